"""Result files: the contract in DESIGN.md, written atomically, never overwritten.

One JSON file per run. ``Run`` gathers what a step knows (config, world, environment,
command), guards the training so that an OOM, Ctrl-C/SIGTERM or crash still leaves a
correct file with its status, and writes the file. ``load_result`` validates a file and
says why when it is not a valid run; the report uses nothing else to read the folder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from labs import envinfo
from labs.compat import OutOfMemoryError
from labs.errors import UsageError

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "interrupted", "failed")
LAB_NAMES = ("02_baseline", "03_dataparallel", "04_ddp")
STRATEGIES = ("single", "dp", "ddp")
MAX_RESULT_BYTES = 20 * 1024 * 1024  # a larger file is not one of ours; never parse it
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it: put it straight back


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def prepare_dir(folder: Path) -> Path:
    """Create the results folder and prove it is writable, before any work is done."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise UsageError(f"cannot write results to {folder}: {reason}") from None
    return folder


def write_json_atomic(data: dict, path: Path, *, overwrite: bool) -> Path:
    """Write to a temporary file in the same folder, then rename: readers never see a
    half-written file, and a crash leaves at most a hidden .tmp file behind."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False, default=str)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for everyone
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the name exists: a run file is never replaced
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links
                if path.exists():
                    raise FileExistsError(path) from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _json_safe(value):
    """NaN and infinity are not JSON: they become null (a value that was not measured)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def command_line() -> str:
    """The command that reproduces this run, with the launcher when we can tell."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    script_args = sys.argv
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # started by torchrun
        nnodes = os.environ.get("GROUP_WORLD_SIZE", "1")
        nproc = os.environ.get("LOCAL_WORLD_SIZE", "1")
        launcher = ["torchrun", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}"]
        return shlex.join(launcher + [Path(script_args[0]).name] + script_args[1:])
    if argv and Path(argv[0]).name.startswith("python"):
        argv[0] = "python"
    return shlex.join(argv)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "run"


def _ignore_signal(signum, frame) -> None:
    """Installed while a failed run writes its result: the write must finish."""


_FAILURE_KEY = "lab/failure/rank{}"


def _tell_rank0(rank: int, outcome: "Outcome") -> None:
    """A failing rank leaves its reason in the process group's store, so that rank 0,
    whose collectives break because of it, records the cause. Best effort."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        key = _FAILURE_KEY.format(rank)
        store.set(key, json.dumps(outcome.__dict__))
        store.check([key])  # a round trip: the report is in before this rank leaves
    except Exception:  # noqa: BLE001 - the store may be gone with rank 0
        pass


def _peer_failure(world_size: int) -> "tuple[int, Outcome] | None":
    """The first rank that reported a failure through the store, if any."""
    import torch.distributed as dist

    if world_size < 2 or not dist.is_initialized():
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        for peer in range(1, world_size):
            key = _FAILURE_KEY.format(peer)
            if store.check([key]):
                return peer, Outcome(**json.loads(store.get(key)))
    except Exception:  # noqa: BLE001 - no store, no report: keep this rank's own reason
        pass
    return None


class Interrupted(Exception):
    """SIGTERM, turned into an exception so the guard can write what was measured."""


@dataclass
class Outcome:
    status: str
    exit_code: int
    reason: str | None


class Run:
    """One run's record. Only the writer (rank 0) ever writes the file."""

    def __init__(self, lab: str, args, *, strategy: str, config: dict, world: dict,
                 writer: bool = True):
        self.lab = lab
        self.writer = writer
        self.results_dir = Path(args.results_dir)
        self.run_id = uuid.uuid4().hex[:12]
        default_name = f"{args.model}-b{config.get('global_batch_size')}-{config.get('amp')}"
        self.run_name = args.run_name or default_name
        self.notes: list[str] = []
        self.path: Path | None = None
        self.record = {
            "schema_version": SCHEMA_VERSION,
            "kind": "run",
            "lab": lab,
            "status": "running",
            "run_id": self.run_id,
            "run_name": self.run_name,
            "started_at": utc_now(),
            "finished_at": None,
            # --nproc: the user's command, not the spawned child's `python -c ...`
            "command": getattr(args, "launch_command", None) or command_line(),
            "config": {"strategy": strategy, "preset": args.preset, **config},
            "world": world,
            "environment": envinfo.collect() if writer else None,
            "metrics": None,
            "notes": self.notes,
        }

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    @contextlib.contextmanager
    def guard(self, meter, rank: int = 0):
        """Turn OOM, Ctrl-C/SIGTERM and crashes into a written result with a status."""
        def on_sigterm(signum, frame):
            raise Interrupted("terminated by SIGTERM")

        previous = signal.signal(signal.SIGTERM, on_sigterm), signal.getsignal(signal.SIGINT)
        try:
            yield
        except UsageError:
            raise
        except OutOfMemoryError as err:
            batch = self.record["config"].get("per_device_batch_size")
            reason = (f"out of memory at {batch} images per device; try a smaller "
                      f"--batch-size or the same batch with --grad-accum-steps")
            first_line = str(err).splitlines()[0] if str(err) else "CUDA out of memory"
            self._fail(meter, rank, Outcome("oom", 3, f"{reason}. ({first_line})"))
        except (KeyboardInterrupt, Interrupted) as err:
            code = 143 if isinstance(err, Interrupted) else 130
            self._fail(meter, rank, Outcome("interrupted", code, str(err) or "Ctrl-C"))
        except Exception as err:
            self._fail(meter, rank, Outcome("failed", 1, f"{type(err).__name__}: {err}"),
                       reraise=True)
        finally:
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])

    def _fail(self, meter, rank: int, outcome: Outcome, reraise: bool = False) -> None:
        # Stopping already: a second signal (the launcher stopping every rank after one
        # failed) must not cut the result short.
        signal.signal(signal.SIGTERM, _ignore_signal)
        signal.signal(signal.SIGINT, _ignore_signal)
        meter.flush()
        failed_rank = rank
        if not self.writer:
            _tell_rank0(rank, outcome)
        elif outcome.status in ("failed", "interrupted"):
            # A peer that failed first (out of memory, say) is why this rank's collective
            # broke or its launcher stopped it: record the peer's reason, not the echo.
            peer = _peer_failure(self.record["world"].get("world_size", 1))
            if peer is not None and (outcome.status == "failed"
                                     or peer[1].status != "interrupted"):
                failed_rank, outcome = peer
                reraise = False  # this rank's own error is only the echo of the peer's
        self.record["failure"] = {"reason": outcome.reason, "rank": failed_rank}
        if self.writer:
            if self.record["world"].get("world_size", 1) > 1:
                self.note("The run stopped early; the metrics are rank 0's alone, as the "
                          "other ranks could not be reached.")
            self.write([meter.rank_summary(rank)], status=outcome.status)
            where = f" on rank {failed_rank}" if failed_rank != rank else ""
            print(f"\n{self.lab}: {outcome.status}{where}: {outcome.reason}\n"
                  f"partial result: {self.path}", file=sys.stderr)
        else:
            print(f"\n{self.lab} rank {rank}: {outcome.status}: {outcome.reason}",
                  file=sys.stderr)
        if reraise:
            raise
        raise SystemExit(outcome.exit_code)

    def write(self, rank_summaries: list[dict], status: str = "ok") -> Path | None:
        """Combine every rank's measurements and write the file (writer only)."""
        from labs.measure import combine

        if not self.writer:
            return None
        metrics, notes = combine(rank_summaries)
        for text in notes:
            self.note(text)
        if status == "ok" and not metrics["steps_measured"]:
            status = "failed"
        self.record.update(status=status, finished_at=utc_now(), metrics=metrics)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        name = f"{self.lab}_{_safe_name(self.run_name)}_{stamp}_{self.run_id}.json"
        self.path = write_json_atomic(_json_safe(self.record), self.results_dir / name,
                                      overwrite=False)
        return self.path


# --- reading ---------------------------------------------------------------------------

@dataclass
class Loaded:
    path: Path
    record: dict | None
    reason: str | None  # why the file was skipped; None when it is valid

    @property
    def ok(self) -> bool:
        return self.record is not None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_run(record: dict) -> list[str]:
    """Problems that make a dict not a valid run record (empty list: valid)."""
    problems = []
    for key in ("lab", "status", "run_id", "run_name", "started_at", "command", "config",
                "world", "metrics"):
        if key not in record:
            problems.append(f"missing {key!r}")
    if problems:
        return problems
    if record["lab"] not in LAB_NAMES:
        problems.append(f"unknown lab {record['lab']!r}")
    if record["status"] not in STATUSES:
        problems.append(f"unknown status {record['status']!r}")
    config, world, metrics = record["config"], record["world"], record["metrics"]
    if not isinstance(config, dict) or config.get("strategy") not in STRATEGIES:
        problems.append("config.strategy is missing or unknown")
    if not isinstance(world, dict) or not isinstance(world.get("world_size"), int) \
            or world["world_size"] < 1:
        problems.append("world.world_size is missing or not a positive integer")
    if not isinstance(metrics, dict):
        return problems + ["metrics is not an object"]
    if record["status"] == "ok":
        tp = metrics.get("throughput_img_s")
        if not isinstance(tp, dict) or not all(_is_number(tp.get(k)) for k in
                                               ("median", "p10", "p90", "mean")):
            problems.append("metrics.throughput_img_s needs numeric median, p10, p90, mean")
        elif not (0 < tp["p10"] <= tp["median"] <= tp["p90"]):
            problems.append("metrics.throughput_img_s is not positive and ordered "
                            "p10 <= median <= p90")
        if not isinstance(metrics.get("steps_measured"), int) or metrics["steps_measured"] < 1:
            problems.append("metrics.steps_measured must be a positive integer")
        if not isinstance(metrics.get("per_device"), list) or not metrics["per_device"]:
            problems.append("metrics.per_device must list at least one device")
    return problems


def load_result(path: Path) -> Loaded:
    """Read one file of the results folder as JSON only (nothing is executed or unpickled)
    and check it against the contract."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_RESULT_BYTES:
            return Loaded(path, None, f"too large to be a result file ({size:,} bytes)")
        record = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return Loaded(path, None, "not text (binary file)")
    except json.JSONDecodeError as err:
        return Loaded(path, None, f"not valid JSON (truncated or corrupt?): {err.msg} "
                                  f"at line {err.lineno}")
    except (ValueError, RecursionError) as err:  # absurdly nested or huge numbers
        return Loaded(path, None, f"not valid JSON (corrupt?): {str(err)[:200]}")
    except OSError as err:
        return Loaded(path, None, f"unreadable: {err.strerror or err}")
    if not isinstance(record, dict):
        return Loaded(path, None, "not a JSON object")
    version = record.get("schema_version")
    if not isinstance(version, int):
        return Loaded(path, None, "no schema_version: not a file written by this lab")
    if version > SCHEMA_VERSION:
        return Loaded(path, None, f"schema_version {version} is newer than this lab "
                                  f"understands ({SCHEMA_VERSION}); update the lab")
    kind = record.get("kind")
    if kind == "environment":
        return Loaded(path, record, None)
    if kind != "run":
        return Loaded(path, None, f"unknown kind {kind!r}")
    problems = validate_run(record)
    if problems:
        return Loaded(path, None, "invalid run file: " + "; ".join(problems))
    return Loaded(path, record, None)


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
        "optimizer": "SGD(momentum=0.9, weight_decay=1e-4)",
        "num_workers": num_workers,
        # CPU speed depends on it, so a baseline must match it (torchrun and --nproc
        # share the cores between ranks; a plain python run takes them all).
        "threads_per_process": torch.get_num_threads(),
        "seed": args.seed,
        **extra,
    }
