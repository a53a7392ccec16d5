"""The figures of the report's two models of communication: the scaling curves (measured
beside the alpha-beta prediction, ``labs.report.scaling``) and one profiled DDP step's
timeline, a lane per rank for compute and one for communication (``labs.report.overlap``).
Drawn with the comparison figures' style and helpers (``labs.report.plots``)."""

from __future__ import annotations

from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from labs.report.plots import (INK, LABEL_FONT, MARKERS, PALETTE, NoData, Plot, _axes_style,
                               _check_key, _draw, _figure, _finish, _legend, _legend_layout,
                               _line_figure, _styled, wrap_label)

COMPUTE, COMMUNICATION, BACKWARD = "#60a5fa", "#f59e0b", "#1e3a8a"


# --- scaling curves (labs.report.scaling) -----------------------------------------------------

@_styled
def plot_scaling(curves: list):
    """Throughput (top) and efficiency (bottom) against N: per curve, the measured points
    joined by a solid line, the prediction dashed with hollow markers (those beyond the
    largest measured N only predicted), and ideal scaling dotted."""
    labels = [c.short_name for c in curves]
    extra = ["measured", "predicted (alpha-beta model)", "ideal: N × baseline"]
    fig = _line_figure(5.0, [wrap_label(label) for label in labels] + extra)
    top, bottom = fig.subplots(2, 1, sharex=True)
    ns = sorted({p.n for c in curves for p in c.points})
    handles = []
    for i, curve in enumerate(curves):
        color = PALETTE[i % len(PALETTE)]
        seen = sorted((p for p in curve.points if p.role != "extrapolated"
                       and p.measured_tp is not None), key=lambda p: p.n)
        guess = sorted((p for p in curve.points if p.predicted_tp is not None),
                       key=lambda p: p.n)
        for ax, measured, predicted in (
                (top, [p.measured_tp for p in seen], [p.predicted_tp for p in guess]),
                (bottom, [100 * p.measured_eff for p in seen],
                 [100 * p.predicted_eff for p in guess])):
            ax.plot([p.n for p in seen], measured, color=color, marker=MARKERS[i % 8],
                    linewidth=2.2, markersize=8)
            if guess:
                ax.plot([p.n for p in guess], predicted, color=color, linestyle="--",
                        marker=MARKERS[i % 8], markerfacecolor="white", linewidth=1.4,
                        markersize=7)
        handles.append(Line2D([], [], color=color, marker=MARKERS[i % 8], linewidth=2.2,
                              label=wrap_label(curve.short_name)))
    for baseline in {c.baseline_tp for c in curves}:
        top.plot(ns, [n * baseline for n in ns], color=INK, linestyle=":", linewidth=1.0)
    bottom.axhline(100, color=INK, linestyle=":", linewidth=1.0)
    handles += [Line2D([], [], color=INK, linewidth=2.2, marker="o", label=extra[0]),
                Line2D([], [], color=INK, linestyle="--", marker="o", markerfacecolor="white",
                       label=extra[1]),
                Line2D([], [], color=INK, linestyle=":", label=extra[2])]
    top.set_ylabel("images/s", fontsize=LABEL_FONT)
    top.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    bottom.set_ylabel("efficiency (%)", fontsize=LABEL_FONT)
    bottom.set_ylim(0, max(115.0, *(100 * (p.measured_eff or 0) + 10
                                    for c in curves for p in c.points)))
    for ax in (top, bottom):
        if ns[-1] >= 8:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(ns, [str(n) for n in ns])
        _axes_style(ax)
    bottom.set_xlabel("devices N (DataParallel: GPUs · DDP: world size)",
                      fontsize=LABEL_FONT)
    _legend(fig, handles)
    _finish(fig)
    return fig, ("Solid: measured; dashed, hollow markers: predicted by the alpha-beta model "
                 "from step 01's all-reduce sweep and the runs' compute-only steps (points "
                 "beyond the largest measured N are predicted only); dotted: ideal scaling. "
                 "At N = 1 the efficiency is the wrapper's speed-up over the baseline, its "
                 "overhead.")


def scaling_plot(curves: list, key: str) -> Plot:
    """The scaling section's figure for one machine, key ``scaling_<key>``."""
    return _draw(f"scaling_{_check_key(key)}", "scaling", "Scaling: throughput and "
                 "efficiency against N", lambda: plot_scaling(curves))


# --- one profiled step (labs.report.overlap) ---------------------------------------------

@_styled
def plot_timeline(timelines: list[dict], more_ranks: int):
    """Per rank, two lanes over one profiled step: compute (blue; backward shaded behind
    it) and communication (amber), each gradient bucket's all-reduce a numbered bar."""
    if not timelines:
        raise NoData("No rank's trace held a profiled step.")
    lanes = [(t, kind) for t in timelines for kind in ("compute", "comm")]
    extra = ["compute", "backward", "all-reduce (bucket k)"]
    fig = _figure(0.9 + 0.32 * len(lanes) + _legend_layout(extra)[1])
    ax = fig.add_subplot()
    ticks, names = [], []
    for i, (t, kind) in enumerate(lanes):
        y = len(lanes) - 1 - i
        ticks.append(y)
        names.append(f"rank {t['rank']} {'compute' if kind == 'compute' else 'all-reduce'}")
        if kind == "compute":
            ax.broken_barh([(s, e - s) for s, e in t["compute"]], (y - 0.3, 0.6),
                           color=COMPUTE, zorder=2)
            if t.get("backward"):  # a bar along the lane's top edge: where backward ran
                b0, b1 = t["backward"]
                ax.broken_barh([(b0, b1 - b0)], (y + 0.3, 0.14), color=BACKWARD, zorder=3)
        else:
            for k, (s, e) in enumerate(t.get("all_reduce") or t["comm"], 1):
                ax.broken_barh([(s, e - s)], (y - 0.3, 0.6), color=COMMUNICATION,
                               edgecolor=INK, linewidth=0.6, zorder=2)
                ax.text((s + e) / 2, y, str(k), ha="center", va="center", color=INK,
                        fontsize=9, zorder=3)
    ax.set_yticks(ticks, names)
    ax.set_xlim(0, max(t["step_ms"] for t in timelines))
    ax.set_xlabel("milliseconds from the start of the step", fontsize=LABEL_FONT)
    _axes_style(ax)
    _legend(fig, [Patch(color=COMPUTE, label=extra[0]), Patch(color=BACKWARD, label=extra[1]),
                  Patch(facecolor=COMMUNICATION, edgecolor=INK, label=extra[2])])
    _finish(fig)
    more = f" The {more_ranks} other ranks are in the table." if more_ranks else ""
    return fig, ("One profiled step, the median one of each rank. Blue: the rank computes "
                 "(the dark bar above it spans backward); amber: its gradient buckets' "
                 "all-reduces, "
                 "numbered in the order DDP launched them. Where amber runs under blue, "
                 "backward hides the communication; amber alone is exposed." + more)


def timeline_plot(timelines: list[dict], more_ranks: int, key: str) -> Plot:
    """The overlap block's figure for one machine, key ``timeline_<key>``."""
    return _draw(f"timeline_{_check_key(key)}", "timeline", "One profiled DDP step, per rank",
                 lambda: plot_timeline(timelines, more_ranks))


# --- communicate less (labs.report.communicate) ------------------------------------------

@_styled
def plot_communicate(points: list[dict]):
    """Final accuracy against bytes all-reduced per image: DDP filled, local SGD hollow;
    circles IID data, triangles label-skewed."""
    if not points:
        raise NoData("No run both counted its bytes and evaluated its accuracy.")
    labels = ["DDP, every step", "local SGD", "IID data (circle)",
              "label-skewed data (triangle)"]
    fig = _line_figure(3.0, labels)
    ax = fig.add_subplot()
    for p in points:
        ax.scatter([p["bytes"]], [100 * p["accuracy"]], s=90, zorder=3,
                   marker="^" if p["skewed"] else "o", edgecolors=COMPUTE, linewidths=1.6,
                   facecolors="white" if p["local"] else COMPUTE)
        ax.annotate(wrap_label(p["label"]), (p["bytes"], 100 * p["accuracy"]),
                    textcoords="offset points", xytext=(6, 6), fontsize=8, color=INK)
    ax.set_xlim(0, 1.5 * max(p["bytes"] for p in points))  # room for the labels
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g}"))
    ax.set_xlabel("MB all-reduced per training image, per rank", fontsize=LABEL_FONT)
    ax.set_ylabel("final top-1 accuracy (%)", fontsize=LABEL_FONT)
    _axes_style(ax)
    handles = [Line2D([], [], marker="o", linestyle="", markerfacecolor=COMPUTE,
                      markeredgecolor=COMPUTE, label=labels[0]),
               Line2D([], [], marker="o", linestyle="", markerfacecolor="white",
                      markeredgecolor=COMPUTE, label=labels[1]),
               Line2D([], [], marker="o", linestyle="", color=INK, label=labels[2]),
               Line2D([], [], marker="^", linestyle="", color=INK, label=labels[3])]
    _legend(fig, handles)
    _finish(fig)
    return fig, ("Each DDP configuration: left is fewer bytes, up is better accuracy. Local "
                 "SGD moves left by about its averaging period; whether it stays up is what "
                 "the runs decide.")


def communicate_plot(points: list[dict], key: str) -> Plot:
    return _draw(f"communicate_{_check_key(key)}", "communicate",
                 "Communicate less: accuracy against bytes per image",
                 lambda: plot_communicate(points))
