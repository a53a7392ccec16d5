"""Read a results folder: every ``*.json`` file through ``labs.contract.load_result``.

Nothing here ever fails on a bad file: it is listed, with the reason, among the skipped
files. Files are parsed as JSON only; nothing is unpickled or executed. A malformed part
of a readable file (a probe point of step 01) is left out and listed in ``parts_skipped``.
Hidden temporary files of the atomic writer (``.NAME.XXXXXXXX.tmp``) are listed, never
opened.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from labs import files
from labs.contract import clean_probes, load_result
from labs.errors import UsageError

TEMPORARY_LEFT = "a temporary file left by an interrupted write; safe to delete"
TEMPORARY_FRESH = ("a temporary file being written right now (or by a write interrupted "
                   "moments ago): leave it; if it is still there later, delete it")
FRESH_S = 300  # younger than this, a writer may still be at work on it


@dataclass
class Folder:
    path: Path
    runs: list[dict] = field(default_factory=list)          # status "ok": compared
    unfinished: list[dict] = field(default_factory=list)    # oom / interrupted / failed
    environments: list[dict] = field(default_factory=list)  # kind "environment" (step 01)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    files: dict[int, str] = field(default_factory=dict)     # id(record) -> file name
    # file name -> [(probe, why)]: malformed parts left out of a file that was read
    parts_skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def file_of(self, record: dict) -> str:
        return self.files.get(id(record), "?")

    @property
    def readable(self) -> int:
        return len(self.runs) + len(self.unfinished) + len(self.environments)


def load_folder(folder: Path) -> Folder:
    """Sort every *.json file of ``folder`` into runs, unfinished runs, environment files
    and skipped files. A missing folder, or one with nothing readable, is a usage error."""
    folder = Path(folder)
    if not folder.exists():
        raise UsageError(f"results folder {folder} does not exist (run steps 01-04 first)")
    if not folder.is_dir():
        raise UsageError(f"--results-dir {folder} is not a folder")
    try:
        paths = sorted(folder.glob("*.json"))
    except OSError as err:
        raise UsageError(f"cannot read results folder {folder}: {err.strerror or err}") from None
    found = Folder(folder)
    seen: dict[str, str] = {}  # run_id -> file: a copied file must not count twice
    for path in paths:
        if not path.is_file():  # a FIFO or device could block a read: never open one
            found.skipped.append((path.name, "not a regular file"))
            continue
        loaded = load_result(path)
        if not loaded.ok:
            found.skipped.append((path.name, loaded.reason or "unreadable"))
            continue
        record = loaded.record
        if record.get("kind") == "run":
            run_id = str(record.get("run_id"))
            if run_id in seen:
                found.skipped.append((path.name, f"a copy of {seen[run_id]} (same run_id "
                                                 f"{run_id}): counted once"))
                continue
            seen[run_id] = path.name
        found.files[id(record)] = path.name
        if record.get("kind") == "environment":
            parts = clean_probes(record)
            if parts:
                found.parts_skipped[path.name] = parts
            found.environments.append(record)
        elif record.get("status") == "ok":
            found.runs.append(record)
        else:
            found.unfinished.append(record)
    found.skipped += _temporary_files(folder)
    if not paths:
        raise UsageError(f"no *.json result files in {folder} (run steps 01-04 first)")
    if not found.readable:
        reasons = "; ".join(f"{name}: {why}" for name, why in found.skipped[:3])
        more = f" (and {len(found.skipped) - 3} more)" if len(found.skipped) > 3 else ""
        raise UsageError(f"no readable result file in {folder}: {reasons}{more}")
    return found


def _temporary_files(folder: Path) -> list[tuple[str, str]]:
    """The atomic writer's hidden temporary files in ``folder``, each with what it is."""
    try:
        names = sorted(p.name for p in folder.iterdir() if files.is_temporary(p.name))
    except OSError:
        return []  # the glob of *.json already says when the folder cannot be read
    found = []
    for name in names:
        try:
            age = time.time() - (folder / name).lstat().st_mtime
        except OSError:
            continue  # renamed into place meanwhile: the write just finished
        found.append((name, TEMPORARY_FRESH if age < FRESH_S else TEMPORARY_LEFT))
    return found


def failure_reason(record: dict) -> str:
    failure = record.get("failure")
    if isinstance(failure, dict) and failure.get("reason"):
        rank = failure.get("rank")
        where = f" (rank {rank})" if isinstance(rank, int) and rank > 0 else ""
        return f"{failure['reason']}{where}"
    return f"status {record.get('status')!r}, no reason recorded"
