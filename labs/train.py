"""What steps 02, 03 and 04 share around their training step.

The step itself (forward under autocast, loss, backward, optimizer step) is in each
script, where DDP's part of it can be seen. Here: the settings every run resolves the
same way (AMP, backends, optimizer, learning-rate rule, schedule checks) and ``Trainer``,
which hands the script one ``Step`` after another (``Trainer.steps``) and keeps the
timing, the learning-rate warmup, the progress bar and fault injection out of sight.
It knows nothing of DataParallel or DDP: ``evaluate`` adds up its counts with
``reduce_sum`` when one is given (04: ``distributed.all_reduce_sum``), so that every
validation image counts once over all ranks.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from labs import faults, profiling
from labs.cli import is_allocation_failure
from labs.compat import OutOfMemoryError
from labs.errors import UsageError, first_line
from labs.measure import Meter

# tqdm's default lock is a multiprocessing semaphore; a rank killed by SIGKILL leaves it
# behind and the launcher's resource tracker warns about it. One process, one thread lock.
tqdm.set_lock(threading.RLock())

# The compute-only probe (04): enough steps for a median, few enough to cost seconds.
COMPUTE_ONLY_STEPS = 10
COMPUTE_ONLY_WARMUP = 2


# Measured (2-core x86 CPU, torch 2.14, one thread; 02 --preset smoke --epochs 1
# --steps-per-epoch 12): median step 2,552 ms with --amp fp16, 78 ms with --amp off,
# 93 ms with --amp bf16.
CPU_FP16_SLOWDOWN = 33


def resolve_amp(requested: str, device: torch.device) -> str:
    """auto: bf16 on GPUs with native bf16 (compute capability 8.0, Ampere, and newer),
    fp16 with GradScaler on older GPUs, off on the CPU."""
    if requested == "fp16" and device.type == "cpu":
        raise UsageError(f"--amp fp16 on the CPU: few CPU kernels support float16, so a "
                         f"step ran {CPU_FP16_SLOWDOWN}x slower than fp32 on a test machine; "
                         f"use --amp bf16 (fast on CPUs with bf16 units) or --amp off")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "off"  # CPU autocast is slower than fp32 on CPUs without bf16 units
    # Not torch.cuda.is_bf16_supported(): by default it also counts emulated bf16, which
    # runs slower than fp16 on the tensor cores of a V100 or T4.
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


def autocast_dtype(amp: str) -> torch.dtype | None:
    return {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def configure_backends(device: torch.device) -> None:
    """Library switches every run wants (recorded in the result's config).

    On the CPU a device is one thread: each process (02, 03 and every rank of 04) runs one
    thread, so 02 is one device and ``04 --nproc 2`` is two on any number of cores, and
    the report pairs them like with like (``config.threads_per_process``). An
    ``OMP_NUM_THREADS`` in the environment wins: the user's (or torchrun's, which sets 1
    for its ranks) is kept. On GPUs the CPU threads only launch kernels: left as they are.
    """
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS", "").strip():
        torch.set_num_threads(1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # autotune convolutions; warmup absorbs it
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 parts
        torch.backends.cudnn.allow_tf32 = True


def to_device(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def check_trains(model: nn.Module, args, devices: list[torch.device],
                 dtype: torch.dtype | None) -> None:
    """One forward and backward pass on a random batch before anything is timed, so that
    a model that cannot train on these images (too small for its kernels, a fixed input
    size) or this batch (batch norm with one image per device) is one line and exit
    status 2 now, not a traceback at the first step. ``devices``: DataParallel's split
    the batch. The model is left as it was: no optimizer step, gradients cleared,
    batch-norm statistics restored, the random state untouched."""
    device = devices[0]
    per_device = max(1, args.batch_size // len(devices))
    batch = min(per_device, 2)  # one image finds batch norm's limit; two find the rest
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            images = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
            labels = torch.zeros(batch, dtype=torch.long, device=device)
            with torch.autocast(device.type, dtype, enabled=dtype is not None):
                loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
        except (RuntimeError, ValueError, AssertionError, IndexError) as err:
            if isinstance(err, OutOfMemoryError) or is_allocation_failure(err):
                raise  # memory: cli.run's "out of memory before training" (status 3)
            raise UsageError(_cannot_train(err, args, per_device)) from None
        finally:
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    buffer.copy_(saved[name])


def _cannot_train(err: Exception, args, per_device: int) -> str:
    text = first_line(err, type(err).__name__)[:200]
    if "Expected more than 1 value per channel" in text:
        return (f"--batch-size {args.batch_size} gives {per_device} image per device, and "
                f"{args.model}'s batch norm needs at least 2 to train; use at least 2 per "
                f"device")
    return (f"--model {args.model} cannot train on {args.img_size}-pixel images ({text}); "
            f"models made for ImageNet train at --img-size 224")


MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
OPTIMIZER = "SGD(momentum=0.9, weight_decay=1e-4)"  # the two above, as the result says it


def build_optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.SGD:
    """SGD with momentum; the fused CUDA kernel on GPUs, foreach elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    implementation = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                           **implementation)


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of gradient one backward pass produces: what DDP all-reduces every step
    (gradients take their parameter's dtype, fp32 here even under autocast)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def default_lr(global_batch: int) -> float:
    return 0.1 * global_batch / 256  # linear scaling rule (Goyal et al., 2017)


LR_WARMUP_SHARE = 0.05  # of the run's optimizer steps, for the default learning rate


def lr_warmup_steps(args, steps_per_epoch: int) -> int:
    """Steps of linear learning-rate warmup: 5% of the run (at least 1) with the default
    learning rate, whose linear scaling rule grows it with the global batch and which a
    fresh model cannot take at once (Goyal et al., 2017); none with --lr given."""
    if args.lr:
        return 0
    return max(1, math.ceil(LR_WARMUP_SHARE * steps_per_epoch * args.epochs))


def lr_rule(args, global_batch: int, steps_per_epoch: int) -> str:
    """The learning-rate rule in words, for the result's config.lr_rule."""
    if args.lr:
        return "--lr given"
    warmup = lr_warmup_steps(args, steps_per_epoch)
    return (f"0.1 × global batch {global_batch} / 256, linear warmup over "
            f"{warmup} step{'s' if warmup != 1 else ''}")


def steps_per_epoch(batches_per_epoch: int, grad_accum_steps: int,
                    cap: int | None) -> int:
    steps = batches_per_epoch // grad_accum_steps
    return min(steps, cap) if cap else steps


def check_schedule(steps: int, epochs: int, warmup_steps: int, what: str) -> None:
    """Refuse a run that would measure nothing, before any work is done."""
    if steps < 1:
        raise UsageError(f"{what}: not even one optimizer step per epoch; use a larger "
                         f"--dataset-size or a smaller --batch-size/--grad-accum-steps")
    if warmup_steps >= steps * epochs:
        raise UsageError(f"--warmup-steps {warmup_steps} leaves nothing to measure in "
                         f"{epochs} epoch(s) of {steps} step(s); lower it or run longer")


class Step:
    """One optimizer step as the script's ``train_step`` sees it: ``micro_batches()`` draws
    ``grad_accum_steps`` batches from the loader, each moved to the device in the model's
    memory layout (the wait for the loader is timed), and says which one is the last;
    ``add_loss`` adds a micro-batch's loss to the epoch's sum on the device (no host sync)."""

    def __init__(self, batches, grad_accum_steps: int, device: torch.device,
                 memory_format: torch.memory_format, loss_sum: torch.Tensor):
        self.grad_accum_steps = grad_accum_steps
        self.last_micro_batch = False
        self.data_wait_s = 0.0
        self._batches = batches
        self._device = device
        self._memory_format = memory_format
        self._loss_sum = loss_sum

    def micro_batches(self):
        for micro in range(self.grad_accum_steps):
            started = time.perf_counter()
            images, labels = next(self._batches)
            self.data_wait_s += time.perf_counter() - started
            self.last_micro_batch = micro == self.grad_accum_steps - 1
            yield (images.to(self._device, non_blocking=True, memory_format=self._memory_format),
                   labels.to(self._device, non_blocking=True))

    def add_loss(self, loss: torch.Tensor) -> None:
        self._loss_sum += loss.detach()


class Trainer:
    """What surrounds the scripts' training step: the epoch's steps (learning-rate warmup,
    timing into a Meter, the progress bar, LAB_FAULT), evaluation, and the compute-only
    steps of 04's communication probe."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, *, amp: str, channels_last: bool,
                 grad_accum_steps: int, meter: Meter, steps_per_epoch: int, epochs: int,
                 reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 lr_warmup_steps: int = 0, show_progress: bool = True):
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.dtype = autocast_dtype(amp)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.grad_accum_steps = grad_accum_steps
        self.meter = meter
        self.steps_per_epoch = steps_per_epoch
        self.evaluation_context = contextlib.nullcontext  # labs.local_sgd replaces it
        self.epochs = epochs
        self.reduce_sum = reduce_sum
        self.lr_warmup_steps = lr_warmup_steps
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.show_progress = show_progress
        self.fault = faults.from_env()  # LAB_FAULT (tests): a crash, OOM or signal at a step

    def _step(self, batches, loss_sum: torch.Tensor) -> Step:
        return Step(batches, self.grad_accum_steps, self.device, self.memory_format, loss_sum)

    def steps(self, loader, epoch: int):
        """The epoch's optimizer steps, one ``Step`` each for the script to train on. Around
        each: the learning rate (warmup), the step's time into the meter, the progress
        bar; after the last, the epoch's mean loss (read once: one host sync)."""
        meter = self.meter
        meter.start_epoch()
        batches = iter(loader)
        loss_sum = torch.zeros((), device=self.device)
        progress = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}",
                        unit="step", disable=not self.show_progress, dynamic_ncols=True,
                        leave=True)
        try:
            for i in range(self.steps_per_epoch):
                self._set_lr(epoch * self.steps_per_epoch + i)
                if self.fault is not None:
                    self.fault.maybe_fire(meter.steps_done)
                step = self._step(batches, loss_sum)
                yield step
                meter.end_step(step.data_wait_s)
                progress.update()
            meter.end_epoch(loss_sum / self.steps_per_epoch)
            loss = meter.loss_per_epoch[-1]
            progress.set_postfix_str(f"loss {loss:.4f}" if math.isfinite(loss) else "loss nan")
        finally:
            progress.close()
            del batches  # stop this epoch's workers before the next epoch starts its own

    def _set_lr(self, step: int) -> None:
        """Linear warmup: step k (from 0, counted over the whole run, so a resumed run
        continues where it was) uses (k + 1) / warmup of the base learning rate."""
        if step > self.lr_warmup_steps:
            return  # the base rate, set at the step that ends the warmup
        factor = min(1.0, (step + 1) / self.lr_warmup_steps) if self.lr_warmup_steps else 1.0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def evaluate(self, loader, epoch: int) -> dict | None:
        """Top-1 accuracy and mean loss on the validation ``loader`` (None: no evaluation,
        returns None): model.eval() under torch.no_grad(), with the training's autocast.
        The counts of every rank are added up with ``reduce_sum``, so each validation
        image counts once. Timed apart: the meter keeps it out of every training time."""
        if loader is None:
            return None
        self.meter.start_eval()
        with self.evaluation_context():  # local SGD: the replicas' average, for this only
            entry = self._evaluate(loader, epoch)
        return entry

    def _evaluate(self, loader, epoch: int) -> dict:
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # right, loss, n
        with torch.no_grad():
            for images, labels in loader:
                images = images.to(self.device, non_blocking=True,
                                   memory_format=self.memory_format)
                labels = labels.to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=self.dtype,
                                    enabled=self.dtype is not None):
                    logits = self.model(images)
                loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
                totals += torch.stack([(logits.argmax(1) == labels).sum().double(),
                                       loss.double(), labels.new_tensor(labels.numel())
                                       .double()])
        if self.reduce_sum is not None:
            totals = self.reduce_sum(totals)
        right, loss_sum, count = totals.tolist()  # one host sync
        self.model.train()
        return self.meter.end_eval(epoch + 1, accuracy=right / count if count else None,
                                   loss=loss_sum / count if count else None,
                                   samples=int(count))

    def compute_only_steps(self, loader, steps: int = COMPUTE_ONLY_STEPS,
                           warmup_steps: int = COMPUTE_ONLY_WARMUP):
        """After training: ``warmup_steps + steps`` more steps on the same data, timed apart
        in the meter, for 04 to run inside DDP's ``no_sync`` (compute without the gradient
        all-reduce). The ranks' weights drift apart during them: nothing may be saved after."""
        self.model.train()
        self.meter.start_compute_only(warmup_steps)
        batches = _endless(loader)
        loss_sum = torch.zeros((), device=self.device)  # not reported: these steps don't train
        for _ in range(warmup_steps + steps):
            step = self._step(batches, loss_sum)
            yield step
            self.meter.end_step(step.data_wait_s)
        self.meter.end_compute_only()

    def profiled_steps(self, loader, steps: int, path):
        """After training: one step to settle, then ``steps`` steps under torch.profiler,
        whose trace goes to ``path`` and whose figures to the meter (``meter.trace``).
        Kept out of every timing; they train on, like the compute-only probe's."""
        self.model.train()
        batches = _endless(loader)
        loss_sum = torch.zeros((), device=self.device)
        yield self._step(batches, loss_sum)  # not profiled: the profiler starts after it
        with profiling.Recorder(path, self.device) as recorder:
            for _ in range(steps):
                with recorder.step():
                    yield self._step(batches, loss_sum)
        self.meter.record_trace(recorder.summary, Path(path), recorder.note)


def _endless(loader):
    """The loader's batches, starting over when it runs out (a short epoch)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the data loader yields no batch")
