"""04 --profile-steps K: K training steps under ``torch.profiler``, after training, so the
throughput figures never include the profiler's cost. Each rank writes its own Chrome
trace (Perfetto and chrome://tracing open it) and keeps what ``labs.trace_analysis`` reads
in it: overlap of backward and all-reduce, exposed communication, the buckets' timing.

A profiler that fails costs the trace, never the run: the step goes on unprofiled and the
result says why in a note.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from labs import trace_analysis

# Kineto, the profiler's tracing library, prints its start and stop on stderr; level 6 is
# above every message it has (set before the profiler first loads it).
os.environ.setdefault("KINETO_LOG_LEVEL", "6")


class Recorder:
    """Around the profiled steps: ``with Recorder(path, device) as r: ... with r.step(): ...``.
    On exit the trace is at ``path`` and ``summary`` holds its figures, or ``note`` why not."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.device = Path(path), device
        self.profiler = None
        self.summary: dict | None = None
        self.note: str | None = None

    def __enter__(self) -> "Recorder":
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
        except Exception as err:  # noqa: BLE001 - no trace, but the run goes on
            self._failed("could not start", err)
        return self

    @contextlib.contextmanager
    def step(self):
        """One profiled step, marked so the analysis can find its start and end."""
        if self.profiler is None:
            yield
            return
        with torch.profiler.record_function(trace_analysis.STEP_MARK):
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the step's kernels inside its mark

    def __exit__(self, *exc) -> None:
        if self.profiler is None:
            return
        scratch = self.path.with_name(self.path.name + ".part")  # never a half-written trace
        try:
            self.profiler.stop()
            self.profiler.export_chrome_trace(str(scratch))
            trace = json.loads(scratch.read_text(encoding="utf-8"))
            os.replace(scratch, self.path)
            self.summary = trace_analysis.summarise(trace)
            if self.summary is None:
                self.note = f"The profiler trace {self.path.name} holds no profiled step."
            else:
                self.summary["trace_bytes"] = self.path.stat().st_size
        except Exception as err:  # noqa: BLE001 - as above
            scratch.unlink(missing_ok=True)
            self._failed("failed", err)

    def _failed(self, what: str, err: Exception) -> None:
        self.profiler = None
        first = (str(err).strip().splitlines() or [""])[0][:200]
        self.note = (f"The profiler {what} ({type(err).__name__}: {first}): no trace, and "
                     f"no overlap figures; the run itself is unaffected.")
