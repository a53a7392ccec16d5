"""What the launcher told this process, torch-free: who it is among the ranks (the
variables torchrun or ``--nproc`` set), whether its ``--nproc`` launcher is still alive,
and the command line that reproduces the run.

Every layer may read this module: the command line's checks, the distributed core, the
result writer and the launcher itself (``labs.launch``), which sets what is read here.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from labs.errors import UsageError


@dataclass
class Ranks:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    nnodes: int
    restart_count: int
    launcher: str  # "torchrun", "spawn", "single" or "env"


def ranks_from_env(legacy_local_rank: int | None = None) -> Ranks:
    """Who this process is, from the variables torchrun (or ``--nproc``) sets, checked:
    a value that is not a number, a rank outside the world or an address that does not
    resolve is one line and exit status 2 now, not a traceback after the process-group
    timeout.

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
    world_size = env_int("WORLD_SIZE", minimum=1)
    rank = env_int("RANK", minimum=0)
    if rank >= world_size:
        raise UsageError(f"RANK={rank} is outside the world: WORLD_SIZE={world_size} "
                         f"means ranks 0 to {world_size - 1}")
    local_world_size = env_int("LOCAL_WORLD_SIZE", default=world_size, minimum=1)
    local_rank = env_int("LOCAL_RANK", default=legacy_local_rank or 0, minimum=0)
    if local_rank >= local_world_size:
        raise UsageError(f"LOCAL_RANK={local_rank} is outside this node's "
                         f"LOCAL_WORLD_SIZE={local_world_size}")
    check_master_address()
    nnodes = env_int("GROUP_WORLD_SIZE", default=max(1, world_size // local_world_size),
                     minimum=1)
    return Ranks(rank=rank, local_rank=local_rank, world_size=world_size,
                 local_world_size=local_world_size, nnodes=nnodes,
                 restart_count=env_int("TORCHELASTIC_RESTART_COUNT", default=0, minimum=0),
                 launcher=launcher)


def env_int(name: str, default: int | None = None, minimum: int = 0) -> int:
    """An integer environment variable of the launch, or a usage error naming it."""
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        if default is None:
            raise UsageError(f"{name} is not set; start 04 with torchrun, with --nproc N, "
                             f"or with plain python for one process")
        return default
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name}={text!r} is not an integer") from None
    if value < minimum:
        raise UsageError(f"{name}={value} must be at least {minimum}")
    return value


def check_master_address() -> None:
    """MASTER_ADDR must resolve and MASTER_PORT be a TCP port (when they are set)."""
    port_text = os.environ.get("MASTER_PORT")
    if port_text is not None:
        try:
            port = int(port_text)
        except ValueError:
            port = -1
        if not 1 <= port <= 65535:
            raise UsageError(f"MASTER_PORT={port_text!r} is not a TCP port (1 to 65535)")
    address = os.environ.get("MASTER_ADDR")
    if address is not None:
        try:
            socket.getaddrinfo(address, None)
        except (socket.gaierror, UnicodeError) as err:
            raise UsageError(f"MASTER_ADDR={address!r} does not resolve ({err}): give the "
                             f"address of the node that runs rank 0, or use torchrun "
                             f"--standalone on one machine") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_gone() -> str | None:
    """Why this rank is being stopped, when the reason is that the --nproc launcher died:
    its ranks then get SIGINT from the kernel (PR_SET_PDEATHSIG), which is no Ctrl-C."""
    launcher = os.environ.get("LAB_LAUNCHER_PID")
    if os.environ.get("LAB_LAUNCHER") != "spawn" or not launcher:
        return None
    if os.getppid() == int(launcher):
        return None
    return (f"the --nproc launcher (pid {launcher}) died before the run ended (killed, "
            f"perhaps by SIGKILL or the OOM killer), so its ranks were stopped")


# Set by 04's --nproc launcher for its ranks: the user's command, for their result.
LAUNCH_COMMAND = "LAB_LAUNCH_COMMAND"

# Variables that shape a run (threads per process on the CPU; which GPUs are visible),
# written before the command when set, so that copying the line reproduces the run.
RUN_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def env_prefix(torchrun_ranks: int = 1) -> list[str]:
    """``NAME=value`` for each of RUN_ENV_VARS set in this process's environment (the lab
    never changes them in its own process), shell-quoted.

    Under torchrun with several ranks per node, torchrun itself sets OMP_NUM_THREADS=1
    when the user did not: a rank cannot tell that from a user's own
    ``OMP_NUM_THREADS=1``, so it is left out (torchrun sets it again on a rerun). Any
    other value is the user's."""
    words = []
    for name in RUN_ENV_VARS:
        value = os.environ.get(name)
        if value is None:
            continue
        if name == "OMP_NUM_THREADS" and torchrun_ranks > 1 and value.strip() == "1":
            continue
        words.append(f"{name}={shlex.quote(value)}")
    return words


def command_line() -> str:
    """The command that reproduces this run, with the launcher when we can tell and the
    environment variables that shaped it (``OMP_NUM_THREADS=1 python 02_... --preset
    smoke``)."""
    if os.environ.get(LAUNCH_COMMAND):  # a rank of --nproc: its argv is `python -c`
        return os.environ[LAUNCH_COMMAND]  # the launcher's line, its environment included
    argv = list(getattr(sys, "orig_argv", sys.argv))
    script_args = sys.argv
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # started by torchrun
        nnodes = os.environ.get("GROUP_WORLD_SIZE", "1")
        nproc = os.environ.get("LOCAL_WORLD_SIZE", "1")
        launcher = ["torchrun", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}"]
        ranks = int(nproc) if nproc.isdigit() else 2  # unknown: assume torchrun set OMP
        return " ".join(env_prefix(torchrun_ranks=ranks) + [
            shlex.join(launcher + [Path(script_args[0]).name] + script_args[1:])])
    if argv and Path(argv[0]).name.startswith("python"):
        argv[0] = "python"
    return " ".join(env_prefix() + [shlex.join(argv)])
