"""`python -m labs run [options]`: the whole lab in one command (see labs/runner.py)."""

from __future__ import annotations

import sys

from labs.errors import UsageError

USAGE = "usage: python -m labs run [--help] [options]   (runs steps 01 -> 05 in order)"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0] != "run":
        print(f"python -m labs: error: unknown command {argv[0]!r}; {USAGE}", file=sys.stderr)
        sys.exit(2)
    from labs import runner

    try:
        sys.exit(runner.main(argv[1:]))
    except UsageError as err:
        print(f"python -m labs run: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
