"""Where the report goes: checked before any work, written atomically.

The report, the CSV of its main table (same stem, ``.csv``) and, with
``--generate-plots``, one PNG per figure (``STEM_KEY.png``) all go into the report's
folder. Each is written with ``labs.files.write_atomic``: a temporary file in that
folder, then renamed over the target, so a reader never sees half a report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from labs.errors import UsageError
from labs.files import unwritable_reason


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
    reason = unwritable_reason(folder)
    if reason is not None:
        raise UsageError(f"cannot write {report}: {reason}")
    return Outputs(report, csv)
