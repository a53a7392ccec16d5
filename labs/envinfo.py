"""What machine a run happened on: recorded in every result so runs can be matched."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
from pathlib import Path

import psutil
import torch


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity, which a batch scheduler narrows),
    not every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def gpu_count() -> int:
    """CUDA GPUs visible to this process (CUDA_VISIBLE_DEVICES applies); 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def nccl_version() -> str | None:
    try:
        if not (torch.cuda.is_available() and torch.distributed.is_nccl_available()):
            return None
        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a build without NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def driver_version() -> str | None:
    """The NVIDIA driver, from NVML when installed, else nvidia-smi; None without either."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def gpus() -> list[dict]:
    found = []
    if not torch.cuda.is_available():
        return found
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append({
            "index": index,
            "name": props.name,
            "total_memory_bytes": int(props.total_memory),
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": int(props.multi_processor_count),
        })
    return found


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7763 64-Core Processor"), which the report uses to
    tell machines apart; on Linux platform.processor() says only "x86_64"."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def collect() -> dict:
    """The ``environment`` block of a result file. Fast: no probes, no benchmarks."""
    import torchvision

    cuda = torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": cpu_count(),
        "ram_bytes": int(psutil.virtual_memory().total),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": cudnn if cuda else None,
        "nccl": nccl_version(),
        "driver": driver_version() if cuda else None,
        "gpus": gpus(),
    }


def cuda_index(device: torch.device) -> int:
    """The GPU number of a CUDA device; a bare "cuda" means the current one."""
    return device.index if device.index is not None else torch.cuda.current_device()


def device_entry(device: torch.device, rank: int | None = None) -> dict:
    """One entry of the result's world.devices list."""
    entry = {"device": str(device), "index": device.index, "host": socket.gethostname(),
             "name": "CPU"}
    if device.type == "cuda":
        index = cuda_index(device)
        entry.update(index=index, name=torch.cuda.get_device_name(index))
    if rank is not None:
        entry["rank"] = rank
    return entry


def select_device(text: str) -> torch.device:
    """--device auto|cpu|cuda|cuda:N, made this process's current device (see
    ``use_device``); a device that is not there is a usage error."""
    device = _parse_device(text)
    use_device(device)
    return device


def use_device(device: torch.device) -> None:
    """Make a GPU the current CUDA device. Without it, everything that asks "the current
    device" (AMP's bf16 check, the pinned-memory thread, cuDNN handles) uses GPU 0 and
    opens a stray context there, whatever --device said."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _parse_device(text: str) -> torch.device:
    from labs.errors import UsageError

    text = text.strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        visible = gpu_count()
        if not visible:
            raise UsageError(f"--device {text}: no CUDA GPU is visible on this machine "
                             f"(use --device cpu or auto)")
        index_text = text.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise UsageError(f"--device {text}: expected cuda:N with N a GPU index")
        index = int(index_text)
        if index >= visible:
            raise UsageError(f"--device {text}: only {visible} GPU(s) "
                             f"visible (cuda:0 to cuda:{visible - 1})")
        return torch.device("cuda", index)
    raise UsageError(f"--device {text}: expected auto, cpu, cuda or cuda:N")


def select_gpus(requested: list[int] | None) -> list[int]:
    """--gpus for DataParallel: default every visible GPU (none on a CPU-only machine),
    the first made the current device (DataParallel's output device); naming a GPU that
    is not there is a usage error."""
    from labs.errors import UsageError

    visible = gpu_count()
    gpus = list(range(visible)) if requested is None else requested
    missing = [i for i in gpus if i >= visible]
    if missing:
        have = f"GPUs 0 to {visible - 1}" if visible else "no GPU"
        raise UsageError(f"--gpus {','.join(map(str, requested))}: this machine has {have}; "
                         f"omit --gpus to use every visible GPU")
    if gpus:
        use_device(torch.device("cuda", gpus[0]))
    return gpus
