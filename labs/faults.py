"""Fault injection, so tests can prove the lab survives what students run into.

Set ``LAB_FAULT`` to comma-separated ``key=value`` pairs:

    LAB_FAULT="kind=exit,rank=1,step=7"     rank 1 dies abruptly before its 8th step

- ``kind``: ``exit`` (the process vanishes, as when killed), ``raise`` (an exception),
  ``oom`` (an out-of-memory error), ``sigterm`` or ``sigint`` (the signal to itself),
  ``hang`` (sleeps, as a stuck rank would);
- ``rank``: which rank (default: every rank);
- ``step``: before which optimizer step of this process, counted from 0 (default 0);
- ``restart``: only in this torchrun restart round (default 0, so a restarted job runs
  clean).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from labs.compat import OutOfMemoryError

KINDS = ("exit", "raise", "oom", "sigterm", "sigint", "hang")


@dataclass
class Fault:
    kind: str
    rank: int | None
    step: int
    restart: int

    def maybe_fire(self, step: int) -> None:
        if step != self.step:
            return
        if self.rank is not None and int(os.environ.get("RANK", 0)) != self.rank:
            return
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) != self.restart:
            return
        if self.kind == "exit":
            os._exit(13)
        if self.kind == "raise":
            raise RuntimeError(f"injected fault at step {step}")
        if self.kind == "oom":
            raise OutOfMemoryError("CUDA out of memory (injected fault)")
        if self.kind in ("sigterm", "sigint"):
            os.kill(os.getpid(), signal.SIGTERM if self.kind == "sigterm" else signal.SIGINT)
            time.sleep(5)  # the handler raises in this thread long before this ends
        if self.kind == "hang":
            time.sleep(3600)


def from_env() -> Fault | None:
    spec = os.environ.get("LAB_FAULT", "").strip()
    if not spec:
        return None
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    kind = fields.get("kind", "")
    if kind not in KINDS:
        raise ValueError(f"LAB_FAULT: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    rank = fields.get("rank")
    return Fault(kind=kind, rank=int(rank) if rank not in (None, "", "any") else None,
                 step=int(fields.get("step", 0)), restart=int(fields.get("restart", 0)))
