"""Step 05 never imports torch, and every step answers --help and typos without it.

Each check runs the script in a fresh interpreter with an import blocker in front of
every other importer: ``import torch`` (or any ``torch.*``) raises ImportError and is
recorded. The report must still be written, and nothing may even have tried.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, lab_env
from test_report import populate


# Runs SCRIPT ARGS... (given after -c) as `python SCRIPT ARGS` would, with torch blocked.
BLOCK_TORCH = r"""
import importlib.abc, runpy, sys

tried = []

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            tried.append(name)
            raise ImportError(f"torch is blocked in this test ({name})")
        return None

sys.meta_path.insert(0, BlockTorch())
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print(f"torch imports tried: {tried}", file=sys.stderr)
"""
NONE_TRIED = "torch imports tried: []"


def run_without_torch(script: str, *args, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(REPO / script),
                           *map(str, args)], cwd=cwd, env=lab_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def results_folder(tmp_path_factory, real_run) -> Path:
    """A real 02 smoke result beside crafted DP/DDP runs, 01's file and bad files."""
    return populate(tmp_path_factory.mktemp("torch_free") / "results", real_run)


def test_the_blocker_blocks(tmp_path):
    """The control: a step that needs torch fails under the blocker."""
    proc = run_without_torch("01_environment_check.py", "--quick", "--results-dir", tmp_path)
    assert proc.returncode != 0
    assert "torch is blocked in this test" in proc.stderr
    assert "torch imports tried: ['torch']" in proc.stderr


@pytest.mark.parametrize("fmt, suffix", [("html", ".html"), ("md", ".md")])
def test_05_writes_the_report_and_csv_without_torch(results_folder, tmp_path, fmt, suffix):
    report = tmp_path / f"report{suffix}"
    proc = run_without_torch("05_performance_comparison.py", "--results-dir",
                             results_folder, "--format", fmt, "--generate-plots",
                             "--output-report", report)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert NONE_TRIED in proc.stderr, proc.stderr[-3000:]
    assert report.is_file() and report.stat().st_size > 0
    csv = report.with_suffix(".csv")
    assert csv.is_file() and csv.read_text().count("\n") > 1  # a header and rows
    assert list(tmp_path.glob("report_*.png")), "no figure was saved"
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    assert f"report   {report}" in proc.stdout


@pytest.mark.parametrize("script, expected", [
    ("01_environment_check.py", "--require-gpus"),
    ("02_baseline_single_gpu.py", "--batch-size"),
    ("03_dataparallel_training.py", "--gpus"),
    ("04_ddp_training.py", "--bucket-cap-mb"),
    ("05_performance_comparison.py", "--generate-plots"),
])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_answers_without_torch(script, expected, flag):
    proc = run_without_torch(script, flag)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {script}")
    assert expected in proc.stdout
    assert NONE_TRIED in proc.stderr


@pytest.mark.parametrize("script, args, says", [
    ("01_environment_check.py", ["--require-gpus", "-1"], "--require-gpus"),
    ("02_baseline_single_gpu.py", ["--batch-size", "0"], "--batch-size"),
    ("02_baseline_single_gpu.py", ["--", "--help"], "unrecognized arguments"),
    ("03_dataparallel_training.py", ["--img-size", "8"], "--img-size"),
    ("03_dataparallel_training.py", ["--data", "imagefolder"], "--data-dir"),
    ("04_ddp_training.py", ["--lr", "inf"], "--lr"),
    ("04_ddp_training.py", ["--static-graph", "--grad-accum-steps", "2"], "--static-graph"),
    ("04_ddp_training.py", ["--resume", "no-such.pt"], "no such checkpoint"),
    ("05_performance_comparison.py", ["--format", "pdf"], "--format"),
])
def test_typos_are_answered_before_torch_loads(tmp_path, script, args, says):
    """A mistake found by the parser costs no torch import (seconds): one line, exit 2."""
    proc = run_without_torch(script, *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    error, tried = proc.stderr.strip().splitlines()
    assert error.startswith(f"{script}: error: ") and says in error
    assert tried == NONE_TRIED
    assert list(tmp_path.iterdir()) == []  # no results folder, no report


def test_the_shared_light_modules_need_only_the_standard_library():
    """What --help, `python -m labs run` and your own scripts import stays light."""
    light = "labs.cli, labs.contract, labs.files, labs.fmt, labs.runner, labs.bandwidth"
    proc = subprocess.run([sys.executable, "-c", f"import sys, {light}; print(sorted("
                           "m for m in sys.modules if m.split('.')[0] in "
                           "('torch', 'numpy', 'pandas', 'matplotlib')))"],
                          cwd=REPO, env=lab_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
