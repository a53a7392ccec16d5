"""The report's figures (matplotlib, Agg backend: no display needed).

Each ``plot_*`` function draws one figure from the comparison table, or raises ``NoData``
with the sentence the report prints instead. ``make_plots`` returns every figure as PNG
bytes; the HTML embeds them as data URIs, ``--generate-plots`` also saves them.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: no display, no GUI toolkit

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

import pandas as pd  # noqa: E402

from labs import fmt  # noqa: E402
from labs.report.output import GENERATOR  # noqa: E402

COLORS = {"single": "#6b7280", "dp": "#d97706", "ddp": "#2563eb"}
METHOD_NAMES = {"single": "single device", "dp": "DataParallel", "ddp": "DDP"}
UNRELIABLE = "#d1d5db"  # the fill of anything flagged unreliable
DPI = 100
WIDTH = 8.0
# Text from result files (device, run, model, setting and file names) reaches tick labels,
# legends and annotations. Every figure is built and saved with these settings, so each
# text is drawn as the characters it holds: mathtext would read "$...$" as a formula (and
# a malformed one stops the drawing), TeX would read "\\", "%", "_". A figure that wants
# a formula sets parse_math=True on that one text of its own.
LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False}


class NoData(Exception):
    """A plot without data: the message says why, in a sentence."""


@dataclass
class Plot:
    key: str
    title: str
    png: bytes | None
    reason: str | None = None
    caption: str = ""

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png or b"").decode("ascii")


def _figure(rows: int) -> Figure:
    return Figure(figsize=(WIDTH, min(12.0, 1.4 + 0.42 * max(rows, 2))), dpi=DPI,
                  layout="constrained")


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    # The Software entry marks the file as 05's own, so the next run may replace it.
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": GENERATOR})
    return buffer.getvalue()


def _style(ax, xlabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.invert_yaxis()  # first row on top, as in the table


def _colors(table: pd.DataFrame) -> list[str]:
    return [COLORS.get(s, "#888888") for s in table["strategy"]]


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


def _method_handles(strategies: pd.Series, flagged: bool) -> list:
    handles = [Patch(facecolor=COLORS[s], label=METHOD_NAMES[s])
               for s in METHOD_NAMES if s in set(strategies)]
    if flagged:
        handles.append(Patch(facecolor=UNRELIABLE, edgecolor="#4b5563", hatch="///",
                             label="flagged unreliable"))
    return handles


def _legend(fig: Figure, handles: list, columns: int = 4) -> None:
    """Below the axes, so it never hides data."""
    if handles:
        fig.legend(handles=handles, loc="outside lower center",
                   ncol=min(len(handles), columns), fontsize=8, frameon=False)


def _spread(median, p10, p90, scale: float) -> tuple[float, float, float]:
    """(median, low, high) in the plot's unit; a missing percentile collapses onto the
    median, a percentile on the wrong side is clipped to it."""
    med = median * scale
    low = med if p10 is None or pd.isna(p10) else min(p10 * scale, med)
    high = med if p90 is None or pd.isna(p90) else max(p90 * scale, med)
    return med, low, high


def efficiency_points(table: pd.DataFrame) -> pd.DataFrame:
    """One point per DataParallel / DDP configuration with a measured efficiency: N >= 2
    from ``efficiency``, N = 1 from the wrapper run's own speedup over the baseline.
    ``variant`` names the settings (bucket size, comm hook, ...) that tell apart the
    configurations of one method on one family; one line is drawn per variant."""
    wrappers = table[table["strategy"].isin(["dp", "ddp"])].copy()
    one = wrappers["n_devices"] == 1
    efficiency = pd.to_numeric(wrappers["efficiency"], errors="coerce")
    speedup = pd.to_numeric(wrappers["speedup"], errors="coerce")
    wrappers["pct"] = 100 * efficiency.where(~one, speedup)
    wrappers["n"] = wrappers["n_devices"].astype(int)
    wrappers["unreliable"] = unreliable(wrappers)
    points = wrappers[wrappers["pct"].notna()].copy()
    points["variant"] = ""
    for _, group in points.groupby(["family", "strategy"], sort=False):
        points.loc[group.index, "variant"] = _variant_names(group)
    return points.sort_values(["family", "strategy", "variant", "n"], kind="stable")


def _family_name(row) -> str:
    return f"{str(row['hardware']).replace('NVIDIA ', '')}, {row['model']}"


VARIANT_FIELDS = {"grad_accum_steps": "accumulate {}", "backend": "{}",
                  "bucket_cap_mb": "bucket {} MB", "comm_hook": "hook {}",
                  "static_graph": "static graph {}", "sync_bn": "SyncBN {}"}


def _setting(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _variant_names(rows: pd.DataFrame) -> list[str]:
    """The settings that differ between ``rows`` (one method on one family), per row."""
    fields = [f for f in VARIANT_FIELDS
              if f in rows.columns and rows[f].map(_setting).nunique() > 1]
    return [" · ".join(VARIANT_FIELDS[f].format(_setting(r[f])) for f in fields)
            for _, r in rows.iterrows()]


@dataclass
class MemoryBar:
    label: str
    peak: float
    capacity: float | None
    strategy: str
    first: bool  # the first device of its configuration


def _memory_bars(table: pd.DataFrame) -> list[MemoryBar]:
    bars = []
    for _, r in table.iterrows():
        unit = "rank" if r["strategy"] == "ddp" else "GPU"
        capacities = r["mem_capacity"] if "mem_capacity" in r.index else []
        first = True
        for i, peak in enumerate(r["mem_by_device"]):
            if peak is None:
                continue
            capacity = capacities[i] if isinstance(capacities, list) and \
                i < len(capacities) else None
            known = not fmt.missing(capacity) and capacity > 0
            bars.append(MemoryBar(f"{r['label']} · {unit} {i}", peak,
                                  capacity if known else None, r["strategy"], first))
            first = False
    return bars


def plot_throughput(table: pd.DataFrame):
    rows = table[table["tp_median"].notna()]
    if rows.empty:
        raise NoData("No completed run measured a throughput.")
    fig = _figure(len(rows) + 1)  # one more row's height for the legend
    ax = fig.add_subplot()
    y = range(len(rows))
    med = rows["tp_median"].astype(float)
    low = (med - rows["tp_p10"].fillna(med).astype(float)).clip(lower=0)
    high = (rows["tp_p90"].fillna(med).astype(float) - med).clip(lower=0)
    flagged = unreliable(rows)
    bars = ax.barh(y, med, xerr=[low, high], capsize=3,
                   error_kw={"elinewidth": 1, "ecolor": "#111827"})
    _paint(bars, rows["strategy"], flagged)
    for i, (value, top) in enumerate(zip(med, med + high)):
        ax.text(top, i, f"  {fmt.rate(value)}", va="center", fontsize=8)
    ax.set_yticks(list(y), rows["label"])
    ax.set_xlim(0, float((med + high).max()) * 1.18)
    _style(ax, "images per second (median, bars p10–p90)")
    _legend(fig, _method_handles(rows["strategy"], any(flagged)))
    caption = "Global throughput; the whiskers span p10 to p90 of the measured steps."
    if any(flagged):
        caption += " Grey hatched bars are runs flagged unreliable (see the flags)."
    return fig, caption


def plot_epoch_time(table: pd.DataFrame):
    rows = table[table["epoch_time_s"].notna()]
    if rows.empty:
        raise NoData("No run recorded epoch times.")
    fig = _figure(len(rows))
    ax = fig.add_subplot()
    seconds = rows["epoch_time_s"].astype(float)
    unit = fmt.unit_for(seconds)  # the axis and every label in one unit
    values = seconds * (1e3 if unit == "ms" else 1.0)
    ax.barh(range(len(rows)), values, color=_colors(rows))
    for i, (value, raw) in enumerate(zip(values, seconds)):
        ax.text(value, i, f"  {fmt.seconds_in(raw, unit)}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), rows["label"])
    ax.set_xlim(0, float(values.max()) * 1.18)
    _style(ax, f"{'milliseconds' if unit == 'ms' else 'seconds'} per epoch "
               f"(median, first epoch left out)")
    return fig, ("Wall time per epoch. Epochs of different runs may hold different numbers "
                 "of steps: compare within one configuration, or use throughput.")


def plot_memory(table: pd.DataFrame):
    bars = _memory_bars(table)
    if not bars:
        raise NoData("No run measured device memory: on the CPU PyTorch keeps no allocator "
                     "statistics, so peak memory per GPU is n/a.")
    fig = _figure(len(bars) + 1)
    ax = fig.add_subplot()
    gib = [b.peak / 2**30 for b in bars]
    capacity = [b.capacity / 2**30 if b.capacity else None for b in bars]
    ax.barh(range(len(bars)), gib, color=[COLORS.get(b.strategy, "#888") for b in bars])
    for i, (value, total) in enumerate(zip(gib, capacity)):
        of = f" of {total:.0f}" if total else ""
        ax.text(value, i, f"  {value:.2f}{of} GiB", va="center", fontsize=8)
        if total:
            ax.vlines(total, i - 0.42, i + 0.42, color="#111827", linewidth=2.5)
    for i, bar in enumerate(bars):
        if bar.first and i:
            ax.axhline(i - 0.5, color="#9ca3af", linewidth=0.6)
    ax.set_yticks(range(len(bars)), [b.label for b in bars])
    ax.set_xlim(0, max(gib + [c for c in capacity if c]) * 1.18)
    _style(ax, "peak allocated GiB per device (after warmup)")
    handles = _method_handles(pd.Series([b.strategy for b in bars]), False)
    if any(capacity):
        handles.append(Line2D([], [], color="#111827", marker="|", markersize=12,
                              markeredgewidth=2.5, linestyle="none",
                              label="device's total memory"))
    _legend(fig, handles)
    caption = ("Peak memory of every GPU. Under DataParallel GPU 0 holds the gathered "
               "outputs and the master copy of the model: its bar is longer.")
    if any(capacity):
        caption += " The black tick on each bar's row marks that device's total memory."
    return fig, caption


def plot_efficiency(table: pd.DataFrame):
    if table["efficiency"].notna().sum() == 0:
        raise NoData("No scaling efficiency could be computed (it needs a run on two or "
                     "more devices and a matching single-device baseline).")
    points = efficiency_points(table)
    fig = Figure(figsize=(WIDTH, 4.8), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    families = list(dict.fromkeys(points["family"]))
    markers, styles = "osD^v<>p*h", ["-", "--", "-.", ":"]
    for f_index, family in enumerate(families):
        fam = points[points["family"] == family]
        suffix = f" · {_family_name(fam.iloc[0])}" if len(families) > 1 else ""
        for strategy, name in (("dp", "DataParallel"), ("ddp", "DDP")):
            rows = fam[(fam["strategy"] == strategy) & ~fam["unreliable"]]
            # A family keeps its line style; each setting of a method its own marker.
            for v_index, (variant, line) in enumerate(rows.groupby("variant", sort=False)):
                ax.plot(line["n"], line["pct"], marker=markers[v_index % len(markers)],
                        color=COLORS[strategy], linestyle=styles[f_index % len(styles)],
                        label=name + (f" · {variant}" if variant else "") + suffix)
    flagged = points[points["unreliable"]]
    if not flagged.empty:
        ax.scatter(flagged["n"], flagged["pct"], marker="X", s=70, color=UNRELIABLE,
                   edgecolors="#4b5563", zorder=4, label="flagged unreliable (not joined)")
    for _, p in points.iterrows():
        ax.annotate(f"{p['pct']:.0f}%", (p["n"], p["pct"]), textcoords="offset points",
                    xytext=(6, 3), ha="left", fontsize=8,
                    color="#9ca3af" if p["unreliable"] else "#111827")
    ax.scatter([1], [100], marker="*", s=160, color="#111827", zorder=5,
               label="single-device baseline (100% by definition)")
    ax.axhline(100, color="#111827", linestyle=":", linewidth=1, label="ideal scaling (100%)")
    top = int(points["n"].max())
    ax.set_xticks(sorted({1, *points["n"]}))
    ax.set_xlim(0.5, top + 0.12 * top + 0.5)  # room for the labels right of the points
    ax.set_xlabel("devices (DataParallel: GPUs; DDP: world size)")
    ax.set_ylabel("scaling efficiency (%)")
    ax.set_ylim(0, max(110.0, float(points["pct"].max()) + 12))
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    _legend(fig, ax.get_legend_handles_labels()[0], columns=2)
    return fig, ("Efficiency = throughput_N / (N × baseline throughput). At N = 1 a point "
                 "is a wrapper run on one device: its measured throughput over the baseline's, "
                 "i.e. the wrapper's overhead. The star is the baseline itself; the dotted line "
                 "is perfect scaling.")


def plot_step_time(table: pd.DataFrame):
    rows = table[table["step_median"].notna()]
    if rows.empty:
        raise NoData("No run recorded step times.")
    unit = fmt.unit_for(pd.concat([rows["step_median"], rows["step_p90"]]))
    scale = 1e3 if unit == "ms" else 1.0
    fig = _figure(len(rows) + 1)
    ax = fig.add_subplot()
    ranks_drawn = False
    for i, (_, r) in enumerate(rows.iterrows()):
        color = COLORS.get(r["strategy"], "#888")
        med, p10, p90 = _spread(r["step_median"], r["step_p10"], r["step_p90"], scale)
        ax.errorbar(med, i, xerr=[[med - p10], [p90 - med]], fmt="s", color=color,
                    markersize=7, elinewidth=3, capsize=0)
        ranks = [p for p in r["per_rank"] if p[1] is not None]
        if len(ranks) > 1:
            ranks_drawn = True
            for k, (_rank, m, rp10, rp90) in enumerate(ranks):
                offset = 0.32 * (k + 1) / (len(ranks) + 1)
                rm, lo, hi = _spread(m, rp10, rp90, scale)
                ax.errorbar(rm, i + offset, xerr=[[rm - lo], [hi - rm]], fmt="o", color=color,
                            markersize=3, elinewidth=0.8, alpha=0.7)
    ax.set_yticks(range(len(rows)), rows["label"])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if unit == "ms"
                                               else f"{v:,.2f}"))
    _style(ax, f"{'milliseconds' if unit == 'ms' else 'seconds'} per step")
    ax.set_xlim(left=0)
    handles = [Line2D([], [], color="#374151", marker="s", markersize=7, linewidth=3,
                      label="global step time: median, bar p10–p90")]
    if ranks_drawn:
        handles.append(Line2D([], [], color="#374151", marker="o", markersize=3,
                              linewidth=0.8, label="each rank's step time: median, bar p10–p90"))
    _legend(fig, handles)
    return fig, ("The global step time is the slowest rank's. A rank whose dots sit to the "
                 "right of the others is a straggler that every other rank waits for.")


def plot_loss(table: pd.DataFrame):
    rows = table[table["loss_per_epoch"].map(len) > 0]
    if rows.empty:
        raise NoData("No run recorded a loss per epoch.")
    legend_rows = -(-len(rows) // 3)
    fig = Figure(figsize=(WIDTH, 3.8 + 0.2 * legend_rows), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    for i, (_, r) in enumerate(rows.iterrows()):
        losses = r["loss_per_epoch"]
        ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3,
                color=COLORS.get(r["strategy"], "#888"), linestyle=styles[i % 4],
                label=r["label"])
    longest = int(rows["loss_per_epoch"].map(len).max())
    ax.set_xticks(range(1, longest + 1) if longest <= 20 else
                  range(1, longest + 1, max(1, longest // 10)))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss")
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    _legend(fig, ax.get_legend_handles_labels()[0], columns=3)
    return fig, ("Same data and seed should give similar curves for every method: a curve "
                 "far from the others points to a different effective batch or learning rate.")


def plot_accuracy(table: pd.DataFrame):
    """Validation accuracy per method: against epochs (the math: same data seen) and
    against training wall time (the speed: who gets there first)."""
    rows = table[table["eval"].map(bool)] if "eval" in table.columns else table.iloc[0:0]
    if rows.empty:
        raise NoData("No run evaluated a validation split (synthetic and fake data have "
                     "random labels; train with --data shapes, or local data, to see "
                     "accuracy).")
    legend_rows = -(-len(rows) // 3)
    fig = Figure(figsize=(WIDTH, 3.8 + 0.2 * legend_rows), dpi=DPI, layout="constrained")
    by_epoch, by_time = fig.subplots(1, 2, sharey=True)
    styles = ["-", "--", ":", "-."]
    for i, (_, r) in enumerate(rows.iterrows()):
        points = r["eval"]
        style = dict(marker="o", markersize=3, color=COLORS.get(r["strategy"], "#888"),
                     linestyle=styles[i % 4])
        by_epoch.plot([p["epoch"] for p in points], [100 * p["accuracy"] for p in points],
                      label=r["label"], **style)
        timed = [p for p in points if p["elapsed_s"] is not None]
        by_time.plot([p["elapsed_s"] for p in timed], [100 * p["accuracy"] for p in timed],
                     **style)
    targets = {float(t) for t in rows["target_accuracy"] if not fmt.missing(t)}
    for ax in (by_epoch, by_time):
        for target in targets:
            ax.axhline(100 * target, color="#111827", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    longest = max(p["epoch"] for e in rows["eval"] for p in e)
    by_epoch.set_xticks(range(1, longest + 1) if longest <= 20 else
                        range(1, longest + 1, max(1, longest // 10)))
    by_epoch.set_xlabel("epoch")
    by_epoch.set_ylabel("validation accuracy, top-1 (%)")
    by_epoch.set_ylim(0, 100)
    by_time.set_xlabel("training wall time (s, evaluation left out)")
    by_time.set_xlim(left=0)
    _legend(fig, by_epoch.get_legend_handles_labels()[0], columns=3)
    caption = ("Left: the same epochs should give about the same accuracy for every "
               "method (DDP changes the speed, not the math; a larger global batch or "
               "per-rank batch norm can shift it). Right: the same curves against training "
               "time: the first to cross a level is the fastest to that accuracy.")
    if targets:
        caption += " The dotted line is the target accuracy."
    return fig, caption


def plot_allreduce(series: list[dict], reason: str | None):
    if not series:
        raise NoData(reason or "No all-reduce measurement.")
    fig = Figure(figsize=(WIDTH, 4.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    palette = ["#2563eb", "#059669", "#d97706", "#7c3aed", "#dc2626"]
    wrong = 0
    for i, s in enumerate(series):
        color = palette[i % len(palette)]
        sizes = [p[0] for p in s["points"]]
        ax.plot(sizes, [p[1] for p in s["points"]], marker="o", markersize=3, color=color,
                label=f"bus bandwidth · {s['label']}")
        if all(p[2] is not None for p in s["points"]):
            ax.plot(sizes, [p[2] for p in s["points"]], linestyle="--", color=color,
                    alpha=0.6, label=f"algorithm bandwidth · {s['label']}")
        bad = [p for p in s["points"] if not p[4]]
        wrong += len(bad)
        if bad:
            ax.scatter([p[0] for p in bad], [p[1] for p in bad], marker="x", s=60,
                       color="#dc2626", zorder=5)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt.size(v)))
    ax.set_xlabel("message size")
    ax.set_ylabel("GB/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, which="both")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7)
    caption = ("algbw = size / time; busbw = algbw × 2(n−1)/n, comparable with the link's "
               "bandwidth (nccl-tests definitions). Small messages are latency-bound.")
    if wrong:
        caption += f" Red crosses: {fmt.plural(wrong, 'size')} returned a wrong result."
    return fig, caption


PLOTS = (
    ("throughput", "Throughput by method", plot_throughput),
    ("epoch_time", "Time per epoch", plot_epoch_time),
    ("memory", "Peak memory per GPU", plot_memory),
    ("efficiency", "Scaling efficiency against the ideal", plot_efficiency),
    ("step_time", "Step-time distribution", plot_step_time),
    ("loss", "Loss per epoch", plot_loss),
    ("accuracy", "Validation accuracy by epoch and by training time", plot_accuracy),
)


def make_plots(table: pd.DataFrame, allreduce: list[dict],
               allreduce_reason: str | None) -> list[Plot]:
    plots = []
    jobs = [(key, title, (lambda f=f: f(table))) for key, title, f in PLOTS]
    jobs.append(("allreduce", "All-reduce bandwidth (step 01)",
                 lambda: plot_allreduce(allreduce, allreduce_reason)))
    for key, title, draw in jobs:
        if table.empty and key != "allreduce":
            plots.append(Plot(key, title, None, "No completed run to plot."))
            continue
        try:
            with matplotlib.rc_context(LITERAL_TEXT):  # texts are made while drawing too
                fig, caption = draw()
                png = _png(fig)
        except NoData as why:
            plots.append(Plot(key, title, None, str(why)))
            continue
        except Exception as err:  # noqa: BLE001 - odd data must not cost the whole report
            plots.append(Plot(key, title, None, f"This figure could not be drawn "
                                                f"({type(err).__name__}: {err})."))
            continue
        plots.append(Plot(key, title, png, None, caption))
    return plots
