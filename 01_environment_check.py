#!/usr/bin/env python3
"""Step 01: what this machine can do, before anything is trained.

    python 01_environment_check.py                    # inventory and probes (seconds)
    python 01_environment_check.py --quick            # inventory only, no probes
    python 01_environment_check.py --require-gpus 4   # exit status 1 unless 4 GPUs are visible

It records the versions (Python, torch, CUDA, cuDNN, NCCL, driver), every GPU and which
GPUs reach each other directly, the CPU, memory and disk, and then measures three things
the later steps depend on:

- the matrix-multiply rate (TFLOP/s) of each GPU in fp32, TF32 and bf16: the ceiling
  that 02's throughput is measured against;
- host <-> GPU copy bandwidth from pinned memory: what an input pipeline can feed;
- an all-reduce sweep between processes, each sum checked: from it, the time DDP (04)
  needs per step to average ResNet-50's gradients.

The result is results/environment.json (kind "environment"), replaced on every run;
step 05 reads it to put the training numbers in context.
"""

import argparse
import shutil
import sys
from pathlib import Path

from labs import cli

PROG = Path(__file__).name


def build_parser() -> argparse.ArgumentParser:
    parser = cli.OneLineParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=Path("results"), metavar="DIR",
                        help="folder for environment.json (default: results)")
    parser.add_argument("--quick", action="store_true",
                        help="inventory only: skip the matmul, copy and all-reduce probes")
    parser.add_argument("--require-gpus", type=cli.non_negative_int, default=0, metavar="N",
                        help="exit with status 1 unless at least N CUDA GPUs are visible "
                             "(default: 0)")
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()  # bad usage raises UsageError: one line, status 2


if __name__ == "__main__":
    cli.check_early(parse_args)  # --help and typos: answered before torch loads

# Only now the heavy imports: torch takes seconds to load, and --help needs none of it.
import torch  # noqa: E402

from labs import contract, envinfo, files, launcher_env, probes  # noqa: E402


def say(text: str) -> None:
    print(text, flush=True)  # probes take seconds: show which one is running


def run_probes(gpus: list[dict], notes: list[str]) -> dict:
    # Compute: a large matmul per GPU and precision; a small one on the CPU as well.
    matmul = []
    for gpu in gpus:
        for dtype in probes.GPU_MATMUL_DTYPES:
            say(f"probe: matmul {dtype} {probes.GPU_MATMUL_SIZE}^3 on cuda:{gpu['index']}")
            matmul.append(probes.matmul_gpu(gpu["index"], dtype, notes))
    say(f"probe: matmul fp32 {probes.CPU_MATMUL_SIZE}^3 on cpu")
    matmul.append(probes.matmul_cpu())

    # Host <-> device copies from pinned memory: only where there is a device.
    copies = None
    if gpus:
        copies = []
        for gpu in gpus:
            say(f"probe: pinned host <-> cuda:{gpu['index']} copies")
            copies += probes.copy_bandwidth(gpu["index"], notes)
    else:
        notes.append("No GPU: host-to-device copy bandwidth not measured (null).")

    # Communication: what DDP does every step, each reduced value checked.
    allreduce = probes.allreduce_sweep(len(gpus), notes, say=say)
    return {"matmul": [m for m in matmul if m is not None], "copy_bandwidth": copies,
            "allreduce": allreduce}


def main() -> None:
    args = parse_args()
    visible = envinfo.gpu_count()
    if visible < args.require_gpus:  # the machine, not the usage: status 1
        print(f"{PROG}: {visible} CUDA GPU(s) visible but --require-gpus "
              f"{args.require_gpus} asks for at least {args.require_gpus} (torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}; check the "
              f"driver and CUDA_VISIBLE_DEVICES)", file=sys.stderr)
        sys.exit(1)
    files.ensure_writable_dir(args.results_dir)  # an unwritable folder is bad usage: status 2
    files.check_file_can_be_replaced(args.results_dir / "environment.json")

    notes: list[str] = []
    environment = envinfo.collect()
    record = {
        "schema_version": contract.SCHEMA_VERSION,
        "kind": "environment",
        "written_at": None,
        "command": launcher_env.command_line(),
        "environment": environment,
        "gpus": probes.gpu_inventory(environment["gpus"]),
        "topology": probes.nvidia_topology(notes),
        "disk_free_bytes": shutil.disk_usage(args.results_dir).free,
        "backends": probes.distributed_backends(),
        "probes": None,
        "recommendations": [],
        "notes": notes,
    }
    if not args.quick:
        record["probes"] = run_probes(record["gpus"], notes)
    record["recommendations"] = probes.recommendations(record)

    record["written_at"] = contract.utc_now()
    path = files.write_json_atomic(record, args.results_dir / "environment.json",
                                     overwrite=True)
    print(probes.format_summary(record, path), flush=True)

    allreduce = (record["probes"] or {}).get("allreduce")
    if allreduce is not None and not allreduce["all_correct"]:
        print(f"{PROG}: the all-reduce probe returned wrong sums: inter-process "
              f"communication is broken on this machine (see {path})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
