"""The whole lab as a newcomer runs it: `python -m labs run` with no options, once for
this module, on this CPU, from a user's shell (no OMP_NUM_THREADS or MKL_NUM_THREADS: each
step sets one thread per device itself). 01 to 05; 02, 03 and 04 on `--data shapes` with
the smoke preset, gloo. Then issue 14, "same math, faster": 02 and 04 learn the shapes,
evaluate once per epoch, and record accuracy and time to accuracy. And the steps as the
README runs them by hand (the runner adds nothing to their environment): DDP compares with
its baseline, and each recorded command carries only what the user set."""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys

import pytest

from conftest import REPO, user_shell_env
from labs.results import load_result

# A hang guard, not a speed limit: the run takes about 1.5 minutes on a quiet 2-core
# machine, and a loaded one may take several times that.
WHOLE_LAB_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def whole_lab(tmp_path_factory):
    """(completed process, the folder it ran in) of `python -m labs run`."""
    folder = tmp_path_factory.mktemp("whole-lab")
    proc = subprocess.run([sys.executable, "-m", "labs", "run"], cwd=folder, env=user_shell_env(),
                          capture_output=True, text=True, timeout=WHOLE_LAB_TIMEOUT_S)
    return proc, folder


@pytest.mark.compat
def test_the_whole_lab_with_no_options_on_this_cpu(whole_lab):
    proc, tmp_path = whole_lab
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = tmp_path / "results"
    runs = [json.loads(p.read_text()) for p in results.glob("0[234]_*.json")]
    assert sorted(r["lab"] for r in runs) == ["02_baseline", "03_dataparallel", "04_ddp"]
    assert all(r["status"] == "ok" for r in runs)
    assert all(load_result(p).ok for p in results.glob("*.json"))
    # the --scaling label the report draws curves by: 02 is the one-device point of both
    assert {r["lab"]: r["config"]["scaling"] for r in runs} == {
        "02_baseline": None, "03_dataparallel": "weak", "04_ddp": "weak"}
    ddp = next(r for r in runs if r["lab"] == "04_ddp")
    assert ddp["world"]["world_size"] == 2 and ddp["world"]["backend"] == "gloo"
    assert json.loads((results / "environment.json").read_text())["kind"] == "environment"
    report = tmp_path / "comparison_report.html"
    assert report.is_file() and "<table" in report.read_text()
    assert str(report) in proc.stdout  # the final summary gives the report's path
    for step in ("01", "02", "03", "04", "05"):
        assert f"step {step}" in proc.stdout


def _lab_result(whole_lab, lab: str) -> dict:
    """One step's result and output from the session's `python -m labs run`, which runs
    02, 03 and 04 on shapes with the smoke preset on a CPU-only machine."""
    proc, folder = whole_lab
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = (folder / "results").glob(f"{lab}_*.json")
    assert load_result(path).ok
    return {"record": json.loads(path.read_text()), "stdout": proc.stdout}


@pytest.fixture(scope="module")
def run02(whole_lab) -> dict:
    return _lab_result(whole_lab, "02_baseline")


@pytest.fixture(scope="module")
def run04(whole_lab) -> dict:
    return _lab_result(whole_lab, "04_ddp")


def assert_learned(record: dict) -> None:
    cfg, metrics = record["config"], record["metrics"]
    assert record["status"] == "ok" and cfg["data"] == "shapes"
    assert cfg["eval"] is True and cfg["val_size"] == 512 and cfg["target_accuracy"] == 0.5
    evals = metrics["eval"]
    assert [e["epoch"] for e in evals] == list(range(1, cfg["epochs"] + 1))  # one per epoch
    assert all(e["samples"] == 512 for e in evals)  # each validation image counted once
    assert all(e["eval_time_s"] > 0 and 0 <= e["loss"] for e in evals)
    elapsed = [e["elapsed_s"] for e in evals]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    chance = 1 / cfg["num_classes"]
    assert metrics["final_accuracy"] == evals[-1]["accuracy"]
    assert metrics["final_accuracy"] >= 3 * chance, evals  # learned, not guessed
    tta = metrics["time_to_accuracy_s"]
    if tta is None:
        assert any("never reached the target of 50%" in n for n in record["notes"])
    else:  # the training time of the first epoch at or above the target
        first = next(e for e in evals if e["accuracy"] >= cfg["target_accuracy"])
        assert tta == first["elapsed_s"]


def test_02_learns_shapes_and_evaluates_every_epoch(run02):
    record = run02["record"]
    assert_learned(record)
    cfg, metrics = record["config"], record["metrics"]
    # training time to an epoch = the epochs alone: evaluation is left out of it
    epochs = metrics["epoch_time_s"]
    for k, entry in enumerate(metrics["eval"]):
        assert entry["elapsed_s"] == pytest.approx(sum(epochs[:k + 1]), rel=1e-6)
    assert cfg["lr"] == pytest.approx(0.1 * 32 / 256)
    assert cfg["lr_warmup_steps"] == 8  # 5% of 5 epochs x 32 steps, rounded up
    assert cfg["lr_rule"] == "0.1 × global batch 32 / 256, linear warmup over 8 steps"
    assert "accuracy" in run02["stdout"] and "validation images" in run02["stdout"]


def test_04_two_ranks_learn_shapes_and_count_each_validation_image_once(run04):
    record = run04["record"]
    assert_learned(record)
    cfg = record["config"]
    assert record["world"]["world_size"] == 2
    assert cfg["global_batch_size"] == 64 and cfg["lr"] == pytest.approx(0.1 * 64 / 256)
    assert cfg["lr_rule"].startswith("0.1 × global batch 64 / 256, linear warmup over")
    # every rank took its own share of the 512 images and they were added up
    assert run04["stdout"].count("== 04_ddp") == 1


def _records(folder) -> dict[str, dict]:
    return {p.name.split("_")[0]: json.loads(p.read_text())
            for p in (folder / "results").glob("0[234]_*.json")}


def test_ddp_compares_with_its_baseline_with_no_thread_variables_set(whole_lab):
    """A CPU device is one thread: 02 is one device, each of 04's two ranks another, so
    the steps compare without the user setting OMP_NUM_THREADS (issue 19, item 10)."""
    proc, folder = whole_lab
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = _records(folder)
    assert records["02"]["config"]["threads_per_process"] == 1
    assert records["04"]["config"]["threads_per_process"] == 1
    with open(folder / "comparison_report.csv", newline="", encoding="utf-8") as table:
        rows = list(csv.DictReader(table))
    (ddp,) = [r for r in rows if r["strategy"] == "ddp"]
    assert ddp["devices"] == "2"
    assert float(ddp["speedup"]) > 0, ddp  # not "no matching baseline"
    assert float(ddp["scaling_efficiency"]) > 0, ddp
    assert "no matching baseline" not in ddp["efficiency_note"]


def test_each_recorded_command_carries_only_what_the_user_set(whole_lab):
    proc, folder = whole_lab
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = _records(folder)
    for record in records.values():
        command = record["command"]
        # the GPUs hidden by CUDA_VISIBLE_DEVICES=''; no thread count set by the user
        assert command.startswith("CUDA_VISIBLE_DEVICES='' python "), command
        assert "OMP_NUM_THREADS" not in command and "MKL_NUM_THREADS" not in command
    # the --nproc launcher's own line, not a rank's `python -c ...`
    words = shlex.split(records["04"]["command"])
    assert words[:5] == ["CUDA_VISIBLE_DEVICES=", "python",
                         str(REPO / "04_ddp_training.py"), "--nproc", "2"]
