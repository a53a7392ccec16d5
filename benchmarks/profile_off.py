#!/usr/bin/env python3
"""Does `--profile-steps` leave training's throughput alone? A ratio, not a test.

    python benchmarks/profile_off.py               # 04 --nproc 2 --preset smoke, 3 pairs
    python benchmarks/profile_off.py --pairs 5 --profile-steps 5

Runs 04 in pairs, one run without --profile-steps and one with it, alternating which goes
first, and prints each run's training throughput (the result's median img/s) and the
median of the with / without ratios. The profiled steps come after training, so the ratio
should be 1 within the machine's noise (compare with the spread between pairs); a ratio
well below 1 would mean the profiler reaches into the timed steps.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def throughput(extra: list[str], base: list[str]) -> float:
    with tempfile.TemporaryDirectory(prefix="lab-profile-off-") as folder:
        subprocess.run([sys.executable, str(REPO / "04_ddp_training.py"), *base,
                        "--results-dir", folder, *extra], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        [result] = Path(folder).glob("04_ddp_*.json")
        return json.loads(result.read_text())["metrics"]["throughput_img_s"]["median"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3, help="pairs of runs (default: 3)")
    parser.add_argument("--profile-steps", type=int, default=3, help="K (default: 3)")
    parser.add_argument("args", nargs="*", default=["--nproc", "2", "--preset", "smoke",
                                                    "--device", "cpu"],
                        help="04's other options (default: --nproc 2 --preset smoke "
                             "--device cpu)")
    args = parser.parse_args()
    profiled = ["--profile-steps", str(args.profile_steps)]
    ratios = []
    for pair in range(args.pairs):
        order = [[], profiled] if pair % 2 == 0 else [profiled, []]
        measured = {bool(extra): throughput(extra, args.args) for extra in order}
        ratios.append(measured[True] / measured[False])
        print(f"pair {pair + 1}: without {measured[False]:.1f} img/s, with "
              f"{measured[True]:.1f} img/s, ratio {ratios[-1]:.3f}", flush=True)
    spread = f"{min(ratios):.3f}-{max(ratios):.3f}" if len(ratios) > 1 else "n/a"
    print(f"median ratio (with / without) {statistics.median(ratios):.3f} over "
          f"{len(ratios)} pairs; range {spread}")


if __name__ == "__main__":
    main()
