"""Where the report goes: checked before any work, written atomically.

The report, the CSV of its main table (same stem, ``.csv``) and, with
``--generate-plots``, one PNG per figure (``STEM_KEY.png``) all go into the report's
folder. Each is written to a temporary file in that folder, then renamed over the
target, so a reader never sees half a report.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from labs.errors import UsageError


@dataclass
class Outputs:
    report: Path
    csv: Path

    def png(self, key: str) -> Path:
        return self.report.with_name(f"{self.report.stem}_{key}.png")


def plan(report: Path) -> Outputs:
    """Check that the report can be written: nothing is created but a probe file, which
    is removed at once. A problem is a usage error."""
    report = Path(report)
    folder = report.parent
    if report.is_dir():
        raise UsageError(f"--output-report {report} is a folder; give a file name")
    if not folder.is_dir():
        raise UsageError(f"cannot write {report}: folder {folder} does not exist")
    csv = report.with_suffix(".csv")
    if csv == report:
        raise UsageError(f"--output-report {report}: the report cannot be a .csv file "
                         f"(the CSV of the table is written beside it)")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"cannot write {report}: {err.strerror or err}") from None
    return Outputs(report, csv)


def write_atomic(path: Path, data: str | bytes) -> Path:
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a report is for reading
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
