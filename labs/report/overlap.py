"""What 04's profiler traces say about overlap, per machine: the DDP configuration profiled
with --profile-steps (the one on the most ranks), each rank's overlap of backward and
all-reduce, and the trace's exposed communication beside the no_sync estimate.

The figures come from the result file (``metrics.trace``, computed by
``labs.trace_analysis`` in each rank when it wrote its trace): the report reads files,
and a folder copied without its ``traces/`` still shows them. Torch-free.
"""

from __future__ import annotations

import statistics

import pandas as pd

from labs import fmt
from labs.report.analysis import num
from labs.report.narrative import noise_floor

MAX_RANKS_DRAWN = 8


def _ms(value) -> str:
    return fmt.seconds(value) if value is not None else "n/a"


def rank_rows(trace: list[dict]) -> list[dict]:
    rows = []
    for t in sorted(trace, key=lambda t: num(t.get("rank")) or 0):
        buckets = [b for b in t.get("buckets") or [] if isinstance(b, dict)]
        rows.append({
            "rank": str(int(num(t.get("rank")) or 0)),
            "overlap": fmt.pct(num(t.get("overlap_pct")) / 100)
            if num(t.get("overlap_pct")) is not None else "n/a",
            "comm": _ms(num(t.get("comm_s"))), "exposed": _ms(num(t.get("exposed_comm_s"))),
            "backward": _ms(num(t.get("backward_s"))), "wait": _ms(num(t.get("wait_s"))),
            "idle": _ms(num(t.get("idle_s"))), "step": _ms(num(t.get("step_s"))),
            "buckets": "; ".join(
                f"{i}: {num(b.get('start_ms')):.1f} → {num(b.get('end_ms')):.1f} ms"
                for i, b in enumerate(buckets, 1)
                if num(b.get("start_ms")) is not None and num(b.get("end_ms")) is not None),
            "file": str(t.get("file") or ""),
        })
    return rows


def compare_sentence(row, trace: list[dict]) -> str:
    """The trace's exposed communication beside 04's no_sync estimate, in words."""
    exposed = [num(t.get("exposed_comm_s")) for t in trace]
    exposed = [e for e in exposed if e is not None]
    if not exposed:
        return "The trace has no communication to compare."
    mean = statistics.fmean(exposed)
    seen = (f"The trace shows {fmt.seconds(mean)} of communication with no compute beside "
            f"it per step (rank average; {fmt.seconds(min(exposed))} to "
            f"{fmt.seconds(max(exposed))} across ranks)")
    estimate = num(row.get("exposed_comm_s"))
    if estimate is None:
        return seen + "; 04's no_sync estimate was not measured (--no-comm-probe)."
    tolerance = max(noise_floor(row) or 0.0, (max(exposed) - min(exposed)) / 2)
    if abs(mean - estimate) <= tolerance:
        return (seen + f"; the no_sync estimate, synced step − compute-only step, is "
                f"{fmt.seconds(estimate)}: they agree within the noise "
                f"({fmt.seconds(tolerance)}).")
    apart = (seen + f"; the no_sync estimate is {fmt.seconds(estimate)}, "
             f"{fmt.seconds(abs(mean - estimate))} apart, more than the noise "
             f"({fmt.seconds(tolerance)}). ")
    reducer = [num(t.get("reducer_s")) for t in trace]
    reducer = statistics.fmean([r for r in reducer if r is not None] or [0.0])
    if estimate > mean:
        counted = (f" (here {fmt.seconds(reducer)} a step of DDP's reducer work, such as "
                   f"averaging the summed buckets; with it the trace accounts for "
                   f"{fmt.seconds(mean + reducer)})" if reducer > 0 else "")
        return apart + ("The estimate also counts the work only a synced step does besides "
                        f"communicating, which the trace files under compute{counted}: "
                        "read the trace for the communication itself, the estimate for "
                        "all that synchronising costs.")
    return apart + ("The estimate subtracts two phases timed one after the other, so a "
                    "machine whose speed changed between them moves it (and can make it "
                    "negative): trust the trace, which watched the very steps the "
                    "all-reduce ran in.")


def analyse(rows: pd.DataFrame) -> dict | None:
    """The overlap block of one machine, or None where no DDP run was profiled."""
    profiled = rows[(rows["strategy"] == "ddp") & rows["trace"].map(bool)] \
        if "trace" in rows.columns else rows.iloc[0:0]
    if profiled.empty:
        return None
    row = profiled.sort_values("n_devices", kind="stable").iloc[-1]
    trace = [t for t in row["trace"] if isinstance(t, dict)]
    overlaps = ", ".join(f"rank {r['rank']} {r['overlap']}" for r in rank_rows(trace))
    drawn = sorted(trace, key=lambda t: num(t.get("rank")) or 0)[:MAX_RANKS_DRAWN]
    return {
        "label": row["label"],
        "rows": rank_rows(trace),
        "summary": (f"{row['label']}, {len(trace)} rank(s) profiled: overlap of "
                    f"communication with compute {overlaps} (time both ran ÷ communication "
                    f"time, as Holistic Trace Analysis defines it)."),
        "comparison": compare_sentence(row, trace),
        "timelines": [{"rank": int(num(t.get("rank")) or 0), **t["timeline"]} for t in drawn
                      if isinstance(t.get("timeline"), dict)],
        "more_ranks": max(0, len(trace) - MAX_RANKS_DRAWN),
    }
