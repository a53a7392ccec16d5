"""What step 03 needs around nn.DataParallel that is not the lesson itself."""

from __future__ import annotations

import torch
from torch import nn

from labs.errors import UsageError


def check_options(args, gpu_ids: list[int]) -> None:
    """Refuse, before any work, what DataParallel cannot do with these GPUs."""
    devices = max(1, len(gpu_ids))
    if args.batch_size < devices:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch; it must be "
                         f"at least the number of GPUs ({devices})")
    check_compile(args.compile, gpu_ids)


def check_compile(compile_model: bool, gpu_ids: list[int]) -> None:
    """torch.compile wraps the module DataParallel was given, but on two or more GPUs
    DataParallel runs copies of the *original* module in its threads (replicate, then
    parallel_apply): they would run uncompiled while the result said compile: true."""
    if compile_model and len(gpu_ids) > 1:
        raise UsageError(f"--compile with DataParallel on {len(gpu_ids)} GPUs: its replicas "
                         f"run uncompiled in DataParallel's threads, so the run would not "
                         f"measure a compiled model; drop --compile, or compile under DDP "
                         f"(step 04)")


def notes(global_batch: int, gpu_ids: list[int]) -> list[str]:
    """Plain sentences for the report about the degenerate cases of this run."""
    said = []
    if len(gpu_ids) <= 1:  # nothing to split across
        where = "one GPU" if gpu_ids else "the CPU"
        said.append(f"DataParallel on {where} is the plain module: world size 1, so this "
                    f"measures DataParallel's overhead, not scaling.")
    elif global_batch % len(gpu_ids):
        said.append(f"The global batch of {global_batch} does not split evenly across "
                    f"{len(gpu_ids)} GPUs; the last GPU gets fewer images.")
    return said


class AutocastForward(nn.Module):
    """Runs the wrapped module's forward under autocast with a fixed dtype.

    Autocast state is per thread. Where forward runs in a thread that sets autocast up
    itself without a dtype (DataParallel's replicas get float16 on CUDA that way), an
    autocast entered inside forward is the innermost one, so the requested dtype holds.
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype | None):
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.module(*args, **kwargs)
