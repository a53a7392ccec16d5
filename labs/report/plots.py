"""The report's figures (matplotlib, Agg backend: no display needed).

``machine_plots(rows, key)`` draws the figures of one machine (host + device model) from
its slice of the comparison table, in teaching order (throughput, scaling efficiency,
accuracy, memory, then the rest); ``allreduce_plot(series, reason, key)`` draws step 01's
bandwidth curves.

Each ``plot_*`` function builds one ``Figure`` (no PNG yet, so tests can inspect it) and
its caption, or raises ``NoData`` with the sentence the report prints instead; ``_png``
turns a figure into PNG bytes. The HTML embeds them as data URIs, ``--generate-plots``
also saves them.

Every figure is made for a phone as much as for a laptop: 5.2 in wide at 100 dpi (520 px)
with 10-point text or larger, so scaled to a 360 px screen text is still over 9 px tall.
Nothing is drawn outside the figure: legends sit below the axes in as many columns as fit
and the figure grows with its rows; values of bar charts are a column of labels right of
the bars. Long labels are wrapped, never cut: see ``wrap_label``. Lines of 1 to 20 runs
stay apart: each configuration has its own colour and marker (one per row of ``rows``,
the same in every figure of the section), each method its own line style, and a line
drawn later is thinner, its hollow markers smaller, so identical runs show as two lines.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import re
from dataclasses import dataclass

import matplotlib
import matplotlib.image

matplotlib.use("Agg")  # before anything imports pyplot: no display, no GUI toolkit

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullLocator  # noqa: E402

import pandas as pd  # noqa: E402

from labs import fmt  # noqa: E402
from labs.report.output import GENERATOR  # noqa: E402

COLORS = {"single": "#6b7280", "dp": "#d97706", "ddp": "#2563eb"}
METHOD_NAMES = {"single": "single device", "dp": "DataParallel", "ddp": "DDP"}
UNRELIABLE = "#d1d5db"  # the fill of anything flagged unreliable
INK = "#111827"
DPI = 100
WIDTH = 5.2  # inches: 520 px, two side by side on a laptop, one scaled down on a phone
FONT = 10.0  # points: every text of a figure is at least this large
LABEL_FONT = 10.5  # axis labels
MAX_HEIGHT = 24.0  # inches: a figure never grows past this, whatever the data
# Text from result files (device, run, model, setting and file names) reaches tick labels,
# legends and annotations. Every figure is built and saved with these settings, so each
# text is drawn as the characters it holds: mathtext would read "$...$" as a formula (and
# a malformed one stops the drawing), TeX would read "\\", "%", "_". A figure that wants
# a formula sets parse_math=True on that one text of its own.
LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False}
STYLE = {**LITERAL_TEXT, "font.size": FONT, "axes.labelsize": LABEL_FONT,
         "xtick.labelsize": FONT, "ytick.labelsize": FONT, "legend.fontsize": FONT}

# Lines: a colour and a marker per configuration (tab10 without its grey, which reads as
# "flagged"), a line style per method. 9 colours and 8 markers repeat together only after
# 72 configurations.
PALETTE = [to_hex(c) for c in matplotlib.colormaps["tab10"].colors if to_hex(c) != "#7f7f7f"]
MARKERS = ("o", "s", "^", "D", "v", "p", "h", "P")
LINESTYLES = {"single": "-", "dp": "--", "ddp": "-."}
# Labels: wrapped at their " · " separators into lines of at most LINE characters; a part
# is never split, and one part longer than PART characters loses its middle to an "…".
LINE, PART = 28, 32
KEY = re.compile(r"[a-z0-9_]+")


class NoData(Exception):
    """A plot without data: the message says why, in a sentence."""


@dataclass
class Plot:
    key: str          # file-name safe: "throughput", or "throughput_<machine key>"
    title: str
    png: bytes | None
    reason: str | None = None  # why there is no figure (png is None)
    caption: str = ""
    primary: bool = False  # shown open in the machine's section; the rest are collapsed
    metric: str = ""  # "throughput", "efficiency", ... (the key without the machine)

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png or b"").decode("ascii")


# --- text --------------------------------------------------------------------------------

def wrap_label(label) -> str:
    """``label`` on lines of at most ``LINE`` characters (or one part, where a part alone
    is longer), broken only after its " · " separators (each line but the last ends with
    " ·"), so no setting is ever cut in two. The one shortening: a part over ``PART``
    characters keeps its start and end around an "…". ``unwrap_label`` gives back the
    label (whole where no part is over ``PART`` characters). Used for every label of a
    run on a figure: tick labels and legends alike."""
    parts = [_shorten(p) for p in str(label).split(" · ")]
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 3 + len(part) <= LINE:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    return " ·\n".join(lines)


def unwrap_label(text: str) -> str:
    return text.replace(" ·\n", " · ")


def _shorten(part: str) -> str:
    if len(part) <= PART:
        return part
    keep = PART - 1
    return part[: keep - keep // 3] + "…" + part[len(part) - keep // 3:]


@functools.lru_cache(maxsize=1)
def _renderer() -> RendererAgg:
    return RendererAgg(8, 8, DPI)  # for measuring text before a figure exists


def _text_px(text: str, size: float = FONT) -> tuple[float, int]:
    """(width in pixels, number of lines) of ``text`` drawn at ``size`` points."""
    prop = FontProperties(size=size)
    lines = text.split("\n")
    width = max(_renderer().get_text_width_height_descent(line or " ", prop, ismath=False)[0]
                for line in lines)
    return width, len(lines)


EM = FONT * DPI / 72  # pixels
LINE_IN = 1.25 * FONT / 72  # inches per line of legend or tick text


def _legend_layout(labels: list[str]) -> tuple[int, float]:
    """(columns, height in inches) of a legend of ``labels`` below the axes: the most
    columns whose total width fits the figure, as matplotlib fills them (consecutive
    entries in a column, the first columns one entry longer)."""
    if not labels:
        return 1, 0.0
    sizes = [_text_px(label) for label in labels]
    entries = [w + 2.8 * EM for w, _ in sizes]  # handle (2 em) and its gap (0.8 em)
    room = WIDTH * DPI - 2 * 0.4 * EM - 12  # the border pad, and a margin
    for ncol in range(min(len(labels), 6), 0, -1):
        columns = np.array_split(np.arange(len(labels)), ncol)
        width = sum(max(entries[i] for i in c) for c in columns) + (ncol - 1) * 2.0 * EM
        if width <= room or ncol == 1:
            break
    rows = len(columns[0])
    lines = sum(max(sizes[c[r]][1] for c in columns if r < len(c)) for r in range(rows))
    return ncol, lines * LINE_IN + (rows - 1) * 0.5 * FONT / 72 + 0.2


def _legend(fig: Figure, handles: list, labels: list[str] | None = None) -> None:
    """Below the axes (it never hides data), in the columns ``_legend_layout`` planned."""
    if not handles:
        return
    labels = labels if labels is not None else [h.get_label() for h in handles]
    ncol, _ = _legend_layout(labels)
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=FONT,
               frameon=False)


def _figure(height: float) -> Figure:
    fig = Figure(figsize=(WIDTH, min(MAX_HEIGHT, height)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # so fig.canvas.draw() lays it out, as saving it does
    return fig


def _styled(build):
    """Build the figure with ``STYLE`` (literal text, 10-point fonts) in force."""
    @functools.wraps(build)
    def styled(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return build(*args, **kwargs)
    return styled


def _png(fig: Figure) -> bytes:
    """The pixels ``_finish`` painted, as PNG: saving the figure would draw it all again."""
    buffer = io.BytesIO()
    # The Software entry marks the file as 05's own, so the next run may replace it.
    matplotlib.image.imsave(buffer, np.asarray(fig.canvas.buffer_rgba()), format="png",
                            dpi=DPI, metadata={"Software": GENERATOR})
    return buffer.getvalue()


def _finish(fig: Figure) -> None:
    """Tick labels at ``FONT``; an axis label wider than its axes kept inside the figure.

    The constrained layout makes room for everything but an x-axis label that overhangs
    its axes (a long label over narrow bars): such a label is laid out once, then ends at
    the axes' right edge (the room left of the bars is free below them), and where it
    still does not fit, goes on two lines."""
    for ax in fig.axes:
        ax.tick_params(labelsize=FONT)  # tick labels made later, when drawn, too
    fig.canvas.draw()  # laid out and painted: ``_png`` encodes these pixels
    box, redraw = fig.bbox, False
    for ax in fig.axes:
        label = ax.xaxis.label
        text = label.get_text()
        if not text or box.x0 <= label.get_window_extent().x0 and \
                label.get_window_extent().x1 <= box.x1:
            continue
        ax.set_xlabel(text, loc="right")
        redraw = True
        fig.draw_without_rendering()
        if label.get_window_extent().x0 < box.x0 and " " in text:
            words = text.split(" ")
            half = min(range(1, len(words)), key=lambda k: abs(
                len(" ".join(words[:k])) - len(" ".join(words[k:]))))
            ax.set_xlabel(" ".join(words[:half]) + "\n" + " ".join(words[half:]),
                          loc="center")
    if redraw:
        fig.canvas.draw()
    # Laid out: drawing it again (a test saving it) need not run the layout a second time.
    fig.set_layout_engine("none")


# --- bar charts: one row per configuration -----------------------------------------------

def _row_height(label: str) -> float:
    return max(0.34, 0.2 * label.count("\n") + 0.3)


def _bar_figure(labels: list[str], legend: list[str]) -> Figure:
    """A figure for one bar per label: taller with each row and each legend line."""
    rows = sum(_row_height(label) for label in labels)
    return _figure(0.75 + rows + _legend_layout(legend)[1])


def _bar_axes(fig: Figure, labels: list[str], values: list[str], xlabel: str):
    """The axes: wrapped labels left, one row each, the first on top; ``values`` as a
    column of labels right of the plot, so no value is ever drawn past the figure."""
    ax = fig.add_subplot()
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first row on top, as in the table
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(len(values)), values)
    right.tick_params(length=0, labelsize=FONT)
    right.spines["right"].set_visible(False)
    ax.set_xlabel(xlabel, fontsize=LABEL_FONT)
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return ax


def unreliable(rows: pd.DataFrame) -> list[bool]:
    """Rows the analysis flagged: a non-empty ``flags`` list. No column means no flags."""
    if "flags" not in rows.columns:
        return [False] * len(rows)
    return [isinstance(f, (list, tuple)) and len(f) > 0 for f in rows["flags"]]


def _paint(bars, strategies, flagged: list[bool]) -> None:
    """Method colour for trusted bars; grey with hatching in the method's colour for
    flagged ones, so an unreliable bar never reads as an ordinary one."""
    for bar, strategy, bad in zip(bars, strategies, flagged):
        color = COLORS.get(strategy, "#888888")
        if bad:
            bar.set(facecolor=UNRELIABLE, edgecolor=color, hatch="///", linewidth=0.8)
        else:
            bar.set(facecolor=color)


def _method_handles(strategies, flagged: bool) -> list:
    present = set(strategies)
    handles = [Patch(facecolor=COLORS[s], label=METHOD_NAMES[s])
               for s in METHOD_NAMES if s in present]
    if flagged:
        handles.append(Patch(facecolor=UNRELIABLE, edgecolor="#4b5563", hatch="///",
                             label="flagged unreliable"))
    return handles


def _spread(median, p10, p90, scale: float) -> tuple[float, float, float]:
    """(median, low, high) in the plot's unit; a missing percentile collapses onto the
    median, a percentile on the wrong side is clipped to it."""
    med = median * scale
    low = med if p10 is None or pd.isna(p10) else min(p10 * scale, med)
    high = med if p90 is None or pd.isna(p90) else max(p90 * scale, med)
    return med, low, high


def _labels(rows: pd.DataFrame) -> list[str]:
    return [wrap_label(label) for label in rows["label"]]


@_styled
def plot_throughput(table: pd.DataFrame):
    rows = table[table["tp_median"].notna()]
    if rows.empty:
        raise NoData("No completed run measured a throughput.")
    labels = _labels(rows)
    flagged = unreliable(rows)
    handles = _method_handles(rows["strategy"], any(flagged))
    fig = _bar_figure(labels, [h.get_label() for h in handles])
    med = rows["tp_median"].astype(float)
    low = (med - rows["tp_p10"].fillna(med).astype(float)).clip(lower=0)
    high = (rows["tp_p90"].fillna(med).astype(float) - med).clip(lower=0)
    ax = _bar_axes(fig, labels, [fmt.rate(v) for v in med],
                   "images per second (median; whiskers p10–p90)")
    bars = ax.barh(range(len(rows)), med, xerr=[low, high], capsize=3,
                   error_kw={"elinewidth": 1, "ecolor": INK})
    _paint(bars, rows["strategy"], flagged)
    ax.set_xlim(0, float((med + high).max()) * 1.04)
    _legend(fig, handles)
    _finish(fig)
    caption = ("Global throughput of each configuration (images per second over all its "
               "devices); the whiskers span p10 to p90 of the measured steps.")
    if any(flagged):
        caption += " Grey hatched bars are runs flagged unreliable (see the flags)."
    return fig, caption


@_styled
def plot_epoch_time(table: pd.DataFrame):
    rows = table[table["epoch_time_s"].notna()]
    if rows.empty:
        raise NoData("No run recorded epoch times.")
    labels = _labels(rows)
    flagged = unreliable(rows)
    handles = _method_handles(rows["strategy"], any(flagged))
    fig = _bar_figure(labels, [h.get_label() for h in handles])
    seconds = rows["epoch_time_s"].astype(float)
    unit = fmt.unit_for(seconds)  # the axis and every label in one unit
    values = seconds * (1e3 if unit == "ms" else 1.0)
    ax = _bar_axes(fig, labels, [fmt.seconds_in(raw, unit) for raw in seconds],
                   f"{'milliseconds' if unit == 'ms' else 'seconds'} per epoch "
                   f"(median, first left out)")
    bars = ax.barh(range(len(rows)), values)
    _paint(bars, rows["strategy"], flagged)
    ax.set_xlim(0, float(values.max()) * 1.04)
    _legend(fig, handles)
    _finish(fig)
    return fig, ("Wall time per epoch. Epochs of different runs may hold different numbers "
                 "of steps: compare within one configuration, or use throughput.")


@dataclass
class MemoryRow:
    label: str
    peaks: list[float]  # GiB, per device that measured one
    capacity: float | None  # GiB, the largest known total memory of its devices
    strategy: str
    unit: str  # "GPU" or "rank"
    top: int  # the device with the largest peak


def _memory_rows(table: pd.DataFrame) -> list[MemoryRow]:
    out = []
    for _, r in table.iterrows():
        measured = r["mem_by_device"] if isinstance(r["mem_by_device"], list) else []
        peaks = [(i, p / 2**30) for i, p in enumerate(measured)
                 if p is not None and not pd.isna(p)]
        if not peaks:
            continue
        capacities = r["mem_capacity"] if "mem_capacity" in r.index else []
        known = [c / 2**30 for c in (capacities if isinstance(capacities, list) else [])
                 if not fmt.missing(c) and isinstance(c, (int, float)) and c > 0]
        top = max(peaks, key=lambda p: p[1])[0]
        out.append(MemoryRow(wrap_label(r["label"]), [p for _, p in peaks],
                             max(known) if known else None, r["strategy"],
                             "rank" if r["strategy"] == "ddp" else "GPU", top))
    return out


def _memory_value(row: MemoryRow) -> str:
    high, low = max(row.peaks), min(row.peaks)
    if len(row.peaks) > 1 and high - low > 0.05 * high:
        return f"{low:.1f}–{high:.1f} GiB"
    return f"{high:.2f} GiB"


@_styled
def plot_memory(table: pd.DataFrame):
    rows = _memory_rows(table)
    if not rows:
        raise NoData("No run measured device memory: on the CPU PyTorch keeps no allocator "
                     "statistics, so peak memory per GPU is n/a.")
    handles = _method_handles([r.strategy for r in rows], False)
    several = any(len(r.peaks) > 1 for r in rows)
    if several:
        handles.append(Line2D([], [], color=INK, marker="o", markerfacecolor="white",
                              markersize=6, linestyle="none", label="each device's peak"))
    capacity = any(r.capacity for r in rows)
    if capacity:
        handles.append(Line2D([], [], color=INK, marker="|", markersize=12,
                              markeredgewidth=2.5, linestyle="none",
                              label="device's total memory"))
    labels = [r.label for r in rows]
    fig = _bar_figure(labels, [h.get_label() for h in handles])
    ax = _bar_axes(fig, labels, [_memory_value(r) for r in rows],
                   "peak allocated GiB per device (after warmup)")
    ax.barh(range(len(rows)), [max(r.peaks) for r in rows],
            color=[COLORS.get(r.strategy, "#888888") for r in rows])
    for i, r in enumerate(rows):
        if len(r.peaks) > 1:
            ax.plot(r.peaks, [i] * len(r.peaks), linestyle="none", marker="o", markersize=6,
                    markerfacecolor="white", markeredgecolor=INK, markeredgewidth=1.2,
                    zorder=3)
    ticks = [(i, r.capacity) for i, r in enumerate(rows) if r.capacity]
    if ticks:
        ax.vlines([c for _, c in ticks], [i - 0.42 for i, _ in ticks],
                  [i + 0.42 for i, _ in ticks], color=INK, linewidth=2.5)
    right = max([max(r.peaks) for r in rows] + [c for _, c in ticks])
    ax.set_xlim(0, right * 1.04)
    _legend(fig, handles)
    _finish(fig)
    caption = ("Peak memory per device: the bar is the configuration's largest peak"
               + ("; a dot is each device's. Under DataParallel GPU 0 holds the gathered "
                  "outputs and the master copy of the model: its dot is right of the others."
                  if several else "."))
    if capacity:
        caption += " The black tick on each row marks the device's total memory."
    return fig, caption


@_styled
def plot_step_time(table: pd.DataFrame):
    rows = table[table["step_median"].notna()]
    if rows.empty:
        raise NoData("No run recorded step times.")
    unit = fmt.unit_for(pd.concat([rows["step_median"], rows["step_p90"]]))
    scale = 1e3 if unit == "ms" else 1.0
    ranks_of = [[p for p in (r if isinstance(r, (list, tuple)) else []) if p[1] is not None]
                for r in rows["per_rank"]]
    handles = [Line2D([], [], color="#374151", marker="s", markersize=7, linewidth=3,
                      label="global step time: median, bar p10–p90")]
    if any(len(ranks) > 1 for ranks in ranks_of):
        handles.append(Line2D([], [], color="#374151", marker="o", markersize=4,
                              linewidth=1, label="each rank's step time: median, bar p10–p90"))
    labels = _labels(rows)
    fig = _bar_figure(labels, [h.get_label() for h in handles])
    values = [fmt.seconds_in(m, unit) for m in rows["step_median"]]
    ax = _bar_axes(fig, labels, values,
                   f"{'milliseconds' if unit == 'ms' else 'seconds'} per step")
    for i, ((_, r), ranks) in enumerate(zip(rows.iterrows(), ranks_of)):
        color = COLORS.get(r["strategy"], "#888888")
        med, p10, p90 = _spread(r["step_median"], r["step_p10"], r["step_p90"], scale)
        ax.errorbar(med, i, xerr=[[med - p10], [p90 - med]], fmt="s", color=color,
                    markersize=7, elinewidth=3, capsize=0)
        if len(ranks) > 1:
            for k, (_rank, m, rp10, rp90) in enumerate(ranks):
                offset = 0.36 * (k + 1) / (len(ranks) + 1)
                rm, lo, hi = _spread(m, rp10, rp90, scale)
                ax.errorbar(rm, i + offset, xerr=[[rm - lo], [hi - rm]], fmt="o",
                            color=color, markersize=4, elinewidth=1, alpha=0.75)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if unit == "ms"
                                               else f"{v:,.2f}"))
    ax.set_xlim(left=0)
    _legend(fig, handles)
    _finish(fig)
    return fig, ("The global step time is the slowest rank's. A rank whose dots sit to the "
                 "right of the others is a straggler that every other rank waits for.")


# --- lines: one per configuration ----------------------------------------------------------

def config_styles(rows: pd.DataFrame) -> dict:
    """Colour, marker and line style of each configuration (by the row's index), from
    its row's position: the same in every figure drawn from ``rows``."""
    return {index: {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)],
                    "linestyle": LINESTYLES.get(strategy, ":")}
            for i, (index, strategy) in enumerate(zip(rows.index, rows["strategy"]))}


def layered(i: int, n: int) -> dict:
    """The i-th of n lines drawn in a panel: each later line thinner, with a smaller
    hollow marker, on top of the earlier ones, so a line that hides another one exactly
    still shows it around its edges."""
    t = i / (n - 1) if n > 1 else 0.5
    return {"linewidth": 3.4 - 2.2 * t, "markersize": 10.0 - 5.0 * t,
            "markerfacecolor": "white", "markeredgewidth": 1.4, "zorder": 2 + i / 100}


def _epoch_ticks(ax, longest: int) -> None:
    ax.set_xticks(range(1, longest + 1) if longest <= 12 else
                  range(1, longest + 1, math.ceil(longest / 10)))


def _line_figure(panels: float, labels: list[str]) -> Figure:
    return _figure(0.55 + panels + _legend_layout(labels)[1])


def _axes_style(ax) -> None:
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


@_styled
def plot_loss(table: pd.DataFrame):
    rows = table[table["loss_per_epoch"].map(lambda v: isinstance(v, list) and len(v) > 0)]
    if rows.empty:
        raise NoData("No run recorded a loss per epoch.")
    styles = config_styles(table)
    labels = _labels(rows)
    fig = _line_figure(2.9, labels)
    ax = fig.add_subplot()
    for i, ((index, r), label) in enumerate(zip(rows.iterrows(), labels)):
        losses = r["loss_per_epoch"]
        ax.plot(range(1, len(losses) + 1), losses, label=label, **styles[index],
                **layered(i, len(rows)))
    _epoch_ticks(ax, int(rows["loss_per_epoch"].map(len).max()))
    ax.set_xlabel("epoch", fontsize=LABEL_FONT)
    ax.set_ylabel("mean training loss", fontsize=LABEL_FONT)
    _axes_style(ax)
    _legend(fig, *ax.get_legend_handles_labels())
    _finish(fig)
    return fig, ("Same data and seed should give similar curves for every method: a curve "
                 "far from the others points to a different effective batch or learning "
                 "rate. Lines drawn later are thinner: one hiding another shows it at its "
                 "edges.")


@_styled
def plot_accuracy(table: pd.DataFrame):
    """Validation accuracy per configuration: against epochs (the math: same data seen)
    and against training wall time (the speed: who gets there first), one above the
    other."""
    rows = (table[table["eval"].map(lambda e: isinstance(e, list) and len(e) > 0)]
            if "eval" in table.columns else table.iloc[0:0])
    if rows.empty:
        raise NoData("No run evaluated a validation split (synthetic and fake data have "
                     "random labels; train with --data shapes, or local data, to see "
                     "accuracy).")
    styles = config_styles(table)
    labels = _labels(rows)
    targets = sorted({float(t) for t in rows.get("target_accuracy", [])
                      if not fmt.missing(t)})
    fig = _line_figure(2 * 2.3, labels + ["target accuracy"] * bool(targets))
    by_epoch, by_time = fig.subplots(2, 1, sharey=True)
    for i, ((index, r), label) in enumerate(zip(rows.iterrows(), labels)):
        points = r["eval"]
        style = {**styles[index], **layered(i, len(rows))}
        by_epoch.plot([p["epoch"] for p in points], [100 * p["accuracy"] for p in points],
                      label=label, **style)
        timed = [p for p in points if p["elapsed_s"] is not None]
        by_time.plot([p["elapsed_s"] for p in timed], [100 * p["accuracy"] for p in timed],
                     **style)
    for ax in (by_epoch, by_time):
        for k, target in enumerate(targets):
            ax.axhline(100 * target, color=INK, linestyle=":", linewidth=1.2,
                       label="target accuracy" if k == 0 and ax is by_epoch else None)
        _axes_style(ax)
        ax.set_ylabel("top-1 accuracy (%)", fontsize=LABEL_FONT)
    _epoch_ticks(by_epoch, max(p["epoch"] for e in rows["eval"] for p in e))
    by_epoch.set_xlabel("epoch", fontsize=LABEL_FONT)
    by_epoch.set_ylim(0, 100)
    by_time.set_xlabel("training wall time (s, evaluation left out)", fontsize=LABEL_FONT)
    by_time.set_xlim(left=0)
    _legend(fig, *by_epoch.get_legend_handles_labels())
    _finish(fig)
    caption = ("Validation accuracy. Top: by epoch, the same epochs should give about the "
               "same accuracy for every method (DDP changes the speed, not the math; a "
               "larger global batch or per-rank batch norm can shift it). Bottom: the same "
               "curves against training time: the first to cross a level is the fastest to "
               "that accuracy.")
    if targets:
        caption += " The dotted line is the target accuracy."
    return fig, caption


# --- scaling efficiency ----------------------------------------------------------------------

VARIANT_FIELDS = {"grad_accum_steps": "accumulate {}", "backend": "{}",
                  "bucket_cap_mb": "bucket {} MB", "comm_hook": "hook {}",
                  "static_graph": "static graph {}", "sync_bn": "SyncBN {}"}
# What tells apart the families (baselines) drawn in one efficiency figure.
FAMILY_FIELDS = {"hardware": "{}", "model": "{}", "img_size": "{}px",
                 "per_device_batch_size": "batch {}/device", "amp": "amp {}",
                 "channels_last": "NHWC {}", "compile": "compile {}", "data": "{}",
                 "cpu_threads": "threads {}"}


def _setting(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "on" if value else "off"
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _names(rows: pd.DataFrame, fields: dict[str, str]) -> list[str]:
    """Per row, the ``fields`` whose setting differs between ``rows``, as words."""
    differ = [f for f in fields
              if f in rows.columns and rows[f].map(_setting).nunique() > 1]
    return [" · ".join(fields[f].format(_setting(r[f]).replace("NVIDIA ", ""))
                       for f in differ) for _, r in rows.iterrows()]


def _variant_names(rows: pd.DataFrame) -> list[str]:
    """The settings that differ between ``rows`` (one method on one family), per row."""
    return _names(rows, VARIANT_FIELDS)


def efficiency_points(table: pd.DataFrame) -> pd.DataFrame:
    """One point per DataParallel / DDP configuration on two or more devices with a
    measured efficiency. World size 1 measures a wrapper's overhead, not scaling: it is
    never a point (its speedup is in the table). ``variant`` names the settings (bucket
    size, comm hook, ...) that tell apart the configurations of one method on one family,
    ``family_name`` the families; one line is drawn per (family, method, variant)."""
    wrappers = table[table["strategy"].isin(["dp", "ddp"])].copy()
    wrappers["n"] = pd.to_numeric(wrappers["n_devices"], errors="coerce")
    wrappers["pct"] = 100 * pd.to_numeric(wrappers["efficiency"], errors="coerce")
    wrappers["unreliable"] = unreliable(wrappers)
    points = wrappers[(wrappers["n"] >= 2) & wrappers["pct"].notna()].copy()
    points["n"] = points["n"].astype(int)
    points["variant"] = ""
    points["family_name"] = ""
    if points.empty:
        return points
    if "family" not in points.columns:
        points["family"] = ""
    for _, group in points.groupby(["family", "strategy"], sort=False):
        points.loc[group.index, "variant"] = _variant_names(group)
    firsts = points.drop_duplicates("family")
    names = dict(zip(firsts["family"], _names(firsts, FAMILY_FIELDS)))
    points["family_name"] = points["family"].map(names)
    points["method_order"] = points["strategy"].map({"dp": 0, "ddp": 1})
    return points.sort_values(["family", "method_order", "variant", "n"], kind="stable")


def point_scaling(rows: pd.DataFrame, points: pd.DataFrame) -> pd.Series:
    """Per efficiency point: "strong" where its row says the global batch stayed fixed
    (``scaling_mode`` or ``scaling`` "strong"), "weak" where it kept its baseline's
    per-device batch (the lab's way: the global batch grows with N), else ""."""
    def said(p) -> str:
        for column in ("scaling_mode", "scaling"):
            value = p.get(column)
            if isinstance(value, str) and value.strip():
                return value.strip().lower()
        return ""

    baselines = rows[rows["strategy"] == "single"]
    batch_of = dict(zip(baselines["family"], baselines["per_device_batch_size"])) \
        if {"family", "per_device_batch_size"} <= set(baselines.columns) else {}
    kinds = []
    for _, p in points.iterrows():
        own = p.get("per_device_batch_size")
        # A baseline matches only with the same per-device batch; one on another host
        # (not in ``rows``) has it too.
        base = batch_of.get(p.get("family"), own)
        if said(p) == "strong":
            kinds.append("strong")
        else:
            kinds.append("weak" if _setting(base) == _setting(own) else "")
    return pd.Series(kinds, index=points.index, dtype=object)


def scaling_kind(kinds: pd.Series) -> str:
    """"weak" or "strong" when every point is, else "mixed"."""
    values = set(kinds)
    return values.pop() if len(values) == 1 and values <= {"weak", "strong"} else "mixed"


def _batch_words(values) -> str:
    known = sorted({int(v) for v in pd.to_numeric(pd.Series(list(values)), errors="coerce")
                    .dropna()})
    return " or ".join(str(v) for v in known) or "its"


@_styled
def plot_efficiency(table: pd.DataFrame):
    points = efficiency_points(table)
    if points.empty:
        one = table[table["strategy"].isin(["dp", "ddp"])
                    & (pd.to_numeric(table["n_devices"], errors="coerce") == 1)]
        if not one.empty:
            raise NoData("No scaling efficiency: every DataParallel or DDP run here used one "
                         "device, and world size 1 measures the wrapper's overhead, not "
                         "scaling (its speedup over the baseline is in the table). Run on "
                         "two or more devices.")
        raise NoData("No scaling efficiency could be computed (it needs a run on two or "
                     "more devices and a matching single-device baseline).")
    points["scaling_kind"] = point_scaling(table, points)
    kind = scaling_kind(points["scaling_kind"])
    good = points[~points["unreliable"]]
    lines = []
    for (_, strategy, variant, how), line in good.groupby(
            ["family", "strategy", "variant", "scaling_kind"], sort=False):
        name = METHOD_NAMES[strategy]
        words = [name, variant, line["family_name"].iloc[0]]
        if kind == "mixed" and how:
            words.append(how)
        lines.append((wrap_label(" · ".join(w for w in words if w)), strategy, line))
    labels = [label for label, _, _ in lines]
    flagged = points[points["unreliable"]]
    extra = (["flagged unreliable (not joined)"] * (not flagged.empty)
             + ["single-device baseline (100% by definition)", "ideal scaling (100%)"])
    fig = _line_figure(3.4, labels + extra)
    ax = fig.add_subplot()
    for i, (label, strategy, line) in enumerate(lines):
        ax.plot(line["n"], line["pct"], label=label, color=PALETTE[i % len(PALETTE)],
                marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[strategy],
                **layered(i, len(lines)))
    if not flagged.empty:
        ax.scatter(flagged["n"], flagged["pct"], marker="X", s=80, color=UNRELIABLE,
                   edgecolors="#4b5563", zorder=4, label="flagged unreliable (not joined)")
    if len(lines) <= 2 and len(points) <= 10:  # few points: their values on the figure
        for _, p in points.iterrows():
            ax.annotate(f"{p['pct']:.0f}%", (p["n"], p["pct"]), textcoords="offset points",
                        xytext=(0, 9), ha="center", fontsize=FONT,
                        color="#6b7280" if p["unreliable"] else INK)
    ax.scatter([1], [100], marker="*", s=180, color=INK, zorder=5,
               label="single-device baseline (100% by definition)")
    ax.axhline(100, color=INK, linestyle=":", linewidth=1.2, label="ideal scaling (100%)")
    ns = sorted({1, *points["n"]})
    top = ns[-1]
    if top >= 8:  # 1, 2, 4, 8, 16 evenly spaced
        ax.set_xscale("log", base=2)
        ax.set_xlim(0.8, top * 1.3)
        ax.xaxis.set_minor_locator(NullLocator())
    else:
        ax.set_xlim(0.6, top + 0.5)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("devices N (DataParallel: GPUs · DDP: world size)", fontsize=LABEL_FONT)
    what = {"weak": "weak-scaling", "strong": "strong-scaling"}.get(kind, "scaling")
    ax.set_ylabel(f"{what} efficiency (%)", fontsize=LABEL_FONT)
    ax.set_ylim(0, max(115.0, float(points["pct"].max()) + 15))
    _axes_style(ax)
    _legend(fig, *ax.get_legend_handles_labels())
    _finish(fig)
    return fig, _efficiency_caption(kind, points)


def _efficiency_caption(kind: str, points: pd.DataFrame) -> str:
    if kind == "weak":
        how = (f"Weak scaling: every device kept the baseline's per-device batch "
               f"({_batch_words(points.get('per_device_batch_size', []))} images), so the "
               f"global batch grew with N. ")
    elif kind == "strong":
        how = (f"Strong scaling: the global batch stayed fixed "
               f"({_batch_words(points.get('global_batch_size', []))} images), split over "
               f"the N devices. ")
    else:
        how = ("Lines marked weak kept the per-device batch (the global batch grew with "
               "N); lines marked strong kept the global batch fixed. ")
    return (how + "Efficiency = throughput_N / (N × baseline throughput). Only runs on two "
            "or more devices are points: on one device a wrapper's run measures its "
            "overhead, not scaling (see its speedup in the table). The star is the "
            "baseline itself; the dotted line is perfect scaling."
            + (" Grey crosses are points flagged unreliable, not joined to their line."
               if points["unreliable"].any() else ""))


# --- step 01's all-reduce ---------------------------------------------------------------------

@_styled
def plot_allreduce(series: list[dict], reason: str | None):
    if not series:
        raise NoData(reason or "No all-reduce measurement.")
    drawn = []
    for i, s in enumerate(series):
        drawn.append((i, s, wrap_label(f"bus bandwidth · {s['label']}")))
        if all(p[2] is not None for p in s["points"]):
            drawn.append((i, s, wrap_label(f"algorithm bandwidth · {s['label']}")))
    wrong = [p for s in series for p in s["points"] if not p[4]]
    labels = [label for _, _, label in drawn] + ["wrong result"] * bool(wrong)
    fig = _line_figure(3.0, labels)
    ax = fig.add_subplot()
    for k, (i, s, label) in enumerate(drawn):
        sizes = [p[0] for p in s["points"]]
        bus = label.startswith("bus")
        ax.plot(sizes, [p[1 if bus else 2] for p in s["points"]], label=label,
                color=PALETTE[i % len(PALETTE)], linestyle="-" if bus else "--",
                marker=MARKERS[k % len(MARKERS)], **layered(k, len(drawn)))
    if wrong:
        ax.scatter([p[0] for p in wrong], [p[1] for p in wrong], marker="x", s=70,
                   color="#dc2626", linewidths=2, zorder=5, label="wrong result")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt.size(v)))
    ax.xaxis.set_minor_locator(NullLocator())
    sizes = sorted({p[0] for s in series for p in s["points"]})
    if len(sizes) > 5:  # every other size at most: labels of 10 points do not collide
        step = math.ceil(len(sizes) / 5)
        ax.set_xticks(sizes[::step])
    ax.set_xlabel("message size", fontsize=LABEL_FONT)
    ax.set_ylabel("GB/s", fontsize=LABEL_FONT)
    ax.set_ylim(bottom=0)
    _axes_style(ax)
    _legend(fig, *ax.get_legend_handles_labels())
    _finish(fig)
    caption = ("algbw = size / time; busbw = algbw × 2(n−1)/n, comparable with the link's "
               "bandwidth (nccl-tests definitions). Small messages are latency-bound.")
    if wrong:
        caption += f" Red crosses: {fmt.plural(len(wrong), 'size')} returned a wrong result."
    return fig, caption


# --- the figures of a section ----------------------------------------------------------------

# In teaching order: what the lab measures, then whether it scales, then whether it still
# learns, then what it costs, then the details.
PLOTS = (
    ("throughput", "Throughput by method", plot_throughput),
    ("efficiency", "Scaling efficiency against the ideal", plot_efficiency),
    ("accuracy", "Validation accuracy by epoch and by training time", plot_accuracy),
    ("memory", "Peak memory per device", plot_memory),
    ("step_time", "Step-time distribution", plot_step_time),
    ("loss", "Loss per epoch", plot_loss),
    ("epoch_time", "Time per epoch", plot_epoch_time),
)
# Shown open: throughput, and the first of these that could be drawn.
SECOND = ("efficiency", "accuracy")


def _draw(key: str, metric: str, title: str, draw) -> Plot:
    try:
        with matplotlib.rc_context(STYLE):  # texts are made while drawing too
            fig, caption = draw()
            png = _png(fig)
    except NoData as why:
        return Plot(key, title, None, str(why), metric=metric)
    except Exception as err:  # noqa: BLE001 - odd data must not cost the whole report
        return Plot(key, title, None, f"This figure could not be drawn "
                                      f"({type(err).__name__}: {err}).", metric=metric)
    return Plot(key, title, png, None, caption, metric=metric)


def _check_key(key: str) -> str:
    if not KEY.fullmatch(key):
        raise ValueError(f"a machine key is [a-z0-9_]+, not {key!r}")
    return key


def _figures(rows: pd.DataFrame, suffix: str) -> list[Plot]:
    out = []
    for metric, title, draw in PLOTS:
        key = metric + suffix
        if rows.empty:
            out.append(Plot(key, title, None, "No completed run to plot.", metric=metric))
        else:
            out.append(_draw(key, metric, title, functools.partial(draw, rows)))
    out[0].primary = True
    second = next((p for p in out if p.metric in SECOND and p.png is not None), None)
    if second is not None:
        second.primary = True
    return out


def machine_plots(rows: pd.DataFrame, key: str) -> list[Plot]:
    """The figures of one machine from its rows of ``analysis.compare``'s table, in
    teaching order (throughput, scaling efficiency, accuracy, memory, step time, loss,
    epoch time). Each has ``key`` ``f"{metric}_{key}"``; one without data has ``png``
    None and its reason. ``primary`` marks the two shown open: throughput, and scaling
    efficiency where it could be drawn, else accuracy."""
    return _figures(rows, "_" + _check_key(key))


def allreduce_plot(series: list[dict], reason: str | None, key: str) -> Plot:
    """Step 01's all-reduce bandwidth for one machine (``environment.allreduce_series``
    of its environment files), key ``allreduce_<key>``."""
    return _draw(f"allreduce_{_check_key(key)}", "allreduce", "All-reduce bandwidth (step 01)",
                 lambda: plot_allreduce(series, reason))
