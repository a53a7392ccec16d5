"""Launch plumbing and bookkeeping for step 04, kept out of the lesson.

04_ddp_training.py keeps the DDP calls a student must see (init_process_group,
DistributedSampler, the DDP wrap, the rank-0 guard, destroy_process_group). What lives
here is the machinery around them: reading the rank from torchrun's environment,
self-launching with ``--nproc`` (spawn, a free port), choosing a backend and refusing the
impossible ones, communication hooks, gathering every rank's measurements to rank 0,
and checkpoints written atomically and read with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from labs.compat import OutOfMemoryError
from labs.errors import UsageError
from labs.results import command_line


@dataclass
class Ranks:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    nnodes: int
    restart_count: int
    launcher: str  # "torchrun", "spawn" or "single"


def ranks_from_env(legacy_local_rank: int | None = None) -> Ranks:
    """Who this process is, from the variables torchrun (or ``spawn``) sets.

    Started with plain ``python`` and no ``--nproc``, the process is a world of one: the
    rendezvous variables are filled in so init_process_group still works.
    """
    env = os.environ
    if "RANK" not in env:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        launcher = "single"
    else:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else env.get("LAB_LAUNCHER",
                                                                            "env")
    world_size = int(env["WORLD_SIZE"])
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", world_size))
    local_rank = int(env.get("LOCAL_RANK", legacy_local_rank or 0))
    nnodes = int(env.get("GROUP_WORLD_SIZE", max(1, world_size // max(1, local_world_size))))
    return Ranks(rank=int(env["RANK"]), local_rank=local_rank, world_size=world_size,
                 local_world_size=local_world_size, nnodes=nnodes,
                 restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
                 launcher=launcher)


def store_for_attempt(ranks: Ranks, timeout) -> "dist.Store | None":
    """A rendezvous store of this torchrun attempt's own, after a restart.

    torchrun's agent keeps one key-value store across restarts. The ranks of a restarted
    attempt would read the addresses the dead attempt's ranks published there, connect to
    ports nobody listens on any more, and time out; a prefix per attempt keeps them apart.
    """
    if ranks.restart_count == 0:
        return None  # first attempt: the usual env:// rendezvous
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          ranks.world_size, is_master=ranks.rank == 0 and not agent_hosts_store,
                          timeout=timeout)
    return dist.PrefixStore(f"lab/attempt{ranks.restart_count}", store)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawned(local_rank: int, train, args, nproc: int, threads: int) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank),
                      WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      GROUP_WORLD_SIZE="1", LAB_LAUNCHER="spawn")
    torch.set_num_threads(threads)
    train(args)


def threads_per_rank(nproc: int) -> int:
    """Like torchrun: share the cores between the ranks instead of each rank taking all
    of them (N ranks x all cores threads thrash; on CPU that is many times slower)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // nproc)


def spawn(train, args) -> None:
    """``--nproc N``: start N copies of ``train(args)`` on this machine, like torchrun.

    The spawn start method (not fork) gives each rank a fresh interpreter, so no CUDA or
    thread state is inherited; it is also what works from a notebook or on macOS.
    """
    nproc = args.nproc
    check_backend(args.backend, args.device, nproc)  # refuse before starting anything
    args.launch_command = command_line()  # the children only see `python -c ...`
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    # torch logs each rank it stops; the line below says so once, in the lab's words.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    context = mp.start_processes(_spawned, args=(train, args, nproc, threads_per_rank(nproc)),
                                 nprocs=nproc, join=False, start_method="spawn")
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        while not context.join():
            pass
    except (KeyboardInterrupt, _Stop) as stop:  # Ctrl-C or SIGTERM: every rank stops too
        signum = stop.signum if isinstance(stop, _Stop) else signal.SIGINT
        _stop_ranks(context.processes, signum)
        sys.exit(128 + signum)
    except mp.ProcessExitedException as err:
        print(f"04_ddp: rank {err.error_index} exited with status {err.exit_code}; "
              f"the other ranks were stopped", file=sys.stderr)
        sys.exit(err.exit_code if err.exit_code and err.exit_code > 0 else 1)
    except mp.ProcessRaisedException as err:
        # A rank found bad input only it could check (an unreadable --resume file, say):
        # one line and status 2, as when the script runs alone.
        usage = [line.partition(": ")[2] for line in str(err).splitlines()
                 if line.startswith(f"{UsageError.__module__}.UsageError: ")]
        if usage:
            raise UsageError(usage[-1]) from None
        print(f"04_ddp: rank {err.error_index} failed:\n{err}", file=sys.stderr)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum, frame):
    raise _Stop(signum)


def _stop_ranks(processes, signum: int) -> None:
    """Pass a stop signal on to the ranks (a terminal's Ctrl-C reaches them by itself;
    ``kill`` of this process does not) and wait while they write what they measured."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    deadline = time.monotonic() + (2.0 if signum == signal.SIGINT else 0.0)
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signum)
    for process in processes:
        process.join(60)
        if process.is_alive():
            process.kill()


def gpus_visible() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_backend(requested: str, device: str, local_world_size: int) -> None:
    """Refuse, before any work, the combinations that cannot run."""
    wants_cpu = device == "cpu" or gpus_visible() == 0
    if requested == "nccl" and wants_cpu:
        raise UsageError("--backend nccl needs CUDA GPUs; on the CPU use --backend gloo "
                         "(or auto)")
    if requested in ("nccl", "auto") and not wants_cpu and local_world_size > gpus_visible():
        raise UsageError(
            f"{local_world_size} ranks on this node but {gpus_visible()} GPU(s): NCCL cannot "
            f"put two ranks on one GPU. Use at most {gpus_visible()} process(es) per node, "
            f"or --backend gloo to rehearse the multi-rank code path on shared GPUs "
            f"(correct but slow), or --device cpu")
    if requested == "gloo" and not dist.is_gloo_available():
        raise UsageError("--backend gloo: this PyTorch build has no gloo")
    if requested == "nccl" and not dist.is_nccl_available():
        raise UsageError("--backend nccl: this PyTorch build has no NCCL; use gloo")


def device_for(ranks: Ranks, requested: str) -> torch.device:
    """One GPU per local rank (wrapping onto shared GPUs only for gloo rehearsals)."""
    if requested not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {requested}: 04 takes auto, cpu or cuda (each rank "
                         f"picks its GPU from its local rank)")
    if requested == "cpu" or gpus_visible() == 0:
        if requested == "cuda":
            raise UsageError("--device cuda: no CUDA GPU is visible on this machine")
        return torch.device("cpu")
    return torch.device("cuda", ranks.local_rank % gpus_visible())


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    if sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU kernel); "
                         "drop it on the CPU")


def choose_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def register_comm_hook(model, hook: str) -> None:
    """Compress gradients before the all-reduce (``--comm-hook``)."""
    if hook == "none":
        return
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if hook == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif hook == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                            start_powerSGD_iter=2)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    else:
        raise UsageError(f"unknown --comm-hook {hook!r}")


def gather_to_rank0(obj):
    """Every rank's picklable ``obj``, as a list on rank 0 (None elsewhere)."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather(obj) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# --- checkpoints ------------------------------------------------------------------------

def save_checkpoint(folder: Path, epoch: int, model, optimizer, scaler) -> Path:
    """Rank 0 saves the *unwrapped* model so the file loads without DDP; atomically, so a
    crash mid-save never leaves a truncated checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch{epoch:04d}.pt"
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def checkpoint_due(epoch: int, every: int) -> bool:
    """After 0-based ``epoch``, is a checkpoint due with ``--checkpoint-every every``?"""
    return every > 0 and (epoch + 1) % every == 0


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(Path(folder).glob("epoch*.pt"))
    return found[-1] if found else None


def resolve_resume(resume: str | None, folder: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(folder)
    return Path(resume)


def load_checkpoint(path: Path, model, optimizer, scaler, device: torch.device) -> int:
    """Restore model, optimizer and scaler; returns the number of epochs already done.
    ``weights_only=True``: a checkpoint is data, never code to unpickle."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except OutOfMemoryError:
        raise
    except pickle.UnpicklingError as err:  # garbage, or pickled objects that are not data
        raise UsageError(f"--resume {path}: not a readable checkpoint: refused by "
                         f"torch.load(weights_only=True), which loads tensors and never "
                         f"unpickles code ({_unpickling_detail(err)})") from None
    except Exception as err:  # noqa: BLE001 - a damaged file can fail in any way
        raise UsageError(f"--resume {path}: not a readable checkpoint, truncated or "
                         f"corrupt? ({_first_sentence(err)})") from None
    try:
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}, not a checkpoint dict")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        return int(state["epoch"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise UsageError(f"--resume {path}: not a checkpoint of this model and options "
                         f"({_first_sentence(err)})") from None


def _first_sentence(err: Exception) -> str:
    text = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _unpickling_detail(err: Exception) -> str:
    """The informative sentence of torch's long weights_only message."""
    for line in str(err).splitlines():
        line = line.rpartition("WeightsUnpickler error:")[2].strip()
        if line.startswith(("Unsupported", "Trying to load")):
            return line.split(". ")[0][:200]
    return "corrupt, or not written by torch.save"


# --- what the result records ----------------------------------------------------------

def ddp_config(args, backend: str, model) -> dict:
    """The DDP options of this run, for the result's config block."""
    from labs.train import gradient_bytes

    return {
        "backend": backend,
        "gradient_bytes": gradient_bytes(model),  # all-reduced every step (before any hook)
        "comm_probe": args.comm_probe,
        "bucket_cap_mb": args.bucket_cap_mb,
        "static_graph": args.static_graph,
        "sync_bn": args.sync_bn,
        "find_unused_parameters": args.find_unused_parameters,
        "broadcast_buffers": args.broadcast_buffers,
        "gradient_as_bucket_view": True,
        "comm_hook": args.comm_hook,
        "timeout_s": args.timeout_s,
        "checkpoint_every": args.checkpoint_every,
        "resume": args.resume,
    }


def describe_world(ranks: Ranks, backend: str, device: torch.device) -> dict:
    """The result's world block; a collective call: every rank must make it."""
    from labs.envinfo import device_entry

    devices = all_gather(device_entry(device, ranks.rank))
    return {"world_size": ranks.world_size, "nnodes": ranks.nnodes, "backend": backend,
            "local_world_size": ranks.local_world_size, "launcher": ranks.launcher,
            "restart_count": ranks.restart_count,
            "devices": sorted(devices, key=lambda d: d["rank"])}


def note_launch(run, ranks: Ranks, device: torch.device, checkpoint: Path | None,
                start_epoch: int) -> None:
    """Plain sentences for the report about how this run was launched."""
    if ranks.world_size == 1:
        run.note("DDP with world size 1: one process, nothing to all-reduce with; this "
                 "measures DDP's overhead, not scaling.")
    gpus = {(d["host"], d["index"]) for d in run.record["world"]["devices"]
            if d["device"].startswith("cuda")}
    if device.type == "cuda" and len(gpus) < ranks.world_size:
        run.note("Several ranks share a GPU (gloo rehearsal): the code path is the "
                 "multi-GPU one, the speed is not.")
    if device.type == "cpu":
        run.note("DDP on the CPU over gloo: ranks compete for the same cores, so scaling "
                 "here says little about GPUs.")
    if ranks.restart_count:
        run.note(f"torchrun restarted the workers {ranks.restart_count} time(s) after a "
                 f"failure; this run resumed from {checkpoint} at epoch {start_epoch + 1}.")
    elif checkpoint is not None:
        run.note(f"Resumed from {checkpoint} at epoch {start_epoch + 1}.")
    run.record["world"]["resumed_from"] = str(checkpoint) if checkpoint else None
    run.record["world"]["start_epoch"] = start_epoch


def buffer_sync(every_forward: bool) -> dict:
    """DDP's switch for re-broadcasting rank 0's buffers before each forward, under the
    name this PyTorch knows (``broadcast_buffers`` became ``forward_sync_buffers``)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {name: every_forward}
