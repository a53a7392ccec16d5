"""Shared test helpers: run the lab's scripts as a user would, in a subprocess."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from labs.launcher_env import free_port

REPO = Path(__file__).resolve().parent.parent


# Test files by their cost on a 2-core machine, the longest first: pytest-xdist hands out
# whole files in collection order, and a long file started last would finish alone.
LONGEST_FIRST = ("test_whole_lab.py", "test_step04_ddp.py", "test_faults.py",
                 "test_faults_launch.py", "test_faults_round3.py", "test_ddp_equivalence.py",
                 "test_step02.py", "test_report_trust.py", "test_runner_signals.py",
                 "test_environment_check.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept


# The fault tests stop the lab's processes with SIGINT, as Ctrl-C in a terminal does. A
# shell that started pytest in the background (`&`, nohup) set SIGINT to ignored, and every
# child would inherit that; a Python handler here is reset to the default in each child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def lab_env(**extra: str) -> dict:
    """Environment for a child process: one thread per process (2-core CI), no GPU."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES=env.get("LAB_TEST_CUDA_VISIBLE_DEVICES", ""))
    env.update(extra)
    return env


def user_shell_env() -> dict:
    """lab_env() without the thread variables the tests set (a user's shell has none),
    on the CPU."""
    env = lab_env(CUDA_VISIBLE_DEVICES="")
    env.pop("OMP_NUM_THREADS")
    env.pop("MKL_NUM_THREADS")
    return env


def run_script(script: str, *args: str, timeout: float = 120, env: dict | None = None,
               launcher: list[str] | None = None, cwd: Path | None = None):
    """Run `python SCRIPT ARGS` (or LAUNCHER SCRIPT ARGS) from the repository root."""
    cmd = (launcher or [sys.executable]) + [str(REPO / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or REPO, env=env or lab_env(), capture_output=True,
                          text=True, timeout=timeout)


_MODULES: dict[str, object] = {}


def load_script(script: str):
    """A numbered script as a module (its ``main`` not run): for the tests that drive its
    own ``train_step`` or call ``main`` in this process."""
    if script not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"lab_step{script[:2]}", REPO / script)
        _MODULES[script] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_MODULES[script])
    return _MODULES[script]


def run_in_process(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGV`` without a new interpreter: cli.run(main) with sys.argv,
    the environment and stdout/stderr swapped for the call. For input a step refuses:
    the same code path as a user's run, without the seconds a new process spends
    importing torch. Every such refusal is also tried as a subprocess somewhere."""
    import torch.distributed as dist

    from labs import cli

    module = load_script(script)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", [script, *argv]), \
            mock.patch.dict(os.environ, lab_env(), clear=True), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.run(module.main)
        except SystemExit as exit_:
            code = exit_.code
        finally:
            # 04 refuses some input after joining its process group; a process would now
            # exit, this one goes on to other tests (which may start a group of their own)
            if dist.is_initialized():
                dist.destroy_process_group()
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def torchrun(*args: str) -> list[str]:
    """`torchrun ARGS` as a launcher prefix, with the venv's own interpreter. Without
    --standalone or a rendezvous endpoint, on a free port: torchrun's default, 29500, would
    be shared by test files running side by side (and by anything else on the machine)."""
    if not any(a == "--standalone" or a.startswith(("--rdzv", "--master")) for a in args):
        args = (f"--master-port={free_port()}", *args)
    return [sys.executable, "-m", "torch.distributed.run", *args]


def result_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.json") if p.name != "environment.json")


def read_single_result(folder: Path) -> dict:
    files = result_files(folder)
    assert len(files) == 1, f"expected exactly one result file, found {files}"
    return json.loads(files[0].read_text())


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    return folder


@pytest.fixture(scope="session")
def real_run_file(tmp_path_factory) -> Path:
    """A genuine result file from `02 --preset smoke`, run once per session."""
    folder = tmp_path_factory.mktemp("real02")
    proc = run_script("02_baseline_single_gpu.py", "--preset", "smoke", "--results-dir", folder)
    assert proc.returncode == 0, proc.stderr
    (path,) = folder.glob("*.json")
    return path


@pytest.fixture(scope="module")
def real_run(real_run_file) -> dict:
    """That result, read afresh for each module: a module may change its copy."""
    return json.loads(real_run_file.read_text())
