"""What a profiler trace of DDP steps says about overlap, per rank. Torch-free: it reads the
Chrome trace JSON that ``torch.profiler`` exports (the file Perfetto and chrome://tracing
open), so the report and the tests can use it without a GPU or a process group.

In each profiled step (a ``STEP_MARK`` annotation on the training thread):

- *communication*: the collectives, NCCL kernels on their GPU stream, or, on the CPU,
  gloo's ``gloo:all_reduce`` / ``gloo:broadcast`` spans on gloo's worker threads;
- *compute*: everything else the device runs, GPU kernels (on GPUs), or the training
  thread's top-level operations (on the CPU, where a thread that waits for an all-reduce
  records nothing while it waits);
- *backward*: from the first to the last autograd node the training thread evaluates.

Then, as Holistic Trace Analysis defines them (facebookresearch/HolisticTraceAnalysis):
overlap % = time with communication and compute both running / communication time;
exposed communication = communication time with no compute beside it; idle = time in the
step with neither. ``ready_s`` is when this rank's last gradients were ready (backward's end
after the step's start); across ranks, ``wait_s`` = the slowest rank's ``ready_s`` - this
rank's: how long it waits in its last all-reduce for the others.
"""

from __future__ import annotations

import statistics

STEP_MARK = "lab: profiled step"
BACKWARD = "autograd::engine::evaluate_function"
# A timeline keeps at most this many intervals per lane (merged across small gaps first).
TIMELINE_INTERVALS = 60


def merge(intervals, gap: float = 0.0) -> list[tuple[float, float]]:
    """Sorted, non-overlapping intervals covering the same time (joined across ``gap``)."""
    out: list[list[float]] = []
    for start, end in sorted((s, e) for s, e in intervals if e > s):
        if out and start <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def length(intervals) -> float:
    return sum(e - s for s, e in merge(intervals))


def overlap(a, b) -> float:
    """Time covered by both ``a`` and ``b``."""
    a, b = merge(a), merge(b)
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _span(event: dict) -> tuple[float, float]:
    start = float(event["ts"])
    return start, start + float(event.get("dur") or 0.0)


def _is_comm(event: dict) -> bool:
    name = str(event.get("name", ""))
    if event.get("cat") == "kernel":
        return "nccl" in name.lower()
    return name.startswith("gloo:")


def _top_level(events: list[dict]) -> list[tuple[float, float]]:
    """The outermost spans of one thread's nested events."""
    spans, end = [], float("-inf")
    for start, stop in sorted(_span(e) for e in events):
        if start >= end:
            spans.append((start, stop))
            end = stop
        elif stop > end:  # a sibling that outlasts the previous one (clock jitter)
            spans[-1] = (spans[-1][0], stop)
            end = stop
    return spans


def step_metrics(step: tuple[float, float], compute, comm, backward, all_reduces,
                 reducer=()) -> dict:
    """One step's figures (seconds; trace times are microseconds). ``all_reduces``: the
    gradient buckets' (start, end), in order; ``reducer``: DDP's own work on the training
    thread (averaging the summed buckets, ...), which only a synced step does."""
    s0, s1 = step
    clip = [(max(s, s0), min(e, s1)) for s, e in comm]
    comm_s, both = length(clip), overlap(clip, compute)
    busy = length([*compute, *clip])
    b0, b1 = backward if backward else (None, None)
    return {
        "step_s": (s1 - s0) / 1e6,
        "compute_s": length(compute) / 1e6,
        "comm_s": comm_s / 1e6,
        "overlap_s": both / 1e6,
        "overlap_pct": 100.0 * both / comm_s if comm_s else None,
        "exposed_comm_s": (comm_s - both) / 1e6,
        "idle_s": max(0.0, (s1 - s0) - busy) / 1e6,
        "reducer_s": length(reducer) / 1e6,
        "backward_s": (b1 - b0) / 1e6 if backward else None,
        "ready_s": (b1 - s0) / 1e6 if backward else None,
        "buckets": [{"start_ms": (s - b0) / 1e3, "end_ms": (e - b0) / 1e3}
                    for s, e in all_reduces] if backward else [],
    }


def steps_of(trace: dict) -> list[dict]:
    """Per profiled step of one rank's trace: its window, lanes and figures."""
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict)
              and e.get("ph") == "X" and "ts" in e]
    marks = sorted((e for e in events if e.get("name") == STEP_MARK), key=lambda e: e["ts"])
    gpu = any(e.get("cat") == "kernel" for e in events)
    found = []
    for mark in marks:
        s0, s1 = _span(mark)
        inside = [e for e in events if s0 <= float(e["ts"]) < s1 and e is not mark]
        main = [e for e in inside if e.get("tid") == mark.get("tid") and e.get("pid") == mark.get("pid")]
        comm = [e for e in inside if _is_comm(e)]
        if gpu:
            compute = merge(_span(e) for e in inside if e.get("cat") == "kernel"
                            and not _is_comm(e))
        else:
            compute = merge(_top_level([e for e in main if e.get("cat") != "user_annotation"
                                        or e.get("name") != STEP_MARK]))
        backward_spans = [_span(e) for e in main if str(e.get("name", "")).startswith(BACKWARD)]
        backward = (min(s for s, _ in backward_spans), max(e for _, e in backward_spans)) \
            if backward_spans else None
        reduces = sorted(_span(e) for e in comm if "all_reduce" in str(e.get("name", "")).lower()
                         or "allreduce" in str(e.get("name", "")).lower())
        comm_spans = merge(_span(e) for e in comm)
        reducer = [_span(e) for e in main if "reducer::" in str(e.get("name", ""))]
        figures = step_metrics((s0, s1), compute, comm_spans, backward, reduces, reducer)
        figures["lanes"] = {"compute": compute, "comm": comm_spans, "window": (s0, s1),
                            "backward": backward, "all_reduces": reduces}
        found.append(figures)
    return found


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def timeline(step: dict) -> dict:
    """One step's lanes in milliseconds from its start, small enough for a result file."""
    lanes = step["lanes"]
    s0, s1 = lanes["window"]
    width = max(s1 - s0, 1.0)

    def squeeze(spans):
        gap = 0.0
        out = merge(spans)
        while len(out) > TIMELINE_INTERVALS:  # join across ever larger gaps
            gap = gap * 2 or width / 1000
            out = merge(spans, gap)
        return [[round((s - s0) / 1e3, 3), round((e - s0) / 1e3, 3)] for s, e in out]

    backward = lanes["backward"]
    return {"step_ms": round(width / 1e3, 3), "compute": squeeze(lanes["compute"]),
            "comm": squeeze(lanes["comm"]),
            "all_reduce": [[round((s - s0) / 1e3, 3), round((e - s0) / 1e3, 3)]
                           for s, e in lanes["all_reduces"]],
            "backward": [round((backward[0] - s0) / 1e3, 3),
                         round((backward[1] - s0) / 1e3, 3)] if backward else None}


def summarise(trace: dict) -> dict | None:
    """A rank's figures over its profiled steps (medians), with the timeline and buckets of
    its median step; None when the trace holds no profiled step."""
    steps = steps_of(trace)
    if not steps:
        return None
    keys = ("step_s", "compute_s", "comm_s", "overlap_s", "exposed_comm_s", "idle_s",
            "reducer_s", "backward_s", "ready_s")
    out = {key: _median(s[key] for s in steps) for key in keys}
    comm, both = out["comm_s"], out["overlap_s"]
    out["overlap_pct"] = 100.0 * both / comm if comm else None
    middle = sorted(steps, key=lambda s: s["step_s"])[len(steps) // 2]
    out.update(steps=len(steps), buckets=middle["buckets"],
               communication_events=sum(len(s["lanes"]["all_reduces"]) for s in steps),
               timeline=timeline(middle))
    return out


def add_waits(ranks: list[dict]) -> list[dict]:
    """Each rank's ``wait_s``: how much later the slowest rank's gradients were ready."""
    ready = [r.get("ready_s") for r in ranks if r.get("ready_s") is not None]
    for r in ranks:
        r["wait_s"] = max(ready) - r["ready_s"] if ready and r.get("ready_s") is not None \
            else None
    return ranks
