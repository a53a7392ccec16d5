"""Shared test helpers: run the lab's scripts as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def lab_env(**extra: str) -> dict:
    """Environment for a child process: one thread per process (2-core CI), no GPU."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES=env.get("LAB_TEST_CUDA_VISIBLE_DEVICES", ""))
    env.update(extra)
    return env


def run_script(script: str, *args: str, timeout: float = 120, env: dict | None = None,
               launcher: list[str] | None = None, cwd: Path | None = None):
    """Run `python SCRIPT ARGS` (or LAUNCHER SCRIPT ARGS) from the repository root."""
    cmd = (launcher or [sys.executable]) + [str(REPO / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or REPO, env=env or lab_env(), capture_output=True,
                          text=True, timeout=timeout)


def torchrun(*args: str) -> list[str]:
    """`torchrun ARGS` as a launcher prefix, with the venv's own interpreter."""
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
