#!/usr/bin/env python3
"""How long `--help` takes, against the time to import torch alone.

    python benchmarks/help_speed.py              # steps 01 to 05
    python benchmarks/help_speed.py 01 05        # only these
    python benchmarks/help_speed.py --runs 9

Every step answers --help before it imports torch (``labs.cli.check_early``), so
its help should take a small fraction of `python -c "import torch"`. Each command runs
in a fresh interpreter, --runs times (default 5); the medians are printed with their
ratio. A ratio near or above 1 means that step loads torch before answering. Not a test:
the times depend on the machine and on what its file cache holds.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the lab's checkout
from labs.runner import REPO, SCRIPTS  # noqa: E402 - torch-free: it only names the steps


def median_s(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", nargs="*", metavar="STEP",
                        help="steps to time, e.g. 01 05 (default: all)")
    parser.add_argument("--runs", type=int, default=5, help="runs per command (default: 5)")
    args = parser.parse_args()
    unknown = [step for step in args.steps if step not in SCRIPTS]
    if unknown:
        parser.error(f"unknown step {unknown[0]!r}; choose from {', '.join(SCRIPTS)}")
    steps = args.steps or list(SCRIPTS)

    python = sys.executable
    subprocess.run([python, "-c", "import torch"], check=True)  # warm the file cache once
    torch_s = median_s([python, "-c", "import torch"], args.runs)
    print(f"{'import torch':<40}{torch_s:8.3f} s   (median of {args.runs})")
    for step in steps:
        help_s = median_s([python, str(REPO / SCRIPTS[step]), "--help"], args.runs)
        print(f"{SCRIPTS[step] + ' --help':<40}{help_s:8.3f} s   "
              f"{help_s / torch_s:5.2f} x import torch")


if __name__ == "__main__":
    main()
