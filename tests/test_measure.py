"""Measurement arithmetic (labs/measure.py): percentiles, the Meter's warmup bookkeeping,
and how ``combine`` turns every rank's numbers into one result's metrics."""

from __future__ import annotations

import math
import random

import pytest
import torch

from labs.measure import Meter, combine, percentile, spread

CPU = torch.device("cpu")


# --- spread / percentile ---------------------------------------------------------------

def test_spread_of_known_values():
    # 1..11: linear interpolation puts p10 exactly on the 2nd value and p90 on the 10th.
    values = list(range(1, 12))
    assert spread(values) == {"median": 6.0, "p10": 2.0, "p90": 10.0}


def test_spread_interpolates_between_values():
    # Two values 0 and 10: p10 is 10 % of the way, p90 is 90 % of the way.
    s = spread([10.0, 0.0])
    assert s["p10"] == pytest.approx(1.0)
    assert s["median"] == pytest.approx(5.0)
    assert s["p90"] == pytest.approx(9.0)


def test_spread_ignores_input_order_and_is_ordered():
    values = [0.5, 3.0, 0.1, 7.5, 2.2, 9.9, 4.4, 0.3]
    shuffled = values[:]
    random.Random(1).shuffle(shuffled)
    s = spread(values)
    assert spread(shuffled) == s
    assert min(values) <= s["p10"] <= s["median"] <= s["p90"] <= max(values)
    assert s["p10"] < s["median"] < s["p90"]  # distinct values: a real spread


def test_spread_of_one_value():
    assert spread([0.25]) == {"median": 0.25, "p10": 0.25, "p90": 0.25}


def test_percentile_accepts_ints_and_returns_a_float():
    assert percentile([1, 2, 3, 4, 5], 50) == 3.0
    assert isinstance(percentile([1, 2, 3], 50), float)


# --- Meter, driven by hand ---------------------------------------------------------------

class FakeClock:
    """Stands in for the Meter's clock: the test says what time it is."""

    def __init__(self):
        self.now = 0.0
        self.synchronized = 0

    def mark(self):
        return self.now

    def seconds(self, start, end):
        return end - start

    def synchronize(self):
        self.synchronized += 1

    def finished(self, mark):
        return True


def hand_meter(warmup_steps: int, samples_per_step: int = 4) -> tuple[Meter, FakeClock]:
    meter = Meter(CPU, warmup_steps=warmup_steps, samples_per_step=samples_per_step)
    clock = FakeClock()
    meter.clock = clock
    return meter, clock


def drive(meter: Meter, clock: FakeClock, epochs: list[list[float]], *,
          epoch_gap: float = 100.0, wait_per_step=lambda k: 0.0, loss=1.0):
    """Run epochs of steps with the given durations (seconds); step k (1-based, counted
    over the whole run) reports a data wait of wait_per_step(k)."""
    k = 0
    for durations in epochs:
        clock.now += epoch_gap  # time between epochs must never count as a step
        meter.start_epoch()
        for duration in durations:
            k += 1
            clock.now += duration
            meter.end_step(wait_per_step(k))
        meter.end_epoch(loss)


def test_meter_excludes_exactly_the_warmup_steps():
    meter, clock = hand_meter(warmup_steps=2)
    drive(meter, clock, [[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert meter.step_times == [3.0, 4.0, 5.0]  # the first two steps were warmup
    assert meter.steps_done == 5
    assert not meter.warming_up
    meter.rank_summary()  # stops the sampler thread started when warmup ended


def test_meter_warmup_spanning_an_epoch_boundary():
    meter, clock = hand_meter(warmup_steps=4)
    # Epoch 1 is all warmup; epoch 2's first step is the last warmup step.
    drive(meter, clock, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert meter.step_times == [5.0, 6.0]
    assert len(meter.epoch_times) == 2
    assert meter.loss_per_epoch == [1.0, 1.0]
    assert clock.synchronized == 2  # one device wait per epoch, none per step
    summary = meter.rank_summary()
    assert summary["step_times_s"] == [5.0, 6.0]
    assert summary["warmup_steps"] == 4


def test_meter_first_measured_step_of_an_epoch_starts_at_the_epoch_start():
    meter, clock = hand_meter(warmup_steps=1)
    drive(meter, clock, [[1.0, 2.0], [3.0, 4.0]], epoch_gap=50.0)
    # The 50 s between epochs is not part of step 3.
    assert meter.step_times == [2.0, 3.0, 4.0]
    meter.rank_summary()


def test_meter_without_warmup_measures_every_step():
    meter, clock = hand_meter(warmup_steps=0)
    meter.start_epoch()
    assert meter._sampling  # warmup 0: the sampler starts with the first epoch
    meter.end_epoch(None)
    drive(meter, clock, [[1.0, 2.0], [3.0]])
    assert meter.step_times == [1.0, 2.0, 3.0]
    meter.rank_summary()
    assert not meter._sampling


def test_meter_data_wait_counts_only_measured_steps():
    meter, clock = hand_meter(warmup_steps=3)
    # step k waits k/100 s for its batch; steps 1-3 are warmup.
    drive(meter, clock, [[1.0] * 3, [1.0] * 3], wait_per_step=lambda k: k / 100)
    assert meter.measured_data_wait_s == pytest.approx((4 + 5 + 6) / 100)
    assert meter.rank_summary()["measured_data_wait_s"] == pytest.approx(0.15)


def test_meter_all_warmup_measures_nothing():
    meter, clock = hand_meter(warmup_steps=10)
    drive(meter, clock, [[1.0, 1.0, 1.0]], wait_per_step=lambda k: 0.5)
    assert meter.step_times == []
    assert meter.measured_data_wait_s == 0.0
    assert meter.warming_up


def test_meter_records_losses_and_non_finite_loss_as_nan():
    meter, clock = hand_meter(warmup_steps=0)
    meter.start_epoch()
    clock.now += 1
    meter.end_step(0.0)
    meter.end_epoch(torch.tensor(2.5))
    meter.start_epoch()
    clock.now += 1
    meter.end_step(0.0)
    meter.end_epoch(float("inf"))
    meter.start_epoch()
    meter.end_epoch(None)  # no loss: nothing appended
    assert meter.loss_per_epoch[0] == 2.5
    assert math.isnan(meter.loss_per_epoch[1])
    assert len(meter.loss_per_epoch) == 2
    assert len(meter.epoch_times) == 3
    meter.rank_summary()


def test_meter_flush_keeps_the_steps_of_an_epoch_cut_short():
    meter, clock = hand_meter(warmup_steps=1)
    meter.start_epoch()
    for duration in (1.0, 2.0, 3.0):
        clock.now += duration
        meter.end_step(0.0)
    assert meter.step_times == []  # not read until the epoch ends...
    meter.flush()  # ...or the run is cut short
    assert meter.step_times == [2.0, 3.0]
    meter.flush()
    assert meter.step_times == [2.0, 3.0]  # nothing counted twice
    meter.rank_summary()


class FakeEvent:
    """A CUDA event as the Meter sees it: recorded at ``t`` ms, done or not yet."""

    def __init__(self, t: float, done: bool):
        self.t, self.done = t, done

    def query(self):
        return self.done

    def elapsed_time(self, end):
        assert self.done and end.done, "elapsed_time on an unfinished event blocks"
        return end.t - self.t


def test_meter_flush_on_the_failure_path_never_waits_for_the_gpu(monkeypatch):
    """After a peer dies under NCCL, the last steps' collectives never finish: flush keeps
    the finished steps and must not call a synchronising CUDA API."""
    def no_sync(*args, **kwargs):
        raise AssertionError("the failure path synchronised with the GPU")

    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    monkeypatch.setattr(torch.cuda, "current_stream", no_sync)
    meter = Meter(CPU, warmup_steps=1, samples_per_step=4)
    meter.clock.cuda = True  # a GPU clock whose events the test controls
    events = iter([FakeEvent(0, True), FakeEvent(100, True), FakeEvent(250, True),
                   FakeEvent(450, True), FakeEvent(700, False), FakeEvent(1000, False)])
    meter.clock.mark = lambda: next(events)
    meter.start_epoch()
    for _ in range(5):
        meter.end_step(0.0)
    meter.flush()  # the result guard's call when a run fails
    assert meter.step_times == [0.15, 0.2]  # warmup dropped; unfinished steps left out
    assert meter._pending == []


def test_meter_with_the_real_clock_measures_positive_times():
    meter = Meter(CPU, warmup_steps=1, samples_per_step=2)
    for _ in range(2):
        meter.start_epoch()
        for _ in range(3):
            torch.ones(64, 64) @ torch.ones(64, 64)
            meter.end_step(0.0)
        meter.end_epoch(0.5)
    summary = meter.rank_summary()
    assert len(summary["step_times_s"]) == 5
    assert all(t > 0 for t in summary["step_times_s"])
    assert all(t > 0 for t in summary["epoch_time_s"])
    assert summary["samples_per_step"] == 2
    assert summary["host_peak_rss_bytes"] > 0
    [device] = summary["per_device"]
    assert device["device"] == "cpu"
    assert device["peak_allocated_bytes"] is None  # not measurable on the CPU...
    assert any("not measured on the CPU" in n for n in summary["notes"])  # ...and said so


def test_meter_keeps_compute_only_steps_apart_and_drops_their_warmup():
    meter, clock = hand_meter(warmup_steps=1)
    drive(meter, clock, [[1.0, 2.0, 3.0]], wait_per_step=lambda k: 0.5)
    meter.start_compute_only(warmup_steps=2)
    for duration in (9.0, 9.0, 0.5, 0.25):  # two probe warmup steps, then two measured
        clock.now += duration
        meter.end_step(0.5)
    meter.end_compute_only()
    assert meter.step_times == [2.0, 3.0]  # training's, untouched by the probe
    assert meter.compute_only_times == [0.5, 0.25]
    assert meter.measured_data_wait_s == 1.0  # the probe's data wait is not training's
    summary = meter.rank_summary()
    assert summary["compute_only_step_times_s"] == [0.5, 0.25]
    assert summary["step_times_s"] == [2.0, 3.0]


def test_meter_does_not_invent_a_per_gpu_step_time_for_several_devices():
    meter = Meter(CPU, warmup_steps=0, samples_per_step=4, devices=[CPU, CPU])
    meter.clock = FakeClock()
    drive(meter, meter.clock, [[1.0, 2.0]])
    summary = meter.rank_summary()
    assert [d["step_time_s"] for d in summary["per_device"]] == [None, None]
    assert any("not measured per GPU" in n for n in summary["notes"])
    one, clock = hand_meter(warmup_steps=0)
    drive(one, clock, [[1.0, 2.0, 3.0]])
    assert one.rank_summary()["per_device"][0]["step_time_s"] == 2.0


# --- combine ---------------------------------------------------------------------------

def rank_summary(rank, step_times, *, samples=10, wait=0.0, epochs=(1.0,), losses=(1.0,),
                 rss=1000, notes=(), warmup=2):
    return {
        "rank": rank,
        "host": f"host{rank}",
        "samples_per_step": samples,
        "step_times_s": list(step_times),
        "measured_data_wait_s": wait,
        "epoch_time_s": list(epochs),
        "loss_per_epoch": list(losses),
        "warmup_steps": warmup,
        "per_device": [{"device": f"cuda:{rank}", "rank": rank, "step_time_s": None}],
        "host_peak_rss_bytes": rss,
        "notes": list(notes),
    }


def two_ranks():
    r0 = rank_summary(0, [1.0, 2.0, 3.0], wait=0.7, epochs=[5.0, 4.0], losses=[2.0, 1.0],
                      rss=100, notes=["same note"])
    r1 = rank_summary(1, [2.0, 1.0, 4.0], wait=1.4, epochs=[4.0, 6.0], losses=[4.0, 3.0],
                      rss=300, notes=["same note", "rank 1 note"])
    return r0, r1


def test_combine_global_throughput_uses_global_samples_and_the_slowest_rank():
    r0, r1 = two_ranks()
    metrics, _ = combine([r1, r0])  # any order
    assert metrics["steps_measured"] == 3
    assert metrics["global_samples_per_step"] == 20
    # rank 1 is the slowest: 2 + 1 + 4 = 7 s for 3 steps of 20 images.
    assert metrics["throughput_img_s"]["mean"] == pytest.approx(60 / 7)


def test_combine_step_time_is_the_slowest_ranks_own_distribution():
    r0, r1 = two_ranks()  # rank 0: [1, 2, 3] (6 s); rank 1: [2, 1, 4] (7 s, the slowest)
    metrics, _ = combine([r0, r1])
    assert metrics["slowest_rank"] == 1
    assert metrics["step_time_s"]["median"] == pytest.approx(2.0)
    assert metrics["step_time_s"]["p10"] == pytest.approx(1.2)
    assert metrics["step_time_s"]["p90"] == pytest.approx(3.6)
    # per-step throughput 20 / [2, 1, 4] = [10, 20, 5]
    tp = metrics["throughput_img_s"]
    assert tp["median"] == pytest.approx(10.0)
    assert tp["p10"] == pytest.approx(6.0)
    assert tp["p90"] == pytest.approx(18.0)


def test_combine_median_does_not_understate_when_rank_boundaries_are_misaligned():
    """Two ranks in lock-step: every step takes 0.10 s of wall time for the job. Each rank
    marks its step boundary at its own moment before the shared all-reduce wait (a random
    0-30 ms early), so its step k measures 0.10 + offset[k] - offset[k-1]. A per-step
    maximum over ranks picks the longer slice every time and understates throughput;
    an outside observer sees 0.10 s a step."""
    rng = random.Random(7)
    n, wall = 41, 0.10
    per_rank = []
    for rank in range(2):
        offsets = [rng.uniform(0, 0.03) for _ in range(n + 1)]
        per_rank.append([wall + offsets[k + 1] - offsets[k] for k in range(n)])
    outside = 16 / wall  # global images per step / the wall time an observer measures
    per_step_max = [max(a, b) for a, b in zip(*per_rank)]
    assert 16 / percentile(per_step_max, 50) < 0.95 * outside  # the old definition's error

    metrics, _ = combine([rank_summary(0, per_rank[0], samples=8),
                          rank_summary(1, per_rank[1], samples=8)])
    assert metrics["throughput_img_s"]["mean"] == pytest.approx(outside, rel=0.01)
    assert metrics["throughput_img_s"]["median"] == pytest.approx(outside, rel=0.05)
    assert metrics["step_time_s"]["median"] == pytest.approx(wall, rel=0.05)
    tp = metrics["throughput_img_s"]
    assert tp["p10"] <= outside <= tp["p90"]


def test_combine_exposed_communication_is_synced_minus_compute_only():
    r0 = rank_summary(0, [0.10, 0.11, 0.12])
    r1 = rank_summary(1, [0.12, 0.12, 0.12])  # the slowest rank: its median 0.12 s
    r0["compute_only_step_times_s"] = [0.08, 0.08, 0.09]
    r1["compute_only_step_times_s"] = [0.09, 0.09, 0.10]  # slowest in the probe too
    metrics, _ = combine([r0, r1])
    assert metrics["compute_only_step_time_s"]["median"] == pytest.approx(0.09)
    assert metrics["exposed_comm_s"]["median"] == pytest.approx(0.03)
    assert metrics["per_rank"][0]["compute_only_step_time_s"]["median"] == pytest.approx(0.08)


def test_combine_exposed_communication_may_be_negative_and_is_kept_as_measured():
    r0 = rank_summary(0, [0.10, 0.10, 0.10])
    r0["compute_only_step_times_s"] = [0.11, 0.11]
    metrics, _ = combine([r0])
    assert metrics["exposed_comm_s"]["median"] == pytest.approx(-0.01)


def test_combine_without_the_probe_has_null_compute_only_and_exposed_communication():
    metrics, _ = combine(list(two_ranks()))
    assert metrics["compute_only_step_time_s"] is None
    assert metrics["exposed_comm_s"] is None
    assert metrics["per_rank"][0]["compute_only_step_time_s"] is None


def test_combine_losses_epochs_devices_and_memory():
    r0, r1 = two_ranks()
    metrics, notes = combine([r1, r0])
    assert metrics["loss_per_epoch"] == [pytest.approx(3.0), pytest.approx(2.0)]
    assert metrics["final_loss"] == pytest.approx(2.0)
    assert metrics["epoch_time_s"] == [5.0, 6.0]  # slowest rank per epoch
    assert [d["device"] for d in metrics["per_device"]] == ["cuda:0", "cuda:1"]
    assert metrics["host_peak_rss_bytes"] == 300
    assert metrics["data_wait_fraction"] == pytest.approx(1.4 / 7)
    assert metrics["warmup_steps"] == 2
    assert [r["rank"] for r in metrics["per_rank"]] == [0, 1]
    assert notes.count("same note") == 1 and "rank 1 note" in notes


def test_combine_single_rank():
    metrics, notes = combine([rank_summary(0, [0.5, 0.25, 1.0], samples=8)])
    assert metrics["throughput_img_s"]["median"] == pytest.approx(16.0)
    assert metrics["throughput_img_s"]["mean"] == pytest.approx(24 / 1.75)
    assert metrics["step_time_s"]["median"] == pytest.approx(0.5)
    assert not any("different numbers of steps" in n for n in notes)


def test_combine_unequal_step_counts_keeps_the_common_steps_and_says_so():
    r0 = rank_summary(0, [1.0, 1.0, 1.0])
    r1 = rank_summary(1, [2.0, 2.0])
    metrics, notes = combine([r0, r1])
    assert metrics["steps_measured"] == 2
    assert metrics["throughput_img_s"]["mean"] == pytest.approx(20 * 2 / 4.0)
    assert any("different numbers of steps" in n for n in notes)


def test_combine_without_measured_steps_has_no_throughput_and_a_note():
    metrics, notes = combine([rank_summary(0, []), rank_summary(1, [])])
    assert metrics["steps_measured"] == 0
    assert metrics["throughput_img_s"] is None
    assert metrics["step_time_s"] is None
    assert metrics["data_wait_fraction"] is None
    assert any("No step was measured" in n for n in notes)


def test_combine_without_losses_has_no_final_loss():
    metrics, _ = combine([rank_summary(0, [1.0], losses=())])
    assert metrics["loss_per_epoch"] == []
    assert metrics["final_loss"] is None


# --- evaluation: timed apart, never inside a step -----------------------------------------

def test_evaluation_time_never_enters_step_times_or_training_time(monkeypatch):
    from labs import measure

    meter, clock = hand_meter(warmup_steps=0)
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock.now)
    drive(meter, clock, [[1.0, 2.0]], epoch_gap=0.0)  # an epoch of 3 s
    meter.start_eval()
    clock.now += 100.0  # a long evaluation
    entry = meter.end_eval(1, accuracy=0.5, loss=1.2, samples=10)
    assert entry["eval_time_s"] == pytest.approx(100.0)
    assert entry["elapsed_s"] == pytest.approx(3.0)  # training time so far: the epoch alone
    # The next step starts from the evaluation's end, not from the previous step's end
    # (what an evaluation in the middle of an epoch would otherwise add to it).
    clock.now += 4.0
    meter.end_step(0.0)
    assert meter.step_times == [1.0, 2.0]  # filed at end_epoch; the pending one next
    meter.end_epoch(1.0)
    assert meter.step_times == [1.0, 2.0, 4.0]
    summary = meter.rank_summary()
    assert summary["eval"] == [entry]
    assert sum(summary["step_times_s"]) == pytest.approx(7.0)


def test_combine_evaluation_time_to_accuracy_and_notes():
    r0, r1 = two_ranks()
    evals0 = [{"epoch": 1, "accuracy": 0.3, "loss": 2.0, "samples": 10, "elapsed_s": 5.0,
               "eval_time_s": 0.5},
              {"epoch": 2, "accuracy": 0.6, "loss": 1.0, "samples": 10, "elapsed_s": 9.0,
               "eval_time_s": 0.4}]
    # rank 1 holds the same (all-reduced) counts, and its own, slower, times
    evals1 = [dict(e, elapsed_s=e["elapsed_s"] + 1, eval_time_s=0.1) for e in evals0]
    r0["eval"], r1["eval"] = evals0, evals1
    metrics, notes = combine([r0, r1], target_accuracy=0.5)
    assert [e["accuracy"] for e in metrics["eval"]] == [0.3, 0.6]
    assert [e["elapsed_s"] for e in metrics["eval"]] == [6.0, 10.0]  # the slowest rank's
    assert [e["eval_time_s"] for e in metrics["eval"]] == [0.5, 0.4]
    assert metrics["final_accuracy"] == 0.6
    assert metrics["time_to_accuracy_s"] == 10.0  # first evaluation at or above 50%
    metrics, notes = combine([r0, r1], target_accuracy=0.9)
    assert metrics["time_to_accuracy_s"] is None
    assert any("never reached the target of 90%" in n for n in notes)
    metrics, notes = combine([rank_summary(0, [1.0])], target_accuracy=0.5)
    assert metrics["eval"] == [] and metrics["final_accuracy"] is None
    assert metrics["time_to_accuracy_s"] is None
    assert any("No evaluation" in n for n in notes)
