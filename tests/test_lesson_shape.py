"""The scripts are the lesson: `diff 02 04` shows what DDP changes and nothing else, every
changed line marked `# DDP:` (so `grep -n "DDP:" 04_ddp_training.py` is its index), and
the same for `diff 02 03` with `# DP:`. Everything else lives in labs/ behind one call."""

from __future__ import annotations

import ast
import difflib

import pytest

from conftest import REPO

BASELINE = "02_baseline_single_gpu.py"

# Lines a wrapper script may add without a marker, and why.
ALLOWED = {
    # Each script names its own step; the name is not a DataParallel or DDP concept.
    '04_ddp_training.py': {'LAB = "04_ddp"'},
    '03_dataparallel_training.py': {'LAB = "03_dataparallel"'},
}
MARKER = {"04_ddp_training.py": "# DDP:", "03_dataparallel_training.py": "# DP:"}


def code_lines(script: str) -> list[str]:
    """The script's lines without its module docstring (prose about the step, which
    necessarily differs and is no code a student has to diff)."""
    text = (REPO / script).read_text(encoding="utf-8")
    lines = text.splitlines()
    docstring = ast.parse(text).body[0]
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    return lines[:docstring.lineno - 1] + lines[docstring.end_lineno:]


def added_lines(script: str) -> list[str]:
    diff = difflib.unified_diff(code_lines(BASELINE), code_lines(script), lineterm="", n=0)
    return [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]


def unmarked(script: str) -> list[str]:
    marker = MARKER[script]
    return [line for line in added_lines(script)
            if line.strip() and not line.strip().startswith("#")
            and marker not in line and line.strip() not in ALLOWED[script]]


@pytest.mark.parametrize("script", ["04_ddp_training.py", "03_dataparallel_training.py"])
def test_every_line_the_wrapper_adds_to_02_is_marked(script):
    assert unmarked(script) == [], (
        f"lines of {script} that {BASELINE} does not have and that carry no "
        f"{MARKER[script]!r} marker: move them into labs/ or mark them")


@pytest.mark.parametrize("script", ["04_ddp_training.py", "03_dataparallel_training.py"])
def test_the_diff_is_the_lesson_not_plumbing(script):
    """The ddp-tutorial-series' single -> multi-GPU diff is about 40 lines, all DDP."""
    code = [line for line in added_lines(script) if line.strip()
            and not line.strip().startswith("#")]
    # 04: 42, 3 for --profile-steps (the overlap, seen) and 4 for local SGD and per-rank
    # data (communicate less): DDP's lesson too, each behind one marked call
    limit = {"04_ddp_training.py": 49, "03_dataparallel_training.py": 16}[script]
    assert len(code) <= limit, f"{script} adds {len(code)} lines to {BASELINE}"


def test_the_check_can_fail():
    """An unmarked line (plumbing back in the script) is reported."""
    original = code_lines
    try:
        globals()["code_lines"] = lambda s: original(s) + (
            ["    distributed.something_unmarked()"] if s != BASELINE else [])
        assert unmarked("04_ddp_training.py") == ["    distributed.something_unmarked()"]
    finally:
        globals()["code_lines"] = original


@pytest.mark.parametrize("script", ["04_ddp_training.py", "03_dataparallel_training.py"])
def test_the_marker_grep_is_the_index(script):
    """`grep -c MARKER` counts the changed code lines, give or take the allowlist."""
    lines = (REPO / script).read_text(encoding="utf-8").splitlines()
    marked = sum(MARKER[script] in line and not line.strip().startswith("#")
                 for line in lines)  # a comment line explaining the next is no change
    code = [line for line in added_lines(script) if line.strip()
            and not line.strip().startswith("#")]
    assert abs(marked - len(code)) <= len(ALLOWED[script]) + 1
