"""labs/files.py: the one atomic writer (results, environment file, checkpoints, report)."""

from __future__ import annotations

import errno
import os
import pickle
import stat
from pathlib import Path

import pytest

from labs import files
from labs.errors import UsageError


def everything(folder: Path) -> list[Path]:
    """Every entry of the folder, hidden temporary files included."""
    return sorted(Path(folder).iterdir())


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


def test_text_is_written_as_utf8(tmp_path):
    target = tmp_path / "report.html"
    assert files.write_atomic(target, "µs · ×2\n") == target
    assert target.read_bytes() == "µs · ×2\n".encode("utf-8")
    assert everything(tmp_path) == [target]


def test_bytes_are_written_unchanged(tmp_path):
    payload = bytes(range(256)) * 16
    target = files.write_atomic(tmp_path / "figure.png", payload)
    assert target.read_bytes() == payload
    assert everything(tmp_path) == [target]


def test_a_callable_writes_to_the_binary_handle_as_torch_save_does(tmp_path):
    state = {"epoch": 3, "weights": [0.5, 1.5]}
    target = files.write_atomic(tmp_path / "epoch0003.pt", lambda f: pickle.dump(state, f))
    assert pickle.loads(target.read_bytes()) == state
    assert everything(tmp_path) == [target]


def test_overwrite_replaces_by_default(tmp_path):
    target = tmp_path / "environment.json"
    target.write_text("old")
    files.write_atomic(target, "new")
    assert target.read_text() == "new"
    assert everything(tmp_path) == [target]


def test_overwrite_false_refuses_an_existing_file_and_leaves_it_untouched(tmp_path):
    target = tmp_path / "run.json"
    target.write_text("the first run")
    with pytest.raises(FileExistsError):
        files.write_atomic(target, "a second run", overwrite=False)
    assert target.read_text() == "the first run"
    assert everything(tmp_path) == [target]  # the temporary file was removed


def test_overwrite_false_writes_a_new_name(tmp_path):
    target = files.write_atomic(tmp_path / "run.json", "{}", overwrite=False)
    assert target.read_text() == "{}"
    assert everything(tmp_path) == [target]


@pytest.mark.parametrize("exists", [False, True])
def test_without_hard_links_overwrite_false_still_never_replaces(tmp_path, monkeypatch,
                                                                 exists):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")  # as on some FUSE or SMB

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "run.json"
    if exists:
        target.write_text("kept")
        with pytest.raises(FileExistsError):
            files.write_atomic(target, "new", overwrite=False)
        assert target.read_text() == "kept"
    else:
        files.write_atomic(target, "new", overwrite=False)
        assert target.read_text() == "new"
    assert everything(tmp_path) == [target]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("overwrite", [True, False])
def test_a_failing_writer_leaves_no_temporary_file_and_no_target(tmp_path, error, overwrite):
    def half_then_fail(handle):
        handle.write(b"half a checkpoint")
        raise error

    with pytest.raises(type(error)):
        files.write_atomic(tmp_path / "epoch0001.pt", half_then_fail, overwrite=overwrite)
    assert everything(tmp_path) == []


def test_a_failing_writer_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "epoch0001.pt"
    target.write_bytes(b"the previous checkpoint")

    def fail(handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        files.write_atomic(target, fail)
    assert target.read_bytes() == b"the previous checkpoint"
    assert everything(tmp_path) == [target]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600),
                                        (0o002, 0o664)])
@pytest.mark.parametrize("overwrite", [True, False])
def test_the_mode_follows_the_umask(tmp_path, umask, mask, mode, overwrite):
    umask(mask)
    target = files.write_atomic(tmp_path / "run.json", "{}", overwrite=overwrite)
    assert stat.S_IMODE(target.stat().st_mode) == mode  # not mkstemp's 0600


def test_a_missing_folder_is_an_error_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        files.write_atomic(tmp_path / "missing" / "run.json", "{}")
    assert everything(tmp_path) == []


def test_unwritable_reason_and_ensure_writable_dir(tmp_path):
    assert files.unwritable_reason(tmp_path) is None
    assert everything(tmp_path) == []  # the probe file is gone
    assert files.unwritable_reason(tmp_path / "missing") is not None
    regular = tmp_path / "file.txt"
    regular.write_text("not a folder")
    with pytest.raises(UsageError, match="cannot write results"):
        files.ensure_writable_dir(regular / "results")
    assert files.ensure_writable_dir(tmp_path / "a" / "b").is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_unwritable(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert files.unwritable_reason(folder) == "Permission denied"
        with pytest.raises(UsageError, match="Permission denied"):
            files.ensure_writable_dir(folder)
    finally:
        folder.chmod(0o755)
