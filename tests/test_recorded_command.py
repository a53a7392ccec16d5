"""The `command` each result records: copied into a shell, it reproduces the run,
environment variables included. (The steps run from a user's shell, with no thread
variables, compare DDP with its baseline: test_whole_lab.py, which runs them so.)"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, result_files, user_shell_env
from labs import launcher_env

# A hang guard, not a speed bound: each step takes seconds on a quiet 2-core machine.
STEP_TIMEOUT_S = 300


def test_the_recorded_command_reruns_the_run_in_a_shell(real_run_file, tmp_path):
    """`02 --preset smoke` started with OMP_NUM_THREADS=1 (lab_env) records it first; the
    line, given to bash in a fresh folder with another --results-dir, runs again and
    records the same line."""
    record = json.loads(real_run_file.read_text())
    command = record["command"]
    assert command.startswith("OMP_NUM_THREADS=1 "), command
    words = shlex.split(command)
    python = words.index("python")
    assert all("=" in w for w in words[:python])  # NAME=value words, then the command
    assert dict(w.split("=", 1) for w in words[:python])["OMP_NUM_THREADS"] == "1"
    assert words[python + 1:] == [str(REPO / "02_baseline_single_gpu.py"), "--preset",
                                  "smoke", "--results-dir", str(real_run_file.parent)]

    fresh = tmp_path / "again"
    rerun = f"{command} --results-dir {shlex.quote(str(fresh))}"
    env = user_shell_env()  # the line itself sets the thread count again
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(["bash", "-c", rerun], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (again,) = result_files(fresh)
    repeated = json.loads(again.read_text())
    assert repeated["command"] == rerun
    assert repeated["config"]["threads_per_process"] == 1


@pytest.mark.parametrize("omp, kept", [("1", False), ("3", True)])
def test_under_torchrun_omp_is_recorded_only_when_torchrun_cannot_have_set_it(
        monkeypatch, omp, kept):
    """torchrun sets OMP_NUM_THREADS=1 for its ranks when the user did not: a rank cannot
    tell that 1 from the user's own, and leaves it out; any other value is the user's."""
    monkeypatch.delenv(launcher_env.LAUNCH_COMMAND, raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(sys, "argv", [str(REPO / "04_ddp_training.py"), "--epochs", "1"])
    line = "torchrun --nnodes=1 --nproc_per_node={} 04_ddp_training.py --epochs 1"
    expected = (f"OMP_NUM_THREADS={omp} " if kept else "") + "CUDA_VISIBLE_DEVICES=2,3 "
    assert launcher_env.command_line() == expected + line.format(2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one rank per node: torchrun set nothing
    assert launcher_env.command_line() == (f"OMP_NUM_THREADS={omp} CUDA_VISIBLE_DEVICES=2,3 "
                                  + line.format(1))
