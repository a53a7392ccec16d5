"""`python -m labs run` stopped from outside, or watched by a reader who leaves (issue 21).

A supervisor's SIGTERM to the runner alone, or a terminal that closes (SIGHUP to the whole
process group), stops the running step as Ctrl-C does: the step writes its `interrupted`
result, the runner says how to resume and exits 128 + the signal's number, and no process
is left behind. A stdout whose reader is gone, or that cannot encode the banner, costs the
printing, never the lab.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from conftest import lab_env, result_files

# Hang guards, not speed limits: starting a step (torch, the model) on a loaded 2-core
# machine, and a stopped step writing its result.
STARTUP_TIMEOUT_S = 120
STOP_TIMEOUT_S = 240  # above the runner's own 120 s before it kills a step


def _as_from_a_terminal() -> None:
    """SIGHUP as a shell started from a terminal has it: whatever started pytest (under
    `nohup` SIGHUP is ignored, and the runner keeps ignoring it, on purpose)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start_lab(folder: Path, *args: str, **popen) -> subprocess.Popen:
    """`python -m labs run ARGS` in ``folder``, its output in stdout.txt and stderr.txt."""
    with (folder / "stdout.txt").open("w") as out, (folder / "stderr.txt").open("w") as err:
        return subprocess.Popen([sys.executable, "-m", "labs", "run", *args], cwd=folder,
                                env=lab_env(), stdout=out, stderr=err,
                                preexec_fn=_as_from_a_terminal, **popen)


def step_processes_once_training(runner: subprocess.Popen, folder: Path) -> list:
    """The running step's processes, once its first epoch has begun (its progress bar)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while "epoch 1/" not in (folder / "stderr.txt").read_text(errors="replace"):
        assert runner.poll() is None, (folder / "stderr.txt").read_text()[-2000:]
        assert time.monotonic() < deadline, "the step did not start training"
        time.sleep(0.2)
    processes = psutil.Process(runner.pid).children(recursive=True)
    assert processes, "the step runs in a process of its own"
    return processes


def still_running(processes: list) -> list[int]:
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # gone while looked at
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
    return alive


def kill_leftovers(runner: subprocess.Popen, processes: list) -> None:
    """A failing test leaves nothing behind (without the fix, the step trains on alone)."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    if runner.poll() is None:
        runner.kill()
    runner.wait(timeout=STOP_TIMEOUT_S)


def assert_stopped_like_ctrl_c(runner, processes, folder: Path, signum: int) -> None:
    assert runner.wait(timeout=STOP_TIMEOUT_S) == 128 + signum
    assert still_running(processes) == []  # the step was waited for, not left alone
    (result,) = result_files(folder / "results")
    assert json.loads(result.read_text())["status"] == "interrupted"
    stderr = (folder / "stderr.txt").read_text()
    assert f"stopped by {signal.Signals(signum).name} during step 02" in stderr
    assert "python -m labs run --from 02" in stderr


def test_sigterm_to_the_runner_alone_stops_the_step_which_keeps_its_result(tmp_path):
    """What a supervisor does (`kill PID`, systemd, docker stop): only the runner hears
    it, so the runner must pass it on."""
    runner = start_lab(tmp_path, "--steps", "02")
    processes = []
    try:
        processes = step_processes_once_training(runner, tmp_path)
        runner.send_signal(signal.SIGTERM)
        assert_stopped_like_ctrl_c(runner, processes, tmp_path, signal.SIGTERM)
    finally:
        kill_leftovers(runner, processes)


def test_a_terminal_that_closes_stops_the_step_which_keeps_its_result(tmp_path):
    """An SSH session that drops sends SIGHUP to the whole process group: runner and step
    hear it together, and the step's result is written once, not cut short."""
    runner = start_lab(tmp_path, "--steps", "02", start_new_session=True)
    processes = []
    try:
        processes = step_processes_once_training(runner, tmp_path)
        os.killpg(runner.pid, signal.SIGHUP)
        assert_stopped_like_ctrl_c(runner, processes, tmp_path, signal.SIGHUP)
    finally:
        kill_leftovers(runner, processes)


def test_a_reader_gone_costs_the_output_not_the_lab(tmp_path):
    """`python -m labs run | head -1`, or a pager quit: every later write to stdout fails
    with a broken pipe. The steps still run and write their results."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before the first line: deterministic
    try:
        proc = subprocess.run([sys.executable, "-m", "labs", "run", "--steps", "01",
                               "--quick-env"], cwd=tmp_path, env=lab_env(), stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=STARTUP_TIMEOUT_S)
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "results" / "environment.json").is_file()


def test_a_stdout_without_the_banner_characters_costs_characters_not_the_lab(tmp_path):
    """A Windows-style console encoding has no "━": it is replaced, not fatal."""
    proc = subprocess.run([sys.executable, "-m", "labs", "run", "--dry-run"], cwd=tmp_path,
                          env=lab_env(PYTHONIOENCODING="cp1252"), capture_output=True,
                          timeout=STARTUP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert "step 05: comparison report" in proc.stdout.decode("cp1252")
