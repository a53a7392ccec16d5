"""All-reduce bandwidth arithmetic, torch-free: step 01 measures with it, step 05's report
predicts with it. GB/s is 1e9 bytes/s, as in nccl-tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

from labs import fmt


def _positive(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def algbw_gb_s(size_bytes: int, time_s: float) -> float | None:
    """nccl-tests' algorithm bandwidth: message size / time, in GB/s."""
    return size_bytes / time_s / 1e9 if time_s > 0 else None


def busbw(algbw: float | None, world_size: int) -> float | None:
    """nccl-tests' bus bandwidth for all-reduce: algbw x 2(n-1)/n. A ring all-reduce moves
    2(n-1)/n of the message over each rank's link, so busbw compares with link speed."""
    if algbw is None:
        return None
    return algbw * 2 * (world_size - 1) / world_size


def interpolate_busbw(results: list[dict], size_bytes: int) -> float | None:
    """Bus bandwidth at `size_bytes` from a sweep: log-linear between the two measured sizes
    around it; beyond the largest, the largest message's (bus bandwidth levels off for
    large messages, so this errs on the slow side); below the smallest, the smallest's.
    Entries without a positive size and bus bandwidth are ignored."""
    points = sorted((size, bw) for size, bw in
                    ((_positive(r.get("size_bytes")), _positive(r.get("busbw_gb_s")))
                     for r in results if isinstance(r, dict))
                    if size is not None and bw is not None)
    if not points:
        return None
    if size_bytes >= points[-1][0]:
        return points[-1][1]
    if size_bytes <= points[0][0]:
        return points[0][1]
    for (s0, b0), (s1, b1) in zip(points, points[1:]):
        if s0 <= size_bytes <= s1 and s1 > s0:
            w = math.log(size_bytes / s0) / math.log(s1 / s0)
            return b0 + w * (b1 - b0)
    return None  # not reached


def predict_allreduce_s(size_bytes: int, world_size: int, results: list[dict]) -> float | None:
    """Time to all-reduce `size_bytes` over `world_size` ranks: bytes x 2(n-1)/n / busbw."""
    if world_size < 2:
        return 0.0  # nothing to exchange
    bw = interpolate_busbw(results, size_bytes)
    if bw is None:
        return None
    return size_bytes * 2 * (world_size - 1) / world_size / (bw * 1e9)


# --- the alpha-beta model of all-reduce (issue 22: scaling curves) -----------------------

def ring_factor(world_size: int) -> float:
    """The share of a message each rank sends (and receives) in a ring all-reduce."""
    return 2 * (world_size - 1) / world_size


@dataclass(frozen=True)
class AlphaBeta:
    """``t(S) = alpha + 2(n-1)/n x S / beta``: a fixed cost per all-reduce (latency, alpha,
    seconds) and a bus bandwidth (beta, bytes/s) for the bytes, on ``world_size`` ranks.
    ``residuals``: measured / fitted time - 1 for each of ``sizes`` (bytes, ascending);
    ``outliers``: the sizes left out of the fit (see ``fit_alpha_beta``)."""
    alpha_s: float
    beta_gb_s: float
    world_size: int
    residuals: tuple[float, ...] = ()
    outliers: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()

    def time_s(self, size_bytes: float) -> float:
        return self.alpha_s + ring_factor(self.world_size) * size_bytes / (self.beta_gb_s * 1e9)


# A point this far off the first fit is a stall (another process had the core), not the
# link: it is left out and the line refitted, as long as two thirds of the points remain.
OUTLIER_RESIDUAL = 0.5


def _weighted_line(x: list[float], t: list[float]) -> tuple[float, float] | None:
    """(alpha, 1/beta) of t = alpha + x/beta by least squares on the relative error, so
    small messages (latency) weigh as much as large ones (bandwidth); a negative alpha,
    which only noise gives, is set to 0 and the slope refitted through the origin."""
    w = [1 / ti ** 2 for ti in t]
    sw, sx, st = sum(w), sum(wi * xi for wi, xi in zip(w, x)), sum(wi * ti for wi, ti in zip(w, t))
    sxx = sum(wi * xi * xi for wi, xi in zip(w, x))
    sxt = sum(wi * xi * ti for wi, xi, ti in zip(w, x, t))
    b = (sw * sxt - sx * st) / (sw * sxx - sx * sx)
    a = (st - b * sx) / sw
    if a < 0:
        a, b = 0.0, sxt / sxx
    return (a, b) if b > 0 else None


def fit_alpha_beta(results: list[dict], world_size: int) -> AlphaBeta | None:
    """alpha and beta from step 01's sweep (``size_bytes``, ``time_s`` per point). Points
    more than ``OUTLIER_RESIDUAL`` off the first fit are left out (``outliers``) and the
    line refitted. None with fewer than two sizes, one rank, or no positive bandwidth."""
    points = sorted((size, t) for size, t in
                    ((_positive(r.get("size_bytes")), _positive(r.get("time_s")))
                     for r in results if isinstance(r, dict))
                    if size is not None and t is not None)
    if world_size < 2 or len({size for size, _ in points}) < 2:
        return None
    kept = points
    for _ in range(2):  # the first fit, then once without the points far off it
        line = _weighted_line([ring_factor(world_size) * s for s, _ in kept],
                              [t for _, t in kept])
        if line is None:
            return None
        fit = AlphaBeta(line[0], 1 / line[1] / 1e9, world_size)
        close = [(s, t) for s, t in points if abs(t / fit.time_s(s) - 1) <= OUTLIER_RESIDUAL]
        if len(close) == len(kept) or 3 * len(close) < 2 * len(points) \
                or len({s for s, _ in close}) < 2:
            break
        kept = close
    return AlphaBeta(fit.alpha_s, fit.beta_gb_s, world_size,
                     residuals=tuple(t / fit.time_s(s) - 1 for s, t in points),
                     outliers=tuple(int(s) for s, t in points if (s, t) not in kept),
                     sizes=tuple(int(s) for s, _ in points))


def fit_quality(fit: AlphaBeta) -> str:
    """How well the line fits, in words: the worst residual of the points it kept, and
    the sizes it left out."""
    kept = [abs(r) for r, size in zip(fit.residuals, fit.sizes) if size not in fit.outliers]
    text = f"every size within {max(kept, default=0.0):.0%} of the fit"
    if fit.outliers:
        text += f"; left out as stalls: {', '.join(fmt.size(s) for s in fit.outliers)}"
    return text


def gradient_allreduce_s(gradient_bytes: float, buckets: int, fit: AlphaBeta) -> float:
    """DDP's gradient all-reduce in one step: alpha per bucket plus the bytes over beta."""
    return buckets * fit.alpha_s + fit.time_s(gradient_bytes) - fit.alpha_s


def predict_ddp_step_s(compute_s: float, gradient_bytes: float, buckets: int,
                       fit: AlphaBeta | None, hidden_share: float) -> float:
    """A DDP step: the compute-only step plus the part of the gradient all-reduce that
    backward does not hide (``hidden_share``, 0 to 1). ``fit`` None: one rank, nothing to
    exchange."""
    if fit is None:
        return compute_s
    return compute_s + (1 - hidden_share) * gradient_allreduce_s(gradient_bytes, buckets, fit)


def sweeps_by_world_size(allreduce: dict | None) -> dict[int, list[dict]]:
    """Step 01's ``probes.allreduce`` block as {world size: sweep points}: the main sweep
    and its ``smaller_world_sizes`` (absent in files from before they were measured). A
    sweep with a wrong sum anywhere is left out: its times measure a broken stack."""
    if not isinstance(allreduce, dict) or allreduce.get("all_correct") is False:
        return {}
    found = {}
    for sweep in [allreduce, *(allreduce.get("smaller_world_sizes") or [])]:
        world = sweep.get("world_size") if isinstance(sweep, dict) else None
        results = sweep.get("results") if isinstance(sweep, dict) else None
        if isinstance(world, bool) or not isinstance(world, int) or world < 2 \
                or not isinstance(results, list) or sweep.get("all_correct") is False:
            continue
        points = [r for r in results if isinstance(r, dict)]
        if points and all(r.get("correct") is not False for r in points):
            found[world] = points
    return dict(sorted(found.items()))
