"""How step 04's processes come to exist, kept out of the lesson.

Under torchrun every rank is started for us and reads who it is from the environment
(``ranks_from_env``). ``--nproc N`` makes 04 its own launcher: ``run`` checks the
command line once, in the parent, then starts N ranks with the spawn start method and
the same variables torchrun would set, shares the cores between them, passes Ctrl-C and
SIGTERM on, and ends the job when a rank dies. ``process_group_kwargs`` gives what
``init_process_group`` needs beyond the usual env:// meeting: the timeout, a store of its
own after a torchrun restart, and NCCL's device binding.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.multiprocessing.errors import record

from labs import cli, envinfo
from labs.compat import DistNetworkError
from labs.errors import UsageError
from labs.launcher_env import (LAUNCH_COMMAND, Ranks, check_master_address, command_line,
                               free_port)
from labs.launcher_env import ranks_from_env  # noqa: F401 - 04 calls launch.ranks_from_env


def process_group_kwargs(args, ranks: Ranks, device: torch.device, backend: str) -> dict:
    """init_process_group's arguments beyond backend, rank and world size.

    - The timeout (``--timeout-s``): a collective waiting on a dead or stuck peer fails
      after it, and the job ends, instead of hanging for torch's default of 10 minutes
      or more.
    - After a torchrun restart, a store of this attempt's own: torchrun's agent keeps one
      key-value store across restarts, and the ranks of a restarted attempt would read
      the addresses the dead attempt's ranks published there, connect to ports nobody
      listens on any more, and time out. A prefix per attempt keeps them apart.
    - Under NCCL, the rank's GPU (``device_id``): the communicator is set up at once,
      on the right GPU.
    """
    timeout = datetime.timedelta(seconds=args.timeout_s)
    extra: dict = {"timeout": timeout}
    if backend == "nccl":
        extra["device_id"] = device
    if ranks.restart_count == 0:
        return extra  # first attempt: the usual env:// rendezvous
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          ranks.world_size, is_master=ranks.rank == 0 and not agent_hosts_store,
                          timeout=timeout)
    return {**extra, "store": dist.PrefixStore(f"lab/attempt{ranks.restart_count}", store)}


def threads_per_rank(nproc: int) -> int:
    """Like torchrun: share the cores between the ranks instead of each rank taking all
    of them (N ranks x all cores threads thrash). This is what GPU ranks keep; a rank on
    the CPU then runs one thread (``train.configure_backends``) unless OMP_NUM_THREADS
    is set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, envinfo.cpu_count() // nproc)


def run(main: Callable[[], None], lab: str) -> None:
    """Run a step's ``main()``: here, or with ``--nproc N`` once in each of N new ranks.

    The command line is parsed and checked here first, so bad input is one line and exit
    status 2 before any rank starts (under torchrun each rank checks it itself)."""
    cli.run(lambda: _launch(main, lab))


def _launch(main: Callable[[], None], lab: str) -> None:
    if os.environ.get("LAB_LAUNCHER") != "spawn":  # not one of our own ranks already
        nproc = cli.parse_args(lab).nproc
        if nproc:
            check_master_address()  # the user's MASTER_ADDR/PORT, if any, for every rank
            _spawn(main, nproc)
            return
    _main_with_plain_rendezvous_errors(main)


def _main_with_plain_rendezvous_errors(main: Callable[[], None]) -> None:
    """A rendezvous that fails (a port in use, an address nobody listens on) ends in a
    long DistNetworkError traceback: say the cause and the fix in one line instead. Only
    before the process group exists: later network errors are a run's own failure.
    ``record``: under torchrun, a rank's exception goes into the error file torchrun's
    failure summary reads, so that it names the rank and shows its traceback."""
    try:
        record(main)()
    except DistNetworkError as err:
        if dist.is_initialized():
            raise
        address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        first = next((line for line in str(err).splitlines() if line.strip()), "")
        raise UsageError(f"rendezvous at {address} failed ({first[:160]}): choose another "
                         f"MASTER_PORT (or --master-port for torchrun), use torchrun "
                         f"--standalone on one machine, or check MASTER_ADDR") from None


def _spawn(main: Callable[[], None], nproc: int) -> None:
    """Start ``nproc`` ranks running ``main()`` and wait for them, like torchrun.

    The spawn start method (not fork) gives each rank a fresh interpreter, so no CUDA or
    thread state is inherited; it is also what works from a notebook or on macOS. Each
    rank parses the same command line again (spawn restores sys.argv).
    """
    os.environ.setdefault(LAUNCH_COMMAND, command_line())  # ranks see `python -c`
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    # torch logs each rank it stops; the line below says so once, in the lab's words.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    # A rank that finds bad input only it can check (an unreadable --resume file, say)
    # leaves the sentence in this folder, so that it is said once, not once per rank.
    usage_errors = tempfile.TemporaryDirectory(prefix="lab-usage-")
    context = mp.start_processes(_rank, args=(main, nproc, threads_per_rank(nproc),
                                              usage_errors.name),
                                 nprocs=nproc, join=False, start_method="spawn")
    stops = (signal.SIGTERM, signal.SIGHUP)  # a supervisor; a terminal that closed
    previous = {sig: signal.signal(sig, _raise_stop) for sig in stops}
    try:
        while not context.join(**_join_grace(context)):
            pass
    except (KeyboardInterrupt, _Stop) as stop:  # Ctrl-C, SIGTERM, SIGHUP: every rank stops
        signum = stop.signum if isinstance(stop, _Stop) else signal.SIGINT
        _stop_ranks(context.processes, signum)
        sys.exit(128 + signum)
    except mp.ProcessExitedException as err:
        said = sorted(Path(usage_errors.name).glob("rank*.txt"))
        if err.exit_code == 2 and said:
            raise UsageError(said[0].read_text(encoding="utf-8")) from None
        print(f"04_ddp: rank {err.error_index} {how_it_ended(err.exit_code)}; the other "
              f"ranks were stopped", file=sys.stderr)
        sys.exit(err.exit_code if err.exit_code > 0 else 128 - err.exit_code)
    except mp.ProcessRaisedException as err:
        if os.environ.get("LAB_TRACEBACK"):
            print(f"04_ddp: rank {err.error_index} failed:\n{err}", file=sys.stderr)
        else:  # the rank said what it recorded; the error's own last line says why
            last = next(line for line in reversed(f"?\n{err}".splitlines()) if line.strip())
            print(f"04_ddp: rank {err.error_index} failed ({last.strip()[:300]}); the other "
                  f"ranks were stopped (LAB_TRACEBACK=1 shows its traceback)", file=sys.stderr)
        sys.exit(1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        usage_errors.cleanup()


# When one rank fails, the others get this long to end by themselves, then as long after
# SIGTERM before SIGKILL. torch's default after SIGTERM is 30 s, which a rank that cannot
# take SIGTERM (stopped, or stuck in C++) adds to the job (torch >= 2.5; older: 30 s).
SHUTDOWN_GRACE_S = 3.0


def _join_grace(context) -> dict:
    parameters = inspect.signature(context.join).parameters
    return {"grace_period": SHUTDOWN_GRACE_S} if "grace_period" in parameters else {}


def how_it_ended(exit_code: int) -> str:
    """A rank's end in words; a negative exit code is the signal that killed it."""
    if exit_code >= 0:
        return f"exited with status {exit_code}"
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        name = f"signal {-exit_code}"
    if name == "SIGKILL":
        return ("was killed by SIGKILL (sent by a user or a scheduler, or by the kernel's "
                "OOM killer when host memory runs out: see `dmesg`)")
    return f"was killed by {name}"


def _rank(local_rank: int, main: Callable[[], None], nproc: int, threads: int,
          usage_errors: str) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank),
                      WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      GROUP_WORLD_SIZE="1", LAB_LAUNCHER="spawn",
                      LAB_LAUNCHER_PID=str(os.getppid()))
    # The launcher's death reaches this rank as SIGINT (PR_SET_PDEATHSIG), and its Ctrl-C
    # is passed on as SIGINT: a launcher started in the background (`&`, nohup, some CI)
    # hands its ranks SIGINT ignored, and they would train on alone. Listen again.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(threads)
    cli.protect_output()
    try:
        _main_with_plain_rendezvous_errors(main)
    except UsageError as err:
        Path(usage_errors, f"rank{local_rank}.txt").write_text(str(err), encoding="utf-8")
        sys.exit(2)


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum, frame):
    raise _Stop(signum)


def _stop_ranks(processes, signum: int) -> None:
    """Pass a stop signal on to the ranks (a terminal's Ctrl-C reaches them by itself;
    ``kill`` of this process does not) and wait while they write what they measured."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second one must not
        signal.signal(sig, signal.SIG_IGN)  # cut this short
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
