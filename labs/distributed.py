"""What step 04 needs around DistributedDataParallel that is not the lesson itself.

04_ddp_training.py keeps the DDP calls a student must see (init_process_group,
DistributedSampler, the DDP wrap, the rank-0 guard, destroy_process_group). Here: the
launch checks that run before any rank starts, the device and backend of a rank, DDP's
options and communication hooks, gathering every rank's measurements to rank 0, failure
reports between ranks, checkpoints (written atomically, read with ``weights_only=True``)
and what the result records about the world. How the processes are started is in
``labs.launch``.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from labs import envinfo, files
from labs.compat import OutOfMemoryError
from labs.contract import Outcome
from labs.errors import UsageError, first_line
from labs.launcher_env import Ranks
from labs.train import gradient_bytes


def rank_device(ranks: Ranks, requested: str) -> torch.device:
    """This rank's device, made the current one: GPU number LOCAL_RANK (wrapping onto
    shared GPUs only for gloo rehearsals), or the CPU."""
    if requested == "cpu" or envinfo.gpu_count() == 0:
        return torch.device("cpu")
    device = torch.device("cuda", ranks.local_rank % envinfo.gpu_count())
    envinfo.use_device(device)
    return device


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


class PeerReports:
    """How a failing rank tells rank 0 why, through the process group's key-value store:
    rank 0, whose collectives break because of it, then records the cause and not the
    echo. Best effort: the store may be gone with the rank that hosts it."""

    KEY = "lab/failure/rank{}"
    # A SIGKILLed rank's sockets close (its peers' collectives break) a moment before the
    # kernel marks it dead; on a busy machine that moment can be long enough to miss.
    DEATH_GRACE_S = 2.0

    def __init__(self, rank: int, world_size: int):
        """A collective call: every rank makes it (it learns where the others run)."""
        self.rank = rank
        self.world_size = world_size
        me = _Process.this()
        self.processes = all_gather(me) if world_size > 1 else [me]

    def writer_lost(self) -> int | None:
        """The rank that died if rank 0 is gone and so is every rank below this one, so
        that this rank must write the result; None otherwise (or when it cannot tell:
        a rank on another host)."""
        if self.rank == 0:
            return None
        deadline = time.monotonic() + self.DEATH_GRACE_S
        for lower in range(self.rank):
            if not self.processes[lower].dead_by(deadline):
                return None
        return 0

    def death_reason(self, rank: int) -> str:
        return (f"rank {rank} (pid {self.processes[rank].pid}) died without a word: killed "
                f"by a signal (SIGKILL from a user or a scheduler, or the kernel's OOM "
                f"killer when host memory ran out) or crashed in native code; rank "
                f"{self.rank} recorded the run")

    def _store(self):
        # torch has no public accessor for the default group's store
        return dist.distributed_c10d._get_default_store()

    def tell(self, outcome) -> None:
        """Leave this rank's outcome (a contract.Outcome) for rank 0."""
        if not dist.is_initialized():
            return
        try:
            key = self.KEY.format(self.rank)
            store = self._store()
            store.set(key, json.dumps(outcome.__dict__))
            store.check([key])  # a round trip: the report is in before this rank leaves
        except Exception:  # noqa: BLE001
            pass

    def first_failure(self):
        """(rank, contract.Outcome) of the first other rank that reported, or None."""
        if self.world_size < 2 or not dist.is_initialized():
            return None
        try:
            store = self._store()
            for peer in range(1, self.world_size):
                key = self.KEY.format(peer)
                if store.check([key]):
                    return peer, Outcome(**json.loads(store.get(key)))
        except Exception:  # noqa: BLE001 - no store, no report: keep this rank's own reason
            pass
        return None


@dataclass
class _Process:
    """Where a rank runs, enough to tell later from the same host whether it is gone."""
    host: str
    pid: int
    started: float

    @staticmethod
    def this() -> "_Process":
        return _Process(socket.gethostname(), os.getpid(), psutil.Process().create_time())

    def dead_by(self, deadline: float) -> bool:
        """is_dead, asked again until the time.monotonic() ``deadline`` (at once for a
        process on another host: that cannot be told from here)."""
        while not self.is_dead():
            if self.host != socket.gethostname() or time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def is_dead(self) -> bool:
        """True only when it is certain: same host, and the process is gone (or a
        zombie, or the pid belongs to a newer process)."""
        if self.host != socket.gethostname():
            return False
        try:
            process = psutil.Process(self.pid)
            return (process.create_time() != self.started
                    or process.status() == psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False


# Work handles of collectives run through run_collective, alive until the process ends.
_OUTLIVE_THE_GROUP: list = []


def run_collective(op, *args, **kwargs) -> None:
    """``op(*args, **kwargs)``, a torch.distributed collective, waited for; safe as the last
    collective before the group is torn down.

    gloo's worker thread lets go of a finished collective a moment after the caller wakes.
    If that drops the last C++ reference to a tensor Python knows, the thread needs the
    GIL. When the main thread is by then destroying the group (GIL held: a rank hangs at
    exit, seen on torch 2.4.1) or finalizing the interpreter (the thread is killed inside
    a destructor: "terminate called", SIGABRT, seen on torch 2.14), it never gets it. So
    the collective runs with async_op and its work handle, which holds the tensors, is
    kept for the life of the process: the worker's reference is never the last one."""
    work = op(*args, **kwargs, async_op=True)
    work.wait()
    _OUTLIVE_THE_GROUP.append(work)


def gather_to_rank0(obj):
    """Every rank's picklable ``obj``, as a list on rank 0 (None elsewhere): what
    ``dist.gather_object`` does, but safe as a run's last collective (run_collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    size = torch.tensor([payload.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    run_collective(dist.all_gather, sizes, size)
    padded = torch.zeros(int(max(n.item() for n in sizes)), dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload
    slots = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    run_collective(dist.gather, padded, slots, dst=0)
    if slots is None:
        return None
    return [pickle.loads(slot[:int(n.item())].cpu().numpy().tobytes())
            for slot, n in zip(slots, sizes)]


def all_gather(obj) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every rank, in place (04 hands it to the Trainer to add up
    the validation counts: each rank evaluated its own share of the images)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) to every rank, one broadcast per
    dtype. Each rank's statistics come from its own batches (unless --broadcast-buffers):
    without this, every rank would evaluate a slightly different model. The weights are
    the same on every rank already; rank 0's model is also the one checkpoints save."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in model.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.data.copy_(value.view_as(buffer))


# --- checkpoints ------------------------------------------------------------------------

def save_checkpoint(args, epoch: int, model, optimizer, scaler) -> Path:
    """Rank 0 saves the *unwrapped* model so the file loads without DDP, into
    --checkpoint-dir, atomically, so a crash mid-save never leaves a truncated checkpoint."""
    folder = Path(args.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch{epoch:04d}.pt"
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict()}
    return files.write_atomic(path, lambda handle: torch.save(state, handle))


def checkpoint_due(epoch: int, every: int) -> bool:
    """After 0-based ``epoch``, is a checkpoint due with ``--checkpoint-every every``?"""
    return every > 0 and (epoch + 1) % every == 0


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(Path(folder).glob("epoch*.pt"))
    return found[-1] if found else None


@dataclass
class Resumed:
    path: Path | None  # the checkpoint loaded, None for a fresh start
    start_epoch: int   # epochs already done


def resume(args, model, optimizer, scaler, device: torch.device) -> Resumed:
    """``--resume PATH|auto``: load the checkpoint into the unwrapped model (every rank
    loads the same file) and say where training starts."""
    path = resolve_resume(args.resume, args.checkpoint_dir)
    if path is None:
        return Resumed(None, 0)
    done = load_checkpoint(path, model, optimizer, scaler, device)
    if done > args.epochs:
        raise UsageError(f"--resume {path}: the checkpoint is from epoch {done}, past "
                         f"--epochs {args.epochs}; raise --epochs to train on")
    if done == args.epochs:  # nothing left to train: not a failure, and no new result
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"04_ddp: --resume {path}: the run already finished all {done} epochs; "
                  f"nothing to resume (raise --epochs to train longer)", flush=True)
        raise SystemExit(0)
    return Resumed(path, done)


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
        with warnings.catch_warnings():  # the one line below says it all
            warnings.simplefilter("ignore")
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
        epoch = state["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"its epoch is {epoch!r}, not a count of finished epochs")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        return epoch
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise UsageError(f"--resume {path}: not a checkpoint of this model and options "
                         f"({_first_sentence(err)})") from None


def _first_sentence(err: Exception) -> str:
    text = first_line(err).split(". ")[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _unpickling_detail(err: Exception) -> str:
    """The informative sentence of torch's long weights_only message."""
    for line in str(err).splitlines():
        line = line.rpartition("WeightsUnpickler error:")[2].strip()
        if line.startswith(("Unsupported", "Trying to load")):
            return line.split(". ")[0][:200]
    return "corrupt, or not written by torch.save"


# --- what the result records ----------------------------------------------------------

def ddp_settings(args, backend: str, model) -> dict:
    """The DDP options of this run, for the result's config block."""
    return {
        "backend": backend,
        "gradient_bytes": gradient_bytes(model),  # all-reduced every step (before any hook)
        "comm_probe": args.comm_probe,
        "profile_steps": args.profile_steps,
        "sync": args.sync,
        "average_every": args.average_every,
        "local_sgd_warmup": args.local_sgd_warmup,
        "partition": args.partition,
        "dirichlet_alpha": args.dirichlet_alpha if args.partition == "dirichlet" else None,
        **_constructor_flags(args),
        "sync_bn": args.sync_bn,
        "broadcast_buffers": args.broadcast_buffers,
        "comm_hook": args.comm_hook,
        "timeout_s": args.timeout_s,
        "checkpoint_every": args.checkpoint_every,
        "resume": args.resume,
    }


def bucket_bytes(ddp_model) -> list[int] | None:
    """The sizes of DDP's gradient buckets, in all-reduce order, as DDP rebuilt them after
    the first step (what the report's model of communication counts latencies for).
    None where this PyTorch does not say (a private API: read, never relied on)."""
    ddp_model = getattr(ddp_model, "_orig_mod", ddp_model)  # under torch.compile
    try:
        data = ddp_model._get_ddp_logging_data()
        sizes = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes")
        return [int(size) for size in str(sizes).split(",")]
    except Exception:  # noqa: BLE001 - a missing figure, never a failed run
        return None


# Bytes on the wire per gradient byte, by --comm-hook (PowerSGD's depend on its rank).
HOOK_BYTES = {"none": 1.0, "fp16": 0.5, "bf16": 0.5}


def comm_bytes_per_sample(config: dict, metrics: dict, world_size: int) -> float | None:
    """Bytes each rank all-reduced per training image it processed: DDP's gradients every
    step (a hook's compression counted), or what local SGD counted. None outside DDP and
    for PowerSGD; 0 on one rank, which has no one to send to."""
    if config.get("strategy") != "ddp":
        return None
    if world_size < 2:
        return 0.0
    counted = metrics.get("local_sgd")
    if counted:
        return counted.get("bytes_per_sample")
    factor = HOOK_BYTES.get(config.get("comm_hook"))
    per_step = (config.get("per_device_batch_size") or 0) * (config.get("grad_accum_steps") or 1)
    if factor is None or not per_step or not config.get("gradient_bytes"):
        return None
    return factor * config["gradient_bytes"] / per_step


def describe_world(ranks: Ranks, backend: str, device: torch.device,
                   resumed: "Resumed") -> dict:
    """The result's world block; a collective call: every rank must make it."""
    devices = all_gather(envinfo.device_entry(device, ranks.rank))
    return {"world_size": ranks.world_size, "nnodes": ranks.nnodes, "backend": backend,
            "local_world_size": ranks.local_world_size, "launcher": ranks.launcher,
            "restart_count": ranks.restart_count,
            "devices": sorted(devices, key=lambda d: d["rank"]),
            "resumed_from": str(resumed.path) if resumed.path else None,
            "start_epoch": resumed.start_epoch}


def launch_notes(world: dict, device: torch.device) -> list[str]:
    """Plain sentences for the report about how this run was launched."""
    notes = []
    if world["world_size"] == 1:
        notes.append("DDP with world size 1: one process, nothing to all-reduce with; this "
                     "measures DDP's overhead, not scaling.")
    gpus = {(d["host"], d["index"]) for d in world["devices"]
            if d["device"].startswith("cuda")}
    if device.type == "cuda" and len(gpus) < world["world_size"]:
        notes.append("Several ranks share a GPU (gloo rehearsal): the code path is the "
                     "multi-GPU one, the speed is not.")
    if device.type == "cpu":
        notes.append("DDP on the CPU over gloo: ranks compete for the same cores, so scaling "
                     "here says little about GPUs.")
    where = f"{world['resumed_from']} at epoch {world['start_epoch'] + 1}"
    if world["restart_count"]:
        notes.append(f"torchrun restarted the workers {world['restart_count']} time(s) "
                     f"after a failure; this run resumed from {where}.")
    elif world["resumed_from"]:
        notes.append(f"Resumed from {where}.")
    return notes


def _constructor_flags(args) -> dict:
    """The DDP flags passed to DistributedDataParallel as they are (one list for the
    constructor and the result)."""
    return {"bucket_cap_mb": args.bucket_cap_mb, "static_graph": args.static_graph,
            "find_unused_parameters": args.find_unused_parameters,
            "gradient_as_bucket_view": True}  # gradients live in the buckets: no copy


def ddp_kwargs(args) -> dict:
    """DistributedDataParallel's keyword arguments from the command line's DDP flags."""
    return {**_constructor_flags(args), **buffer_sync(args.broadcast_buffers)}


def buffer_sync(every_forward: bool) -> dict:
    """DDP's switch for re-broadcasting rank 0's buffers before each forward, under the
    name this PyTorch knows (``broadcast_buffers`` became ``forward_sync_buffers``)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {name: every_forward}
