"""A results folder as a reviewer built it on two machines: the fixture of the report's
acceptance tests (tests/test_report_machines.py, tests/test_report_screens.py).

``build(folder, real)`` writes 17 files into ``folder``: 14 completed runs, one run that
ran out of memory and two step-01 files. Every run is a copy of ``real`` (a genuine
``02 --preset smoke`` record) turned by ``test_report.make_run`` into ResNet-50 at 224 px
on the lab's ``shapes`` data (evaluated after each of 4 epochs, target 50 %), then given
the machine it ran on: its ``environment`` block (host, CPU, GPUs, versions), its devices'
host, name and capacity, its own epoch times, commands and start times.

Machine A, ``dgx-h100``: 8 × NVIDIA H100 80GB HBM3 (80 GiB), NVLink (NV18) between every
pair, all-reduce busbw up to 318.4 GB/s (``environment_dgx-h100.json``). Per-device
batch 64 everywhere.

    method      amp   img/s    speed-up  efficiency  final acc.  planted
    Single      off    1,100   baseline              65.5 %      fp32 baseline (tf32 on)
    Single      bf16   1,750   baseline              66.0 %      AMP baseline
    DP ×2       off    1,496   1.36×     68 %        65.0 %
    DP ×4       off    2,112   1.92×     48 %        64.0 %
    DP ×8       off    3,520   3.20×     40 %        61.0 %      GPU 0 31 GiB / others 11;
                                                                 GPU 0 38 % busy, others 19
    DDP ×2      bf16   3,430   1.96×     98 %        65.0 %
    DDP ×4      bf16   6,790   3.88×     97 %        62.0 %
    DDP ×8      bf16  12,880   7.36×     92 %        49.0 %      the fastest run of A, and
                                                                 it NEVER reaches the 50 %
                                                                 target: not a recommendation
    DDP ×8 b512/device: status "oom"                             the unfinished run

Machine B, ``ws-4090``: 4 × NVIDIA GeForce RTX 4090 (24 GiB), PCIe only (PHB / NODE /
SYS, no peer access), all-reduce busbw up to 9.2 GB/s (``environment_ws-4090.json``).

    method      amp   img/s    speed-up  efficiency  final acc.  planted
    Single      off      620   baseline              65.5 %
    Single      bf16   1,300   baseline              66.0 %
    DP ×2       off    1,010   1.63×     81 %        65.0 %
    DP ×4       off    1,373   2.21×     55 %        64.0 %      NOISY: p10–p90 = 40 % of
                                                                 the median (limit 25 %)
    DDP ×2      bf16   2,808   2.16×    108 %        65.0 %      SUPERLINEAR (limit 105 %)
    DDP ×4      bf16   4,290   3.30×     83 %        62.0 %

The figures a flagged run must never lend to a headline or verdict are in ``FLAGGED``.
Nothing here needs torch: ``labs.bandwidth`` is plain Python.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from test_report import GIB, H100, OOM_REASON, make_run, write

from labs.bandwidth import interpolate_busbw, predict_allreduce_s

RTX4090 = "NVIDIA GeForce RTX 4090"
RESNET50_GRADIENT_BYTES = 102_228_128
DATASET = 64_000      # training images per epoch (shapes data)
EPOCHS = 4
BATCH = 64            # images per device
TARGET = 0.5

ENV_A = "environment_dgx-h100.json"
ENV_B = "environment_ws-4090.json"

MACHINES = {
    "dgx-h100": {
        "gpu": H100, "count": 8, "memory": 80 * GIB, "cc": "9.0", "sms": 132,
        "cpu_model": "Intel(R) Xeon(R) Platinum 8480+", "cpu_count": 224,
        "ram_bytes": 2048 * GIB, "driver": "550.90.07", "power": 610.0,
        "platform": "Linux-5.15.0-119-generic-x86_64-with-glibc2.35", "day": "2026-03-10",
        "env_file": ENV_A, "busbw": (38.5, 121.0, 236.4, 301.2, 318.4),
        "matmul": {"fp32": 51.2, "tf32": 378.0, "bf16": 702.5}, "copy": (53.6, 51.9),
    },
    "ws-4090": {
        "gpu": RTX4090, "count": 4, "memory": 24 * GIB, "cc": "8.9", "sms": 128,
        "cpu_model": "Intel(R) Xeon(R) Gold 6430", "cpu_count": 128,
        "ram_bytes": 512 * GIB, "driver": "550.120", "power": 405.0,
        "platform": "Linux-6.8.0-45-generic-x86_64-with-glibc2.39", "day": "2026-03-11",
        "env_file": ENV_B, "busbw": (3.1, 6.4, 8.5, 9.0, 9.2),
        "matmul": {"fp32": 78.4, "tf32": 81.7, "bf16": 163.9}, "copy": (24.6, 26.1),
    },
}

# The strings the planted runs' figures take in the report (labs.fmt: times, rate, pct).
SUPERLINEAR_SPEEDUP = "2.16×"       # ws-4090 DDP ×2: 2,808 / 1,300
SUPERLINEAR_EFFICIENCY = "108%"
NOISY_THROUGHPUT = "1,373"          # ws-4090 DP ×4
FLAGGED = (SUPERLINEAR_SPEEDUP, SUPERLINEAR_EFFICIENCY, NOISY_THROUGHPUT)
MISSED_TARGET = "DDP ×8"            # dgx-h100: the fastest run, 49.0 % < 50 % target
OOM_RUN = "resnet50-b4096-bf16"     # dgx-h100 DDP ×8 at 512 per device

# (machine, strategy, devices, amp, img/s, accuracy per epoch, memory GiB per device,
#  utilisation % per device, what is planted)
H, W = "dgx-h100", "ws-4090"
RUNS = [
    (H, "single", 1, "off", 1100.0, (0.33, 0.52, 0.62, 0.655), [12.4], [97], ""),
    (H, "single", 1, "bf16", 1750.0, (0.34, 0.53, 0.62, 0.660), [8.1], [96], ""),
    (H, "dp", 2, "off", 1496.0, (0.33, 0.51, 0.61, 0.65), [19.6, 11.0], [71, 52], ""),
    (H, "dp", 4, "off", 2112.0, (0.30, 0.50, 0.60, 0.64), [24.3] + [11.0] * 3,
     [54] + [31] * 3, ""),
    (H, "dp", 8, "off", 3520.0, (0.27, 0.46, 0.56, 0.61), [31.0] + [11.0] * 7,
     [38] + [19] * 7, "GPU 0 memory and utilisation above the others"),
    (H, "ddp", 2, "bf16", 3430.0, (0.32, 0.51, 0.61, 0.65), [8.6] * 2, [96] * 2, ""),
    (H, "ddp", 4, "bf16", 6790.0, (0.29, 0.47, 0.57, 0.62), [8.6] * 4, [95] * 4, ""),
    (H, "ddp", 8, "bf16", 12880.0, (0.21, 0.36, 0.44, 0.49), [8.6] * 8, [93] * 8,
     "fastest on dgx-h100, never reaches the 50 % target"),
    (W, "single", 1, "off", 620.0, (0.33, 0.52, 0.62, 0.655), [12.4], [98], ""),
    (W, "single", 1, "bf16", 1300.0, (0.34, 0.53, 0.62, 0.660), [8.1], [97], ""),
    (W, "dp", 2, "off", 1010.0, (0.33, 0.51, 0.61, 0.65), [19.6, 11.0], [78, 61], ""),
    (W, "dp", 4, "off", 1373.0, (0.30, 0.50, 0.60, 0.64), [22.8] + [11.0] * 3,
     [57] + [36] * 3, "noisy: p10-p90 spread 40 % of the median"),
    (W, "ddp", 2, "bf16", 2808.0, (0.32, 0.51, 0.61, 0.65), [8.6] * 2, [97] * 2,
     "superlinear: 2.16× on 2 GPUs, 108 % efficiency"),
    (W, "ddp", 4, "bf16", 4290.0, (0.29, 0.47, 0.57, 0.62), [8.6] * 4, [94] * 4, ""),
]
NOISY_SPREAD = (0.78, 1.18)   # p10 and p90 as factors of the median: 40 % apart
LAB_SCRIPT = {"single": "02_baseline_single_gpu.py", "dp": "03_dataparallel_training.py",
              "ddp": "04_ddp_training.py"}


def _run_id(text: str) -> str:
    """12 hex digits, fixed per run, so file names are the same every time."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    while "318" in digest[:12]:  # the tests look for H100's 318 GB/s by its digits
        digest = digest[1:]
    return digest[:12]


def _gpus(machine: dict) -> list[dict]:
    return [{"index": i, "name": machine["gpu"], "total_memory_bytes": machine["memory"],
             "compute_capability": machine["cc"], "multiprocessors": machine["sms"]}
            for i in range(machine["count"])]


def _environment(real: dict, host: str) -> dict:
    m = MACHINES[host]
    env = copy.deepcopy(real["environment"])
    env.update(host=host, platform=m["platform"], cpu_model=m["cpu_model"],
               cpu_count=m["cpu_count"], ram_bytes=m["ram_bytes"], python="3.11.9",
               torch="2.5.1+cu124", torchvision="0.20.1+cu124", cuda="12.4", cudnn=90100,
               nccl="2.21.5", driver=m["driver"], gpus=_gpus(m))
    return env


def _command(strategy: str, n: int, amp: str, batch: int) -> str:
    args = (f"--model resnet50 --img-size 224 --data shapes --dataset-size {DATASET} "
            f"--epochs {EPOCHS} --amp {amp}")
    if strategy == "ddp":
        return (f"torchrun --nproc_per_node={n} {LAB_SCRIPT[strategy]} {args} "
                f"--batch-size {batch}")
    if strategy == "dp":
        gpus = ",".join(map(str, range(n)))
        return f"python {LAB_SCRIPT[strategy]} {args} --batch-size {batch * n} --gpus {gpus}"
    return f"python {LAB_SCRIPT[strategy]} {args} --batch-size {batch}"


def _on_machine(record: dict, real: dict, host: str, *, amp: str, started: str,
                finished: str, utilisation: list[float], epoch_s: float,
                batch: int = BATCH) -> dict:
    """A make_run record moved onto ``host``: its environment, devices, settings, times."""
    m = MACHINES[host]
    strategy, n = record["config"]["strategy"], len(record["world"]["devices"])
    record["environment"] = _environment(real, host)
    record.update(started_at=started, finished_at=finished,
                  command=_command(strategy, n, amp, batch))
    name = f"resnet50-b{record['config']['global_batch_size']}-{amp}"
    record["run_name"] = name
    record["run_id"] = _run_id(f"{host}/{strategy}/{n}/{amp}/{batch}/{record['status']}")
    steps = max(1, DATASET // record["config"]["global_batch_size"])
    record["config"].update(
        preset=None, model="resnet50", img_size=224, num_classes=10, data="shapes",
        data_dir=None, dataset_size=DATASET, train_set={"images": DATASET, "classes": None},
        epochs=EPOCHS, steps_per_epoch=steps, warmup_steps=10, amp_requested=amp,
        tf32=True, num_workers=0 if strategy == "ddp" else 8, seed=0,
        lr_warmup_steps=max(1, -(-steps * EPOCHS * 5 // 100)))
    if strategy == "dp":
        record["config"]["gpus"] = list(range(n))
    if strategy == "ddp":
        record["config"].update(comm_probe=True, static_graph=False,
                                find_unused_parameters=False, broadcast_buffers=False,
                                gradient_as_bucket_view=True, timeout_s=300.0,
                                checkpoint_every=0, resume=None)
        record["world"].update(local_world_size=n, launcher="torchrun", restart_count=0,
                               resumed_from=None, start_epoch=0)
    metrics = record["metrics"]
    metrics.update(steps_measured=steps * EPOCHS - 10, warmup_steps=10,
                   epoch_time_s=[round(epoch_s * 1.12, 3)] + [round(epoch_s, 3)] * (EPOCHS - 1),
                   loss_per_epoch=[2.05, 1.42, 1.08, 0.91], final_loss=0.91)
    for device, busy in zip(metrics["per_device"], utilisation):
        device.update(total_memory_bytes=m["memory"], utilization_pct=float(busy),
                      power_w=round(m["power"] * busy / 100, 1), data_pool_bytes=0)
    return record


def _sweep(busbw: tuple[float, ...], world: int) -> list[dict]:
    """nccl's sweep as 01 records it: 1 MiB to 256 MiB in steps of ×4."""
    rows = []
    for k, bus in zip(range(20, 29, 2), busbw):
        size = 2**k
        algbw = bus * world / (2 * (world - 1))
        rows.append({"size_bytes": size, "time_s": size / (algbw * 1e9),
                     "algbw_gb_s": algbw, "busbw_gb_s": bus, "correct": True})
    return rows


def bandwidth_figures(host: str) -> list[float]:
    """Every GB/s figure step 01 recorded on ``host``, or that a report derives from its file:
    the all-reduce sweep's bus and algorithm bandwidths, the bus bandwidth interpolated at
    ResNet-50's gradient size, the host <-> device copies. dgx-h100's span 22.0–318.4 GB/s,
    ws-4090's 2.07–26.1 GB/s: none of one machine's is near one of the other's."""
    m = MACHINES[host]
    sweep = _sweep(m["busbw"], m["count"])
    return sorted({*m["busbw"], *(r["algbw_gb_s"] for r in sweep), *m["copy"],
                   interpolate_busbw(sweep, RESNET50_GRADIENT_BYTES)})


def _topology(host: str) -> str:
    """``nvidia-smi topo -m`` as it prints on each machine."""
    if host == "dgx-h100":
        n, nics = 8, 4
        numa = lambda i: 0 if i < 4 else 1  # noqa: E731
        link = lambda i, j: "NV18"  # noqa: E731
        nic = lambda i, k: "PXB" if i // 2 == k else ("NODE" if numa(i) == k // 2  # noqa: E731
                                                       else "SYS")
        affinity = ("0-55,112-167", "56-111,168-223")
    else:
        n, nics = 4, 1
        numa = lambda i: 0 if i < 2 else 1  # noqa: E731
        link = lambda i, j: "NODE" if numa(i) == numa(j) else "SYS"  # noqa: E731
        nic = lambda i, k: "PHB" if i == 0 else ("NODE" if numa(i) == 0 else "SYS")  # noqa: E731
        affinity = ("0-31,64-95", "32-63,96-127")
    names = [f"GPU{i}" for i in range(n)] + [f"NIC{k}" for k in range(nics)]
    lines = ["\t" + "\t".join(names) + "\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID"]
    for i in range(n):
        cells = [" X " if i == j else link(i, j) for j in range(n)]
        cells += [nic(i, k) for k in range(nics)]
        lines.append(f"GPU{i}\t" + "\t".join(cells)
                     + f"\t{affinity[numa(i)]}\t{numa(i)}\t\tN/A")
    for k in range(nics):
        cells = [nic(i, k) for i in range(n)]
        cells += [" X " if k == q else "NODE" for q in range(nics)]
        lines.append(f"NIC{k}\t" + "\t".join(cells))
    lines += ["", "Legend:", "",
              "  X    = Self",
              "  SYS  = Connection traversing PCIe as well as the SMP interconnect between "
              "NUMA nodes (e.g., QPI/UPI)",
              "  NODE = Connection traversing PCIe as well as the interconnect between PCIe "
              "Host Bridges within a NUMA node",
              "  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically "
              "the CPU)",
              "  PXB  = Connection traversing multiple PCIe bridges (without traversing the "
              "PCIe Host Bridge)",
              "  PIX  = Connection traversing at most a single PCIe bridge",
              "  NV#  = Connection traversing a bonded set of # NVLinks",
              "", "NIC Legend:", ""]
    lines += [f"  NIC{k}: mlx5_{k}" for k in range(nics)]
    return "\n".join(lines)


def environment_record(real: dict, host: str) -> dict:
    """Step 01's file on ``host``, in the shape 01_environment_check.py writes."""
    m = MACHINES[host]
    env = _environment(real, host)
    n = m["count"]
    nvlink = host == "dgx-h100"
    gpus = [{**g, "peer_access": [j for j in range(n) if j != g["index"]] if nvlink else []}
            for g in env["gpus"]]
    sweep = _sweep(m["busbw"], n)
    predicted = predict_allreduce_s(RESNET50_GRADIENT_BYTES, n, sweep)
    matmul = [{"device": f"cuda:{g['index']}", "dtype": dtype, "size": 8192,
               "time_s": 2 * 8192**3 / (tflops * 1e12), "tflops": tflops}
              for g in env["gpus"] for dtype, tflops in m["matmul"].items()]
    matmul.append({"device": "cpu", "dtype": "fp32", "size": 1024, "time_s": 0.0021,
                   "tflops": 2 * 1024**3 / 0.0021 / 1e12})
    copies = [{"device": f"cuda:{g['index']}", "direction": d, "size_bytes": 256 * 2**20,
               "gb_s": gb_s} for g in env["gpus"] for d, gb_s in zip(("h2d", "d2h"),
                                                                    m["copy"])]
    memory = f"{m['memory'] / GIB:.1f} GiB"
    pairs = ", ".join(f"{i}-{j}" for i in range(n) for j in range(i + 1, n))
    recommendations = [
        f"Per-GPU batch for resnet50 at 224 px on {memory} ({m['gpu']}, the smallest GPU): "
        f"up to {768 if nvlink else 224} with --amp bf16 --channels-last, "
        f"{384 if nvlink else 112} with --amp off (fp32); from 22 and 44 GiB at batch 256, "
        f"scaled linearly with 15% headroom.",
        f"DataLoader workers for --data fake or real images: --num-workers 8 per process "
        f"({m['cpu_count']} CPU cores shared by {n} process(es), one core left for each "
        f"training process); --data synthetic needs none.",
        f"{n} GPUs: every step is meaningful; compare 03 --gpus "
        f"{','.join(map(str, range(n)))} and 04 --nproc {n} with 02 for scaling efficiency.",
    ]
    if not nvlink:
        recommendations.append(f"No peer-to-peer access between GPUs {pairs}: their traffic "
                               f"goes through host memory, which slows DataParallel and "
                               f"all-reduce.")
    recommendations.append(
        f"All-reducing resnet50's gradients ({RESNET50_GRADIENT_BYTES / 1e6:.0f} MB fp32) over "
        f"{n} nccl ranks should take about {predicted * 1e3:.1f} ms per step; DDP hides it "
        f"behind the backward pass only when backward takes longer.")
    return {
        "schema_version": 1, "kind": "environment",
        "written_at": f"{m['day']}T08:41:07+00:00",
        "command": "python 01_environment_check.py --require-gpus 2",
        "environment": env, "gpus": gpus, "topology": _topology(host),
        "disk_free_bytes": 1_830 * GIB,
        "backends": {"nccl": True, "gloo": True, "mpi": False},
        "probes": {"matmul": matmul, "copy_bandwidth": copies,
                   "allreduce": {"backend": "nccl", "world_size": n, "device": "cuda",
                                 "results": sweep, "all_correct": True,
                                 "predicted_gradient_allreduce_s": predicted,
                                 "gradient_model": "resnet50",
                                 "gradient_bytes": RESNET50_GRADIENT_BYTES}},
        "recommendations": recommendations,
        "notes": [],
    }


def _file_name(record: dict) -> str:
    stamp = record["started_at"][:19].replace("-", "").replace(":", "") + "Z"
    return f"{record['lab']}_{record['run_name']}_{stamp}_{record['run_id']}.json"


def build(folder: Path, real: dict) -> Path:
    """Write the two machines' results into ``folder`` (created) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    minute = {H: 0, W: 0}
    for host, strategy, n, amp, throughput, accuracy, memory, busy, planted in RUNS:
        m = MACHINES[host]
        epoch_s = DATASET / throughput
        spread = NOISY_SPREAD if planted.startswith("noisy") else (0.97, 1.02)
        step = BATCH * n / throughput
        baseline_step = BATCH / next(r[4] for r in RUNS if r[0] == host
                                     and r[1] == "single" and r[3] == amp)
        record = make_run(
            real, strategy=strategy, n=n, throughput=throughput, gpu=m["gpu"], host=host,
            memory_gib=memory, batch=BATCH, amp=amp, spread=spread,
            exposed_s=max(0.0004, step - baseline_step) if strategy == "ddp" else None,
            gradient_bytes=RESNET50_GRADIENT_BYTES, eval=list(accuracy), epoch_s=epoch_s,
            data_wait=0.004)
        start = minute[host]
        minute[host] += 4 + int(EPOCHS * epoch_s * 1.1 / 60)
        end = minute[host] - 1
        day = m["day"]
        record = _on_machine(
            record, real, host, amp=amp, utilisation=busy, epoch_s=epoch_s,
            started=f"{day}T{9 + start // 60:02d}:{start % 60:02d}:05+00:00",
            finished=f"{day}T{9 + end // 60:02d}:{end % 60:02d}:41+00:00")
        write(folder, _file_name(record), record)
    # The unfinished run: DDP ×8 on dgx-h100 at 512 images per device ran out of memory.
    oom = make_run(real, strategy="ddp", n=8, throughput=1.0, gpu=H100, host=H,
                   memory_gib=[79.1] * 8, batch=512, amp="bf16", status="oom",
                   gradient_bytes=RESNET50_GRADIENT_BYTES)
    start = minute[H]
    oom = _on_machine(oom, real, H, amp="bf16", utilisation=[0] * 8, epoch_s=1.0,
                      batch=512, started=f"2026-03-10T{9 + start // 60:02d}:"
                      f"{start % 60:02d}:05+00:00",
                      finished=f"2026-03-10T{9 + start // 60:02d}:{start % 60:02d}:39+00:00")
    assert oom["run_name"] == OOM_RUN and oom["failure"]["reason"] == OOM_REASON
    oom["notes"].append("Stopped by CUDA out of memory during the first epoch.")
    write(folder, _file_name(oom), oom)
    write(folder, ENV_A, environment_record(real, H))
    write(folder, ENV_B, environment_record(real, W))
    return folder


def flagged_runs(folder: Path) -> dict[str, list[str]]:
    """What labs.report.analysis flags in ``folder``: label -> flag kinds (for checking
    the fixture itself)."""
    from labs.report import analysis, loading

    table = analysis.compare(analysis.run_frame(loading.load_folder(folder)))
    return {f"{row['label']} @ {row['hosts']}": [analysis.flag_kind(f) for f in row["flags"]]
            for _, row in table.iterrows() if row["flags"]}


if __name__ == "__main__":  # python tests/two_machines.py REAL_02_RESULT.json FOLDER
    import sys

    built = build(Path(sys.argv[2]), json.loads(Path(sys.argv[1]).read_text()))
    print(built, flagged_runs(built))
