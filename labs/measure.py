"""Honest timing and memory for one process.

Rules (docs/results_format.md says what each resulting number means):
- warmup steps (cuDNN autotuning, torch.compile, allocator growth) are excluded;
- GPU work is asynchronous, so step boundaries are CUDA events read once per epoch: no
  host sync inside the timed loop;
- a step's time runs from the end of the previous step to the end of this one, so time the
  GPU sat idle waiting for data counts against throughput; the host's wait for the next
  batch is also recorded on its own (data-wait share);
- peak memory statistics are reset when warmup ends, for every device the process drives;
- summaries are medians with p10/p90, not one mean;
- after training, 04 can time a few more steps with the gradient all-reduce switched off
  (``start_compute_only``): the same work without communication, kept apart, so that
  synced minus compute-only is the communication DDP failed to hide;
- evaluation (``start_eval`` / ``end_eval``, between epochs) is timed on its own and never
  enters a step, an epoch or the throughput: the next step's time starts when the
  evaluation ends, and the training time to an accuracy counts the epochs only.

``Meter`` collects one process's raw numbers into a plain dict (``rank_summary``);
``combine`` turns the dicts of every rank into the ``metrics`` block of a result file.
"""

from __future__ import annotations

import math
import resource
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from labs import trace_analysis
from labs.envinfo import cuda_index


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def spread(values) -> dict:
    """median, p10 and p90 of a non-empty sequence."""
    return {"median": percentile(values, 50), "p10": percentile(values, 10),
            "p90": percentile(values, 90)}


class _Clock:
    """Marks step boundaries: CUDA events on a GPU (read later), perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0  # elapsed_time is in milliseconds
        return end - start

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def finished(self, mark) -> bool:
        """Has the device reached ``mark``? Never waits (CUDA events are queried)."""
        return mark.query() if self.cuda else True


class DeviceSampler:
    """Samples GPU utilisation and power (NVML) and host RSS in a background thread."""

    def __init__(self, devices: list[torch.device], interval_s: float = 0.25):
        self.devices = devices
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.rss_peak = 0
        self.utilization: dict[int, list[float]] = {}
        self.power: dict[int, list[float]] = {}
        self.note: str | None = None
        self._handles = self._nvml_handles()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _nvml_handles(self) -> dict:
        cuda = [d for d in self.devices if d.type == "cuda"]
        try:
            import pynvml  # from the optional `nvidia-ml-py` package
        except ImportError:
            if cuda:
                self.note = ("GPU utilisation and power not measured: NVML unavailable "
                             "(pip install 'dp-vs-ddp-lab[gpu]')")
            return {}
        if not cuda:
            self.note = "GPU utilisation and power not measured: NVML saw no GPU in use."
            return {}
        try:
            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no driver: report, don't fail
            self.note = "GPU utilisation and power not measured: NVML could not start."
            return {}
        handles = {}
        for device in cuda:
            index = cuda_index(device)
            try:
                # CUDA_VISIBLE_DEVICES renumbers devices; the PCI bus id is the same in
                # both. (torch < 2.8 has no PCI ids: AttributeError, noted below.)
                props = torch.cuda.get_device_properties(index)
                bus_id = (f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:"
                          f"{props.pci_device_id:02x}.0")
                handles[index] = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
            except Exception:  # noqa: BLE001
                self.note = ("GPU utilisation and power not measured: NVML could not map "
                             "a device (PyTorch older than 2.8 reports no PCI bus id)")
        return handles

    def _sample(self) -> None:
        try:
            self.rss_peak = max(self.rss_peak, self.process.memory_info().rss)
        except psutil.Error:
            pass
        if self._handles:
            import pynvml

            for index, handle in self._handles.items():
                try:
                    self.utilization.setdefault(index, []).append(
                        float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
                    self.power.setdefault(index, []).append(
                        pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)  # mW -> W
                except Exception:  # noqa: BLE001
                    pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> None:
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="device-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._sample()

    def utilization_pct(self, index) -> float | None:
        values = self.utilization.get(index)
        return float(np.median(values)) if values else None

    def power_w(self, index) -> float | None:
        values = self.power.get(index)
        return float(np.mean(values)) if values else None


def host_peak_rss_bytes(sampled: int) -> int:
    """Largest of what was sampled and the kernel's own high-water mark."""
    peak = sampled
    if sys.platform.startswith("linux"):
        peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    elif sys.platform == "darwin":
        peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return int(peak)


class Meter:
    """One process's step times, data wait, epoch times, losses and peak memory.

    The training loop calls ``start_epoch``, then ``end_step(data_wait_s)`` after each
    optimizer step, then ``end_epoch(mean_loss)``; only ``end_epoch`` waits for the GPU.
    """

    def __init__(self, device: torch.device, warmup_steps: int, samples_per_step: int,
                 data_pool_bytes: int = 0, devices: list[torch.device] | None = None):
        self.device = device
        self.devices = devices or [device]  # DataParallel drives several from one process
        # The synthetic images resident on ``device``: in every peak, but not training's.
        self.data_pool_bytes = data_pool_bytes
        self.warmup_steps = warmup_steps
        self.samples_per_step = samples_per_step
        self.clock = _Clock(device)
        self.sampler = DeviceSampler(self.devices)
        self.steps_done = 0
        self.step_times: list[float] = []
        self.epoch_times: list[float] = []
        self.loss_per_epoch: list[float] = []
        self.measured_data_wait_s = 0.0
        self.compute_only_times: list[float] = []
        self.trace: dict | None = None  # 04 --profile-steps: labs.trace_analysis's figures
        self.local_sgd = None  # 04 --sync local-sgd: the labs.local_sgd.LocalSGD at work
        self.notes: list[str] = []
        self.evals: list[dict] = []
        self._eval_started: float | None = None
        self._probe_warmup_left: int | None = None  # None: training steps, not the probe
        self._pending: list[tuple] = []
        self._last_mark = None
        self._epoch_started = 0.0
        self._sampling = False

    @property
    def in_compute_only(self) -> bool:
        return self._probe_warmup_left is not None

    @property
    def warming_up(self) -> bool:
        return self.steps_done < self.warmup_steps

    def start_epoch(self) -> None:
        self._epoch_started = time.perf_counter()
        self._last_mark = self.clock.mark()
        if self.warmup_steps == 0 and not self._sampling:
            self._warmup_done()

    def end_step(self, data_wait_s: float) -> None:
        mark = self.clock.mark()
        if self._probe_warmup_left is not None:  # a compute-only probe step
            if self._probe_warmup_left:
                self._probe_warmup_left -= 1
            else:
                self._pending.append((self._last_mark, mark))
            self._last_mark = mark
            return
        if not self.warming_up:
            self._pending.append((self._last_mark, mark))
            self.measured_data_wait_s += data_wait_s
        self._last_mark = mark
        self.steps_done += 1
        if self.steps_done == self.warmup_steps:
            self._warmup_done()

    def start_eval(self) -> None:
        """An evaluation starts (between epochs): from here nothing is training."""
        self._eval_started = time.perf_counter()

    def end_eval(self, epoch: int, *, accuracy: float | None, loss: float | None,
                 samples: int) -> dict:
        """File one evaluation: after ``epoch`` epochs, with the training wall time so far
        (the epochs alone) and the evaluation's own time. The step clock restarts here,
        so the next step does not carry the evaluation."""
        entry = {"epoch": epoch, "accuracy": accuracy, "loss": loss, "samples": samples,
                 "elapsed_s": float(sum(self.epoch_times)),
                 "eval_time_s": time.perf_counter() - (self._eval_started or 0.0)}
        self.evals.append(entry)
        self._eval_started = None
        self._last_mark = self.clock.mark()
        return entry

    def start_compute_only(self, warmup_steps: int) -> None:
        """Steps from here on belong to the compute-only probe: timed, but kept apart from
        training's (and their first ``warmup_steps`` dropped). Call it between epochs."""
        self._probe_warmup_left = warmup_steps
        self._last_mark = self.clock.mark()

    def end_compute_only(self) -> None:
        """Wait for the device once and file the probe's step times."""
        self.clock.synchronize()
        self.compute_only_times.extend(self.clock.seconds(a, b) for a, b in self._pending)
        self._pending.clear()
        self._probe_warmup_left = None

    def record_trace(self, summary: dict | None, path: Path, note: str | None) -> None:
        """The profiled steps' figures, with the trace's name beside the results."""
        if summary is not None:
            self.trace = {**summary, "file": f"{path.parent.name}/{path.name}"}
        if note:
            self.notes.append(note)

    def _warmup_done(self) -> None:
        for device in self.devices:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        self.sampler.start()
        self._sampling = True

    def end_epoch(self, mean_loss: torch.Tensor | float | None) -> None:
        """Wait for the device once, then turn this epoch's marks into seconds."""
        self.clock.synchronize()
        self.step_times.extend(self.clock.seconds(a, b) for a, b in self._pending)
        self._pending.clear()
        self.epoch_times.append(time.perf_counter() - self._epoch_started)
        if mean_loss is not None:
            value = float(mean_loss)
            self.loss_per_epoch.append(value if math.isfinite(value) else float("nan"))

    def flush(self) -> None:
        """Keep the steps of an epoch cut short (interrupt, OOM, a failed peer) that the
        device has finished, without waiting for it: under NCCL a collective that lost
        its peer never finishes, and a synchronize would wait for it forever."""
        if self._pending:
            into = self.step_times if self._probe_warmup_left is None else \
                self.compute_only_times
            try:
                into.extend(self.clock.seconds(a, b) for a, b in self._pending
                            if self.clock.finished(b))
            except Exception:  # noqa: BLE001 - a broken device: the steps are lost
                pass
            self._pending.clear()

    def rank_summary(self, rank: int = 0) -> dict:
        """Everything this process measured, as plain data (sent to rank 0 under DDP)."""
        if self._sampling:
            self.sampler.stop()
            self._sampling = False
        host = socket.gethostname()
        # One device per process: its step time is the process's. DataParallel drives
        # several from one process, and nothing times each GPU's share on its own.
        step_median = (float(np.median(self.step_times))
                       if self.step_times and len(self.devices) == 1 else None)
        per_device = []
        notes = list(self.notes)
        if len(self.devices) > 1:
            notes.append("Step time is not measured per GPU under DataParallel: one process "
                         "drives every GPU, and the step time is the whole step's.")
        for device in self.devices:
            entry = {"device": str(device), "index": device.index, "host": host,
                     "rank": rank, "name": None, "peak_allocated_bytes": None,
                     "peak_reserved_bytes": None, "total_memory_bytes": None,
                     "data_pool_bytes": None,
                     "step_time_s": step_median, "utilization_pct": None, "power_w": None}
            if device.type == "cuda":
                index = cuda_index(device)
                entry.update(
                    index=index,
                    name=torch.cuda.get_device_name(index),
                    peak_allocated_bytes=int(torch.cuda.max_memory_allocated(index)),
                    peak_reserved_bytes=int(torch.cuda.max_memory_reserved(index)),
                    total_memory_bytes=int(torch.cuda.get_device_properties(index).total_memory),
                    data_pool_bytes=self.data_pool_bytes if device == self.device else 0,
                    utilization_pct=self.sampler.utilization_pct(index),
                    power_w=self.sampler.power_w(index),
                )
            per_device.append(entry)
        if any(d.type != "cuda" for d in self.devices):
            notes.append("Device memory is not measured on the CPU (no allocator "
                         "statistics); see host_peak_rss_bytes.")
        if self.sampler.note:
            notes.append(self.sampler.note)
        return {
            "rank": rank,
            "host": host,
            "samples_per_step": self.samples_per_step,
            "step_times_s": list(self.step_times),
            "compute_only_step_times_s": list(self.compute_only_times),
            "trace": self.trace,
            "local_sgd": self.local_sgd.summary(self.samples_per_step) if self.local_sgd
            else None,
            "measured_data_wait_s": self.measured_data_wait_s,
            "epoch_time_s": list(self.epoch_times),
            "loss_per_epoch": list(self.loss_per_epoch),
            "eval": [dict(e) for e in self.evals],
            "warmup_steps": self.warmup_steps,
            "per_device": per_device,
            "host_peak_rss_bytes": host_peak_rss_bytes(self.sampler.rss_peak),
            "notes": notes,
        }


def slowest_rank(ranks: list[dict], key: str, steps: int) -> dict:
    """The rank whose first ``steps`` entries of ``key`` took the longest in total."""
    return max(ranks, key=lambda r: sum(r[key][:steps]))


def combine(ranks: list[dict], target_accuracy: float | None = None
            ) -> tuple[dict, list[str]]:
    """The ``metrics`` block of a result from every rank's summary, and notes about it.

    Every DDP step ends in a collective, so the job goes at the pace of its slowest rank.
    The global step statistics are that rank's own per-step distribution: what an observer
    timing the slowest rank from outside would see. (A per-step maximum over ranks would
    overstate step time, because each rank's step boundaries fall at a different moment of
    the shared wait, and the max picks the longest slice every time.) Global throughput
    = global samples per step / those step times; its mean = global samples in the
    measured steps / the slowest rank's measured wall time.
    """
    notes: list[str] = []
    ranks = sorted(ranks, key=lambda r: r["rank"])
    steps = min(len(r["step_times_s"]) for r in ranks)
    if any(len(r["step_times_s"]) != steps for r in ranks):
        notes.append("Ranks measured different numbers of steps; the extra steps of the "
                     "faster ranks are left out.")
    global_samples_per_step = sum(r["samples_per_step"] for r in ranks)
    metrics: dict = {
        "steps_measured": int(steps),
        "warmup_steps": int(ranks[0]["warmup_steps"]),
        "global_samples_per_step": int(global_samples_per_step),
    }
    if steps:
        slowest = slowest_rank(ranks, "step_times_s", steps)
        step_times = np.array(slowest["step_times_s"][:steps], dtype=float)
        slowest_wall = float(step_times.sum())
        metrics["slowest_rank"] = slowest["rank"]
        metrics["throughput_img_s"] = {**spread(global_samples_per_step / step_times),
                                       "mean": global_samples_per_step * steps / slowest_wall}
        metrics["step_time_s"] = spread(step_times)
        wait = max(r["measured_data_wait_s"] for r in ranks)
        metrics["data_wait_fraction"] = min(1.0, wait / slowest_wall) if slowest_wall else None
    else:
        metrics["slowest_rank"] = None
        metrics["throughput_img_s"] = None
        metrics["step_time_s"] = None
        metrics["data_wait_fraction"] = None
        notes.append("No step was measured after warmup, so there is no throughput.")
    metrics.update(_compute_only(ranks, metrics["step_time_s"]))
    traced = [{"rank": r["rank"], **r["trace"]} for r in ranks if r.get("trace")]
    metrics["trace"] = trace_analysis.add_waits(traced) if traced else None
    metrics["local_sgd"] = _local_sgd([r.get("local_sgd") for r in ranks])
    epochs = min(len(r["epoch_time_s"]) for r in ranks)
    metrics["epoch_time_s"] = [max(r["epoch_time_s"][e] for r in ranks) for e in range(epochs)]
    n_losses = min(len(r["loss_per_epoch"]) for r in ranks)
    # Each rank's loss is the mean over its own batches; equal batch sizes make the mean
    # over ranks the mean over the global batch.
    metrics["loss_per_epoch"] = [float(np.mean([r["loss_per_epoch"][e] for r in ranks]))
                                 for e in range(n_losses)]
    metrics["final_loss"] = metrics["loss_per_epoch"][-1] if n_losses else None
    metrics.update(_evaluation(ranks, target_accuracy, notes))
    metrics["per_device"] = [d for r in ranks for d in r["per_device"]]
    metrics["host_peak_rss_bytes"] = max(r["host_peak_rss_bytes"] for r in ranks)
    metrics["per_rank"] = [
        {"rank": r["rank"], "host": r["host"], "steps_measured": len(r["step_times_s"]),
         "step_time_s": spread(r["step_times_s"]) if r["step_times_s"] else None,
         "compute_only_step_time_s": (spread(r["compute_only_step_times_s"])
                                      if r.get("compute_only_step_times_s") else None),
         "data_wait_s": r["measured_data_wait_s"]}
        for r in ranks
    ]
    for r in ranks:
        for note in r["notes"]:
            if note not in notes:
                notes.append(note)
    return metrics, notes


def _local_sgd(summaries: list[dict | None]) -> dict | None:
    """Every rank's local-SGD figures (labs.local_sgd) as the result's ``metrics.local_sgd``:
    rank 0's counts (the same on every rank) and the replicas' drift over all ranks and
    averages."""
    summaries = [s for s in summaries if s]
    if not summaries:
        return None
    drift = [d for s in summaries for d in s["divergence"]]
    return {**{k: v for k, v in summaries[0].items() if k != "divergence"},
            "divergence": {"median": float(np.median(drift)) if drift else None,
                           "max": max(drift) if drift else None, "samples": len(drift)}}


def _evaluation(ranks: list[dict], target: float | None, notes: list[str]) -> dict:
    """``eval`` (one entry per evaluation), ``final_accuracy`` and ``time_to_accuracy_s``.
    Every rank holds the same counts (added up over ranks), so the accuracies are rank 0's;
    the times are the longest over ranks, as for epochs."""
    evals = [dict(e) for e in ranks[0].get("eval") or []]
    for i, entry in enumerate(evals):
        for key in ("elapsed_s", "eval_time_s"):
            entry[key] = max(float(r["eval"][i][key]) for r in ranks
                             if len(r.get("eval") or []) > i)
    final = evals[-1]["accuracy"] if evals else None
    reached = next((e for e in evals if e["accuracy"] is not None and target is not None
                    and e["accuracy"] >= target), None)
    if not evals:
        notes.append("No evaluation (--no-eval, or synthetic/fake data whose labels are "
                     "random): no accuracy and no time to accuracy.")
    elif target is None:
        notes.append("No --target-accuracy: no time to accuracy.")
    elif reached is None:
        best = max(evals, key=lambda e: e["accuracy"] or 0)
        notes.append(f"Validation accuracy never reached the target of {100 * target:g}% "
                     f"(best {100 * (best['accuracy'] or 0):.1f}% after epoch "
                     f"{best['epoch']}): time_to_accuracy_s is null; train longer or lower "
                     f"--target-accuracy.")
    return {"eval": evals, "final_accuracy": final,
            "time_to_accuracy_s": reached["elapsed_s"] if reached else None}


def _compute_only(ranks: list[dict], step_time: dict | None) -> dict:
    """The compute-only probe (04): the slowest rank's probe steps, by the same definition
    as the global step time, and exposed communication = synced - compute-only median.
    Null when the probe did not run on every rank."""
    probes = [r.get("compute_only_step_times_s") or [] for r in ranks]
    steps = min(map(len, probes))
    if not steps or step_time is None:
        return {"compute_only_step_time_s": None, "exposed_comm_s": None}
    slowest = slowest_rank(ranks, "compute_only_step_times_s", steps)
    compute_only = spread(slowest["compute_only_step_times_s"][:steps])
    return {"compute_only_step_time_s": compute_only,
            "exposed_comm_s": {"median": step_time["median"] - compute_only["median"]}}
