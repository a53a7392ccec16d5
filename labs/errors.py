"""Errors that end a step with a clear message instead of a traceback."""


class UsageError(Exception):
    """Bad command line or bad input: one line on stderr, exit status 2, nothing written."""
