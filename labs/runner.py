"""`python -m labs run`: the whole lab, 01 -> 05, sized to the machine it runs on.

The runner only starts the numbered scripts as a student would (each in its own
process, writing to the runner's own stdout and stderr, so their output is live) and
reads nothing but their exit status; the scripts themselves write the results and the
report. A stop signal (Ctrl-C, SIGTERM, SIGHUP) reaches the running step, which records
what it measured; the runner waits for it, then exits with 128 + the signal's number.
Plans by hardware:

- no GPU: smoke-sized model on `--data shapes` (a task the model learns, so the report
  shows accuracy and time to accuracy for every method); 04 runs 2 processes over gloo;
- one GPU: the ResNet-50 baseline, DP and DDP at world size 1 (labelled as such: they
  measure overhead, not scaling);
- N GPUs: the lab's own commands: 02 at batch 64, with AMP and in fp32 (--amp off, so the
  report can show what mixed precision buys); then a scaling sweep: 03 and 04 (torchrun,
  AMP) at world sizes 1, 2, 4, ... up to N, and N itself, on the first k selected GPUs.

`--world-sizes` picks the sweep's sizes (on the CPU it sweeps 04 only: DataParallel needs
GPUs) and `--scaling` how each size compares with 02: weak keeps 02's batch on every
device (03 gets 64 x k, 04 64 per process), strong keeps 02's global batch and splits it
(03 gets 64, 04 64 / k per process); both runs each size both ways. World size 1 is one
run either way, labelled weak. In a sweep every run carries its `--scaling` label, which
its result records for the report.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from labs.cli import (PRESETS, SCALING_CHOICES, OneLineParser, positive_int, preset_value,
                      profile_step_count, protect_output)
from labs.errors import UsageError
from labs.files import ensure_writable_dir

REPO = Path(__file__).resolve().parent.parent
STEP_NAMES = {
    "01": "environment check",
    "02": "single-device baseline",
    "03": "DataParallel",
    "04": "DistributedDataParallel",
    "05": "comparison report",
}
SCRIPTS = {
    "01": "01_environment_check.py",
    "02": "02_baseline_single_gpu.py",
    "03": "03_dataparallel_training.py",
    "04": "04_ddp_training.py",
    "05": "05_performance_comparison.py",
}
TRAINING_STEPS = ("02", "03", "04")
GPU_BATCH = 64  # 02's batch on GPUs: per device in weak scaling, the global one in strong
CPU_RANKS = 2  # the CPU plan's one 04 run, unless --world-sizes says otherwise
# A terminal's Ctrl-C and hangup, `timeout` and a kill of the process group reach the
# running step too: it gets this long to stop by itself before the runner passes the
# signal on, since a second signal could cut its result short.
STOP_GRACE_S = 2.0
# For a stopped step to write its result (04's launcher waits up to 60 s for its ranks),
# then it is killed.
STOP_TIMEOUT_S = 120.0


@dataclass
class Command:
    step: str
    argv: list[str]
    repeat_index: int = 0
    env: dict = field(default_factory=dict)

    def display(self) -> str:
        argv = ["python" if a == sys.executable else a for a in self.argv]
        prefix = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join(prefix + [shlex.join(argv)])


@dataclass
class Plan:
    hardware: str
    preset: str | None
    gpus: list[int]
    commands: list[Command] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_steps(text: str) -> list[str]:
    steps = sorted({part.strip().zfill(2) for part in text.split(",")})
    if not set(steps) <= set(SCRIPTS):
        raise UsageError(f"--steps {text}: expected step numbers from 01 to 05, "
                         f"e.g. 02,04,05")
    return steps


def _distinct_ints(text: str, smallest: int) -> list[int] | None:
    """"0,1,3" as [0, 1, 3]; None unless every part is a distinct int >= ``smallest``."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        return None
    ok = values and min(values) >= smallest and len(set(values)) == len(values)
    return values if ok else None


def parse_gpus(text: str) -> list[int]:
    gpus = _distinct_ints(text, 0)
    if gpus is None:
        raise UsageError(f"--gpus {shlex.quote(text)}: expected distinct GPU indices such "
                         f"as 0,1 (omit --gpus to use every visible GPU)")
    return gpus


def parse_world_sizes(text: str) -> list[int]:
    sizes = _distinct_ints(text, 1)
    if sizes is None:
        raise UsageError(f"--world-sizes {shlex.quote(text)}: expected distinct positive "
                         f"numbers of devices such as 1,2,4,8")
    return sorted(sizes)


def default_world_sizes(gpu_count: int) -> list[int]:
    """The powers of two below the GPU count, and the count: 6 GPUs -> 1, 2, 4, 6."""
    if gpu_count == 0:
        return [CPU_RANKS]
    return [2 ** i for i in range(gpu_count.bit_length()) if 2 ** i < gpu_count] + [gpu_count]


def sweep_runs(world_sizes: list[int], scaling: str) -> list[tuple[int, str]]:
    """(world size, scaling mode) of each 03/04 run, smallest first, weak before strong."""
    modes = SCALING_CHOICES if scaling == "both" else (scaling,)
    # one device: weak and strong scaling are the same run
    return [(k, mode) for k in world_sizes for mode in (("weak",) if k == 1 else modes)]


def check_world_sizes(args, world_sizes: list[int], gpus: list[int]) -> None:
    """Sizes the hardware cannot hold: one GPU per device, one CPU core per gloo rank."""
    largest, listed = world_sizes[-1], ",".join(map(str, world_sizes))
    if gpus and largest > len(gpus):
        where = "selected with --gpus" if args.gpus is not None else "on this machine"
        raise UsageError(f"--world-sizes {listed}: {largest} devices but {len(gpus)} GPU(s) "
                         f"{where}; each device is one GPU")
    cores = os.cpu_count() or 1
    if not gpus and largest > cores:
        raise UsageError(f"--world-sizes {listed}: {largest} ranks but this machine has "
                         f"{cores} CPU cores; each rank needs one")


def check_strong_split(args, runs: list[tuple[int, str]], batch: int, limit: int) -> None:
    uneven = [k for k, mode in runs if mode == "strong" and batch % k]
    if uneven:
        fits = ",".join(str(k) for k in range(1, limit + 1) if batch % k == 0)
        raise UsageError(f"--scaling {args.scaling}: the global batch {batch} does not split "
                         f"evenly over {uneven[0]} devices; use world sizes that divide it, "
                         f"e.g. --world-sizes {fits}")


def _listing(values: list[int]) -> str:
    """[1, 2, 4] -> "1, 2 and 4"."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def build_plan(args, gpu_count: int) -> Plan:
    """What to run, as argv lists, for this hardware and these options."""
    gpus = args.gpus if args.gpus is not None else list(range(gpu_count))
    missing = [g for g in gpus if g >= gpu_count]
    if missing:
        raise UsageError(f"--gpus {','.join(map(str, gpus))}: this machine has "
                         f"{gpu_count} GPU(s); omit --gpus to use every visible GPU")
    n = len(gpus)
    hardware = "cpu" if n == 0 else ("1 GPU" if n == 1 else f"{n} GPUs")
    preset = args.preset if args.preset != "auto" else ("smoke" if n == 0 else None)
    plan = Plan(hardware=hardware, preset=preset, gpus=gpus)
    common = ["--results-dir", str(args.results_dir)]
    if preset:
        common += ["--preset", preset]
    python = sys.executable
    script = {k: str(REPO / v) for k, v in SCRIPTS.items()}

    world_sizes = args.world_sizes or default_world_sizes(n)
    if args.world_sizes:  # the defaults fit by construction (on the CPU: today's 2 ranks)
        check_world_sizes(args, world_sizes, gpus)
    runs = sweep_runs(world_sizes, args.scaling)
    # a lone weak run keeps the plain command (weak is the default); in a sweep, or for
    # strong scaling, every command names its mode, which its result records
    labelled = len(runs) > 1 or args.scaling != "weak"

    def label(mode: str) -> list[str]:
        return ["--scaling", mode] if labelled else []

    modes = "weak and strong" if args.scaling == "both" else args.scaling
    sweep = f"Scaling sweep: world sizes {_listing(world_sizes)} in {modes} scaling"

    profile = ["--profile-steps", str(args.profile_steps)] if args.profile_steps else []
    # per step: (argv, environment) of each run
    per_step: dict[str, list[tuple[list[str], dict]]]
    if n == 0:
        batch = preset_value("batch_size", preset, "shapes")  # per process, as 04 resolves it
        check_strong_split(args, runs, batch, os.cpu_count() or 1)
        # One thread per process on the CPU (train.configure_backends) unless the user set
        # OMP_NUM_THREADS, which every step inherits: 02's baseline matches each of 04's
        # ranks, so efficiency compares like with like.
        plan.notes.append(f"No GPU: every step runs on the CPU, one thread per process; 04 "
                          f"uses {_listing(world_sizes)} processes over gloo. The numbers "
                          f"show the mechanics, not GPU speed.")
        if runs != [(CPU_RANKS, "weak")]:
            plan.notes.append("DataParallel needs GPUs: on the CPU 03 runs once, in one "
                              "process; --world-sizes and --scaling apply to 04 only.")
        if len(runs) > 1:
            plan.notes.append(f"{sweep} ({len(runs)} runs of 04).")
        # A learnable task, computed from the seed: the report can then show that the
        # methods reach the same accuracy, and how long each takes to get there.
        learn = ["--data", "shapes"]
        per_step = {
            "02": [([python, script["02"], "--device", "cpu", *learn, *common], {})],
            "03": [([python, script["03"], *learn, *common], {})],
            "04": [([python, script["04"], "--nproc", str(k), "--device", "cpu", *learn,
                     *(["--batch-size", str(batch // k)] if mode == "strong" else []),
                     *common, *label(mode), *profile], {}) for k, mode in runs],
        }
    else:
        check_strong_split(args, runs, GPU_BATCH, n)
        size = ([] if preset else ["--model", "resnet50", "--epochs", "5"])
        baseline = [python, script["02"], "--batch-size", str(GPU_BATCH), "--device",
                    f"cuda:{gpus[0]}", *size, *common]
        # the fp32 reference beside the mixed-precision baseline: AMP's effect measured
        per_step = {"02": [([*baseline, "--amp", amp], {}) for amp in ("auto", "off")],
                    "03": [], "04": []}
        for k, mode in runs:
            weak = mode == "weak"
            first = ",".join(map(str, gpus[:k]))
            per_step["03"].append(([python, script["03"], "--batch-size",
                                    str(GPU_BATCH * k if weak else GPU_BATCH), "--gpus", first,
                                    *size, *common, *label(mode)], {}))
            # torchrun gives local rank r the r-th visible GPU: pin a subset by visibility
            pinned = {"CUDA_VISIBLE_DEVICES": first} if gpus[:k] != list(range(gpu_count)) \
                else {}
            per_step["04"].append(([python, "-m", "torch.distributed.run", "--standalone",
                                    f"--nproc_per_node={k}", script["04"], "--batch-size",
                                    str(GPU_BATCH if weak else GPU_BATCH // k), "--amp", "auto",
                                    *size, *common, *label(mode), *profile], pinned))
        if n == 1:
            plan.notes.append("One GPU: DataParallel and DDP run at world size 1. They "
                              "measure each wrapper's overhead; scaling needs 2+ GPUs.")
        if len(runs) > 1:
            plan.notes.append(f"{sweep} ({len(runs)} runs each of 03 and 04).")

    for step in args.steps:
        if step == "01":
            quick = ["--quick"] if args.quick_env else []
            plan.commands.append(Command("01", [python, script["01"], "--results-dir",
                                                str(args.results_dir), *quick]))
        elif step in TRAINING_STEPS:
            for k in range(args.repeat):
                for argv, env in per_step[step]:
                    plan.commands.append(Command(step, argv, k, env=env))
        elif step == "05":
            plan.commands.append(Command("05", [
                python, script["05"], "--results-dir", str(args.results_dir),
                "--generate-plots", "--output-report", str(args.report)]))
    return plan


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m labs run",
                           description="Run the whole lab, 01 -> 05, sized to this machine.")
    parser.add_argument("--steps", type=str, default="01,02,03,04,05", metavar="LIST",
                        help="which steps to run, e.g. 02,04,05 (default: all)")
    parser.add_argument("--from", dest="start", metavar="STEP",
                        help="run from this step on, e.g. --from 03 (to resume after a "
                             "failure)")
    parser.add_argument("--gpus", metavar="IDS",
                        help="GPUs to use, e.g. 0,1 (default: every visible GPU)")
    parser.add_argument("--preset", default="auto", choices=("auto", *PRESETS),
                        help="run size: auto = smoke on a CPU-only machine, the lab's full "
                             "commands on GPUs (default: auto)")
    parser.add_argument("--results-dir", type=Path, default=Path("results"), metavar="DIR",
                        help="folder for the result files (default: results)")
    parser.add_argument("--report", type=Path, default=Path("comparison_report.html"),
                        metavar="PATH", help="report to write (default: "
                                             "comparison_report.html)")
    parser.add_argument("--world-sizes", metavar="LIST",
                        help="world sizes of 03 and 04, e.g. 1,2,4,8 (default: on GPUs the "
                             "powers of two below the GPU count, and the count; on the CPU "
                             "04 with 2 processes)")
    parser.add_argument("--scaling", choices=(*SCALING_CHOICES, "both"), default="weak",
                        help="how 03 and 04 compare with 02: weak = each device keeps 02's "
                             "batch (the global batch grows with N), strong = the global "
                             "batch stays 02's, split over N devices, both = each world "
                             "size both ways (default: weak)")
    parser.add_argument("--profile-steps", type=profile_step_count, default=0, metavar="K",
                        help="04 also runs K steps under torch.profiler after training: a "
                             "trace per rank in RESULTS_DIR/traces and the report's overlap "
                             "timeline (default: 0, off)")
    parser.add_argument("--repeat", type=positive_int, default=1, metavar="K",
                        help="run each training step K times; the report aggregates "
                             "them (default: 1)")
    parser.add_argument("--quick-env", action="store_true",
                        help="step 01 without its probes")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands without running them")
    return parser


def parse_args(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    steps = args.steps
    args.steps = parse_steps(steps)
    if args.start is not None:
        start = args.start.strip().zfill(2)
        if start not in SCRIPTS:
            raise UsageError(f"--from {args.start}: expected one step number from 01 to "
                             f"05, e.g. --from 03")
        args.steps = [s for s in args.steps if s >= start]
        if not args.steps:
            raise UsageError(f"--from {args.start} comes after every step of --steps "
                             f"{steps}: nothing to run")
    if args.gpus is not None:
        args.gpus = parse_gpus(args.gpus)
    if args.world_sizes is not None:
        args.world_sizes = parse_world_sizes(args.world_sizes)
    return args


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def resume_hint(args_argv: list[str], step: str) -> str:
    kept = []
    skip = False
    for arg in args_argv:  # drop an earlier --from/--steps; the hint sets where to start
        if skip:
            skip = False
            continue
        if arg in ("--from", "--steps"):
            skip = True
            continue
        if arg.startswith(("--from=", "--steps=")):
            continue
        kept.append(arg)
    return shlex.join(["python", "-m", "labs", "run", *kept, "--from", step])


class StopSignals:
    """Records the first SIGINT (Ctrl-C), SIGTERM (a supervisor) or SIGHUP (a terminal
    that closed) while installed: the running step is stopped with it, then the lab."""

    def __init__(self):
        self.signum: int | None = None
        self.received_at = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) != signal.SIG_IGN:  # nohup, `&`: ignored on purpose
                self._previous[signum] = signal.signal(signum, self._receive)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _receive(self, signum, frame) -> None:
        if self.signum is None:  # later signals change nothing: the step is stopping
            self.signum, self.received_at = signum, time.monotonic()


def run_step(command: Command, stop: StopSignals) -> int:
    """The step's exit status. A stop signal is passed on to the step, which then has
    time to write its result: no step is left running without the runner."""
    process = subprocess.Popen(command.argv, cwd=Path.cwd(), env={**os.environ, **command.env})
    passed_on_at = None
    while True:
        try:
            return process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            now = time.monotonic()
        if stop.signum is not None and passed_on_at is None and \
                now - stop.received_at >= STOP_GRACE_S:
            process.send_signal(stop.signum)
            passed_on_at = now
        elif passed_on_at is not None and now - passed_on_at >= STOP_TIMEOUT_S:
            process.kill()


def stopped(signum: int, step: str, when: str, args, argv: list[str]) -> int:
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    print(f"\nlab: stopped by {name} {when}.\nThe results written so far are kept in "
          f"{args.results_dir}. Resume with:\n  {resume_hint(argv, step)}", file=sys.stderr,
          flush=True)
    return 128 + signum


def execute(plan: Plan, args, argv: list[str], stop: StopSignals) -> int:
    """Run the plan; stop at the first failure or stop signal and say how to resume.
    Returns a status."""
    print(f"lab: {plan.hardware}; preset {plan.preset or 'full (the lab commands)'}; "
          f"{len(plan.commands)} run(s); results in {args.results_dir}", flush=True)
    for note in plan.notes:
        print(f"note: {note}", flush=True)
    started = time.monotonic()
    done: list[tuple[Command, float, int]] = []
    for i, command in enumerate(plan.commands, 1):
        label = STEP_NAMES[command.step]
        if stop.signum is not None:  # between two steps
            return stopped(stop.signum, command.step, f"before step {command.step}", args,
                           argv)
        repeat = f" (run {command.repeat_index + 1}/{args.repeat})" \
            if command.step in TRAINING_STEPS and args.repeat > 1 else ""
        print(f"\n━━ [{i}/{len(plan.commands)}] step {command.step}: {label}{repeat} · "
              f"elapsed {_clock(time.monotonic() - started)} ━━\n$ {command.display()}",
              flush=True)
        if args.dry_run:
            continue
        step_started = time.monotonic()
        status = run_step(command, stop)
        took = time.monotonic() - step_started
        done.append((command, took, status))
        if status != 0 and stop.signum is not None:
            return stopped(stop.signum, command.step, f"during step {command.step} "
                           f"({label}) after {_clock(took)}", args, argv)
        if status != 0:
            print(f"\nlab: step {command.step} ({label}) failed with exit status {status} "
                  f"after {_clock(took)}.\nThe results of the earlier steps are kept in "
                  f"{args.results_dir}. Fix the cause above, then resume with:\n  "
                  f"{resume_hint(argv, command.step)}", file=sys.stderr, flush=True)
            return status if status > 0 else 1
    if args.dry_run:
        return 0
    print(f"\n━━ lab finished in {_clock(time.monotonic() - started)} ━━")
    for command, took, _ in done:
        print(f"  step {command.step}  {STEP_NAMES[command.step]:<24} {_clock(took):>6}")
    if "05" in args.steps:
        print(f"\nreport: {args.report.resolve()}  (open it in a browser)")
    return 0


def main(argv: list[str] | None = None) -> int:
    protect_output()  # a closed or non-UTF-8 stdout costs the printing, never the lab
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    missing = [s for s in args.steps if not (REPO / SCRIPTS[s]).is_file()]
    if missing:
        raise UsageError(f"the lab's scripts are not beside the labs package ({REPO}); "
                         f"run from a checkout of the lab")
    ensure_writable_dir(args.results_dir)  # bad folders fail now, not after the training
    if "05" in args.steps:  # step 05 would refuse it only after all the training
        from labs.report import output
        output.plan(args.report, args.results_dir, flag="--report")
    from labs import envinfo  # torch: seconds to load, so not for --help or a bad option

    plan = build_plan(args, envinfo.gpu_count())
    with StopSignals() as stop:
        return execute(plan, args, argv, stop)
