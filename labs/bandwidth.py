"""All-reduce bandwidth arithmetic, torch-free: step 01 measures with it, step 05's report
predicts with it. GB/s is 1e9 bytes/s, as in nccl-tests."""

from __future__ import annotations

import math


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
