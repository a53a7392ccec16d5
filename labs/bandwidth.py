"""All-reduce bandwidth arithmetic, torch-free: step 01 measures with it, step 05's report
predicts with it. GB/s is 1e9 bytes/s, as in nccl-tests."""

from __future__ import annotations

import math
from dataclasses import dataclass


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
    ``residuals``: measured / fitted time - 1, per sweep point, in size order."""
    alpha_s: float
    beta_gb_s: float
    world_size: int
    residuals: tuple[float, ...]

    def time_s(self, size_bytes: float) -> float:
        return self.alpha_s + ring_factor(self.world_size) * size_bytes / (self.beta_gb_s * 1e9)


def fit_alpha_beta(results: list[dict], world_size: int) -> AlphaBeta | None:
    """alpha and beta from step 01's sweep (``size_bytes``, ``time_s`` per point), by least
    squares on the relative error, so that small messages (latency) weigh as much as
    large ones (bandwidth). None with fewer than two sizes, one rank, or no positive
    bandwidth in the data. A negative latency (noise) is set to 0 and beta refitted."""
    points = sorted((size, t) for size, t in
                    ((_positive(r.get("size_bytes")), _positive(r.get("time_s")))
                     for r in results if isinstance(r, dict))
                    if size is not None and t is not None)
    if world_size < 2 or len({size for size, _ in points}) < 2:
        return None
    x = [ring_factor(world_size) * size for size, _ in points]  # bytes over each link
    t = [time for _, time in points]
    w = [1 / ti ** 2 for ti in t]  # weighted least squares of t = a + b x
    sw, sx, st = sum(w), sum(wi * xi for wi, xi in zip(w, x)), sum(wi * ti for wi, ti in zip(w, t))
    sxx = sum(wi * xi * xi for wi, xi in zip(w, x))
    sxt = sum(wi * xi * ti for wi, xi, ti in zip(w, x, t))
    b = (sw * sxt - sx * st) / (sw * sxx - sx * sx)
    a = (st - b * sx) / sw
    if a < 0:  # no latency is below zero: the line through the origin instead
        a, b = 0.0, sxt / sxx
    if b <= 0:
        return None
    fit = AlphaBeta(a, 1 / b / 1e9, world_size, ())
    return AlphaBeta(a, fit.beta_gb_s, world_size,
                     tuple(time / fit.time_s(size) - 1 for size, time in points))


def predict_ddp_step_s(compute_s: float, gradient_bytes: float, buckets: int,
                       fit: AlphaBeta, hidden_share: float) -> float:
    """A DDP step: the compute-only step plus the part of the gradient all-reduce that
    backward does not hide. The all-reduce costs alpha per bucket plus the gradient bytes
    over beta; ``hidden_share`` (0 to 1) is the share of it hidden behind backward."""
    communication = buckets * fit.alpha_s + fit.time_s(gradient_bytes) - fit.alpha_s
    return compute_s + (1 - hidden_share) * communication
