"""Where the report goes: checked before any work, written atomically, never over a file
that is not 05's own.

The report, the CSV of its main table (same stem, ``.csv``) and, with
``--generate-plots``, one PNG per figure (``STEM_KEY.png``) all go into the report's
folder. Each is written with ``labs.files.write_atomic``: a temporary file in that
folder, then renamed over the target, so a reader never sees half a report.

An existing file is replaced only when 05 wrote it, told by a mark 05 puts in everything
it writes: a ``<meta name="generator">`` tag in the HTML, a first-line comment in the
Markdown, the Software entry of a PNG; the CSV by its header. Anything else (a result
file, someone's notes, a CSV or picture of another program) is refused as bad usage
before anything is written.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from labs.errors import UsageError
from labs.files import unwritable_reason

GENERATOR = "dp-vs-ddp-lab 05"
HTML_MARK = f'<meta name="generator" content="{GENERATOR}">'
MARKDOWN_MARK = f"<!-- generator: {GENERATOR} -->"
# Reports of 05 from before the mark start with their title: still 05's own.
TITLE = "DataParallel vs DistributedDataParallel: performance comparison"
OLD_MARKS = (f"<title>{TITLE}</title>", f"# {TITLE}")
CSV_HEADER_START = "method,strategy,lab,"  # the first columns of render.CSV_COLUMNS
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEAD_BYTES = 64 * 1024  # the marks are near the start; a large file is never read whole


@dataclass
class Outputs:
    report: Path
    csv: Path

    def png(self, key: str) -> Path:
        return self.report.with_name(f"{self.report.stem}_{key}.png")

    def check_pngs(self, keys) -> None:
        """Refuse (UsageError) when the PNG of any figure in ``keys`` exists and is not
        05's own. Called before the first file is written."""
        for key in keys:
            _refuse_foreign(self.png(key), _is_our_png, "figure")


def plan(report: Path, results_dir: Path | None = None,
         flag: str = "--output-report") -> Outputs:
    """Check that the report can be written and would replace nothing but 05's own files:
    nothing is created but a probe file, which is removed at once. A problem is a usage
    error naming ``flag`` (the runner checks its ``--report`` before any training)."""
    report = Path(report)
    folder = report.parent
    if report.is_dir():
        raise UsageError(f"{flag} {report} is a folder; give a file name")
    if not folder.is_dir():
        raise UsageError(f"cannot write {report}: folder {folder} does not exist")
    csv = report.with_suffix(".csv")
    if csv == report:
        raise UsageError(f"{flag} {report}: the report cannot be a .csv file "
                         f"(the CSV of the table is written beside it)")
    if report.suffix.lower() == ".json" and results_dir is not None and \
            _same_folder(folder, results_dir):
        raise UsageError(f"{flag} {report}: a .json file in the results folder "
                         f"would be read as a result; choose another name or folder")
    _refuse_foreign(report, _is_our_report, "report", flag)
    _refuse_foreign(csv, _is_our_csv, "table", flag)
    reason = unwritable_reason(folder)
    if reason is not None:
        raise UsageError(f"cannot write {report}: {reason}")
    return Outputs(report, csv)


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _refuse_foreign(path: Path, ours, what: str, flag: str = "--output-report") -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_file():
        raise UsageError(f"refusing to replace {path}: not a regular file; choose another "
                         f"{flag}")
    if not ours(path):
        raise UsageError(f"refusing to replace {path}: it exists and is not a {what} "
                         f"written by 05; choose another {flag}, or move it away")


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(HEAD_BYTES)
    except OSError:
        return b""  # unreadable: not recognisably ours


def _is_our_report(path: Path) -> bool:
    text = _head(path).decode("utf-8", errors="replace")
    first = text.split("\n", 1)[0].strip()
    if first == MARKDOWN_MARK or first in OLD_MARKS:
        return True
    head = text[:text.find("</head>")] if "</head>" in text else text
    return HTML_MARK in head or OLD_MARKS[0] in head


def _is_our_csv(path: Path) -> bool:
    return _head(path).decode("utf-8", errors="replace").startswith(CSV_HEADER_START)


def png_text(data: bytes) -> dict[str, str] | None:
    """The text entries (tEXt, iTXt) before the image data of a PNG, or None when ``data``
    does not start like a PNG."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    entries, at = {}, len(PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        if kind == b"IDAT" or len(body) < length:
            break
        if kind in (b"tEXt", b"iTXt") and b"\0" in body:
            key, value = body.split(b"\0", 1)
            if kind == b"iTXt":  # compression flag, method, language, translated keyword
                value = value[2:].split(b"\0", 2)[-1]
            entries[key.decode("latin-1")] = value.decode("utf-8", errors="replace")
        at += 12 + length
    return entries


_FIGURE_NAME = re.compile(r".+_[a-z0-9_]+\.png")


def _is_our_png(path: Path) -> bool:
    """05 marks its PNGs with Software = GENERATOR. Before the mark it removed the entry:
    a PNG with no Software entry and a figure's name is an older 05's."""
    entries = png_text(_head(path))
    if entries is None:
        return False
    if "Software" in entries:
        return entries["Software"] == GENERATOR
    return bool(_FIGURE_NAME.fullmatch(path.name))
