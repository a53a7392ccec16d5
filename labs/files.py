"""Writing files so that a reader never sees half of one, torch-free.

Every file the lab writes (result files, step 01's environment file, checkpoints, the
report, its CSV and figures) goes through ``write_atomic``: the content is written to a
hidden temporary file in the target's folder, flushed to disk, then renamed onto the
target in one step. A crash leaves at most that hidden temporary file, never a truncated
target.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

from labs.errors import UsageError

Content = str | bytes | Callable[[BinaryIO], object]  # text, bytes, or a writer


def write_atomic(path: Path, content: Content, *, overwrite: bool = True) -> Path:
    """Write ``content`` to ``path`` atomically and return the path.

    ``content`` is text (written as UTF-8), bytes, or a function that writes to the
    binary file handle it is given (``lambda f: torch.save(state, f)``). With
    ``overwrite=False`` an existing ``path`` is never replaced: FileExistsError, and the
    file is left as it was. The new file's mode follows the umask, as ``open`` does.
    """
    path = Path(path)
    fd, tmp = _create_hidden_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode("utf-8") if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_into_place_once(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # the names _create_hidden_beside makes


def is_temporary(name: str) -> bool:
    """A file name of write_atomic's hidden temporary files (one an interrupted write
    can leave behind)."""
    return bool(_TEMPORARY.match(name))


def _create_hidden_beside(path: Path) -> tuple[int, str]:
    """A new hidden file in ``path``'s folder (the same file system, so the rename is
    atomic). Not mkstemp: it makes every file 0600, and results are for everyone; the
    mode given to os.open is reduced by the umask instead."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue  # a name drawn twice: draw again


def _move_into_place_once(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)  # fails if the name exists: the target is never replaced
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


PROBE_BYTES = 256 * 1024  # more than a result file; an empty file fits on a full disk


def unwritable_reason(folder: Path) -> str | None:
    """Why a file cannot be written in ``folder`` (None: it can), found by writing and
    removing a hidden probe file of PROBE_BYTES: permissions alone do not tell
    (read-only mounts, ACLs), and on a full disk creating an empty file still works."""
    probe = None
    try:
        fd, probe = _create_hidden_beside(Path(folder) / "write-test")
        with os.fdopen(fd, "wb") as handle:
            handle.write(bytes(PROBE_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        return err.strerror or str(err)
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    return None


def ensure_writable_dir(folder: Path) -> Path:
    """Create the results folder and prove it is writable, before any work is done."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot write results to {folder}: "
                         f"{err.strerror or err}") from None
    reason = unwritable_reason(folder)
    if reason is not None:
        raise UsageError(f"cannot write results to {folder}: {reason}")
    return folder


def check_folder_can_be_made(folder: Path, flag: str) -> None:
    """Refuse now a folder that will be written later (checkpoints): one that is a file,
    or whose nearest existing parent cannot be written. Nothing is created here."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file, not a folder; name a folder (it is "
                         f"created when needed)")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder}: {existing} is a file, not a folder")
    reason = unwritable_reason(existing)
    if reason is not None:
        raise UsageError(f"{flag} {folder}: cannot write in {existing}: {reason}")


def check_file_can_be_replaced(path: Path) -> None:
    """Refuse now a file path that is a folder (step 01's environment.json, say)."""
    if Path(path).is_dir():
        raise UsageError(f"cannot write {path}: it is a folder; move it away or choose "
                         f"another folder")


def write_json_atomic(data: dict, path: Path, *, overwrite: bool) -> Path:
    """``data`` as indented JSON, through write_atomic (readers never see half a
    file). NaN is refused: pass the record through ``_json_safe`` first."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False, default=str)
    return write_atomic(path, text + "\n", overwrite=overwrite)
