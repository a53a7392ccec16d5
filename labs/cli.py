"""The command-line contract shared by steps 02, 03 and 04: same flags, same spelling.

``parse_args(lab)`` builds the parser for one step, applies a ``--preset``, fills the
defaults and validates every value before any work is done. A bad value raises
``UsageError``; ``run(main)`` turns it into one line on stderr and exit status 2.

Torch-free, so that ``--help`` and most mistakes are answered at once: every step calls
``check_early`` with its ``parse_args`` (02-04: this one, ``torch_checks=False``) before
importing torch, which takes seconds to load.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable

from labs.contract import LAB_NAMES
from labs.errors import UsageError, first_line
from labs.files import check_folder_can_be_made
from labs.launcher_env import env_int

AMP_CHOICES = ("auto", "off", "fp16", "bf16")
DATA_CHOICES = ("synthetic", "fake", "imagefolder", "cifar10", "shapes")
# Data whose labels mean something: evaluated every epoch unless --no-eval.
EVAL_DATA = ("shapes", "imagefolder", "cifar10")
DEFAULT_TARGET_ACCURACY = 0.5  # --target-accuracy when evaluating
COMM_HOOKS = ("none", "fp16", "bf16", "powersgd")
SCALING_CHOICES = ("weak", "strong")
SYNC_CHOICES = ("every-step", "local-sgd")
DEFAULT_AVERAGE_EVERY = 8
MAX_PROFILE_STEPS = 20  # 04 --profile-steps: a trace is about 0.6 MB per step of ResNet-18
BACKENDS = ("auto", "nccl", "gloo")

# The lab's defaults. Options left unset on the command line take the preset's value,
# then these.
DEFAULTS = {
    "model": "resnet50",
    "batch_size": 64,
    "epochs": 5,
    "steps_per_epoch": None,  # None: the whole data set each epoch
    "img_size": 224,
    "num_classes": 1000,
    "data": "synthetic",
    "dataset_size": 12_800,  # images per epoch for synthetic/fake; a cap for real data
    "num_workers": None,  # None: chosen from the CPU count for pipelines that use workers
    "amp": "auto",  # bf16 on GPUs that support it, fp16 on older GPUs, off on the CPU
    "channels_last": False,
    "compile": False,
    "warmup_steps": 10,
    "grad_accum_steps": 1,
    "lr": None,  # None: 0.1 x global batch / 256 (Goyal et al., 2017), with linear warmup
    "seed": 0,
    "val_size": 512,  # validation images (shapes; a cap for real data)
}

# Named settings. `smoke` runs a step in seconds on a 2-core CPU; `cpu` is the smallest
# run whose numbers still mean something on a CPU-only machine.
PRESETS = {
    "smoke": {
        "model": "resnet18",
        "batch_size": 8,
        "epochs": 2,
        "steps_per_epoch": 5,
        "img_size": 32,
        "num_classes": 10,
        "dataset_size": 256,
        "warmup_steps": 2,
        "num_workers": 0,
    },
    "cpu": {
        "model": "resnet18",
        "batch_size": 32,
        "epochs": 2,
        "steps_per_epoch": 15,
        "img_size": 64,
        "num_classes": 100,
        "dataset_size": 2_048,
        "warmup_steps": 3,
    },
    "full": {},  # the lab's defaults: ResNet-50 at 224
}

# A preset's settings for one data source, over the preset's own. `--data shapes` is
# there to learn: smoke trains on whole epochs of 1,024 images (5 epochs of 32-image
# steps, under half a minute on 2 CPU cores), enough for ResNet-18 to get well above
# chance; random data needs no more than a few steps to be timed.
PRESET_DATA = {
    ("smoke", "shapes"): {"batch_size": 32, "epochs": 5, "steps_per_epoch": None,
                          "dataset_size": 1_024},
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on an error; the lab prints one line."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse's signature
        raise UsageError(f"{message} (see --help)")


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):  # inf would train to NaN, or wait for ever
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than zero, got {text!r}")
    return value


def profile_step_count(text: str) -> int:
    steps = non_negative_int(text)
    if steps > MAX_PROFILE_STEPS:  # a trace grows by megabytes per step
        raise argparse.ArgumentTypeError(f"at most {MAX_PROFILE_STEPS} steps, got {steps}")
    return steps


def _fraction(text: str) -> float:
    """A fraction in (0, 1], such as an accuracy."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction above 0 and at most 1 "
                                         f"(0.5 = 50%), got {text!r}")
    return value


def _gpu_list(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated GPU indices such as 0,1,2,3, got {text!r}"
        ) from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(
            f"must be distinct non-negative GPU indices such as 0,1,2,3, got {text!r}"
        )
    return ids


def build_parser(lab: str, description: str | None = None) -> argparse.ArgumentParser:
    if lab not in LAB_NAMES:
        raise ValueError(f"unknown lab {lab!r}")
    parser = OneLineParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = DEFAULTS
    what = parser.add_argument_group("what to train")
    what.add_argument("--model", metavar="NAME",
                      help=f"any torchvision classification model (default: {d['model']})")
    if lab == "03_dataparallel":
        batch_help = ("GLOBAL batch size in images, split evenly across --gpus by "
                      f"DataParallel (default: {d['batch_size']})")
    else:
        batch_help = f"batch size per process, in images (default: {d['batch_size']})"
    what.add_argument("--batch-size", type=positive_int, metavar="N", help=batch_help)
    what.add_argument("--epochs", type=positive_int, metavar="N",
                      help=f"number of epochs (default: {d['epochs']})")
    what.add_argument("--steps-per-epoch", type=positive_int, metavar="N",
                      help="cap on optimizer steps per epoch (default: the whole data set)")
    what.add_argument("--img-size", type=positive_int, metavar="PX",
                      help=f"input height and width in pixels (default: {d['img_size']})")
    what.add_argument("--num-classes", type=positive_int, metavar="N",
                      help=f"number of output classes (default: {d['num_classes']})")
    what.add_argument("--lr", type=_positive_float, metavar="LR",
                      help="SGD learning rate (default: 0.1 x global batch / 256)")
    what.add_argument("--grad-accum-steps", type=positive_int, metavar="N",
                      help="micro-batches accumulated per optimizer step (default: 1)")

    data = parser.add_argument_group("data")
    data.add_argument("--data", choices=DATA_CHOICES,
                      help="synthetic: random images resident on the device (no input "
                           "pipeline); fake: torchvision FakeData through a DataLoader with "
                           "ImageNet augmentations; imagefolder/cifar10: local files under "
                           "--data-dir, never downloaded; shapes: coloured shapes computed "
                           "from --seed, a task a model can learn (accuracy, time to "
                           f"accuracy) with no download (default: {d['data']})")
    data.add_argument("--data-dir", type=Path, metavar="PATH",
                      help="folder with the data set for --data imagefolder or cifar10")
    data.add_argument("--dataset-size", type=positive_int, metavar="N",
                      help=f"images per epoch for synthetic/fake data, a cap for real data "
                           f"(default: {d['dataset_size']})")
    data.add_argument("--val-size", type=positive_int, metavar="N",
                      help=f"validation images: the held-out split of --data shapes, a cap "
                           f"for real data (default: {d['val_size']})")
    data.add_argument("--eval", action=argparse.BooleanOptionalAction, default=None,
                      help="top-1 accuracy and loss on the validation split after every "
                           "epoch, timed apart from training (default: on for shapes, "
                           "imagefolder and cifar10; off for synthetic and fake, whose "
                           "labels are random)")
    data.add_argument("--target-accuracy", type=_fraction, metavar="F",
                      help=f"validation accuracy (0-1) whose training time the result "
                           f"records as time to accuracy (default: "
                           f"{DEFAULT_TARGET_ACCURACY} when evaluating)")
    data.add_argument("--num-workers", type=non_negative_int, metavar="N",
                      help="DataLoader worker processes (default: from the CPU count; "
                           "synthetic data uses none)")

    speed = parser.add_argument_group("speed")
    speed.add_argument("--amp", choices=AMP_CHOICES,
                       help="mixed precision: auto = bf16 where the GPU supports it, fp16 "
                            "on older GPUs, off on the CPU (default: auto)")
    speed.add_argument("--channels-last", action="store_true", default=None,
                       help="NHWC memory layout, faster convolutions on tensor cores")
    speed.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile the model (compile time is excluded by warmup)")
    speed.add_argument("--warmup-steps", type=non_negative_int, metavar="N",
                       help=f"steps excluded from every measurement "
                            f"(default: {d['warmup_steps']})")

    where = parser.add_argument_group("where and output")
    if lab == "03_dataparallel":
        where.add_argument("--gpus", type=_gpu_list, metavar="IDS",
                           help="GPUs to split each batch across, e.g. 0,1,2,3 "
                                "(default: every visible GPU)")
    else:
        where.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                           help="where to run; auto picks CUDA when present (default: auto)")
    where.add_argument("--seed", type=non_negative_int, metavar="N",
                       help=f"random seed (default: {d['seed']})")
    where.add_argument("--results-dir", type=Path, default=Path("results"), metavar="DIR",
                       help="folder for the run's JSON result (default: results)")
    where.add_argument("--run-name", metavar="NAME",
                       help="label for this run in file names and the report "
                            "(default: model, batch and precision)")
    where.add_argument("--preset", choices=tuple(PRESETS),
                       help="named settings; smoke runs in seconds on a 2-core CPU, cpu is a "
                            "small but meaningful CPU run; explicit flags override it")
    if lab != "02_baseline":
        # Not in DEFAULTS, which fills every step's options: 02 has no --scaling, being
        # the one-device point of both curves.
        where.add_argument("--scaling", choices=SCALING_CHOICES, default="weak",
                           help="how this run compares with step 02 for the report: weak = "
                                "each device keeps 02's batch (the global batch grows with "
                                "N), strong = the global batch stays 02's, split over N "
                                "devices (default: weak). A label: --batch-size keeps its "
                                "meaning")

    if lab == "04_ddp":
        _add_ddp_options(parser)
    return parser


def _add_ddp_options(parser: argparse.ArgumentParser) -> None:
    launch = parser.add_argument_group("launch (DDP)")
    launch.add_argument("--nproc", type=positive_int, metavar="N",
                        help="start N processes on this machine yourself instead of "
                             "running under torchrun")
    launch.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto = nccl when every rank has its own GPU, gloo otherwise "
                             "(default: auto)")
    launch.add_argument("--timeout-s", type=_positive_float, default=300.0, metavar="S",
                        help="process-group timeout: a rank waiting longer than this for a "
                             "dead peer gives up (default: 300)")
    # torch.distributed.launch (deprecated) passes --local-rank / --local_rank.
    launch.add_argument("--local-rank", "--local_rank", type=non_negative_int,
                        dest="local_rank", help=argparse.SUPPRESS)

    ddp = parser.add_argument_group("DistributedDataParallel options")
    ddp.add_argument("--bucket-cap-mb", type=_positive_float, default=25.0, metavar="MB",
                     help="gradient bucket size for all-reduce (default: 25)")
    ddp.add_argument("--static-graph", action="store_true",
                     help="promise the graph is the same every step (enables optimisations)")
    ddp.add_argument("--sync-bn", action="store_true",
                     help="convert BatchNorm to SyncBatchNorm (statistics across ranks)")
    ddp.add_argument("--find-unused-parameters", action="store_true",
                     help="tolerate parameters that get no gradient (costs a graph walk)")
    ddp.add_argument("--broadcast-buffers", action="store_true",
                     help="broadcast rank 0's buffers (batch-norm statistics) every step")
    ddp.add_argument("--comm-hook", choices=COMM_HOOKS, default="none",
                     help="gradient compression before all-reduce (default: none)")
    ddp.add_argument("--no-comm-probe", dest="comm_probe", action="store_false",
                     help="skip the short phase after training that times the same steps "
                          "without gradient all-reduce (model.no_sync()) to measure the "
                          "communication DDP does not hide (default: the probe runs)")
    ddp.add_argument("--profile-steps", type=profile_step_count, default=0, metavar="K",
                     help="after training, K more steps under torch.profiler: one Chrome "
                          "trace per rank in RESULTS_DIR/traces (open it in Perfetto), and "
                          f"the overlap of backward and all-reduce in the result; 1 to "
                          f"{MAX_PROFILE_STEPS}, 0 = off (default: 0)")

    less = parser.add_argument_group("communicate less: local SGD and per-rank data")
    less.add_argument("--sync", choices=SYNC_CHOICES, default="every-step",
                      help="every-step = DDP's gradient all-reduce every step; local-sgd = "
                           "each rank steps alone and the replicas are averaged every "
                           "--average-every steps (default: every-step)")
    less.add_argument("--average-every", type=positive_int, default=None, metavar="H",
                      help=f"local SGD: average the replicas every H optimizer steps "
                           f"(default: {DEFAULT_AVERAGE_EVERY})")
    less.add_argument("--local-sgd-warmup", type=non_negative_int, default=None, metavar="W",
                      help="local SGD: the first W steps synchronise every step, as DDP "
                           "does (default: the learning-rate warmup's steps)")
    less.add_argument("--partition", choices=("iid", "dirichlet"), default="iid",
                      help="each rank's share of the training set: iid = a random 1/N "
                           "every epoch (DistributedSampler); dirichlet = a fixed, "
                           "label-skewed shard per rank, like federated clients (default: "
                           "iid)")
    less.add_argument("--dirichlet-alpha", type=_positive_float, default=0.5, metavar="A",
                      help="--partition dirichlet: small A = few classes per rank, large A "
                           "= close to iid (default: 0.5)")

    ckpt = parser.add_argument_group("checkpoints (DDP)")
    ckpt.add_argument("--checkpoint-every", type=non_negative_int, default=0, metavar="N",
                      help="save a checkpoint every N epochs, 0 = never (default: 0)")
    ckpt.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"),
                      metavar="DIR", help="folder for checkpoints (default: checkpoints)")
    ckpt.add_argument("--resume", metavar="PATH|auto",
                      help="resume from a checkpoint file; auto = the latest in "
                           "--checkpoint-dir when there is one")


def preset_value(name: str, preset: str | None, data: str | None = None):
    """The value option ``name`` takes when left unset: the preset's setting for this data
    source, else the preset's own, else DEFAULTS. ``data`` None: the preset's data source,
    else the default one."""
    settings = PRESETS.get(preset or "full", {})
    data = data or settings.get("data", DEFAULTS["data"])
    settings = {**DEFAULTS, **settings, "data": data,
                **PRESET_DATA.get((preset or "full", data), {})}
    return settings[name]


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill options left unset: first from the preset, then from DEFAULTS."""
    data = args.data
    for name in DEFAULTS:
        if getattr(args, name, None) is None:
            setattr(args, name, preset_value(name, args.preset, data))
    if getattr(args, "eval", None) is None:  # parsers of other tools may lack the flag
        args.eval = args.data in EVAL_DATA
    if getattr(args, "target_accuracy", None) is None:
        args.target_accuracy = DEFAULT_TARGET_ACCURACY if args.eval else None
    args.channels_last = bool(args.channels_last)
    args.compile = bool(args.compile)
    return args


def parse_args(lab: str, description: str | None = None, argv: list[str] | None = None,
               *, torch_checks: bool = True) -> argparse.Namespace:
    """Parse, fill and check the command line of step ``lab``; raises UsageError on any
    bad value. ``torch_checks=False`` leaves out the checks that load torch (the model's
    name and, for 04, the launch): what ``check_early`` runs before the heavy imports."""
    args = build_parser(lab, description).parse_args(argv)
    args.lab = lab
    apply_preset(args)
    check_values(args)
    if not torch_checks:
        return args
    from labs import models  # torchvision import is slow; only when the rest is valid

    models.check_model_name(args.model)
    if args.lab == "04_ddp":
        check_launch(args)
    return args


def check_values(args: argparse.Namespace) -> None:
    """Cross-field checks argparse cannot express, and files that must exist. Torch-free,
    so that ``check_early`` can answer them before torch loads."""
    if args.data in ("imagefolder", "cifar10"):
        if args.data_dir is None:
            raise UsageError(f"--data {args.data} needs --data-dir PATH (nothing is downloaded)")
        if not args.data_dir.is_dir():
            raise UsageError(f"--data-dir {args.data_dir} is not a folder")
    elif args.data_dir is not None:
        raise UsageError(f"--data-dir is only used with --data imagefolder or cifar10, "
                         f"not --data {args.data}")
    if args.img_size < 16:
        raise UsageError(f"--img-size must be at least 16 pixels, got {args.img_size}")
    if args.num_classes < 2:
        raise UsageError(f"--num-classes must be at least 2, got {args.num_classes}")
    if args.run_name is not None and not args.run_name.strip():
        raise UsageError("--run-name must not be empty")
    if getattr(args, "resume", None) and args.resume != "auto":
        if not Path(args.resume).is_file():
            raise UsageError(f"--resume {args.resume}: no such checkpoint file")
    if getattr(args, "checkpoint_every", 0) or getattr(args, "resume", None) == "auto":
        check_folder_can_be_made(args.checkpoint_dir, "--checkpoint-dir")
    if getattr(args, "sync", "every-step") == "local-sgd":
        if args.comm_hook != "none":
            raise UsageError(f"--sync local-sgd replaces DDP's gradient all-reduce with its "
                             f"own hook; drop --comm-hook {args.comm_hook}")
        args.average_every = args.average_every or DEFAULT_AVERAGE_EVERY
    elif getattr(args, "average_every", None) is not None \
            or getattr(args, "local_sgd_warmup", None) is not None:
        raise UsageError("--average-every and --local-sgd-warmup need --sync local-sgd")
    if getattr(args, "partition", "iid") == "dirichlet" and args.data in ("synthetic", "fake"):
        raise UsageError(f"--partition dirichlet needs labelled images: --data {args.data} "
                         f"has random labels (use --data shapes, imagefolder or cifar10)")
    if getattr(args, "static_graph", False) and args.grad_accum_steps > 1:
        # DDP's static graph expects every backward to all-reduce; no_sync skips some.
        raise UsageError("--static-graph cannot be combined with --grad-accum-steps > 1 "
                         "(DDP's static graph does not support no_sync); drop one of them")


def check_backend(requested: str, device: str, local_world_size: int) -> None:
    """Refuse, before any work, the combinations that cannot run."""
    import torch.distributed as dist

    from labs import envinfo

    wants_cpu = device == "cpu" or envinfo.gpu_count() == 0
    if requested == "nccl" and wants_cpu:
        raise UsageError("--backend nccl needs CUDA GPUs; on the CPU use --backend gloo "
                         "(or auto)")
    if requested in ("nccl", "auto") and not wants_cpu and local_world_size > envinfo.gpu_count():
        raise UsageError(
            f"{local_world_size} ranks on this node but {envinfo.gpu_count()} GPU(s): NCCL cannot "
            f"put two ranks on one GPU. Use at most {envinfo.gpu_count()} process(es) per node, "
            f"or --backend gloo to rehearse the multi-rank code path on shared GPUs "
            f"(correct but slow), or --device cpu")
    if requested == "gloo" and not dist.is_gloo_available():
        raise UsageError("--backend gloo: this PyTorch build has no gloo")
    if requested == "nccl" and not dist.is_nccl_available():
        raise UsageError("--backend nccl: this PyTorch build has no NCCL; use gloo")


def check_launch(args) -> None:
    """Refuse, before any rank starts, the launches that cannot work (cli.parse_args calls
    it for 04: in the parent for --nproc, in every rank under torchrun)."""
    from labs import envinfo

    started_by_torchrun = (os.environ.get("LOCAL_RANK") is not None
                           and os.environ.get("LAB_LAUNCHER") != "spawn")
    if args.nproc and started_by_torchrun:
        raise UsageError("--nproc starts its own processes; do not combine it with torchrun")
    if args.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {args.device}: 04 takes auto, cpu or cuda (each rank "
                         f"picks its GPU from its local rank)")
    if args.device == "cuda" and envinfo.gpu_count() == 0:
        raise UsageError("--device cuda: no CUDA GPU is visible on this machine")
    local_world_size = args.nproc or env_int("LOCAL_WORLD_SIZE", default=1, minimum=1)
    check_backend(args.backend, args.device, local_world_size)
    if args.sync_bn and (args.device == "cpu" or envinfo.gpu_count() == 0):
        raise UsageError("--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU kernel); "
                         "drop it on the CPU")


def check_early(parse_args: Callable[..., object], *args, **kwargs) -> None:
    """Parse the command line before the heavy imports: ``--help``, and every mistake
    ``parse_args(*args, **kwargs)`` finds without torch, are answered in a fraction of a
    second instead of after the seconds torch takes to load. Bad input: one line, exit
    status 2 (as ``run``)."""
    run(lambda: parse_args(*args, **kwargs))


class _ReaderMayLeave:
    """stdout or stderr, such that a reader who left (``| head -1``, a pager quit: EPIPE;
    an SSH session gone: EIO) costs the output, never the run: after a failed write the
    stream writes to os.devnull. Also at exit, when Python flushes it one last time."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no file descriptor (a StringIO)
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def protect_output() -> None:
    """A closed stdout or stderr, or one whose encoding lacks a character the lab prints
    (cp1252 and "━"), never fails a run: the reader's loss, not the run's."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, _ReaderMayLeave):
            continue
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):  # not a text file (a test's StringIO)
            pass
        setattr(sys, name, _ReaderMayLeave(stream))


def run(main) -> None:
    """Run a step's main(); a UsageError becomes one line on stderr and exit status 2."""
    prog = Path(sys.argv[0]).name
    protect_output()
    try:
        main()
    except UsageError as err:
        sys.stderr.write(f"{prog}: error: {err}\n")  # one write: ranks do not interleave
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 - only allocation failures are handled here
        if not is_allocation_failure(err):
            raise
        # Inside training the result guard records an `oom` result; this is before it
        # (building the data set or the model), so there is no run to record yet.
        first = first_line(err, type(err).__name__)[:200]
        sys.stderr.write(f"{prog}: out of memory before training started ({first}); try a "
                         f"smaller --img-size, --batch-size or --dataset-size\n")
        sys.exit(3)


def is_allocation_failure(err: BaseException) -> bool:
    """An allocation that failed: MemoryError, torch's OutOfMemoryError (CUDA), or the
    RuntimeError its CPU allocator raises. By name: this module never imports torch."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text
                                              or "not enough memory" in text)
