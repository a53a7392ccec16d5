"""Image files that cannot be read, found before training instead of when the sampler
draws them (an hour in, as a traceback without the file's name).

Cheap enough for a whole folder: the header tells the format, and a JPEG or PNG must end
with its end marker (EOI, IEND), which a file cut short (a copy that stopped, a full
disk) lacks. Only a file that fails that test, or has another format, is decoded in full.
Torch-free: PIL only.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError

from labs.errors import UsageError, first_line

END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
TAIL_BYTES = 1024  # a JPEG may carry a little data after its end marker
THREADS = 8  # reading file headers waits on the disk, not the CPU


def unreadable_reason(path: str) -> str | None:
    """Why ``path`` is no image PIL can decode (None: it is one)."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "an empty file"
        with Image.open(path) as image:
            marker = END_MARKERS.get(image.format)
            if marker is not None:
                with open(path, "rb") as handle:
                    handle.seek(max(0, size - TAIL_BYTES))
                    if marker in handle.read():
                        return None
            image.load()  # no end marker, or another format: decode to be sure
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for damaged data
        return first_line(err, type(err).__name__)
    return None


def check_readable(paths: list[str], where: str) -> None:
    """Refuse (UsageError, one line) a set of images of which any cannot be read: the
    first few are named with their reason, and how many there are in all."""
    with ThreadPoolExecutor(THREADS) as pool:
        reasons = list(pool.map(unreadable_reason, paths))
    bad = [(path, why) for path, why in zip(paths, reasons) if why is not None]
    if bad:
        named = "; ".join(f"{path}: {why}" for path, why in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise UsageError(f"{where}: {len(bad)} of {len(paths)} images cannot be read: "
                         f"{named}{more}; remove or replace them")
