"""The README's steps run by hand on a CPU, as a user's shell runs them (no
OMP_NUM_THREADS, no MKL_NUM_THREADS), and the `command` each result records: copied into
a shell, it reproduces the run, environment variables included."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, lab_env, result_files, run_script
from labs import launcher_env

# A hang guard, not a speed bound: each step takes seconds on a quiet 2-core machine.
STEP_TIMEOUT_S = 300


def user_shell_env() -> dict:
    """lab_env() without the thread variables the tests set (a user's shell has none),
    on the CPU."""
    env = lab_env(CUDA_VISIBLE_DEVICES="")
    env.pop("OMP_NUM_THREADS")
    env.pop("MKL_NUM_THREADS")
    return env


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory) -> Path:
    """02, then `04 --nproc 2`, then 05, smoke presets, into one results folder."""
    folder = tmp_path_factory.mktemp("hand-run")
    env = user_shell_env()
    steps = [("02_baseline_single_gpu.py", "--preset", "smoke", "--results-dir", folder),
             ("04_ddp_training.py", "--nproc", "2", "--preset", "smoke", "--results-dir",
              folder),
             ("05_performance_comparison.py", "--results-dir", folder, "--output-report",
              folder / "comparison_report.html")]
    for script, *args in steps:
        proc = run_script(script, *args, env=env, timeout=STEP_TIMEOUT_S)
        assert proc.returncode == 0, f"{script}: {proc.stderr[-3000:]}"
    return folder


def _records(folder: Path) -> dict[str, dict]:
    runs = [json.loads(p.read_text()) for p in result_files(folder)]
    return {r["lab"]: r for r in runs}


def test_the_readme_steps_by_hand_on_a_cpu_compare_ddp_with_its_baseline(hand_run):
    records = _records(hand_run)
    assert sorted(records) == ["02_baseline", "04_ddp"]
    # a CPU device is one thread: 02 is one device, each of 04's two ranks another
    assert records["02_baseline"]["config"]["threads_per_process"] == 1
    assert records["04_ddp"]["config"]["threads_per_process"] == 1
    with open(hand_run / "comparison_report.csv", newline="", encoding="utf-8") as table:
        rows = list(csv.DictReader(table))
    (ddp,) = [r for r in rows if r["strategy"] == "ddp"]
    assert ddp["devices"] == "2"
    assert float(ddp["speedup"]) > 0, ddp  # not "no matching baseline"
    assert float(ddp["scaling_efficiency"]) > 0, ddp
    assert "no matching baseline" not in ddp["efficiency_note"]


def test_hand_run_commands_carry_only_what_the_user_set(hand_run):
    records = _records(hand_run)
    for record in records.values():
        command = record["command"]
        # the GPUs hidden by CUDA_VISIBLE_DEVICES=''; no thread count set by the user
        assert command.startswith("CUDA_VISIBLE_DEVICES='' python "), command
        assert "OMP_NUM_THREADS" not in command and "MKL_NUM_THREADS" not in command
    # the --nproc launcher's own line, not a rank's `python -c ...`
    words = shlex.split(records["04_ddp"]["command"])
    assert words[:5] == ["CUDA_VISIBLE_DEVICES=", "python",
                         str(REPO / "04_ddp_training.py"), "--nproc", "2"]


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
