"""DDP computes what one process would on the whole batch: the strongest DDP test.

The module starts its ranks once (torch.multiprocessing.spawn; a rank costs a torch import,
seconds on a small CPU): they meet through a FileStore in pytest's tmp_path (no port to
collide on), over gloo with one thread per rank, and run every scenario below one after
the other in one process group. They train with the lab's own pieces: 04's ``train_step``
(02's for the one process, and for accumulating without no_sync), labs.train.Trainer,
labs.train.build_optimizer and DDP wrapped as 04 wraps it (gradient_as_bucket_view, small
buckets so there are several). The tests then compare what each rank saved.

The test model has no batch norm on purpose: BatchNorm normalises each rank's share of the
batch with that share's own mean and variance, so the per-rank gradients are not those of
the concatenated batch (only SyncBatchNorm, which needs GPUs, would make them equal).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import load_script
from labs import data, distributed, train
from labs.measure import Meter

STEP_02 = load_script("02_baseline_single_gpu.py").train_step
STEP_04 = load_script("04_ddp_training.py").train_step

BATCH_PER_RANK = 4
WORLD = 3  # not a power of two: the validation set below splits unevenly over the ranks
SCENARIOS = {  # name: (micro-batches per optimizer step, 04's step with no_sync, or 02's?)
    "one-step": (1, True),
    "accumulated": (2, True),
    "accumulated-without-no-sync": (2, False),
}
EVAL_SIZE = 7  # divisible by neither 2 nor 3: a padding sampler would repeat images


# --- training: one DDP step equals one step on the concatenated batch ---------------------

def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))


def global_batch(micro_batches: int):
    """The whole batch every test slices: rank r, micro-step m gets its own rows."""
    gen = torch.Generator().manual_seed(1)
    n = BATCH_PER_RANK * WORLD * micro_batches
    return torch.randn(n, 3, 12, 12, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def rows_for(rank: int, micro: int):
    """Rank r's rows for micro-step m, laid out so all ranks' micro-step m together are one
    contiguous block of the global batch."""
    start = (micro * WORLD + rank) * BATCH_PER_RANK
    return slice(start, start + BATCH_PER_RANK)


def one_step(model, micro_batches: int, batches, train_step=STEP_02) -> nn.Module:
    device = torch.device("cpu")
    # Same learning rate as the single process: DDP averages gradients over ranks, and
    # the loss is a mean over each rank's batch, so the averaged gradient is the gradient
    # of the mean loss over the concatenated batch.
    optimizer = train.build_optimizer(model, lr=0.5, device=device)
    meter = Meter(device, warmup_steps=0, samples_per_step=BATCH_PER_RANK * micro_batches)
    trainer = train.Trainer(model, optimizer, device, amp="off", channels_last=False,
                            grad_accum_steps=micro_batches, meter=meter, steps_per_epoch=1,
                            epochs=1, show_progress=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in trainer.steps(batches, epoch=0):
        train_step(model, optimizer, scaler, step, None)
    return model


def train_on_rank(rank: int, micro_batches: int, use_no_sync: bool) -> dict:
    """One DDP step of the tiny model on this rank's rows, its all-reduces counted."""
    model = DDP(tiny_model(), bucket_cap_mb=0.001, gradient_as_bucket_view=True,
                **distributed.buffer_sync(False))
    all_reduces = {"count": 0}

    def counting_allreduce(state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        state["count"] += 1
        return default_hooks.allreduce_hook(None, bucket)

    model.register_comm_hook(all_reduces, counting_allreduce)
    images, labels = global_batch(micro_batches)
    batches = [(images[rows_for(rank, m)], labels[rows_for(rank, m)])
               for m in range(micro_batches)]
    one_step(model, micro_batches, batches, STEP_04 if use_no_sync else STEP_02)
    return {"state": model.module.state_dict(), "all_reduces": all_reduces["count"]}


# --- local SGD (labs/local_sgd.py): averaging every H steps --------------------------------

LOCAL_STEPS = 8


def local_batches(rank: int, steps: int) -> list:
    """A different batch on every rank at every step, as each rank's own data gives."""
    out = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        images = torch.randn(BATCH_PER_RANK * WORLD, 3, 12, 12, generator=gen)
        labels = torch.randint(0, 5, (BATCH_PER_RANK * WORLD,), generator=gen)
        out.append((images[rows_for(rank, 0)], labels[rows_for(rank, 0)]))
    return out


def train_local(rank: int, sync: str, average_every: int, steps: int) -> dict:
    """``steps`` steps of 04's train_step, DDP as 04 wraps it, then 04's averager (local
    SGD with no warm-up, or DDP's every-step no-op); the parameters after every step."""
    from types import SimpleNamespace

    from torch.nn.utils import parameters_to_vector

    from labs import local_sgd

    device = torch.device("cpu")
    model = DDP(tiny_model(), bucket_cap_mb=0.001, gradient_as_bucket_view=True,
                **distributed.buffer_sync(False))
    optimizer = train.build_optimizer(model, lr=0.5, device=device)
    meter = Meter(device, warmup_steps=0, samples_per_step=BATCH_PER_RANK)
    args = SimpleNamespace(sync=sync, average_every=average_every, local_sgd_warmup=0)
    trainer = train.Trainer(model, optimizer, device, amp="off", channels_last=False,
                            grad_accum_steps=1, meter=meter, steps_per_epoch=steps,
                            epochs=1, show_progress=False)
    averager = local_sgd.setup(model, args, trainer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    after = []
    for step in trainer.steps(local_batches(rank, steps), epoch=0):
        STEP_04(model, optimizer, scaler, step, None)
        averager.after_step()
        after.append(parameters_to_vector(model.module.parameters()).detach().clone())
    with trainer.evaluation_context():  # what Trainer.evaluate sees
        evaluated = parameters_to_vector(model.module.parameters()).detach().clone()
    own = parameters_to_vector(model.module.parameters()).detach().clone()
    summary = meter.rank_summary(rank)["local_sgd"]  # what the result receives
    return {"after": after, "local_sgd": summary, "evaluated": evaluated, "own": own}


# --- evaluation: every validation image counts exactly once over the ranks ----------------

class IndexImages(torch.utils.data.Dataset):
    """Image i is filled with the number i; every label is 0."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(i)), torch.tensor(0)


class ParityModel(nn.Module):
    """Predicts class 0 for even images, class 1 for odd ones, and notes what it saw."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []

    def forward(self, x):
        index = x[:, 0, 0, 0].long()
        self.seen += index.tolist()
        odd = (index % 2).float()
        return 5 * torch.stack([1 - odd, odd], dim=1) + 0 * self.weight


def evaluate_on_rank(rank: int, world: int) -> dict:
    """This rank's share of the validation set, evaluated as 04 does; the counts are
    all-reduced over the process group."""
    cpu = torch.device("cpu")
    module = ParityModel()
    model = DDP(module, **distributed.buffer_sync(False))
    meter = Meter(cpu, warmup_steps=0, samples_per_step=2)
    trainer = train.Trainer(model, train.build_optimizer(model, 0.1, cpu), cpu,
                            amp="off", channels_last=False, grad_accum_steps=1,
                            meter=meter, steps_per_epoch=1, epochs=1,
                            reduce_sum=distributed.all_reduce_sum, show_progress=False)
    loader = data.eval_loader(IndexImages(EVAL_SIZE), 2, cpu, 0,
                              data.ShardSampler(EVAL_SIZE, rank, world))
    entry = trainer.evaluate(loader, epoch=0)
    return {"entry": entry, "seen": module.seen, "training": module.training}


# --- the ranks, started once for the module -----------------------------------------------

def _worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank,
                            world_size=WORLD)
    try:
        out = {name: train_on_rank(rank, *how) for name, how in SCENARIOS.items()}
        out["eval"] = evaluate_on_rank(rank, WORLD)
        out["ddp-steps"] = train_local(rank, "every-step", None, LOCAL_STEPS)
        out["local-sgd-h1"] = train_local(rank, "local-sgd", 1, LOCAL_STEPS)
        out["local-sgd-h4"] = train_local(rank, "local-sgd", 4, LOCAL_STEPS)
        # the last collective before the teardown goes through the lab's safe path: a
        # plain one there can hang a rank at exit (torch 2.4.1, labs.distributed)
        distributed.run_collective(dist.barrier)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the WORLD ranks computed, by scenario."""
    folder = tmp_path_factory.mktemp("ddp-equivalence")
    mp.spawn(_worker, args=(str(folder / "store"), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def single_process_reference(micro_batches: int) -> dict:
    images, labels = global_batch(micro_batches)
    model = one_step(tiny_model(), 1, [(images, labels)])
    return model.state_dict()


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def assert_same_on_every_rank(runs: list[dict]) -> None:
    """Bit for bit: every rank applied the same averaged gradient."""
    for other in runs[1:]:
        assert_same_weights(runs[0]["state"], other["state"], atol=0)


def test_one_ddp_step_equals_one_step_on_the_concatenated_batch(ranks):
    step = [r["one-step"] for r in ranks]
    assert_same_on_every_rank(step)
    reference = single_process_reference(micro_batches=1)
    assert_same_weights(step[0]["state"], reference, atol=1e-5)
    # the step really moved the weights (an equality of untouched weights proves nothing)
    untouched = tiny_model().state_dict()
    assert any(not torch.allclose(untouched[k], reference[k]) for k in reference)


def test_gradient_accumulation_with_no_sync_equals_the_large_batch_step(ranks):
    accumulated = [r["accumulated"] for r in ranks]
    assert_same_on_every_rank(accumulated)
    assert_same_weights(accumulated[0]["state"], single_process_reference(2), atol=1e-5)
    # no_sync skipped the all-reduce of the first micro-step: a step costs the all-reduces
    # of one backward, where accumulating without no_sync costs those of every micro-step
    plain, without_no_sync = ranks[0]["one-step"], ranks[0]["accumulated-without-no-sync"]
    assert accumulated[0]["all_reduces"] == plain["all_reduces"] >= 1
    # (DDP re-buckets after its first backward, so the second micro-step may use more
    # buckets than the first: compare, don't multiply)
    assert without_no_sync["all_reduces"] > accumulated[0]["all_reduces"]
    assert_same_weights(without_no_sync["state"], accumulated[0]["state"], atol=1e-5)


def evaluate_alone(tmp_path) -> list[dict]:
    """A world of one, in this process: its own group, gone again afterwards."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        return [evaluate_on_rank(0, 1)]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, WORLD])
def test_distributed_evaluation_counts_every_validation_image_once(ranks, tmp_path, world):
    evaluated = evaluate_alone(tmp_path) if world == 1 else [r["eval"] for r in ranks]
    seen = sorted(i for r in evaluated for i in r["seen"])
    assert seen == list(range(EVAL_SIZE))  # every image evaluated, on exactly one rank
    if world > 1:
        assert all(r["seen"] for r in evaluated)  # and every rank had a share
    even = len(range(0, EVAL_SIZE, 2))
    expected_loss = (EVAL_SIZE - even) * 5 / EVAL_SIZE + math.log1p(math.exp(-5))
    for r in evaluated:  # the same all-reduced numbers on every rank
        entry = r["entry"]
        assert entry["samples"] == EVAL_SIZE and entry["epoch"] == 1
        assert entry["accuracy"] == pytest.approx(even / EVAL_SIZE)
        assert entry["loss"] == pytest.approx(expected_loss, rel=1e-6)
        assert r["training"]  # back in training mode afterwards


def test_local_sgd_averaging_every_step_is_ddp(ranks):
    """H = 1: each rank steps on its own gradient and the replicas are averaged after every
    step; SGD (momentum and weight decay included) is linear in the gradient, so this is
    DDP's averaged-gradient step, to rounding."""
    for rank in ranks:
        for ddp, local in zip(rank["ddp-steps"]["after"], rank["local-sgd-h1"]["after"]):
            torch.testing.assert_close(local, ddp, atol=1e-5, rtol=1e-5)
    # and the steps moved the weights: equality of untouched weights would prove nothing
    first, last = ranks[0]["ddp-steps"]["after"][0], ranks[0]["ddp-steps"]["after"][-1]
    assert not torch.allclose(first, last)


def test_local_sgd_every_4_steps_equal_after_each_average_apart_between(ranks):
    after = [r["local-sgd-h4"]["after"] for r in ranks]  # [rank][step] parameters
    averaged = [0, 4]  # the average runs after steps 1 and 5 (counted from 0: 0 and 4)
    for step in range(LOCAL_STEPS):
        spread = max(float((after[r][step] - after[0][step]).abs().max())
                     for r in range(1, WORLD))
        if step in averaged:
            assert spread < 1e-6, f"step {step}: replicas differ by {spread} after averaging"
        else:
            assert spread > 1e-4, f"step {step}: replicas equal without an average"
    summary = ranks[0]["local-sgd-h4"]["local_sgd"]
    assert summary["averages"] == 2 and summary["steps"] == LOCAL_STEPS
    params = after[0][0].numel() * 4
    assert summary["bytes_all_reduced"] == 2 * params  # no warm-up, no float buffers
    assert len(summary["divergence"]) == 2 and summary["divergence"][1] > 0


def test_local_sgd_evaluates_the_average_and_trains_on_its_own_replica(ranks):
    runs = [r["local-sgd-h4"] for r in ranks]  # steps 6-8 were local: replicas differ
    mean = torch.stack([r["after"][-1] for r in runs]).mean(0)
    for run in runs:
        torch.testing.assert_close(run["evaluated"], mean, atol=1e-6, rtol=1e-6)
        assert torch.equal(run["own"], run["after"][-1])  # its replica back, untouched
    assert not torch.allclose(runs[0]["own"], runs[1]["own"])
