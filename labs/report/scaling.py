"""Scaling curves: throughput and efficiency against the number of devices N, in weak and
strong scaling, each measured point beside what the alpha-beta model predicts for it.

A curve is one method (DataParallel or DDP) with everything but N held fixed, in one mode:

- weak scaling: every device keeps the baseline's batch, so the global batch grows with N;
- strong scaling: the global batch stays the baseline's, split over the N devices.

A run at N = 1 belongs to both (its per-device batch is its global batch). The model of a
DDP step on N ranks (docs/student_guide.md, "Predicting scaling"):

    step(N)      = compute(N) + (1 - hidden) x all_reduce(N)
    all_reduce(N) = buckets x alpha(N) + 2(N-1)/N x gradient bytes / beta(N)

``compute(N)``: the run's compute-only step (the same steps under ``no_sync``);
``alpha``, ``beta``: step 01's fit at N (``labs.bandwidth.fit_alpha_beta``), or at the
nearest measured N0 with alpha scaled by (N-1)/(N0-1) (a ring has 2(N-1) latency-bound
steps) and beta kept (a ring's bus bandwidth hardly depends on N); ``hidden``: the share
of the all-reduce that backward hides, calibrated once, on the smallest multi-rank run,
from its measured exposed communication, and used for every other point. Beyond the
largest measured N the compute is extrapolated too (weak: the largest N's; strong:
linear in the per-device batch). DataParallel has no such model: it is measured only.
Torch-free: reads the comparison table and the environment files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pandas as pd

from labs import fmt
from labs.bandwidth import (AlphaBeta, fit_alpha_beta, fit_quality, gradient_allreduce_s,
                            predict_ddp_step_s, ring_factor, sweeps_by_world_size)
from labs.report.analysis import dig, num, same_setting_key

MODES = ("weak", "strong")
# What a curve holds fixed besides the family (the baseline: model, image size, batch,
# precision, ...): the method's own settings.
CURVE_FIELDS = ("strategy", "family", "backend", "bucket_cap_mb", "comm_hook",
                "static_graph", "sync_bn", "grad_accum_steps", "target_accuracy", "sync",
                "average_every", "partition", "dirichlet_alpha")
DEFAULT_BUCKET_CAP_MB = 25  # DistributedDataParallel's bucket_cap_mb
# Weak scaling keeps each rank's work: a compute-only step this much slower at N = 2 than
# at N = 1 is ranks competing for the machine, not communication.
CONTENTION = 1.25
# "If your link were ...": nominal one-way bandwidth per GPU (GB/s), as beta. Sources in
# docs/student_guide.md, "Predicting scaling".
LINKS = (
    ("PCIe 4.0 ×16, no peer access (through host memory)", 10.0),
    ("PCIe 4.0 ×16, peer to peer", 25.0),
    ("NVLink 3 (A100: 600 GB/s both ways)", 300.0),
    ("NVLink 4 (H100: 900 GB/s both ways)", 450.0),
    ("NVLink 5 (B200: 1.8 TB/s both ways)", 900.0),
    ("100 Gb/s network, one NIC per GPU", 12.5),
    ("200 Gb/s network, one NIC per GPU", 25.0),
    ("400 Gb/s network, one NIC per GPU", 50.0),
)


@dataclass
class Point:
    n: int
    per_device_batch: float | None
    global_batch: float | None
    measured_tp: float | None = None
    measured_eff: float | None = None  # at N = 1: the wrapper's speed-up (its overhead)
    tta_s: float | None = None
    lr: float | None = None
    evaluated: bool = False
    flagged: bool = False
    compute_s: float | None = None
    exposed_s: float | None = None  # measured: synced step - compute-only step
    all_reduce_s: float | None = None  # predicted, before hiding
    predicted_step_s: float | None = None
    predicted_tp: float | None = None
    predicted_eff: float | None = None
    role: str = "measured"  # "measured", "calibration" (fixes hidden), "extrapolated"

    @property
    def error(self) -> float | None:
        if self.role != "measured" or not self.measured_tp or self.predicted_tp is None:
            return None
        return self.predicted_tp / self.measured_tp - 1


@dataclass
class Curve:
    strategy: str
    mode: str
    batch: float          # the baseline's: per device (weak) or global (strong)
    baseline_tp: float
    baseline_tta_s: float | None
    points: list[Point]
    notes: list[str] = field(default_factory=list)

    @property
    def short_name(self) -> str:
        method = "DDP" if self.strategy == "ddp" else "DP"
        what = "/device" if self.mode == "weak" else " in all"
        return f"{method} · {self.mode} · {fmt.count(self.batch)}{what}"

    @property
    def name(self) -> str:
        method = "DDP" if self.strategy == "ddp" else "DataParallel"
        what = "per-device batch" if self.mode == "weak" else "global batch"
        return f"{method}, {self.mode} scaling ({what} {fmt.count(self.batch)})"


@dataclass
class Model:
    fits: dict[int, AlphaBeta]
    hidden: float
    calibration: str
    buckets: str
    source: str  # the environment file


@dataclass
class Scaling:
    curves: list[Curve]
    model: Model | None
    refusal: str | None  # why there is no prediction
    sentences: list[str]
    links: list[dict]
    link_ns: list[int]


def _mode(row) -> str:
    return "strong" if row.get("scaling") == "strong" else "weak"


def _point(row) -> Point:
    n = int(row["n_devices"])
    eff = row["efficiency"] if n > 1 else row["speedup"]
    return Point(n=n, per_device_batch=num(row["per_device_batch_size"]),
                 global_batch=num(row["global_batch_size"]), measured_tp=num(row["tp_median"]),
                 measured_eff=num(eff), tta_s=num(row["time_to_accuracy_s"]), lr=num(row["lr"]),
                 evaluated=bool(row["eval"]),
                 flagged=bool(row["flags"]), compute_s=num(row["compute_median"]),
                 exposed_s=num(row["exposed_comm_s"]))


def find_curves(rows: pd.DataFrame) -> list[tuple[Curve, pd.DataFrame]]:
    """Every (method, settings, mode) of ``rows`` (one machine's comparison rows) measured
    at two or more device counts against a baseline, with its rows."""
    wrappers = rows[rows["strategy"].isin(["dp", "ddp"]) & rows["baseline_tp"].notna()]
    curves = []
    if wrappers.empty:
        return curves
    keys = wrappers[list(CURVE_FIELDS)].apply(
        lambda row: "|".join(map(same_setting_key, row)), axis=1)
    for _, group in wrappers.groupby(keys, sort=False):
        for mode in MODES:
            members = group[(group["n_devices"] == 1)
                            | (group.apply(_mode, axis=1) == mode)]
            members = members.drop_duplicates("n_devices").sort_values("n_devices")
            if members["n_devices"].nunique() < 2:
                continue
            first = members.iloc[0]
            batch = num(first["baseline_batch"])
            curves.append((Curve(strategy=first["strategy"], mode=mode, batch=batch,
                                 baseline_tp=num(first["baseline_tp"]),
                                 baseline_tta_s=num(first.get("baseline_tta")),
                                 points=[_point(r) for _, r in members.iterrows()]),
                           members))
    order = {("ddp", "weak"): 0, ("ddp", "strong"): 1, ("dp", "weak"): 2, ("dp", "strong"): 3}
    return sorted(curves, key=lambda c: order[(c[0].strategy, c[0].mode)])


# --- the model ------------------------------------------------------------------------------

def sweep_fits(environments: list[dict], backend: str, file_of) -> tuple[dict, str | None, str]:
    """({N: AlphaBeta}, why there is none, the file) from the newest environment record
    whose all-reduce sweep used ``backend``."""
    usable = [e for e in environments if sweeps_by_world_size(dig(e, "probes", "allreduce"))]
    if not usable:
        return {}, ("no prediction: step 01's file from this machine has no all-reduce sweep "
                    "(run python 01_environment_check.py without --quick on this machine)"
                    if environments else "no prediction: no step-01 file from this machine "
                    "(run python 01_environment_check.py on it)"), ""
    newest = max(usable, key=lambda e: str(e.get("written_at") or ""))
    probe = dig(newest, "probes", "allreduce")
    if str(probe.get("backend")) != str(backend):
        return {}, (f"no prediction: step 01 measured all-reduce over {probe.get('backend')}, "
                    f"these runs used {backend}"), file_of(newest)
    fits = {n: fit_alpha_beta(points, n) for n, points in sweeps_by_world_size(probe).items()}
    fits = {n: f for n, f in fits.items() if f is not None}
    if not fits:
        return {}, "no prediction: step 01's sweep could not be fitted", file_of(newest)
    return fits, None, file_of(newest)


def fit_at(fits: dict[int, AlphaBeta], n: int) -> AlphaBeta:
    """The fit at N, or the nearest measured one's with its latency scaled to N ranks."""
    if n in fits:
        return fits[n]
    near = min(fits, key=lambda m: (abs(math.log(m / n)), -m))
    return replace(fits[near], alpha_s=fits[near].alpha_s * (n - 1) / (near - 1),
                   world_size=n, residuals=(), outliers=(), sizes=())


def bucket_count(row) -> tuple[int, str]:
    recorded = row.get("bucket_bytes")
    if isinstance(recorded, list) and recorded:
        return len(recorded), f"buckets: {len(recorded)}, as DDP built them"
    cap = num(row.get("bucket_cap_mb")) or DEFAULT_BUCKET_CAP_MB
    count = max(1, math.ceil(num(row["gradient_bytes"]) / (cap * 2**20)))
    return count, f"buckets: {count}, estimated from bucket_cap_mb {cap:g}"


def _fit(fits, n: int) -> AlphaBeta | None:
    return fit_at(fits, n) if n >= 2 else None  # one rank: nothing to exchange


def all_reduce_s(fits, n: int, gradient_bytes: float, buckets: int) -> float:
    fit = _fit(fits, n)
    return gradient_allreduce_s(gradient_bytes, buckets, fit) if fit else 0.0


def _calibrate(curves: list[Curve], fits, gradient_bytes, buckets) -> tuple[float, str] | None:
    """The hidden share from the smallest multi-rank DDP run (weak scaling first) whose
    figures are not flagged, else the smallest flagged one (and the text says so)."""
    usable = [(c, p) for c in curves for p in c.points
              if p.n >= 2 and p.compute_s is not None and p.exposed_s is not None]
    for curve, p in sorted(usable, key=lambda cp: cp[1].flagged)[:1]:
        total = all_reduce_s(fits, p.n, gradient_bytes, buckets)
        hidden = min(1.0, max(0.0, 1 - p.exposed_s / total)) if total > 0 else 1.0
        p.role = "calibration"
        return hidden, (f"the N = {p.n} {curve.mode}-scaling run exposed "
                        f"{fmt.seconds(max(p.exposed_s, 0.0))} of a predicted "
                        f"{fmt.seconds(total)} all-reduce"
                        + (" (a flagged run: every multi-rank run is, so the predictions "
                           "inherit its doubt)" if p.flagged else ""))
    return None


def _predict(curve: Curve, fits, gradient_bytes, buckets, hidden: float) -> None:
    for p in curve.points:
        if p.compute_s is None or not p.global_batch:
            continue
        p.all_reduce_s = all_reduce_s(fits, p.n, gradient_bytes, buckets)
        p.predicted_step_s = predict_ddp_step_s(p.compute_s, gradient_bytes, buckets,
                                                _fit(fits, p.n), hidden)
        p.predicted_tp = p.global_batch / p.predicted_step_s
        p.predicted_eff = p.predicted_tp / (p.n * curve.baseline_tp)


def _extrapolate(curve: Curve, fits, gradient_bytes, buckets, hidden) -> None:
    """Points at 2x and 4x the largest measured N, labelled extrapolated."""
    known = [p for p in curve.points if p.compute_s is not None and p.per_device_batch]
    if not known:
        return
    top = max(known, key=lambda p: p.n)
    accumulate = top.global_batch / (top.per_device_batch * top.n)
    for n in (2 * top.n, 4 * top.n):
        if curve.mode == "weak":
            per_device, compute = top.per_device_batch, top.compute_s
        else:
            per_device = top.global_batch / accumulate / n
            if per_device < 1 or per_device != int(per_device):
                curve.notes.append(f"N = {n} not predicted: the global batch "
                                   f"{fmt.count(top.global_batch)} does not split into "
                                   f"whole batches over {n} devices")
                continue
            compute = _compute_at(known, per_device)
        p = Point(n=n, per_device_batch=per_device, global_batch=per_device * n * accumulate,
                  compute_s=compute, role="extrapolated")
        curve.points.append(p)
    _predict(curve, fits, gradient_bytes, buckets, hidden)


def _compute_at(known: list[Point], per_device: float) -> float:
    """Compute-only step time at another per-device batch: the line through the measured
    multi-rank (batch, time) points (least squares), or proportional to the largest N's
    point; never below a tenth of the fastest measured step (a fixed cost remains). One
    rank alone is left out: on shared CPU cores it computes faster than N ranks do."""
    multi = [p for p in known if p.n >= 2] or known
    known = multi if len({p.per_device_batch for p in multi}) >= 2 else \
        [max(known, key=lambda p: p.n)]
    xs = [p.per_device_batch for p in known]
    ys = [p.compute_s for p in known]
    if len(set(xs)) >= 2:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / \
            sum((x - mx) ** 2 for x in xs)
        value = my + slope * (per_device - mx)
    else:
        value = ys[0] * per_device / xs[0]
    return max(value, 0.1 * min(ys))


def link_table(curve: Curve, fits, gradient_bytes, buckets, hidden) -> tuple[list, list]:
    """Predicted efficiency at the largest measured N and at 4x it for other links: this
    machine's compute and latency, the link's bandwidth as beta."""
    measured = [p for p in curve.points if p.role != "extrapolated" and p.compute_s is not None]
    if not measured or max(p.n for p in measured) < 2:
        return [], []
    top = max(measured, key=lambda p: p.n)
    ns = [top.n, 4 * top.n] if curve.mode == "weak" else [top.n]
    rows = []
    for name, beta in LINKS:
        cells = []
        for n in ns:
            linked = {m: replace(f, beta_gb_s=beta) for m, f in fits.items()}
            step = predict_ddp_step_s(top.compute_s, gradient_bytes, buckets,
                                      _fit(linked, n), hidden)
            tp = top.per_device_batch * n * (top.global_batch / (top.per_device_batch * top.n)) \
                / step
            cells.append(fmt.pct(tp / (n * curve.baseline_tp)))
        rows.append({"link": name, "beta": f"{beta:g} GB/s", "cells": cells})
    return rows, ns


# --- in words -------------------------------------------------------------------------------

def _bend(curve: Curve) -> str | None:
    """Where the curve bends and why, from its numbers."""
    pts = [p for p in curve.points if p.predicted_step_s is not None]
    multi = [p for p in pts if p.n >= 2]
    if not multi:
        return None
    share = {p.n: (p.predicted_step_s - p.compute_s) / p.predicted_step_s for p in multi}
    last = multi[-1]
    where = "predicted" if last.role == "extrapolated" else "measured and predicted"
    if curve.mode == "strong":
        one = next((p for p in pts if p.n == 1), None)
        start = (f"the compute-only step falls from {fmt.seconds(one.compute_s)} at N = 1 to "
                 f"{fmt.seconds(last.compute_s)} at N = {last.n} (per-device batch "
                 f"{fmt.count(one.per_device_batch)} → {fmt.count(last.per_device_batch)})"
                 if one else "the compute-only step shrinks with the per-device batch")
        return (f"{curve.name}: {start}, while the exposed all-reduce does not shrink "
                f"({fmt.seconds(multi[0].predicted_step_s - multi[0].compute_s)} at N = "
                f"{multi[0].n}, {fmt.seconds(last.predicted_step_s - last.compute_s)} at "
                f"N = {last.n}): communication grows from {fmt.pct(share[multi[0].n])} to "
                f"{fmt.pct(share[last.n])} of the step and efficiency falls to "
                f"{fmt.pct(last.predicted_eff)} ({where}).")
    one = next((p for p in pts if p.n == 1), None)
    if one is not None and multi[0].compute_s > CONTENTION * one.compute_s:
        return (f"{curve.name}: at N = {multi[0].n} each rank's compute-only step takes "
                f"{fmt.times(multi[0].compute_s / one.compute_s)} as long as one rank's alone "
                f"({fmt.seconds(multi[0].compute_s)} vs {fmt.seconds(one.compute_s)}): the "
                f"ranks slow each other down (shared cores or memory bandwidth), which no "
                f"communication model explains. That, more than the all-reduce "
                f"({fmt.pct(share[multi[0].n])} of the step), bends this curve.")
    factors = ", ".join(f"{ring_factor(p.n):.2f} at N = {p.n}" for p in multi)
    return (f"{curve.name}: each rank's compute stays about {fmt.seconds(multi[0].compute_s)} "
            f"while the bytes each rank sends grow with 2(N − 1)/N ({factors}) and the "
            f"latency with N: the exposed all-reduce is {fmt.pct(share[multi[0].n])} of the "
            f"step at N = {multi[0].n} and {fmt.pct(share[last.n])} at N = {last.n}, where "
            f"efficiency is {fmt.pct(last.predicted_eff)} ({where}).")


def _checked(curves: list[Curve]) -> str | None:
    """Each measured point the model predicted without being fitted to it, in one line."""
    tested = [(c, p) for c in curves for p in c.points if p.error is not None and p.n >= 2]
    if not tested:
        return None
    worst = max(abs(p.error) for _, p in tested)
    checks = "; ".join(f"{c.mode} N = {p.n}: {fmt.rate(p.predicted_tp)} predicted, "
                       f"{fmt.rate(p.measured_tp)} measured ({p.error:+.0%})" for c, p in tested)
    return (f"The model against the measurements (DDP, every multi-rank point but the one "
            f"that calibrates it): {checks}. "
            + ("Within 10 % everywhere: the all-reduce model accounts for the step."
               if worst <= 0.10 else "Off by more than 10 % somewhere: something the model "
               "leaves out (stragglers, the input pipeline, ranks competing for the "
               "machine) matters there."))


def _lr_sentence(curve: Curve) -> str | None:
    if curve.mode != "weak" or not any(p.tta_s is not None for p in curve.points):
        return None
    measured = [p for p in curve.points if p.role != "extrapolated"]
    batches = " → ".join(fmt.count(p.global_batch) for p in measured)
    rates = " → ".join(f"{p.lr:g}" for p in measured if p.lr is not None)
    return (f"Weak scaling: the global batch grows with N ({batches}) and, by the linear "
            f"scaling rule, the learning rate with it ({rates}), so an epoch has N times "
            f"fewer, larger steps: time to the target accuracy need not fall N-fold even "
            f"where throughput does.")


def analyse(rows: pd.DataFrame, environments: list[dict], file_of) -> Scaling | None:
    """The scaling section of one machine, or None where no method ran at two or more
    device counts (results from before sweeps existed render without it)."""
    found = find_curves(rows)
    if not found:
        return None
    curves = [c for c, _ in found]
    ddp = [(c, members) for c, members in found if c.strategy == "ddp"]
    model, refusal, links, link_ns = None, None, [], []
    if ddp:
        members = ddp[0][1]
        multi = members[members["n_devices"] >= 2]
        reference = (multi if not multi.empty else members).iloc[0]
        fits, refusal, source = sweep_fits(environments, reference["backend"], file_of)
        gradient_bytes = num(reference["gradient_bytes"])
        if not refusal and gradient_bytes is None:
            refusal = "no prediction: these runs did not record their gradient bytes"
        if not refusal:
            buckets, bucket_words = bucket_count(reference)
            ddp_curves = [c for c, _ in ddp]
            calibrated = _calibrate(ddp_curves, fits, gradient_bytes, buckets)
            if calibrated is None:
                refusal = ("no prediction: no multi-rank DDP run measured its compute-only "
                           "step (04 runs it unless --no-comm-probe)")
            else:
                hidden, how = calibrated
                model = Model(fits, hidden, how, bucket_words, source)
                for c in ddp_curves:
                    _extrapolate(c, fits, gradient_bytes, buckets, hidden)
                links, link_ns = link_table(ddp_curves[0], fits, gradient_bytes, buckets,
                                            hidden)
    sentences = [s for s in [_checked(curves)] + list(map(_bend, curves)) if s]
    sentences += [s for s in map(_lr_sentence, curves) if s][:1]  # the same for every method
    if any(c.strategy == "dp" for c in curves):
        sentences.append("DataParallel is measured only: it scatters each batch from GPU 0, "
                         "copies the model to every GPU and gathers the outputs back every "
                         "step, which the all-reduce model does not describe.")
    return Scaling(curves, model, refusal, sentences, links, link_ns)


def fit_rows(model: Model) -> list[dict]:
    return [{"n": n, "alpha": f"{fit.alpha_s * 1e6:.1f} µs", "beta": f"{fit.beta_gb_s:.2f} GB/s",
             "quality": fit_quality(fit)} for n, fit in sorted(model.fits.items())]


def table_rows(curve: Curve) -> list[dict]:
    """Per point: measured and predicted throughput and efficiency, and the error."""
    out = []
    for p in sorted(curve.points, key=lambda p: p.n):
        error = p.error
        out.append({
            "n": str(p.n),
            "batch": f"{fmt.count(p.global_batch)} = {p.n} × {fmt.count(p.per_device_batch)}"
            if p.n > 1 else fmt.count(p.global_batch),
            "measured": "—" if p.role == "extrapolated" else fmt.rate(p.measured_tp),
            "measured_eff": "—" if p.role == "extrapolated" else
            (fmt.pct(p.measured_eff) + (" (overhead)" if p.n == 1 else "")
             + (" · flagged" if p.flagged else "")),
            "predicted": fmt.rate(p.predicted_tp) if p.predicted_tp else "—",
            "predicted_eff": fmt.pct(p.predicted_eff) if p.predicted_eff else "—",
            "error": ("calibrates the model" if p.role == "calibration" else
                      "extrapolated" if p.role == "extrapolated" else
                      f"{error:+.0%}" if error is not None else "—"),
            "tta": fmt.seconds(p.tta_s) if p.tta_s is not None else
            ("—" if p.role == "extrapolated" else "not reached" if p.evaluated
             else "not evaluated"),
            "role": p.role,
        })
    return out
