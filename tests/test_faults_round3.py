"""Faults, round 3 (issue 21): what used to cost a user a run, found before training or
survived. One subprocess per family, as a user runs it; the variations in this process
(``run_in_process``: the same code path, without a new interpreter's torch import).

SIGHUP mid-run (a terminal that closed: the runner and its step get it) is in
test_runner_signals.py with the runner's own signals, pipes and selections (and
test_runner.py); results that do not belong together in test_report_pairing.py.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, lab_env, result_files, run_in_process, run_script
from labs import data, launch, models, train
from labs.contract import load_result

S01, S02, S04 = ("01_environment_check.py", "02_baseline_single_gpu.py",
                 "04_ddp_training.py")
SMOKE = ["--preset", "smoke"]


def assert_one_line_refusal(proc, *expected: str) -> str:
    """Exit status 2, one line on stderr naming the problem, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# --- 1. unreadable images: found before training, the file named --------------------------

def image_folder(root: Path, classes=("cat", "dog"), per_class: int = 6) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 36), (40 * c, 10 * i, 200)).save(root / name / f"{i}.jpg")
    return root


def test_a_truncated_jpeg_and_an_empty_file_are_refused_before_training(tmp_path):
    root = image_folder(tmp_path / "images")
    whole = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "0.jpg").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    (root / "dog" / "3.jpg").write_bytes(b"")
    results = tmp_path / "r"
    proc = run_script(S02, *SMOKE, "--data", "imagefolder", "--data-dir", root,
                      "--num-classes", "2", "--results-dir", results)
    line = assert_one_line_refusal(proc, "2 of ", "cannot be read", "remove or replace")
    assert str(root / "cat" / "0.jpg") in line and str(root / "dog" / "3.jpg") in line
    assert "empty file" in line
    assert result_files(results) == []  # nothing trained, nothing recorded


def test_the_image_check_passes_good_files_and_names_each_kind_of_bad_one(tmp_path):
    from labs.image_check import unreadable_reason

    root = image_folder(tmp_path / "images", classes=("a",), per_class=2)
    good, cut = root / "a" / "0.jpg", root / "a" / "1.jpg"
    cut.write_bytes(good.read_bytes()[:200])
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(png)
    (tmp_path / "text.jpg").write_text("not an image")
    assert unreadable_reason(str(good)) is None and unreadable_reason(str(png)) is None
    assert unreadable_reason(str(cut)) is not None  # no end marker, and decoding fails
    assert unreadable_reason(str(tmp_path / "text.jpg")) == "not an image PIL can read"


def test_bad_images_in_the_held_out_validation_split_are_named_with_the_rest(tmp_path):
    """One refusal names every bad file: a validation image held out of the folder used
    to be checked only after the training images passed, so a second run found it."""
    from labs.errors import UsageError

    root = image_folder(tmp_path / "images", per_class=10)
    args = type("Args", (), dict(data="imagefolder", data_dir=root, eval=True, val_size=64,
                                 seed=0, dataset_size=1000, num_classes=2, img_size=32))()
    base = data._local_files("imagefolder", str(root), train=True)
    held = set(data.hold_out(data._targets(base), args))
    val_file = base.samples[min(held)][0]
    train_file = base.samples[min(set(range(len(base))) - held)][0]
    for path in (val_file, train_file):
        Path(path).write_bytes(b"")
    with pytest.raises(UsageError) as refused:
        data.build_dataset(args, torch.device("cpu"))
    assert "2 of 20 images cannot be read" in str(refused.value)
    assert val_file in str(refused.value) and train_file in str(refused.value)


# --- 2. options that cannot train: one line before the first step --------------------------

def test_a_model_too_big_for_the_image_size_is_refused_before_training(tmp_path):
    results = tmp_path / "r"
    proc = run_script(S02, *SMOKE, "--model", "inception_v3", "--results-dir", results)
    assert_one_line_refusal(proc, "--model inception_v3 cannot train on 32-pixel images",
                            "--img-size 224")
    assert result_files(results) == []


def test_batch_norm_with_one_image_per_device_is_refused(tmp_path):
    proc = run_in_process(S02, [*SMOKE, "--batch-size", "1", "--results-dir",
                                str(tmp_path / "r")])
    assert_one_line_refusal(proc, "--batch-size 1 gives 1 image per device",
                            "batch norm needs at least 2")
    assert result_files(tmp_path / "r") == []


def test_a_vision_transformer_is_built_for_the_lab_s_image_size():
    """vit_b_16 at 32 px (the lab's own hint names it) used to fail at the first step."""
    model = models.build_model("vit_b_16", 10, 32)
    train.check_trains(model, type("Args", (), {"batch_size": 2, "img_size": 32,
                                                "model": "vit_b_16"})(),
                       [torch.device("cpu")], None)
    assert all(p.grad is None for p in model.parameters())  # the check left no gradient


def test_the_check_leaves_the_model_as_it_was():
    model = models.build_model("resnet18", 10, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    train.check_trains(model, type("Args", (), {"batch_size": 8, "img_size": 32,
                                                "model": "resnet18"})(),
                       [torch.device("cpu")], None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics too
    assert torch.equal(torch.get_rng_state(), state)


def test_a_checkpoint_dir_that_is_a_file_is_refused_at_once(tmp_path):
    taken = tmp_path / "ckpt"
    taken.write_text("a file")
    proc = run_in_process(S04, [*SMOKE, "--checkpoint-every", "1", "--checkpoint-dir",
                                str(taken), "--results-dir", str(tmp_path / "r")])
    assert_one_line_refusal(proc, f"--checkpoint-dir {taken} is a file, not a folder")


def test_step_01_refuses_an_output_path_that_is_a_folder(tmp_path):
    (tmp_path / "environment.json").mkdir()
    proc = run_in_process(S01, ["--quick", "--results-dir", str(tmp_path)])
    assert_one_line_refusal(proc, "environment.json: it is a folder")


# --- 4. closed streams and a stopped rank -------------------------------------------------

def test_a_reader_that_leaves_costs_the_output_not_the_run(tmp_path):
    """`02 ... | true`: the result is written and the step exits 0, without a traceback."""
    results = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, str(REPO / S02), *SMOKE, "--epochs", "1",
                             "--results-dir", str(results)], cwd=REPO,
                            env=lab_env(PYTHONIOENCODING="cp1252"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the step prints anything
    err = proc.stderr.read().decode(errors="replace")
    assert proc.wait(timeout=300) == 0, err[-3000:]
    assert "Traceback" not in err and "BrokenPipe" not in err
    (path,) = result_files(results)
    assert load_result(path).record["status"] == "ok"


STOPPED_RANK_JOB = """
import os, signal, sys, time
from pathlib import Path

from labs import launch


def main():
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGSTOP)  # stopped: SIGTERM cannot end it
    time.sleep(0.3)
    Path(os.environ["FAILED_AT"]).write_text(str(time.time()))
    raise RuntimeError("rank 0 gave up waiting")


if __name__ == "__main__":
    sys.argv += ["--nproc", "2", "--preset", "smoke"]
    launch.run(main, "04_ddp")
"""


@pytest.mark.skipif("grace_period" not in inspect.signature(
    torch.multiprocessing.ProcessContext.join).parameters,
    reason="torch < 2.5 waits 30 s after SIGTERM, whatever the lab asks")
def test_a_rank_that_cannot_take_sigterm_no_longer_adds_30_s(tmp_path):
    """The --nproc launcher when rank 0 fails and rank 1 is stopped (SIGSTOP, Ctrl-Z):
    torch's join waited 30 s after SIGTERM before SIGKILL; the launcher asks for
    launch.SHUTDOWN_GRACE_S, and says what happened in one line. (The same through 04 with
    a real collective timeout: docs/guarantees.md section 4; a hung rank: test_faults.)"""
    script, marker = tmp_path / "job.py", tmp_path / "failed-at"
    script.write_text(STOPPED_RANK_JOB)
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO,
                          env=lab_env(PYTHONPATH=str(REPO), FAILED_AT=str(marker)),
                          capture_output=True, text=True, timeout=300)
    ended = time.time()
    assert proc.returncode == 1, proc.stderr[-3000:]
    # from rank 0's failure to the job's end: two graces, not 30 s (half of it is margin)
    assert ended - float(marker.read_text()) < 2 * launch.SHUTDOWN_GRACE_S + 15
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["04_ddp: rank 0 failed (RuntimeError: rank 0 gave up waiting); the "
                     "other ranks were stopped (LAB_TRACEBACK=1 shows its traceback)"], lines


# --- 5. image folders that cannot teach what the report would claim ------------------------

def test_a_one_class_folder_is_refused(tmp_path):
    root = image_folder(tmp_path / "images", classes=("only",))
    proc = run_script(S02, *SMOKE, "--data", "imagefolder", "--data-dir", root,
                      "--results-dir", tmp_path / "r")
    assert_one_line_refusal(proc, "one class ('only')", "two or more class folders")


def test_the_hold_out_keeps_a_training_image_of_every_class(tmp_path):
    """40 images of one class and 1 of another: the rare class used to be held out
    whole (trained never, validated always)."""
    root = image_folder(tmp_path / "images", classes=("common",), per_class=40)
    (root / "rare").mkdir()
    Image.new("RGB", (40, 36)).save(root / "rare" / "0.jpg")
    args = type("Args", (), dict(data="imagefolder", data_dir=root, eval=True, val_size=64,
                                 seed=0, dataset_size=1000, num_classes=2, img_size=32))()
    train_set = data.build_dataset(args, torch.device("cpu"))
    val_set = data.build_val_dataset(args, torch.device("cpu"))
    assert set(train_set.targets) == {0, 1}  # both classes train
    assert set(val_set.targets) <= set(train_set.targets)
    assert len(val_set) == 8  # 20% of 41, all of them from the common class


def test_a_dataset_size_below_the_class_count_is_refused(tmp_path):
    root = image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=3)
    proc = run_in_process(S02, [*SMOKE, "--data", "imagefolder", "--data-dir", str(root),
                                "--num-classes", "3", "--dataset-size", "2",
                                "--results-dir", str(tmp_path / "r")])
    assert_one_line_refusal(proc, "--dataset-size 2 is fewer than the 3 classes")


# --- 7. fp16 on the CPU -----------------------------------------------------------------------

def test_fp16_on_the_cpu_is_refused_with_the_alternative(tmp_path):
    proc = run_script(S02, *SMOKE, "--amp", "fp16", "--results-dir", tmp_path / "r")
    assert_one_line_refusal(proc, "--amp fp16 on the CPU", f"{train.CPU_FP16_SLOWDOWN}x slower",
                            "--amp bf16")
    assert not (tmp_path / "r").exists() or result_files(tmp_path / "r") == []

