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
from matplotlib.ticker import FuncFormatter  # noqa: E402

import pandas as pd  # noqa: E402

from labs.report import fmt  # noqa: E402

COLORS = {"single": "#6b7280", "dp": "#d97706", "ddp": "#2563eb"}
DPI = 100
WIDTH = 8.0


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
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _style(ax, xlabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.invert_yaxis()  # first row on top, as in the table


def _colors(table: pd.DataFrame) -> list[str]:
    return [COLORS.get(s, "#888888") for s in table["strategy"]]


def plot_throughput(table: pd.DataFrame):
    rows = table[table["tp_median"].notna()]
    if rows.empty:
        raise NoData("No completed run measured a throughput.")
    fig = _figure(len(rows))
    ax = fig.add_subplot()
    y = range(len(rows))
    med = rows["tp_median"].astype(float)
    low = (med - rows["tp_p10"].fillna(med).astype(float)).clip(lower=0)
    high = (rows["tp_p90"].fillna(med).astype(float) - med).clip(lower=0)
    ax.barh(y, med, xerr=[low, high], color=_colors(rows), capsize=3,
            error_kw={"elinewidth": 1, "ecolor": "#111827"})
    for i, (value, top) in enumerate(zip(med, med + high)):
        ax.text(top, i, f"  {fmt.rate(value)}", va="center", fontsize=8)
    ax.set_yticks(list(y), rows["label"])
    ax.set_xlim(0, float((med + high).max()) * 1.18)
    _style(ax, "images per second (median, bars p10–p90)")
    return fig, "Global throughput; the whiskers span p10 to p90 of the measured steps."


def plot_epoch_time(table: pd.DataFrame):
    rows = table[table["epoch_time_s"].notna()]
    if rows.empty:
        raise NoData("No run recorded epoch times.")
    fig = _figure(len(rows))
    ax = fig.add_subplot()
    values = rows["epoch_time_s"].astype(float)
    ax.barh(range(len(rows)), values, color=_colors(rows))
    for i, value in enumerate(values):
        ax.text(value, i, f"  {fmt.seconds(value)}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), rows["label"])
    ax.set_xlim(0, float(values.max()) * 1.18)
    _style(ax, "seconds per epoch (median, first epoch left out)")
    return fig, ("Wall time per epoch. Epochs of different runs may hold different numbers "
                 "of steps: compare within one configuration, or use throughput.")


def plot_memory(table: pd.DataFrame):
    bars = []  # (label, bytes, strategy, first of group)
    for _, r in table.iterrows():
        values = [v for v in r["mem_by_device"] if v is not None]
        if not values:
            continue
        unit = "rank" if r["strategy"] == "ddp" else "GPU"
        for i, value in enumerate(r["mem_by_device"]):
            if value is not None:
                bars.append((f"{r['label']} · {unit} {i}", value, r["strategy"], i == 0))
    if not bars:
        raise NoData("No run measured device memory: on the CPU PyTorch keeps no allocator "
                     "statistics, so peak memory per GPU is n/a.")
    fig = _figure(len(bars))
    ax = fig.add_subplot()
    gib = [b[1] / 2**30 for b in bars]
    ax.barh(range(len(bars)), gib, color=[COLORS.get(b[2], "#888") for b in bars])
    for i, value in enumerate(gib):
        ax.text(value, i, f"  {value:.2f}", va="center", fontsize=8)
    for i, bar in enumerate(bars):
        if bar[3] and i:
            ax.axhline(i - 0.5, color="#9ca3af", linewidth=0.6)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.set_xlim(0, max(gib) * 1.18)
    _style(ax, "peak allocated GiB per device (after warmup)")
    return fig, ("Peak memory of every GPU. Under DataParallel GPU 0 holds the gathered "
                 "outputs and the master copy of the model: its bar is longer.")


def plot_efficiency(table: pd.DataFrame):
    scaled = table[table["efficiency"].notna()]
    if scaled.empty:
        raise NoData("No scaling efficiency could be computed (it needs a run on two or "
                     "more devices and a matching single-device baseline).")
    fig = Figure(figsize=(WIDTH, 4.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    families = list(dict.fromkeys(scaled["family"]))
    markers = "osD^v<>p*h"
    top_n = int(scaled["n_devices"].max())
    for f_index, family in enumerate(families):
        fam = scaled[scaled["family"] == family]
        hw = fam["hardware"].iloc[0].replace("NVIDIA ", "")
        suffix = f" · {hw}, {fam['model'].iloc[0]}" if len(families) > 1 else ""
        for strategy, name in (("dp", "DataParallel"), ("ddp", "DDP")):
            rows = fam[fam["strategy"] == strategy].sort_values("n_devices")
            if rows.empty:
                continue
            xs = [1, *rows["n_devices"].astype(int)]
            ys = [100.0, *(100 * rows["efficiency"].astype(float))]
            ax.plot(xs, ys, marker=markers[f_index % len(markers)], color=COLORS[strategy],
                    label=name + suffix, linestyle="-" if f_index == 0 else "--")
            for x, y_ in zip(xs[1:], ys[1:]):
                ax.annotate(f"{y_:.0f}%", (x, y_), textcoords="offset points",
                            xytext=(0, 7), ha="center", fontsize=8)
    ax.axhline(100, color="#111827", linestyle=":", linewidth=1, label="ideal (100%)")
    ax.set_xticks(range(1, top_n + 1))
    ax.set_xlabel("devices (DataParallel: GPUs; DDP: world size)")
    ax.set_ylabel("scaling efficiency (%)")
    ax.set_ylim(0, max(110.0, float(100 * scaled["efficiency"].max()) + 10))
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, loc="lower left")
    return fig, ("Efficiency = throughput_N / (N × baseline throughput). The dotted line is "
                 "perfect scaling; each line starts at the baseline (N = 1, 100%).")


def plot_step_time(table: pd.DataFrame):
    rows = table[table["step_median"].notna()]
    if rows.empty:
        raise NoData("No run recorded step times.")
    fig = _figure(len(rows))
    ax = fig.add_subplot()
    for i, (_, r) in enumerate(rows.iterrows()):
        med = r["step_median"] * 1e3
        low = med - (r["step_p10"] if r["step_p10"] is not None else r["step_median"]) * 1e3
        high = (r["step_p90"] if r["step_p90"] is not None else r["step_median"]) * 1e3 - med
        color = COLORS.get(r["strategy"], "#888")
        ax.errorbar(med, i, xerr=[[max(low, 0)], [max(high, 0)]], fmt="s", color=color,
                    markersize=7, elinewidth=3, capsize=0)
        ranks = [p for p in r["per_rank"] if p[1] is not None]
        if len(ranks) > 1:
            for k, (rank, m, p10, p90) in enumerate(ranks):
                offset = 0.32 * (k + 1) / (len(ranks) + 1)
                ax.errorbar(m * 1e3, i + offset, fmt="o", color=color, markersize=3,
                            xerr=[[max(m - (p10 or m), 0) * 1e3], [max((p90 or m) - m, 0) * 1e3]],
                            elinewidth=0.8, alpha=0.7)
    ax.set_yticks(range(len(rows)), rows["label"])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    _style(ax, "milliseconds per step\n■ global median, p10–p90   ● each rank's median, "
               "p10–p90")
    ax.set_xlim(left=0)
    return fig, ("The global step time is the slowest rank's. A rank whose dots sit to the "
                 "right of the others is a straggler that every other rank waits for.")


def plot_loss(table: pd.DataFrame):
    rows = table[table["loss_per_epoch"].map(len) > 0]
    if rows.empty:
        raise NoData("No run recorded a loss per epoch.")
    fig = Figure(figsize=(WIDTH, 4.0), dpi=DPI, layout="constrained")
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
    ax.legend(fontsize=7, ncol=2 if len(rows) > 6 else 1, loc="best")
    return fig, ("Same data and seed should give similar curves for every method: a curve "
                 "far from the others points to a different effective batch or learning rate.")


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
            fig, caption = draw()
        except NoData as why:
            plots.append(Plot(key, title, None, str(why)))
            continue
        except Exception as err:  # noqa: BLE001 - odd data must not cost the whole report
            plots.append(Plot(key, title, None, f"This figure could not be drawn "
                                                f"({type(err).__name__}: {err})."))
            continue
        plots.append(Plot(key, title, _png(fig), None, caption))
    return plots
