"""How numbers read, in one place: the report (HTML, Markdown, text), the summary a step
prints (labs.console) and step 01's (labs.probes) agree. Torch-free.

A missing value (None or NaN) reads "n/a" everywhere."""

from __future__ import annotations

import math


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def gib(n_bytes, digits: int = 2) -> str:
    """Bytes in GiB: two decimals for measured memory (a peak of 11.03 GiB), one for a
    machine's capacity (RAM, free disk, a GPU's total memory: step 01)."""
    return "n/a" if missing(n_bytes) else f"{n_bytes / 2**30:.{digits}f} GiB"


def rate(img_s) -> str:
    if missing(img_s):
        return "n/a"
    return f"{img_s:,.0f}" if img_s >= 100 else f"{img_s:,.1f}"


def seconds(value) -> str:
    if missing(value):
        return "n/a"
    if value < 1:
        return f"{value * 1e3:,.1f} ms"
    return f"{value:,.2f} s" if value < 100 else f"{value:,.0f} s"


def pct(fraction, digits: int = 0) -> str:
    return "n/a" if missing(fraction) else f"{100 * fraction:.{digits}f}%"


def times(factor) -> str:
    return "n/a" if missing(factor) else f"{factor:.2f}×"


def size(n_bytes) -> str:
    """A message or buffer size in the largest binary unit it reaches: "256 MiB"."""
    if missing(n_bytes):
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:g} {unit}" if n_bytes % scale == 0 else \
                f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} B"


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def unit_for(values) -> str:
    """One time unit for a whole column: "ms" when every known value is under a second."""
    known = [v for v in values if not missing(v)]
    return "ms" if known and max(known) < 1 else "s"


def seconds_in(value, unit: str) -> str:
    """``value`` (seconds) in ``unit`` ("ms" or "s"), so a column reads in one unit."""
    if missing(value):
        return "n/a"
    if unit == "ms":
        return f"{value * 1e3:,.1f} ms"
    return f"{value:,.2f} s" if value < 100 else f"{value:,.0f} s"


def figure(value) -> str:
    """A measured number with about three significant digits, for a table whose header
    names the unit."""
    if missing(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:.{3 - len(str(int(magnitude)))}f}"
    return f"{value:#.3g}"


def count(value) -> str:
    """A whole number of things (images in a batch): "1,024"; "n/a" when missing."""
    if missing(value):
        return "n/a"
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"
