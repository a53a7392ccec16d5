"""Errors that end a step with a clear message instead of a traceback."""


class UsageError(Exception):
    """Bad command line or bad input: one line on stderr, exit status 2, nothing written."""


def first_line(err: BaseException, default: str = "") -> str:
    """The first non-blank line of an error's message (torch's run to many lines), or
    ``default`` when it has none."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else default
