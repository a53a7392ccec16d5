"""`python -m labs run` (the whole lab in one command) and the train_ddp.sh wrapper."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, lab_env
from labs import runner
from labs.errors import UsageError


def lab_run(*args: str, cwd: Path, env: dict | None = None, timeout: float = 240):
    return subprocess.run([sys.executable, "-m", "labs", "run", *args], cwd=cwd,
                          env=env or lab_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_a_failing_step_stops_the_run_keeps_results_and_says_how_to_resume(tmp_path):
    env = lab_env(LAB_FAULT="kind=raise,step=1")  # every training step crashes
    proc = lab_run("--steps", "02,05", cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "step 02" in proc.stderr and "failed" in proc.stderr
    assert "python -m labs run --from 02" in proc.stderr
    assert not (tmp_path / "comparison_report.html").exists()  # 05 never ran
    # 02 still left its (failed) result behind, as every step does
    files = list((tmp_path / "results").glob("02_*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["status"] == "failed"


class Args:
    def __init__(self, **kw):
        defaults = dict(steps=["01", "02", "03", "04", "05"], gpus=None, preset="auto",
                        results_dir=Path("results"), report=Path("comparison_report.html"),
                        repeat=1, quick_env=False, world_sizes=None, scaling="weak",
                        profile_steps=0)
        self.__dict__.update({**defaults, **kw})


def by_step(plan) -> dict:
    return {c.step: c for c in plan.commands}


def test_plan_without_gpu_trains_every_method_on_shapes():
    """A newcomer on a laptop sees accuracy and time to accuracy: a learnable task."""
    plan = runner.build_plan(Args(), gpu_count=0)
    steps = by_step(plan)
    assert plan.preset == "smoke"
    for step in ("02", "03", "04"):
        argv = steps[step].argv
        assert argv[argv.index("--data") + 1] == "shapes", step
        assert argv[argv.index("--preset") + 1] == "smoke", step


def test_plan_for_four_gpus_is_the_lab_commands():
    plan = runner.build_plan(Args(), gpu_count=4)
    steps = by_step(plan)
    assert plan.preset is None and plan.hardware == "4 GPUs"
    two = steps["02"].argv
    assert two[two.index("--batch-size") + 1] == "64" and "resnet50" in two
    three = steps["03"].argv
    assert three[three.index("--batch-size") + 1] == "256"
    assert three[three.index("--gpus") + 1] == "0,1,2,3"
    four = steps["04"].argv
    assert "torch.distributed.run" in four and "--nproc_per_node=4" in four
    assert four[four.index("--batch-size") + 1] == "64" and "--amp" in four
    assert "--generate-plots" in steps["05"].argv
    baselines = [c.argv for c in plan.commands if c.step == "02"]
    amp = [argv[argv.index("--amp") + 1] for argv in baselines]
    assert amp == ["auto", "off"]  # the fp32 reference: AMP's effect is measured


def test_plan_for_the_cpu_leaves_threads_to_the_steps(monkeypatch):
    """On the CPU every step runs one thread per process by itself (a user's
    OMP_NUM_THREADS, inherited by every step, wins): the runner sets no variable, so each
    step's command, as shown and as recorded, is what a user would type."""
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    plan = runner.build_plan(Args(), gpu_count=0)
    steps = by_step(plan)
    assert all(c.env == {} for c in plan.commands)
    assert steps["02"].display().startswith("python ")
    assert any("one thread per process" in note for note in plan.notes)
    assert [c.step for c in plan.commands].count("02") == 1


def test_a_step_shown_with_its_environment_can_be_pasted_into_a_shell():
    command = runner.Command("04", [sys.executable, "04_ddp_training.py", "--epochs", "1"],
                             env={"CUDA_VISIBLE_DEVICES": ""})
    assert command.display() == "CUDA_VISIBLE_DEVICES='' python 04_ddp_training.py --epochs 1"


def test_plan_for_one_gpu_labels_world_size_one():
    plan = runner.build_plan(Args(), gpu_count=1)
    assert plan.hardware == "1 GPU"
    assert any("world size 1" in note for note in plan.notes)
    assert "--nproc_per_node=1" in by_step(plan)["04"].argv


def test_plan_for_a_subset_of_gpus_pins_ddp_to_them():
    plan = runner.build_plan(Args(gpus=[2, 3]), gpu_count=4)
    steps = by_step(plan)
    assert steps["04"].env == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert "--nproc_per_node=2" in steps["04"].argv
    assert steps["03"].argv[steps["03"].argv.index("--gpus") + 1] == "2,3"


def test_plan_repeats_training_steps_only():
    plan = runner.build_plan(Args(repeat=3), gpu_count=0)
    assert [c.step for c in plan.commands] == ["01"] + ["02"] * 3 + ["03"] * 3 + \
        ["04"] * 3 + ["05"]


def test_plan_refuses_gpus_that_are_not_there():
    with pytest.raises(UsageError, match="--gpus"):
        runner.build_plan(Args(gpus=[0, 1]), gpu_count=1)


@pytest.mark.parametrize("argv", [["--steps", "07"], ["--repeat", "0"], ["--gpus", "a"],
                                  ["--preset", "huge"], ["--bogus"]])
def test_runner_bad_usage_is_one_line_and_exit_2(tmp_path, argv):
    proc = lab_run(*argv, cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


@pytest.mark.parametrize("argv, says", [
    (["--steps", "02", "--from", "05"], "--from 05 comes after every step of --steps 02"),
    (["--from", "09"], "--from 09: expected one step number"),
    (["--gpus=-1", "--dry-run"], "--gpus -1: expected distinct GPU indices"),
    (["--gpus", "0,0", "--dry-run"], "--gpus 0,0: expected distinct GPU indices"),
    # 05 alone would refuse these, but only after 01-04 (--quick-env: a short 01 before)
    (["--steps", "01,05", "--quick-env", "--report", "no-such-folder/report.html"],
     "folder no-such-folder does not exist"),
    (["--steps", "01,05", "--quick-env", "--report", "."], "--report . is a folder"),
])
def test_a_selection_or_report_path_that_cannot_work_is_refused_before_step_01(tmp_path,
                                                                               argv, says):
    proc = lab_run(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-500:] + proc.stderr[-1000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("python -m labs run: error: ") and says in line
    assert "step 01" not in proc.stdout
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_a_report_05_would_not_replace_is_refused_before_step_01(tmp_path):
    (tmp_path / "notes.html").write_text("<p>my own notes</p>")
    proc = lab_run("--steps", "01,05", "--quick-env", "--report", "notes.html", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-500:] + proc.stderr[-1000:]
    (line,) = proc.stderr.strip().splitlines()
    assert "refusing to replace notes.html" in line and "choose another --report" in line
    assert "step 01" not in proc.stdout
    assert (tmp_path / "notes.html").read_text() == "<p>my own notes</p>"


def test_dry_run_prints_commands_and_runs_nothing(tmp_path):
    proc = lab_run("--dry-run", "--from", "03", cwd=tmp_path)
    assert proc.returncode == 0
    assert "03_dataparallel_training.py" in proc.stdout and "02_baseline" not in proc.stdout
    assert list((tmp_path / "results").glob("*.json")) == []


# --- train_ddp.sh --------------------------------------------------------------------------

def wrapper(*args: str, env: dict | None = None):
    env = env or lab_env(PYTHON=sys.executable)
    return subprocess.run(["bash", str(REPO / "train_ddp.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, complaint", [
    (("x",), "GPUS"),
    (("0",), "GPUS"),
    (("2", "-8"), "BATCH_PER_GPU"),
    (("2", "64", "zero"), "EPOCHS"),
    (("2", "64", "5", "8"), "IMG_SIZE"),
    (("1", "2", "3", "4", "5"), "too many"),
    (("--bogus",), "unknown option"),
])
def test_wrapper_rejects_bad_arguments(args, complaint):
    proc = wrapper(*args)
    assert proc.returncode == 2
    assert complaint in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_wrapper_without_gpus_says_what_to_run_instead():
    proc = wrapper("2", "64")
    assert proc.returncode == 1
    assert "no CUDA GPU" in proc.stderr and "--nproc 2" in proc.stderr


def test_wrapper_without_torchrun_says_so(tmp_path):
    fake_python = tmp_path / "python3"
    fake_python.write_text("#!/bin/sh\nexit 1\n")  # an interpreter without torch
    fake_python.chmod(0o755)
    proc = wrapper("2", env=lab_env(PYTHON=str(fake_python)))
    assert proc.returncode == 1 and "torchrun" in proc.stderr
