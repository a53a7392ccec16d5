"""Writing result files (docs/results_format.md): atomically, never overwritten.

One JSON file per run. ``Run`` gathers what a step knows (config, world, environment,
command), guards the training so that an OOM, Ctrl-C/SIGTERM or crash still leaves a
correct file with its status, and writes the file. Reading and validating a file is
``labs.contract`` (torch-free, for the report); its names are re-exported here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import re
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from labs import distributed, envinfo, files, partition, train
from labs.compat import OutOfMemoryError
from labs.contract import (  # noqa: F401 - re-exported for the steps and older callers
    LAB_NAMES, MAX_RESULT_BYTES, SCHEMA_VERSION, STATUSES, STRATEGIES, Loaded, Outcome,
    load_result, utc_now, validate_run)
from labs.errors import UsageError, first_line
from labs.launcher_env import command_line, launcher_gone
from labs.measure import combine

if TYPE_CHECKING:
    from labs.distributed import PeerReports, Resumed
    from labs.launcher_env import Ranks


def _json_safe(value):
    """NaN and infinity are not JSON: they become null (a value that was not measured)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "run"


def _ignore_signal(signum, frame) -> None:
    """Installed while a failed run writes its result: the write must finish."""


def _shared_run_id() -> str:
    """A new run id; under DDP rank 0's, on every rank (a collective: every rank creates
    its Run at the same point), so that any rank can find the run's file."""
    import torch.distributed as dist

    run_id = [uuid.uuid4().hex[:12]]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(run_id, src=0)
    return run_id[0]


class Interrupted(Exception):
    """SIGTERM or SIGHUP, turned into an exception so the guard can write what was
    measured."""

    def __init__(self, signum: int):
        why = (" (the terminal closed: run long jobs under tmux, screen or nohup)"
               if signum == signal.SIGHUP else "")
        super().__init__(f"terminated by {signal.Signals(signum).name}{why}")
        self.signum = signum


class Run:
    """One run's record. Under DDP (``ranks`` given) every rank makes one, at the same
    point (its constructor and ``write`` are collectives), and only rank 0 writes."""

    def __init__(self, lab: str, args, *, strategy: str, config: dict,
                 devices: list[torch.device], ranks: "Ranks | None" = None,
                 backend: str | None = None, model: torch.nn.Module | None = None,
                 resumed: "Resumed | None" = None, sampler=None):
        """``devices``: this process's devices (02: one, 03: DataParallel's). 04 adds its
        ``ranks``, ``backend``, the DDP ``model`` (its gradient bytes now, its buckets when
        the run is written), where it ``resumed`` and its ``sampler``: the world block then
        lists every rank's device, the config gets the DDP options and each rank's images
        per class, notes say how the run was launched, and a failing rank's reason reaches
        rank 0 (``PeerReports``)."""
        self.lab = lab
        self.rank = ranks.rank if ranks is not None else 0
        self.writer = self.rank == 0
        self.distributed = ranks is not None
        self.results_dir = Path(args.results_dir)
        self.run_id = _shared_run_id()
        default_name = f"{args.model}-b{config.get('global_batch_size')}-{config.get('amp')}"
        self.run_name = args.run_name or default_name
        self.notes: list[str] = []
        self.path: Path | None = None
        self.peers: PeerReports | None = None
        self.ddp_model = model if ranks is not None else None
        if ranks is None:
            world = one_process_world(devices)
        else:
            world = distributed.describe_world(ranks, backend, devices[0], resumed)
            config = {**config, **distributed.ddp_settings(args, backend, model),
                      "class_histograms": None if sampler is None
                      else partition.histograms(sampler, args)}
            self.peers = distributed.PeerReports(ranks.rank, ranks.world_size)
        self.record = {
            "schema_version": SCHEMA_VERSION,
            "kind": "run",
            "lab": lab,
            "status": "running",
            "run_id": self.run_id,
            "run_name": self.run_name,
            "started_at": utc_now(),
            "finished_at": None,
            "command": command_line(),
            "config": {"strategy": strategy, "preset": args.preset, **config},
            "world": world,
            "environment": envinfo.collect() if self.writer else None,
            "metrics": None,
            "notes": self.notes,
        }
        if ranks is not None:
            self.note(*distributed.launch_notes(world, devices[0]))

    def note(self, *texts: str) -> None:
        for text in texts:
            if text not in self.notes:
                self.notes.append(text)

    @contextlib.contextmanager
    def guard(self, meter):
        """Turn OOM, Ctrl-C, SIGTERM, SIGHUP and crashes into a written result with a
        status. Under DDP a failing rank's reason reaches rank 0, which writes."""
        def on_stop(signum, frame):
            raise Interrupted(signum)

        stops = (signal.SIGTERM, signal.SIGHUP)  # a supervisor; a terminal that closed
        previous = {sig: signal.signal(sig, on_stop) for sig in stops}
        previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
        try:
            yield
        except UsageError:
            raise
        except OutOfMemoryError as err:
            batch = self.record["config"].get("per_device_batch_size")
            reason = (f"out of memory at {batch} images per device; try a smaller "
                      f"--batch-size or the same batch with --grad-accum-steps")
            detail = first_line(err, "CUDA out of memory")
            self._fail(meter, Outcome("oom", 3, f"{reason}. ({detail})"))
        except (KeyboardInterrupt, Interrupted) as err:
            code = 128 + err.signum if isinstance(err, Interrupted) else 130
            orphaned = launcher_gone()
            self._fail(meter, Outcome("failed", code, orphaned) if orphaned else
                       Outcome("interrupted", code, str(err) or "Ctrl-C"))
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            if self.distributed and re.search(r"timed? ?out", str(err), re.I):
                reason = (f"another rank did not answer within --timeout-s "
                          f"{self.record['config'].get('timeout_s')} (stopped, stuck or "
                          f"dead): {reason}")
            self._fail(meter, Outcome("failed", 1, reason), reraise=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _fail(self, meter, outcome: Outcome, reraise: bool = False) -> None:
        # Stopping already: a second signal (the launcher stopping every rank after one
        # failed) must not cut the result short.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _ignore_signal)
        meter.flush()
        peers = self.peers
        rank = failed_rank = self.rank
        if not self.writer and peers is not None:
            lost = peers.writer_lost()
            if lost is None:
                peers.tell(outcome)
            elif any(self.results_dir.glob(f"*_{self.run_id}.json")):
                pass  # rank 0 recorded the run before it ended: nothing to take over
            else:  # rank 0 died (and its store with it): the lowest live rank records the run
                self.writer = True
                self.record["environment"] = envinfo.collect()
                failed_rank, outcome = lost, Outcome(
                    "failed", outcome.exit_code, peers.death_reason(lost))
                reraise = False
        elif peers is not None and outcome.status in ("failed", "interrupted"):
            # A peer that failed first (out of memory, say) is why this rank's collective
            # broke or its launcher stopped it: record the peer's reason, not the echo.
            peer = peers.first_failure()
            if peer is not None and (outcome.status == "failed"
                                     or peer[1].status != "interrupted"):
                failed_rank, outcome = peer
                reraise = False  # this rank's own error is only the echo of the peer's
        self.record["failure"] = {"reason": outcome.reason, "rank": failed_rank}
        if self.writer:
            if self.record["world"].get("world_size", 1) > 1:
                self.note(f"The run stopped early; the metrics are rank {rank}'s alone, as "
                          f"the other ranks could not be reached.")
            self._write([meter.rank_summary(rank)], status=outcome.status)
            where = f" on rank {failed_rank}" if failed_rank != rank else ""
            print(f"\n{self.lab}: {outcome.status}{where}: {outcome.reason}\n"
                  f"partial result: {self.path}", file=sys.stderr)
        else:
            print(f"\n{self.lab} rank {rank}: {outcome.status}: {outcome.reason}",
                  file=sys.stderr)
        if reraise:
            raise
        raise SystemExit(outcome.exit_code)

    def trace_path(self) -> Path:
        """Where this rank's profiler trace goes (04 --profile-steps): beside the results,
        in ``traces/``, named after the run (step 05 reads only the results folder's own
        files, so a trace is never mistaken for a result)."""
        return self.results_dir / "traces" / \
            f"{self.lab}_{_safe_name(self.run_name)}_{self.run_id}_rank{self.rank}.json"

    def write(self, meter) -> Path | None:
        """The run finished: every rank's measurements, combined, in the file rank 0
        writes (returns its path; None on the other ranks). Under DDP a collective."""
        if self.ddp_model is not None:  # DDP builds its buckets on the first step
            self.record["config"]["bucket_bytes"] = distributed.bucket_bytes(self.ddp_model)
        summary = meter.rank_summary(self.rank)
        return self._write(distributed.gather_to_rank0(summary) if self.distributed
                           else [summary])

    def _write(self, rank_summaries: list[dict] | None, status: str = "ok") -> Path | None:
        if not self.writer:
            return None
        metrics, notes = combine(rank_summaries,
                                 target_accuracy=self.record["config"].get("target_accuracy"))
        metrics["comm_bytes_per_sample"] = distributed.comm_bytes_per_sample(
            self.record["config"], metrics, self.record["world"].get("world_size", 1))
        for text in notes:
            self.note(text)
        if status == "ok" and not metrics["steps_measured"]:
            status = "failed"
        self.record.update(status=status, finished_at=utc_now(), metrics=metrics)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        name = f"{self.lab}_{_safe_name(self.run_name)}_{stamp}_{self.run_id}.json"
        try:
            self.path = files.write_json_atomic(_json_safe(self.record), self.results_dir / name,
                                          overwrite=False)
        except OSError as err:  # the disk filled up or turned read-only during the run
            self.path = self._save_elsewhere(name, err)
            if status == "ok":  # a failed run exits with its own status after this
                from labs import console

                console.print_summary(self.record, self.path or "(printed above)")
                raise SystemExit(1) from None
        return self.path

    def _save_elsewhere(self, name: str, err: OSError) -> Path | None:
        """The measurements must survive a results folder that cannot take them: the
        system's temporary folder, or else the JSON itself on stdout. One line says where."""
        text = json.dumps(_json_safe(self.record), indent=2, allow_nan=False, default=str)
        problem = (f"{self.lab}: cannot write the result to {self.results_dir}: "
                   f"{err.strerror or err}")
        try:
            path = files.write_atomic(Path(tempfile.gettempdir()) / name, text + "\n",
                                      overwrite=False)
        except OSError:
            print(f"{self.lab}-result-json-begin\n{text}\n{self.lab}-result-json-end",
                  flush=True)
            print(f"{problem}; the result is printed above as JSON (between the "
                  f"{self.lab}-result-json lines): save it into the results folder",
                  file=sys.stderr, flush=True)
            return None
        print(f"{problem}; saved it to {path} instead: move it into the results folder",
              file=sys.stderr, flush=True)
        return path


def one_process_world(devices: list[torch.device]) -> dict:
    """The world block of 02 and 03: one process, on one device or (DataParallel) several."""
    return {"world_size": 1, "nnodes": 1, "backend": None,
            "devices": [envinfo.device_entry(d) for d in devices]}


def config_from_args(args, *, per_device_batch_size: int, global_batch_size: int,
                     steps_per_epoch: int, amp: str, lr: float, num_workers: int,
                     **extra) -> dict:
    """The ``config`` block: every option that shapes the run, as it was resolved."""
    return {
        "model": args.model,
        "img_size": args.img_size,
        "num_classes": args.num_classes,
        "data": args.data,
        "data_dir": str(args.data_dir) if args.data_dir else None,
        "dataset_size": args.dataset_size,
        "per_device_batch_size": per_device_batch_size,
        "global_batch_size": global_batch_size,
        "scaling": getattr(args, "scaling", None),  # 03/04's label; 02 is both curves' base
        "grad_accum_steps": args.grad_accum_steps,
        "epochs": args.epochs,
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": args.warmup_steps,
        "amp": amp,
        "amp_requested": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "tf32": torch.backends.cuda.matmul.allow_tf32,
        "lr": lr,
        "lr_rule": train.lr_rule(args, global_batch_size, steps_per_epoch),
        "lr_warmup_steps": train.lr_warmup_steps(args, steps_per_epoch),
        "optimizer": train.OPTIMIZER,
        "num_workers": num_workers,
        # CPU speed depends on it, so a baseline must match it (torchrun and --nproc
        # share the cores between ranks; a plain python run takes them all).
        "threads_per_process": torch.get_num_threads(),
        "seed": args.seed,
        "eval": bool(args.eval),
        "val_size": args.val_size if args.eval else None,
        "target_accuracy": args.target_accuracy,
        **extra,
    }
