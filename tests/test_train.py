"""The training step of the scripts (02's ``train_step``; 04's for no_sync) driven by
labs/train.py's Trainer: mixed precision, channels_last, gradient accumulation, DDP's
no_sync on the micro-batches that must not synchronise, the learning-rate warmup, the
compute-only steps, and the schedule checks."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import load_script
from labs import train
from labs.errors import UsageError
from labs.measure import Meter

CPU = torch.device("cpu")
CLASSES = 5
STEP_02 = load_script("02_baseline_single_gpu.py").train_step
STEP_04 = load_script("04_ddp_training.py").train_step


def tiny_cnn(dtype=torch.float32, seed: int = 0) -> nn.Module:
    """Conv/ReLU/Flatten/Linear, no batch norm (see the accumulation test)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, kernel_size=3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, CLASSES),
    ).to(dtype)


def batch(n: int, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g, dtype=dtype)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return images, labels


def make_trainer(model, *, amp="off", channels_last=False, grad_accum_steps=1,
                 steps_per_epoch=1, epochs=1, lr=0.05, lr_warmup_steps=0):
    """What 02 builds around its step: the model on the device, the optimizer, the
    GradScaler and autocast dtype, and the Trainer."""
    model = train.to_device(model, CPU, channels_last)
    optimizer = train.build_optimizer(model, lr, CPU)
    # Warmup longer than the test: the meter never starts its sampling thread.
    meter = Meter(CPU, warmup_steps=10_000, samples_per_step=1)
    trainer = train.Trainer(model, optimizer, CPU, amp=amp, channels_last=channels_last,
                            grad_accum_steps=grad_accum_steps, meter=meter,
                            steps_per_epoch=steps_per_epoch, epochs=epochs,
                            lr_warmup_steps=lr_warmup_steps, show_progress=False)
    return SimpleNamespace(model=model, optimizer=optimizer, meter=meter, trainer=trainer,
                           scaler=torch.amp.GradScaler("cpu", enabled=amp == "fp16"),
                           dtype=train.autocast_dtype(amp))


def train_epoch(run, batches, epoch: int, train_step=STEP_02) -> float:
    """One epoch as the scripts run it; returns the epoch's mean loss."""
    run.model.train()
    for step in run.trainer.steps(batches, epoch):
        train_step(run.model, run.optimizer, run.scaler, step, run.dtype)
    return run.meter.loss_per_epoch[-1]


def params(model):
    return [p.detach().clone() for p in model.parameters()]


# --- mixed precision -----------------------------------------------------------------------

def test_bf16_autocast_runs_the_forward_in_bfloat16_and_learns():
    model = tiny_cnn()
    seen = []
    model[0].register_forward_hook(lambda m, inp, out: seen.append(out.dtype))
    model[5].register_forward_hook(lambda m, inp, out: seen.append(out.dtype))
    run = make_trainer(model, amp="bf16", steps_per_epoch=2, epochs=3, lr=0.1)
    before = params(run.model)
    fixed = batch(8)
    losses = [train_epoch(run, [fixed] * 2, epoch) for epoch in range(3)]
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in run.model.parameters())  # master weights
    assert any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    assert losses[-1] < losses[0]
    assert not run.scaler.is_enabled()  # bf16 has fp32's range: no loss scaling


def test_amp_off_runs_in_float32():
    model = tiny_cnn()
    seen = []
    model[0].register_forward_hook(lambda m, inp, out: seen.append(out.dtype))
    run = make_trainer(model, amp="off")
    train_epoch(run, [batch(4)], 0)
    assert seen == [torch.float32]
    assert not run.scaler.is_enabled()


def test_fp16_scales_the_loss_before_backward_and_learns():
    run = make_trainer(tiny_cnn(), amp="fp16")
    assert run.dtype == torch.float16 and run.scaler.is_enabled()
    scale = run.scaler.get_scale()
    assert scale > 1.0
    seen = []  # the gradient reaching the last layer's output, as backward sees it
    run.model[5].register_full_backward_hook(lambda m, g_in, g_out: seen.append(g_out[0]))
    before = params(run.model)
    train_epoch(run, [batch(4)], 0)
    assert any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    # unscaled, d(mean loss)/d(logit) is at most 1/batch: scaled, it is 65536 times that
    assert seen and seen[0].abs().max().item() > 1.0


def test_autocast_dtype():
    assert train.autocast_dtype("off") is None
    assert train.autocast_dtype("fp16") is torch.float16
    assert train.autocast_dtype("bf16") is torch.bfloat16


def test_resolve_amp():
    assert train.resolve_amp("auto", CPU) == "off"
    assert train.resolve_amp("bf16", CPU) == "bf16"
    with pytest.raises(UsageError, match="--amp fp16 on the CPU.*--amp bf16"):
        train.resolve_amp("fp16", CPU)  # 33x slower than fp32: refused, with the way out
    assert train.resolve_amp("off", CPU) == "off"


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"),
                                                  ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_amp_auto_chooses_bf16_only_where_it_is_native(monkeypatch, capability, expected):
    # is_bf16_supported() would say yes on a V100 or T4 too (emulated bf16, slow)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert train.resolve_amp("auto", torch.device("cuda", 0)) == expected


# --- channels_last ---------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_layout_of_weights_and_input(channels_last):
    model = tiny_cnn()
    layouts = []

    def hook(module, inputs, output):
        layouts.append((
            inputs[0].is_contiguous(memory_format=torch.channels_last),
            module.weight.is_contiguous(memory_format=torch.channels_last),
        ))

    model[2].register_forward_hook(hook)  # 8 channels in, 3x3 kernel: the layout matters
    model[0].register_forward_hook(hook)
    run = make_trainer(model, channels_last=channels_last)
    images, labels = batch(4)
    assert images.is_contiguous()  # NCHW from the loader; the step's batches are converted
    train_epoch(run, [(images, labels)], 0)
    assert len(layouts) == 2
    assert all(layout == (channels_last, channels_last) for layout in layouts), layouts


# --- gradient accumulation -------------------------------------------------------------------

def test_two_micro_steps_equal_one_step_of_the_whole_batch():
    # Without batch norm, the loss of a batch is the mean of per-sample losses, so the
    # gradients of two half batches, each scaled by 1/2, add up to the gradient of the whole
    # batch. Batch norm would break this: it normalises with the statistics of whatever
    # batch it sees, so a half batch is normalised differently from the whole batch (the
    # same reason DDP ranks differ without SyncBatchNorm). float64 keeps rounding out.
    images, labels = batch(8, dtype=torch.float64)
    whole = make_trainer(tiny_cnn(torch.float64), grad_accum_steps=1, lr=0.1)
    halves = make_trainer(tiny_cnn(torch.float64), grad_accum_steps=2, lr=0.1)
    start = params(whole.model)
    assert all(torch.equal(a, b) for a, b in zip(start, halves.model.parameters()))

    train_epoch(whole, [(images, labels)], 0)
    train_epoch(halves, [(images[:4], labels[:4]), (images[4:], labels[4:])], 0)

    moved = max((p - s).abs().max().item() for p, s in zip(whole.model.parameters(), start))
    assert moved > 1e-4  # the step did something
    for a, b in zip(whole.model.parameters(), halves.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the reported loss is that of the whole batch too
    assert halves.meter.loss_per_epoch[0] == pytest.approx(whole.meter.loss_per_epoch[0],
                                                           rel=1e-6)


def test_accumulation_without_scaling_would_differ():
    # Guards the test above: one micro-step of half the batch is not the same update.
    images, labels = batch(8, dtype=torch.float64)
    whole = make_trainer(tiny_cnn(torch.float64), lr=0.1)
    half = make_trainer(tiny_cnn(torch.float64), lr=0.1)
    train_epoch(whole, [(images, labels)], 0)
    train_epoch(half, [(images[:4], labels[:4])], 0)
    assert any(not torch.allclose(a, b) for a, b in zip(whole.model.parameters(),
                                                       half.model.parameters()))


class RecordingDDP(nn.Module):
    """Stands in for DistributedDataParallel: a ``no_sync()`` context, and a note per
    forward pass of whether it ran inside one (DDP decides in the forward pass whether
    the backward that follows all-reduces)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.syncing = True
        self.forwards: list[bool] = []  # True: this forward's backward would all-reduce

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, x):
        self.forwards.append(self.syncing)
        return self.module(x)


def test_04_skips_the_all_reduce_on_every_micro_batch_but_the_last():
    model = RecordingDDP(tiny_cnn())
    run = make_trainer(model, grad_accum_steps=3, steps_per_epoch=2)
    train_epoch(run, [batch(2, seed=s) for s in range(6)], 0, train_step=STEP_04)
    assert model.forwards == [False, False, True] * 2


def test_04_without_accumulation_synchronises_every_step():
    model = RecordingDDP(tiny_cnn())
    run = make_trainer(model, grad_accum_steps=1, steps_per_epoch=3)
    train_epoch(run, [batch(2)] * 3, 0, train_step=STEP_04)
    assert model.forwards == [True] * 3


def test_04s_step_is_02s_step_when_nothing_is_distributed():
    """The lines DDP adds change where gradients are all-reduced, not what is computed."""
    images, labels = batch(8, dtype=torch.float64)
    runs = {}
    for name, step in (("02", STEP_02), ("04", STEP_04)):
        run = make_trainer(RecordingDDP(tiny_cnn(torch.float64)), grad_accum_steps=2, lr=0.1)
        train_epoch(run, [(images[:4], labels[:4]), (images[4:], labels[4:])], 0, step)
        runs[name] = run
    for a, b in zip(runs["02"].model.parameters(), runs["04"].model.parameters()):
        assert torch.equal(a, b)


def test_an_epoch_feeds_the_meter_once_per_optimizer_step():
    run = make_trainer(tiny_cnn(), grad_accum_steps=2, steps_per_epoch=3)
    train_epoch(run, [batch(2)] * 6, 0)
    assert run.meter.steps_done == 3
    assert len(run.meter.loss_per_epoch) == 1


def test_the_compute_only_steps_are_timed_apart_and_reuse_a_short_loader():
    run = make_trainer(tiny_cnn(), steps_per_epoch=2)
    train_epoch(run, [batch(2), batch(2, seed=2)], 0)
    trained = list(run.meter.step_times), run.meter.steps_done
    count = 0
    for step in run.trainer.compute_only_steps([batch(2)], steps=3, warmup_steps=1):
        STEP_02(run.model, run.optimizer, run.scaler, step, run.dtype)
        count += 1
    assert count == 4  # one loader batch, started over for every step
    assert len(run.meter.compute_only_times) == 3  # the warmup step dropped
    assert (run.meter.step_times, run.meter.steps_done) == trained  # training's untouched
    assert not run.meter.in_compute_only


# --- schedule ----------------------------------------------------------------------------------

def test_steps_per_epoch():
    assert train.steps_per_epoch(10, 1, None) == 10
    assert train.steps_per_epoch(10, 3, None) == 3
    assert train.steps_per_epoch(10, 2, 4) == 4
    assert train.steps_per_epoch(10, 2, 50) == 5


def test_check_schedule_refuses_a_run_that_measures_nothing():
    with pytest.raises(UsageError, match="--warmup-steps 10 leaves nothing to measure"):
        train.check_schedule(steps=5, epochs=2, warmup_steps=10, what="x")
    with pytest.raises(UsageError, match="not even one optimizer step"):
        train.check_schedule(steps=0, epochs=2, warmup_steps=0, what="3 images")
    train.check_schedule(steps=5, epochs=2, warmup_steps=9, what="x")  # one step measured


def test_default_lr_scales_with_the_global_batch():
    assert train.default_lr(256) == pytest.approx(0.1)
    assert train.default_lr(512) == pytest.approx(2 * train.default_lr(256))


# --- on a GPU (skipped in CI) ------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_the_steady_state_step_never_synchronises_with_the_gpu(amp):
    """With torch.cuda.set_sync_debug_mode("error") any synchronising call raises. After a
    warmup epoch (cuDNN autotuning and allocator growth may synchronise), steps of the
    real loop on the synthetic pool must not: the host runs ahead of the GPU, and the only
    wait is the one at the end of the epoch. (fp16: fused SGD takes GradScaler's
    inf-check on the device, so it needs no sync either.)"""
    from torch.utils.data import RandomSampler

    from labs import data, models

    device = torch.device("cuda", torch.cuda.current_device())
    dataset = data.SyntheticImages(256, 32, CLASSES, device, seed=0)
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    loader = data.build_loader(dataset, SimpleNamespace(seed=0, batch_size=16), sampler,
                               device, 0)
    model = train.to_device(models.build_model("resnet18", CLASSES, 32), device, True)
    optimizer = train.build_optimizer(model, 0.1, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    dtype = train.autocast_dtype(amp)
    meter = Meter(device, warmup_steps=3, samples_per_step=16)
    trainer = train.Trainer(model, optimizer, device, amp=amp, channels_last=True,
                            grad_accum_steps=1, meter=meter, steps_per_epoch=5, epochs=2,
                            show_progress=False)
    for step in trainer.steps(loader, 0):  # warmup
        STEP_02(model, optimizer, scaler, step, dtype)
    steps = trainer.steps(loader, 1)
    STEP_02(model, optimizer, scaler, next(steps), dtype)  # the epoch's start, unchecked
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            STEP_02(model, optimizer, scaler, next(steps), dtype)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for step in steps:  # the last step, and the epoch's end (one wait, allowed)
        STEP_02(model, optimizer, scaler, step, dtype)
    assert len(meter.step_times) == 5 + 5 - 3 and all(t > 0 for t in meter.step_times)


# --- learning-rate warmup and evaluation --------------------------------------------------

def test_learning_rate_warms_up_linearly_over_the_run_then_holds():
    seen = []

    def recording_step(model, optimizer, scaler, step, dtype):
        seen.append(optimizer.param_groups[0]["lr"])
        STEP_02(model, optimizer, scaler, step, dtype)

    run = make_trainer(tiny_cnn(), steps_per_epoch=2, epochs=3, lr=0.4, lr_warmup_steps=4)
    for epoch in range(3):
        train_epoch(run, [batch(4, seed=epoch), batch(4, seed=epoch + 9)], epoch,
                    recording_step)
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    # a resumed run (epoch 1 first) continues the schedule where it was, not from 0
    resumed = make_trainer(tiny_cnn(), steps_per_epoch=2, epochs=3, lr=0.4, lr_warmup_steps=4)
    seen.clear()
    train_epoch(resumed, [batch(4), batch(4)], 1, recording_step)
    assert seen == pytest.approx([0.3, 0.4])


def test_lr_warmup_steps_and_rule():
    from labs import cli

    args = cli.parse_args("02_baseline", argv=["--preset", "smoke", "--epochs", "4"])
    assert train.lr_warmup_steps(args, 25) == 5  # 5% of 100 steps
    assert train.lr_warmup_steps(args, 1) == 1  # never less than one step
    assert train.lr_rule(args, 64, 25) == "0.1 × global batch 64 / 256, linear warmup over 5 steps"
    given = cli.parse_args("02_baseline", argv=["--preset", "smoke", "--lr", "0.3"])
    assert train.lr_warmup_steps(given, 25) == 0 and train.lr_rule(given, 64, 25) == "--lr given"


def test_evaluate_counts_accuracy_and_loss_without_gradients():
    model = tiny_cnn()
    run = make_trainer(model)
    trainer = run.trainer
    images, labels = batch(10, seed=4)
    loader = [(images[:4], labels[:4]), (images[4:], labels[4:])]  # the last batch short
    entry = trainer.evaluate(loader, epoch=2)
    with torch.no_grad():
        logits = model(images)
    assert entry["epoch"] == 3 and entry["samples"] == 10
    assert entry["accuracy"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert entry["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(),
                                          rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # nothing was backpropagated
    assert model.training  # back to training mode for the next epoch
    assert trainer.meter.evals == [entry] and trainer.meter.step_times == []
    assert trainer.evaluate(None, epoch=0) is None  # --no-eval: nothing at all
