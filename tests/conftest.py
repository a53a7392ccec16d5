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
def whole_lab(tmp_path_factory):
    """`python -m labs run` with no options, once per session, as a newcomer runs it:
    (completed process, the folder it ran in). Several modules read its results."""
    folder = tmp_path_factory.mktemp("whole-lab")
    proc = subprocess.run([sys.executable, "-m", "labs", "run"], cwd=folder, env=lab_env(),
                          capture_output=True, text=True, timeout=240)  # budget: 3 min
    return proc, folder
