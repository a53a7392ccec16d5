"""What this machine can do: the compute and communication probes of step 01.

One function per probe; each returns plain dicts for the ``environment`` file and, when
it cannot measure, says why in ``notes`` instead of guessing a number:

- ``matmul_gpu`` / ``matmul_cpu``: the matrix-multiply rate, TFLOP/s = 2 n^3 / t, timed
  with CUDA events on a GPU after a warmup (the ceiling for training throughput);
- ``copy_bandwidth``: host-to-device and device-to-host copies from pinned memory (what an
  input pipeline can push to a GPU);
- ``allreduce_sweep``: all-reduce over a range of message sizes between processes (nccl
  across the GPUs, gloo between two CPU processes otherwise), with every reduced value
  checked, and from it the predicted time to all-reduce ResNet-50's gradients.

The arithmetic is kept in pure functions so tests can check it without hardware: the
bandwidth formulas in ``labs.bandwidth`` (shared with the report, which never imports
torch), ``recommend_batch_size`` here. GB/s is 1e9 bytes/s.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from labs.bandwidth import (algbw_gb_s, busbw, fit_alpha_beta, fit_quality,
                            predict_allreduce_s, sweeps_by_world_size)
from labs.compat import OutOfMemoryError
from labs.data import workers_per_process
from labs.distributed import run_collective
from labs.errors import first_line
from labs import fmt

# The default model's gradients: ResNet-50 (1000 classes) has 25,557,032 parameters,
# all-reduced in fp32 by DDP whatever the autocast precision.
GRADIENT_MODEL = "resnet50"
RESNET50_PARAMETERS = 25_557_032
GRADIENT_BYTES = RESNET50_PARAMETERS * 4

# Peak memory of ResNet-50 at 224 px, batch 256, one H100 (docs/student_guide.md,
# "Reference figures"); activations dominate, so memory is taken to grow linearly with
# the batch.
MEMORY_AT_BATCH_256_GIB = {"bf16": 11.0, "fp32": 27.2}
MEMORY_HEADROOM = 0.20

GPU_MATMUL_SIZE = 8192
CPU_MATMUL_SIZE = 1024
GPU_MATMUL_DTYPES = ("fp32", "tf32", "bf16")
COPY_BYTES = 256 * 2**20

# All-reduce sweeps: message sizes in bytes (fp32 elements x 4). The CPU sweep is kept
# small so step 01 finishes in seconds on a 2-core machine.
KiB, MiB = 2**10, 2**20
GPU_ALLREDUCE_SIZES = tuple(MiB * 4**k for k in range(5))  # 1 MiB ... 256 MiB
CPU_ALLREDUCE_SIZES = tuple(4 * KiB * 4**k for k in range(7))  # 4 KiB ... 16 MiB
ALLREDUCE_TIMEOUT_S = 60


# --- arithmetic --------------------------------------------------------------------------

def matmul_tflops(n: int, time_s: float) -> float | None:
    """An n x n by n x n matrix product costs 2 n^3 floating-point operations."""
    return 2 * n**3 / time_s / 1e12 if time_s > 0 else None


def allreduce_expected(world_size: int) -> float:
    """Rank r contributes r + 1, so the sum is 1 + 2 + ... + n = n(n+1)/2."""
    return world_size * (world_size + 1) / 2


def check_allreduce(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """A 0-d bool tensor on the tensor's device (no host sync): every element is the sum."""
    return (tensor == allreduce_expected(world_size)).all()


def allreduce_correct(tensor: torch.Tensor, world_size: int) -> bool:
    return bool(check_allreduce(tensor, world_size))


def recommend_batch_size(total_memory_bytes: int, precision: str,
                         headroom: float = MEMORY_HEADROOM) -> int:
    """Largest power-of-two per-GPU batch for ResNet-50 at 224 px that leaves `headroom`
    of the GPU's memory free; 0 when not even one image fits."""
    per_image = MEMORY_AT_BATCH_256_GIB[precision] * 2**30 / 256
    fits = total_memory_bytes * (1 - headroom) / per_image
    return 2 ** int(math.floor(math.log2(fits))) if fits >= 1 else 0


# --- the machine -------------------------------------------------------------------------

def gpu_inventory(gpus: list[dict]) -> list[dict]:
    """envinfo's GPU list plus, for each GPU, the GPUs it can reach directly (P2P)."""
    inventory = []
    for gpu in gpus:
        i = gpu["index"]
        peers = [j for j in range(len(gpus))
                 if j != i and torch.cuda.can_device_access_peer(i, j)]
        inventory.append({**gpu, "peer_access": peers})
    return inventory


def nvidia_topology(notes: list[str]) -> str | None:
    """`nvidia-smi topo -m` (how GPUs, NICs and CPUs connect); None without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        if torch.cuda.is_available():
            notes.append("nvidia-smi was not found: GPU topology not recorded.")
        return None
    try:
        done = subprocess.run([smi, "topo", "-m"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        notes.append(f"nvidia-smi topo -m could not run ({err}): topology not recorded.")
        return None
    if done.returncode != 0 or not done.stdout.strip():
        reason = (done.stderr or done.stdout).strip().splitlines()
        notes.append(f"nvidia-smi topo -m failed (exit {done.returncode}"
                     f"{': ' + reason[0] if reason else ''}): topology not recorded.")
        return None
    return done.stdout.rstrip("\n")


def distributed_backends() -> dict:
    if not dist.is_available():
        return {"nccl": False, "gloo": False, "mpi": False}
    return {"nccl": dist.is_nccl_available(), "gloo": dist.is_gloo_available(),
            "mpi": dist.is_mpi_available()}


# --- compute -----------------------------------------------------------------------------

@contextlib.contextmanager
def _tf32(enabled: bool):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _cuda_median_s(device: torch.device, op, warmup: int, iters: int) -> float:
    """Median time of `op` on `device`'s current stream, from CUDA events, after warmup."""
    with torch.cuda.device(device):
        for _ in range(warmup):
            op()
        pairs = []
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            op()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) / 1000.0 for s, e in pairs)  # events give ms


def matmul_gpu(index: int, dtype: str, notes: list[str], n: int = GPU_MATMUL_SIZE,
               warmup: int = 3, iters: int = 10) -> dict | None:
    """fp32 (TF32 off), tf32 (fp32 tensors, TF32 tensor cores) or bf16 on GPU `index`."""
    device = torch.device("cuda", index)
    major, _ = torch.cuda.get_device_capability(device)
    if dtype in ("tf32", "bf16") and major < 8:
        notes.append(f"cuda:{index}: no {dtype} matmul probe: needs compute capability "
                     f"8.0 or newer (Ampere), this GPU has {major}.x.")
        return None
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    try:
        with _tf32(dtype == "tf32"):
            a = torch.randn(n, n, device=device, dtype=torch_dtype)
            b = torch.randn(n, n, device=device, dtype=torch_dtype)
            c = torch.empty(n, n, device=device, dtype=torch_dtype)
            t = _cuda_median_s(device, lambda: torch.mm(a, b, out=c), warmup, iters)
    except OutOfMemoryError:
        notes.append(f"cuda:{index}: {dtype} matmul probe at n={n} ran out of memory.")
        return None
    finally:
        a = b = c = None
        torch.cuda.empty_cache()
    return {"device": f"cuda:{index}", "dtype": dtype, "size": n, "time_s": t,
            "tflops": matmul_tflops(n, t)}


def matmul_cpu(n: int = CPU_MATMUL_SIZE, warmup: int = 2, iters: int = 5) -> dict:
    """A small fp32 matmul on the CPU, so a machine without a GPU still gets a number."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    t = statistics.median(times)
    return {"device": "cpu", "dtype": "fp32", "size": n, "time_s": t,
            "tflops": matmul_tflops(n, t)}


# --- host <-> device copies --------------------------------------------------------------

def copy_bandwidth(index: int, notes: list[str], size_bytes: int = COPY_BYTES,
                   warmup: int = 2, iters: int = 10) -> list[dict]:
    """Host-to-device and device-to-host bandwidth from pinned host memory on GPU `index`."""
    device = torch.device("cuda", index)
    try:
        host = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=True)
        on_gpu = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    except RuntimeError as err:  # pinned memory refused, or the GPU is full
        notes.append(f"cuda:{index}: copy bandwidth not measured "
                     f"({first_line(err, type(err).__name__)}).")
        return []
    rows = []
    for direction, dst, src in (("h2d", on_gpu, host), ("d2h", host, on_gpu)):
        t = _cuda_median_s(device, lambda: dst.copy_(src, non_blocking=True), warmup, iters)
        rows.append({"device": f"cuda:{index}", "direction": direction,
                     "size_bytes": size_bytes, "gb_s": algbw_gb_s(size_bytes, t)})
    del host, on_gpu
    torch.cuda.empty_cache()
    return rows


# --- all-reduce --------------------------------------------------------------------------

def _time_allreduce(size_bytes: int, rank: int, world_size: int, device: torch.device,
                    warmup: int, iters: int) -> dict:
    """One message size on one rank: median time after warmup, and every result checked.
    Each all-reduce goes through run_collective: the last one comes just before
    destroy_process_group, and a plain call there can hang or abort the rank at exit."""
    tensor = torch.empty(size_bytes // 4, dtype=torch.float32, device=device)
    correct = torch.ones((), dtype=torch.bool, device=device)
    times, events = [], []
    for i in range(warmup + iters):
        tensor.fill_(rank + 1)  # all_reduce works in place: refill before each round
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            run_collective(dist.all_reduce, tensor)
            end.record()
            if i >= warmup:
                events.append((start, end))
        else:
            dist.barrier()  # start together, so one rank's lateness is not timed
            t0 = time.perf_counter()
            run_collective(dist.all_reduce, tensor)  # gloo on CPU: returns when done
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        correct &= check_allreduce(tensor, world_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1000.0 for s, e in events]
    return {"size_bytes": tensor.numel() * 4, "time_s": statistics.median(times),
            "correct": bool(correct)}


def _allreduce_worker(rank: int, world_size: int, backend: str, store_path: str,
                      out_dir: str, sizes: tuple, warmup: int, iters: int) -> None:
    """One rank of the sweep (started by torch.multiprocessing.spawn)."""
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    extra = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        extra["device_id"] = device
    store = dist.FileStore(store_path, world_size)  # rendezvous: no port to collide on
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=ALLREDUCE_TIMEOUT_S), **extra)
    try:
        rows = [_time_allreduce(size, rank, world_size, device, warmup, iters)
                for size in sizes]
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))


def combine_allreduce(per_rank: list[list[dict]], world_size: int) -> list[dict]:
    """Per size: the slowest rank's median time, the bandwidths from it, and correct only
    when every rank saw the right sum."""
    rows = []
    for same_size in zip(*per_rank):
        size = same_size[0]["size_bytes"]
        t = max(r["time_s"] for r in same_size)
        algbw = algbw_gb_s(size, t)
        rows.append({"size_bytes": size, "time_s": t, "algbw_gb_s": algbw,
                     "busbw_gb_s": busbw(algbw, world_size),
                     "correct": all(r["correct"] for r in same_size)})
    return rows


@contextlib.contextmanager
def _environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _loopback_interface() -> str | None:
    """The interface holding 127.0.0.1, for gloo between processes of this host."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    return None


def sweep_world_sizes(gpu_count: int) -> list[int]:
    """The world sizes of the nccl sweep: the powers of two from 2 up to the GPU count, and
    the GPU count itself (8 GPUs: 2, 4, 8), so the report can fit latency and bandwidth
    at each size a scaling sweep runs."""
    sizes = [2 ** k for k in range(1, gpu_count.bit_length()) if 2 ** k < gpu_count]
    return [*sizes, gpu_count]


def _spawn_sweep(backend: str, world_size: int, sizes: tuple, warmup: int, iters: int,
                 env: dict) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="lab-allreduce-") as tmp, _environ(**env):
        torch.multiprocessing.spawn(
            _allreduce_worker, nprocs=world_size, join=True,
            args=(world_size, backend, os.path.join(tmp, "store"), tmp, sizes, warmup, iters))
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text())
                    for r in range(world_size)]
    return combine_allreduce(per_rank, world_size)


def allreduce_sweep(gpu_count: int, notes: list[str], say=print) -> dict | None:
    """nccl across every GPU when there are two or more (and across the first 2, 4, ...
    GPUs: ``smaller_world_sizes``); gloo between two CPU processes otherwise. Returns the
    ``probes.allreduce`` block, or None with a note."""
    backends = distributed_backends()
    if gpu_count >= 2 and backends["nccl"]:
        backend, world_sizes, device, sizes, warmup, iters = (
            "nccl", sweep_world_sizes(gpu_count), "cuda", GPU_ALLREDUCE_SIZES, 5, 20)
    elif backends["gloo"]:
        backend, world_sizes, device, sizes, warmup, iters = (
            "gloo", [2], "cpu", CPU_ALLREDUCE_SIZES, 2, 5)
        if gpu_count >= 2:
            notes.append("NCCL is not available in this torch build: the all-reduce probe "
                         "ran over gloo between two CPU processes instead.")
    else:
        notes.append("No distributed backend (nccl or gloo) in this torch build: "
                     "all-reduce not measured.")
        return None
    say(f"probe: all-reduce sweep, {backend}, {', '.join(map(str, world_sizes))} ranks on "
        f"{device}, {fmt.size(sizes[0])} to {fmt.size(sizes[-1])}")
    env = {"OMP_NUM_THREADS": "1"}
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
        loopback = _loopback_interface()
        if loopback:
            env["GLOO_SOCKET_IFNAME"] = loopback  # both ranks are on this host
    swept = {}
    for world_size in reversed(world_sizes):  # every GPU first: the sweep that matters most
        try:
            swept[world_size] = _spawn_sweep(backend, world_size, sizes, warmup, iters, env)
        except Exception as err:  # noqa: BLE001 - a failed probe is a note, not a crash
            lines = [line for line in str(err).strip().splitlines() if line.strip()]
            notes.append(f"The all-reduce probe over {world_size} ranks failed "
                         f"({type(err).__name__}: {lines[-1] if lines else err}): not "
                         f"measured.")
            if world_size == world_sizes[-1]:
                return None
    world_size = world_sizes[-1]
    rows = swept[world_size]
    smaller = [{"world_size": n, "results": swept[n],
                "all_correct": all(r["correct"] for r in swept[n])}
               for n in world_sizes[:-1] if n in swept]
    all_correct = all(r["correct"] for r in rows) and all(s["all_correct"] for s in smaller)
    if backend == "gloo":
        notes.append("The all-reduce probe ran over gloo between two CPU processes on this "
                     "host: it measures the software stack and memory, not a GPU link.")
    if not all_correct:
        notes.append("The all-reduce probe returned WRONG sums: the communication stack is "
                     "broken; do not trust DDP results on this machine until it is fixed.")
    return {"backend": backend, "world_size": world_size, "device": device,
            "results": rows, "all_correct": all_correct,
            "smaller_world_sizes": smaller,
            "predicted_gradient_allreduce_s":
                predict_allreduce_s(GRADIENT_BYTES, world_size, rows) if all_correct else None,
            "gradient_model": GRADIENT_MODEL, "gradient_bytes": GRADIENT_BYTES}


# --- what it means -----------------------------------------------------------------------

def recommendations(record: dict) -> list[str]:
    """Plain sentences from the inventory and the probes."""
    gpus, env, probes = record["gpus"], record["environment"], record["probes"]
    cores, said = env["cpu_count"], []
    if gpus:
        smallest = min(gpus, key=lambda g: g["total_memory_bytes"])
        mixed = "bf16" if all(int(g["compute_capability"].split(".")[0]) >= 8
                              for g in gpus) else "fp16"
        low = recommend_batch_size(smallest["total_memory_bytes"], "bf16")
        full = recommend_batch_size(smallest["total_memory_bytes"], "fp32")
        memory = fmt.gib(smallest["total_memory_bytes"], 1)
        said.append(
            f"Per-GPU batch for resnet50 at 224 px on {memory} "
            f"({smallest['name']}{', the smallest GPU' if len(gpus) > 1 else ''}): up to "
            f"{low} with --amp {mixed} --channels-last, {full} with --amp off (fp32); from "
            f"{MEMORY_AT_BATCH_256_GIB['bf16']:.0f} and {MEMORY_AT_BATCH_256_GIB['fp32']:.0f} "
            f"GiB at batch 256, scaled linearly with {MEMORY_HEADROOM:.0%} headroom.")
    processes = max(1, len(gpus))
    workers = workers_per_process(cores, processes)  # what 02-04 choose themselves
    said.append(f"DataLoader workers for --data fake or real images: --num-workers {workers} "
                f"per process ({cores} CPU cores shared by {processes} process(es), one core "
                f"left for each training process); --data synthetic needs none.")
    if not gpus:
        said.append("No GPU: 02 and 04 run on the CPU (04 over gloo between CPU processes) "
                    "and 03's DataParallel just calls the model; use --preset smoke or "
                    "--preset cpu. The numbers teach the mechanics, not GPU speed.")
    elif len(gpus) == 1:
        said.append("One GPU: 02 is meaningful; 03 and 04 run at world size 1, so scaling "
                    "efficiency cannot be measured here. NCCL cannot run two ranks on one "
                    "GPU; 04 --backend gloo --nproc 2 rehearses multi-rank code, not speed.")
    else:
        ids = ",".join(str(g["index"]) for g in gpus)
        said.append(f"{len(gpus)} GPUs: every step is meaningful; compare 03 --gpus {ids} "
                    f"and 04 --nproc {len(gpus)} with 02 for scaling efficiency.")
        no_p2p = [(g["index"], j) for g in gpus for j in range(len(gpus))
                  if j > g["index"] and j not in g["peer_access"]]
        if no_p2p:
            pairs = ", ".join(f"{i}-{j}" for i, j in no_p2p)
            said.append(f"No peer-to-peer access between GPUs {pairs}: their traffic goes "
                        f"through host memory, which slows DataParallel and all-reduce.")
    allreduce = (probes or {}).get("allreduce")
    if allreduce and allreduce["predicted_gradient_allreduce_s"] is not None:
        said.append(
            f"All-reducing resnet50's gradients ({allreduce['gradient_bytes'] / 1e6:.0f} MB "
            f"fp32) over {allreduce['world_size']} {allreduce['backend']} ranks should take "
            f"about {allreduce['predicted_gradient_allreduce_s'] * 1e3:.1f} ms per step; DDP "
            f"hides it behind the backward pass only when backward takes longer.")
    return said


# --- on screen ---------------------------------------------------------------------------

def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_summary(record: dict, path) -> str:
    env, probes = record["environment"], record["probes"]
    gpu_word = f"{len(record['gpus'])} visible" if record["gpus"] else "none visible"
    lines = [
        "",
        "== 01 environment ==",
        f"host         {env['host']} ({env['platform']}), {env['cpu_count']} CPU cores, "
        f"{fmt.gib(env['ram_bytes'], 1)} RAM, "
        f"{fmt.gib(record['disk_free_bytes'], 1)} free for results",
        f"software     Python {env['python']}, torch {env['torch']}, torchvision "
        f"{env['torchvision']}, CUDA {env['cuda'] or 'n/a'}, cuDNN {env['cudnn'] or 'n/a'}, "
        f"NCCL {env['nccl'] or 'n/a'}, driver {env['driver'] or 'n/a'}",
        "backends     " + ", ".join(f"{k} {'yes' if v else 'no'}"
                                    for k, v in record["backends"].items()),
        f"GPUs         {gpu_word}",
    ]
    for g in record["gpus"]:
        peers = ", ".join(map(str, g["peer_access"])) or "none"
        lines.append(f"  cuda:{g['index']:<7}{g['name']}, "
                     f"{fmt.gib(g['total_memory_bytes'], 1)}, "
                     f"compute {g['compute_capability']}, {g['multiprocessors']} SMs, "
                     f"peer access: {peers}")
    if record["topology"]:
        lines.append("topology     nvidia-smi topo -m:")
        lines += [f"  {row}" for row in record["topology"].splitlines()]
    if probes is None:
        lines.append("probes       skipped (--quick)")
    else:
        lines.append(f"matmul       {'device':<8}{'dtype':<6}{'n':>6}{'time':>12}{'TFLOP/s':>10}")
        for m in probes["matmul"]:
            lines.append(f"             {m['device']:<8}{m['dtype']:<6}{m['size']:>6}"
                         f"{m['time_s'] * 1e3:>9.2f} ms{_num(m['tflops'], '.2f'):>10}")
        if probes["copy_bandwidth"] is None:
            lines.append("copy         n/a (no GPU)")
        for c in probes["copy_bandwidth"] or []:
            lines.append(f"copy         {c['device']:<8}{c['direction']:<4}"
                         f"{fmt.size(c['size_bytes']):>9}  {_num(c['gb_s'], '.1f')} GB/s")
        ar = probes["allreduce"]
        if ar is None:
            lines.append("all-reduce   n/a (see notes)")
        else:
            verdict = "all sums correct" if ar["all_correct"] else "WRONG SUMS"
            lines.append(f"all-reduce   {ar['backend']}, {ar['world_size']} ranks on "
                         f"{ar['device']}, {verdict}")
            lines.append(f"             {'size':>9}{'time':>12}{'algbw':>12}{'busbw':>12}")
            for r in ar["results"]:
                lines.append(f"             {fmt.size(r['size_bytes']):>9}"
                             f"{r['time_s'] * 1e3:>9.3f} ms"
                             f"{_num(r['algbw_gb_s'], '.2f'):>7} GB/s"
                             f"{_num(r['busbw_gb_s'], '.2f'):>7} GB/s"
                             f"{'' if r['correct'] else '  WRONG'}")
            for n, sweep in sweeps_by_world_size(ar).items():
                fit = fit_alpha_beta(sweep, n)
                if fit is not None:
                    lines.append(f"alpha-beta   over {n} ranks: latency {fit.alpha_s * 1e6:.1f} "
                                 f"us, bus bandwidth {fit.beta_gb_s:.2f} GB/s "
                                 f"({fit_quality(fit)})")
            predicted = ar["predicted_gradient_allreduce_s"]
            lines.append(f"predicted    {ar['gradient_model']} gradients "
                         f"({ar['gradient_bytes'] / 1e6:.1f} MB): "
                         + ("n/a" if predicted is None else f"{predicted * 1e3:.1f} ms per "
                            f"all-reduce over {ar['world_size']} ranks"))
    lines += [f"recommend    {text}" for text in record["recommendations"]]
    lines += [f"note         {text}" for text in record["notes"]]
    lines.append(f"result       {path}")
    return "\n".join(lines)
