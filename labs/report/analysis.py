"""From run records to the comparison: one row per run, one row per configuration.

``run_frame`` flattens each valid run into a row (pandas). ``compare`` aggregates
repeated runs of one configuration (median across runs, with the range of run medians),
finds each configuration's single-device baseline and computes speedup and scaling
efficiency:

    speedup    = throughput_N / throughput_baseline
    efficiency = throughput_N / (N x throughput_baseline)

N is the number of devices doing the work: the GPUs DataParallel splits each batch over,
or the DDP world size. The baseline is the median throughput of the ``02_baseline`` runs
of the same machine (``machine_key``: host, device model, CPU model on CPUs, torch) with
the same model, image size, per-device batch, precision, memory layout, compile setting,
data source and, on CPUs, threads per process. Another machine's baseline is never used:
the note says where it ran instead.

Runs that evaluated a validation split also get their accuracy curve, final accuracy and
time to the target accuracy, and the speed-up in time to accuracy it implies:

    time-to-accuracy speed-up = baseline's time to the target / this run's

``validity_flags`` then says, per configuration, why its figure cannot be trusted (noise,
a superlinear result, a wrapper faster than its baseline); the report headlines only rows
without flags.
"""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pandas as pd

from labs import fmt

METHOD = {"single": "Single", "dp": "DataParallel", "ddp": "DDP"}
STRATEGY_ORDER = {"single": 0, "dp": 1, "ddp": 2}
WORLD_SIZE_1 = "world size 1: scaling not measurable"
ELSEWHERE = "baseline only on another machine"  # the note of a run whose 02 ran elsewhere

# What must agree between a run and its baseline (besides the machine, ``machine_key``).
# cpu_threads: threads per process, where the devices are CPUs (on GPUs the CPU threads
# only launch kernels, and torchrun gives each rank 1 while a plain 02 takes them all).
# baseline_batch: the batch of the matching 02 run, the run's per-device batch (weak
# scaling) or, for a run recorded as strong scaling, its global batch.
BASELINE_FIELDS = ("model", "img_size", "baseline_batch", "amp", "channels_last",
                   "compile", "data", "cpu_threads")
# What makes two runs "the same configuration" (repeats are aggregated).
CONFIG_FIELDS = ("lab", "strategy", "n_devices", "world_size", "nnodes", "machine", "hardware",
                 *BASELINE_FIELDS, "per_device_batch_size", "global_batch_size",
                 "grad_accum_steps", "backend",
                 "bucket_cap_mb", "comm_hook", "static_graph", "sync_bn", "lr",
                 "target_accuracy", "sync", "average_every", "partition", "dirichlet_alpha")
FIELD_NAMES = {"model": "model", "img_size": "image size", "baseline_batch":
               "per-device batch", "amp": "amp", "channels_last": "channels_last",
               "compile": "torch.compile", "data": "data source", "hardware": "device",
               "cpu_threads": "threads per process"}

# Validity: a figure outside these limits is flagged and never headlined.
SUPERLINEAR_LIMIT = 1.05      # scaling efficiency above this: noise or a wrong baseline
WRAPPER_FASTER_LIMIT = 1.10   # a world-size-1 wrapper can only add work to its baseline
SPREAD_LIMIT = 0.25           # p10-p90 (or repeat range) as a share of the median
RERUN = "rerun on a quiet machine, or repeat each run: python -m labs run --repeat 3"


# --- safe access: a valid run file still has free-form fields ----------------------------

def num(value) -> float | None:
    if isinstance(value, (np.integer, np.floating)):  # a value read back from a table
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def dig(record, *keys):
    for key in keys:
        if isinstance(record, dict):
            record = record.get(key)
        elif isinstance(record, list) and isinstance(key, int) and -len(record) <= key < len(record):
            record = record[key]
        else:
            return None
    return record


def dicts(value) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def numbers(value) -> list[float]:
    return [n for n in map(num, value) if n is not None] if isinstance(value, list) else []


def spread_of(block) -> tuple[float | None, float | None, float | None]:
    return tuple(num(dig(block, k)) for k in ("median", "p10", "p90"))


def median(values) -> float | None:
    values = [v for v in values if v is not None and not pd.isna(v)]
    return float(statistics.median(values)) if values else None


def scalar(value):
    """A config value usable as a grouping key (lists and dicts become text)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


# --- one row per run --------------------------------------------------------------------

def devices_used(record: dict) -> list[dict]:
    devices = dicts(dig(record, "world", "devices"))
    return devices or dicts(dig(record, "metrics", "per_device"))


def hardware_of(record: dict) -> tuple[str, bool]:
    """The device name(s) of a run, and whether every device is a CPU."""
    names, cpu = set(), True
    for entry in devices_used(record):
        name = entry.get("name")
        device = str(entry.get("device") or "")
        is_cpu = device.startswith("cpu") or name == "CPU"
        cpu = cpu and is_cpu
        names.add(str(name) if name else ("CPU" if is_cpu else "unknown device"))
    if not names:
        return "unknown device", False
    return " + ".join(sorted(names)), cpu


def primary_host(record: dict) -> str:
    """The host a run is filed under: that of its first device (rank 0, or DataParallel's
    GPU 0), else the host its environment block names."""
    for entry in devices_used(record):
        if entry.get("host"):
            return str(entry["host"])
    host = dig(record, "environment", "host")
    return str(host) if host else "unknown host"


def machine_key(record: dict) -> str:
    """The machine a run ran on: host, device model, CPU model (on CPUs: every CPU is named
    "CPU", and containers and VMs share host names) and torch version (another torch runs
    other kernels on the same chip). Runs are compared only within one machine."""
    hardware, cpu = hardware_of(record)
    env = record.get("environment") if isinstance(record.get("environment"), dict) else {}
    return json.dumps([primary_host(record), hardware,
                       scalar(env.get("cpu_model")) if cpu else None, scalar(env.get("torch"))])


def machine_words(row) -> str:
    """How a sentence names a row's machine: "box-a (CPU Intel Xeon, torch 2.5.1)"."""
    device = f"CPU {_describe(row['cpu_model'])}" if row["cpu"] else \
        short_hardware(str(row["hardware"]))
    return f"{row['host']} ({device}, torch {_describe(row['torch'])})"


def device_count(record: dict) -> int:
    strategy = dig(record, "config", "strategy")
    world = dig(record, "world", "world_size")
    world = world if isinstance(world, int) and world > 0 else 1
    if strategy == "dp":  # one process drives every GPU: N is the GPUs it splits over
        return max(1, len(devices_used(record)))
    if strategy == "ddp":
        return world
    return 1


def epoch_time(values: list[float]) -> float | None:
    """Median epoch time; the first epoch holds the warmup, so it is left out when there
    is more than one."""
    if len(values) > 1:
        values = values[1:]
    return median(values)


def device_capacities(record: dict, per_device: list[dict]) -> list[float | None]:
    """Total memory of each ``metrics.per_device`` entry: its own ``total_memory_bytes``
    (newer files), else the run's ``environment.gpus`` entry with the same index and name
    on the same host, else None."""
    env = record.get("environment") if isinstance(record.get("environment"), dict) else {}
    gpus = {g["index"]: g for g in dicts(env.get("gpus")) if isinstance(g.get("index"), int)}
    capacities = []
    for device in per_device:
        total = num(device.get("total_memory_bytes"))
        index = device.get("index")
        gpu = gpus.get(index) if isinstance(index, int) else None
        if total is None and gpu and gpu.get("name") == device.get("name") and \
                device.get("host") in (None, env.get("host")):
            total = num(gpu.get("total_memory_bytes"))
        capacities.append(total)
    return capacities


def spread_share(median_value, p10, p90) -> float | None:
    """The p10-p90 width as a share of the median."""
    if median_value is None or p10 is None or p90 is None or not median_value > 0:
        return None
    return (p90 - p10) / median_value


def rank_details(metrics: dict) -> list[dict]:
    out = []
    for r in dicts(metrics.get("per_rank")):
        step = spread_of(r.get("step_time_s"))
        out.append({"rank": num(r.get("rank")), "host": r.get("host"),
                    "median": step[0], "p10": step[1], "p90": step[2],
                    "compute_median": num(dig(r, "compute_only_step_time_s", "median")),
                    "data_wait_s": num(r.get("data_wait_s"))})
    return out


def device_details(metrics: dict) -> list[dict]:
    return [{"index": d.get("index") if isinstance(d.get("index"), int) else i,
             "rank": d.get("rank") if isinstance(d.get("rank"), int) else None,
             "step_time_s": num(d.get("step_time_s")),
             "utilization_pct": num(d.get("utilization_pct")),
             "power_w": num(d.get("power_w"))}
            for i, d in enumerate(dicts(metrics.get("per_device")))]


def training_peak(device: dict) -> float | None:
    """A device's peak allocated memory less the synthetic data pool resident on it."""
    peak = num(device.get("peak_allocated_bytes"))
    return None if peak is None else peak - (num(device.get("data_pool_bytes")) or 0)


def eval_points(metrics: dict) -> list[dict]:
    """``metrics.eval`` as {epoch, accuracy, elapsed_s}, the entries with an accuracy."""
    points = []
    for e in dicts(metrics.get("eval")):
        epoch, accuracy = num(e.get("epoch")), num(e.get("accuracy"))
        if epoch is not None and accuracy is not None:
            points.append({"epoch": int(epoch), "accuracy": accuracy,
                           "elapsed_s": num(e.get("elapsed_s"))})
    return points


def run_row(record: dict, file: str) -> dict:
    cfg = record.get("config") if isinstance(record.get("config"), dict) else {}
    metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
    world = record.get("world") if isinstance(record.get("world"), dict) else {}
    hardware, cpu = hardware_of(record)
    tp = spread_of(metrics.get("throughput_img_s"))
    st = spread_of(metrics.get("step_time_s"))
    compute = spread_of(metrics.get("compute_only_step_time_s"))
    per_device = dicts(metrics.get("per_device"))
    memory = [training_peak(d) for d in per_device]
    measured = [m for m in memory if m is not None]
    strategy = cfg.get("strategy")
    n = device_count(record)
    hosts = sorted({str(d.get("host")) for d in devices_used(record) if d.get("host")})
    host = primary_host(record)
    env = record.get("environment") if isinstance(record.get("environment"), dict) else {}
    evals = eval_points(metrics)
    return {
        "file": file,
        "run_id": str(record.get("run_id")),
        "run_name": str(record.get("run_name")),
        "lab": record.get("lab"),
        "strategy": strategy,
        "method": METHOD.get(strategy, str(strategy)),
        "n_devices": n,
        "world_size": world.get("world_size"),
        "nnodes": scalar(world.get("nnodes")),
        "hardware": hardware,
        "cpu": cpu,
        "hosts": ", ".join(hosts),
        "host": host,
        "machine": machine_key(record),
        "cpu_model": scalar(env.get("cpu_model")),
        "torch": scalar(env.get("torch")),
        "tf32": scalar(cfg.get("tf32")),
        "scaling": scalar(cfg.get("scaling")),
        "num_classes": scalar(cfg.get("num_classes")),
        **{f: scalar(cfg.get(f)) for f in BASELINE_FIELDS
           if f not in ("cpu_threads", "baseline_batch")},
        "per_device_batch_size": scalar(cfg.get("per_device_batch_size")),
        "baseline_batch": baseline_batch(cfg),
        "bucket_bytes": [b for b in numbers(cfg.get("bucket_bytes")) if b > 0],
        "threads_per_process": scalar(cfg.get("threads_per_process")),
        "cpu_threads": scalar(cfg.get("threads_per_process")) if cpu else None,
        "global_batch_size": scalar(cfg.get("global_batch_size")),
        "grad_accum_steps": scalar(cfg.get("grad_accum_steps")),
        "backend": scalar(cfg.get("backend") or world.get("backend")),
        "bucket_cap_mb": scalar(cfg.get("bucket_cap_mb")),
        "comm_hook": scalar(cfg.get("comm_hook")),
        "static_graph": scalar(cfg.get("static_graph")),
        "sync_bn": scalar(cfg.get("sync_bn")),
        "epoch_time_s": epoch_time(numbers(metrics.get("epoch_time_s"))),
        "tp_median": tp[0], "tp_p10": tp[1], "tp_p90": tp[2],
        "step_median": st[0], "step_p10": st[1], "step_p90": st[2],
        "tp_spread": spread_share(*tp),
        "compute_median": compute[0], "compute_p10": compute[1], "compute_p90": compute[2],
        "exposed_comm_s": num(dig(metrics, "exposed_comm_s", "median")),
        "trace": dicts(metrics.get("trace")),
        "sync": scalar(cfg.get("sync")) or ("every-step" if strategy == "ddp" else None),
        "average_every": scalar(cfg.get("average_every")),
        "partition": scalar(cfg.get("partition")) or ("iid" if strategy == "ddp" else None),
        "dirichlet_alpha": num(cfg.get("dirichlet_alpha")),
        "comm_bytes_per_sample": num(metrics.get("comm_bytes_per_sample")),
        "sync_words": f"local SGD every {cfg.get('average_every')}"
        if cfg.get("sync") == "local-sgd" else "",
        "partition_words": f"Dirichlet α {num(cfg.get('dirichlet_alpha')) or 0:g}"
        if cfg.get("partition") == "dirichlet" else "",
        "divergence": num(dig(metrics, "local_sgd", "divergence", "median")),
        "gradient_bytes": num(cfg.get("gradient_bytes")),
        "host_rss": num(metrics.get("host_peak_rss_bytes")),
        "cpu_count": num(dig(record, "environment", "cpu_count")),
        "slowest_rank": num(metrics.get("slowest_rank")),
        "rank_detail": rank_details(metrics),
        "device_detail": device_details(metrics),
        "data_wait_fraction": num(metrics.get("data_wait_fraction")),
        "mem_max": max(measured) if measured else None,
        "mem_min": min(measured) if measured else None,
        "mem_by_device": memory,
        "mem_capacity": device_capacities(record, per_device),
        "per_rank": [(num(dig(r, "rank")), *spread_of(r.get("step_time_s")))
                     for r in dicts(metrics.get("per_rank"))],
        "loss_per_epoch": numbers(metrics.get("loss_per_epoch")),
        "eval": evals,
        "final_accuracy": (None if not evals else num(metrics.get("final_accuracy"))
                           if num(metrics.get("final_accuracy")) is not None
                           else evals[-1]["accuracy"]),
        "time_to_accuracy_s": num(metrics.get("time_to_accuracy_s")),
        "target_accuracy": num(cfg.get("target_accuracy")),
        "lr": num(cfg.get("lr")),
        "lr_rule": scalar(cfg.get("lr_rule")),
        "warmup_steps": num(metrics.get("warmup_steps")),
        "steps_measured": num(metrics.get("steps_measured")),
        "started_at": str(record.get("started_at") or ""),
        "command": str(record.get("command") or ""),
    }


def baseline_batch(cfg: dict):
    """The batch per device of the 02 run this one compares with: its own per-device
    batch, or under strong scaling (the global batch held fixed) its global batch."""
    if cfg.get("scaling") != "strong" or cfg.get("strategy") == "single":
        return scalar(cfg.get("per_device_batch_size"))
    total, accumulate = num(cfg.get("global_batch_size")), num(cfg.get("grad_accum_steps"))
    if total is None:
        return None
    share = total / (accumulate or 1)
    return int(share) if share == int(share) else share


def run_frame(folder) -> pd.DataFrame:
    """One row per completed run of a ``loading.Folder``. A run that passes validation but
    cannot be analysed (odd values in free-form fields) moves to the skipped files."""
    rows = []
    for record in list(folder.runs):
        try:
            rows.append(run_row(record, folder.file_of(record)))
        except Exception as err:  # noqa: BLE001 - one odd file must not cost the report
            folder.runs.remove(record)
            folder.skipped.append((folder.file_of(record),
                                   f"could not be analysed ({type(err).__name__}: {err})"))
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["config_id"] = frame[list(CONFIG_FIELDS)].apply(
        lambda row: json.dumps([scalar(v) for v in row], default=str), axis=1)
    frame["family"] = frame[["hardware", *BASELINE_FIELDS]].apply(
        lambda row: json.dumps([scalar(v) for v in row], default=str), axis=1)
    return frame.sort_values(["started_at", "file"]).reset_index(drop=True)


# --- scaling ----------------------------------------------------------------------------

def scaling(throughput: float, baseline: float, n: int) -> tuple[float, float]:
    """(speedup, efficiency) of ``throughput`` on ``n`` devices against ``baseline``."""
    speedup = throughput / baseline
    return speedup, speedup / n


def _describe(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "on" if value else "off"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not recorded"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def same_setting_key(value) -> str:
    """A value as compared between runs: a setting missing from a file (None or NaN,
    depending on the column's dtype) equals a setting missing from another."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not recorded"
    return str(value)


def baseline_for(row: pd.Series, runs: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The 02 runs of ``row``'s machine that match it, or an empty frame and the reason
    there is none (``ELSEWHERE`` and the machines, where only other machines have one)."""
    single = runs[runs["strategy"] == "single"]
    if " + " in row["hardware"]:
        return single.iloc[0:0], (f"no baseline: the run mixes device types "
                                  f"({row['hardware']})")
    fields = ["hardware", *BASELINE_FIELDS]
    same = single
    for f in fields:
        same = same[same[f].map(same_setting_key) == same_setting_key(row[f])]
    here = same[same["machine"] == row["machine"]]
    if not here.empty:
        return here, None
    if not same.empty:  # a match, but another machine's speed says nothing of this one's
        where = "; ".join(dict.fromkeys(machine_words(b) for _, b in same.iterrows()))
        return here, f"{ELSEWHERE}: {where}"
    if single.empty and not row["cpu"]:
        return same, ("no baseline: the folder has no completed 02_baseline run "
                      "to compare with")
    if single[single["hardware"] == row["hardware"]].empty and not row["cpu"]:
        elsewhere = ", ".join(sorted(set(single["hardware"])))
        return same, (f"no matching baseline: no 02 run on {row['hardware']} "
                      f"(02 runs exist on {elsewhere})")
    mine = single[single["machine"] == row["machine"]]
    if mine.empty:
        return same, f"no matching baseline: no 02 run on {machine_words(row)}"
    # Explain with the closest 02 run of this machine: which settings differ.
    diffs = mine.apply(lambda b: [f for f in fields if same_setting_key(b[f])
                                  != same_setting_key(row[f])], axis=1)
    closest = min(range(len(mine)), key=lambda i: len(diffs.iloc[i]))
    b = mine.iloc[closest]
    what = ", ".join(f"{FIELD_NAMES[f]} {_describe(b[f])} vs {_describe(row[f])}"
                     for f in diffs.iloc[closest])
    reason = (f"no matching baseline: the closest 02 run on this device "
              f"({b['run_name']}) differs in {what}")
    if "cpu_threads" in diffs.iloc[closest]:
        reason += (f"; run 02 with OMP_NUM_THREADS={_describe(row['threads_per_process'])}, "
                   "the threads each rank used")
    return same, reason


def compare(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration, with its baseline, speedup and efficiency."""
    if runs.empty:
        return pd.DataFrame()
    rows = []
    for config_id, group in runs.groupby("config_id", sort=False):
        first = group.iloc[0]
        row = {f: first[f] for f in (*CONFIG_FIELDS, "threads_per_process", "method", "cpu",
                                     "sync_words", "partition_words",
                                     "family", "lr_rule", "host", "cpu_model", "torch",
                                     "tf32", "scaling", "num_classes")}
        run_medians = group["tp_median"].dropna().tolist()
        mem_lists = [m for m in group["mem_by_device"] if m]
        width = max((len(m) for m in mem_lists), default=0)
        row.update(
            config_id=config_id,
            n_runs=len(group),
            run_names=list(group["run_name"]),
            files=list(group["file"]),
            hosts=", ".join(sorted({h for h in group["hosts"] if h})),
            epoch_time_s=median(group["epoch_time_s"]),
            tp_median=median(run_medians),
            tp_p10=median(group["tp_p10"]), tp_p90=median(group["tp_p90"]),
            tp_run_min=min(run_medians) if run_medians else None,
            tp_run_max=max(run_medians) if run_medians else None,
            tp_run_range=run_range(run_medians),
            tp_spread=spread_share(median(run_medians), median(group["tp_p10"]),
                                   median(group["tp_p90"])),
            compute_median=median(group["compute_median"]),
            compute_p10=median(group["compute_p10"]),
            compute_p90=median(group["compute_p90"]),
            exposed_comm_s=median(group["exposed_comm_s"]),
            gradient_bytes=median(group["gradient_bytes"]),
            bucket_bytes=group.iloc[-1]["bucket_bytes"],
            trace=next((t for t in reversed(list(group["trace"])) if t), []),
            comm_bytes_per_sample=median(group["comm_bytes_per_sample"]),
            divergence=median(group["divergence"]),
            host_rss=median(group["host_rss"]),
            cpu_count=median(group["cpu_count"]),
            slowest_rank=group.iloc[-1]["slowest_rank"],
            rank_detail=group.iloc[-1]["rank_detail"],
            device_detail=group.iloc[-1]["device_detail"],
            step_median=median(group["step_median"]),
            step_p10=median(group["step_p10"]), step_p90=median(group["step_p90"]),
            data_wait_fraction=median(group["data_wait_fraction"]),
            mem_max=median(group["mem_max"]), mem_min=median(group["mem_min"]),
            mem_by_device=[median(m[i] if i < len(m) else None for m in mem_lists)
                           for i in range(width)],
            per_rank=group.iloc[-1]["per_rank"],
            mem_capacity=group.iloc[-1]["mem_capacity"],  # same devices in every repeat
            loss_per_epoch=[median(l[i] if i < len(l) else None
                                   for l in group["loss_per_epoch"])
                            for i in range(max(map(len, group["loss_per_epoch"]), default=0))],
            warmup_steps=median(group["warmup_steps"]),
            steps_measured=median(group["steps_measured"]),
            commands=list(group["command"]),
            eval=eval_curve(group["eval"]),
            final_accuracy=median(group["final_accuracy"]),
            time_to_accuracy_s=median(group["time_to_accuracy_s"]),
            tta_reached=int(group["time_to_accuracy_s"].notna().sum()),
        )
        row.update(_efficiency(row, first, runs))
        row.update(_time_to_accuracy(row, first, runs))
        row["flags"] = validity_flags(row)
        row["scaling_mode"] = scaling_mode(row)
        rows.append(row)
    table = pd.DataFrame(rows)
    # Machines in the order their first run started (the order of the steps), and in
    # each the single-device runs, then DataParallel, then DDP, by device count.
    first_start = runs.groupby("machine")["started_at"].min()
    table["machine_order"] = table["machine"].map(first_start).fillna("")
    table["order"] = table["strategy"].map(STRATEGY_ORDER).fillna(9)
    table = table.sort_values(["machine_order", "machine", "order", "n_devices", "family",
                               "global_batch_size"], key=_sort_key,
                              kind="stable").reset_index(drop=True)
    table["label"] = ""
    for _, rows_of_machine in table.groupby("machine", sort=False):
        table.loc[rows_of_machine.index, "label"] = unique_labels(rows_of_machine)
    return table.drop(columns=["order", "machine_order"])


def _sort_key(column: pd.Series) -> pd.Series:
    if column.name in ("family", "machine", "machine_order"):
        return column.astype(str)
    return pd.to_numeric(column, errors="coerce")


def scaling_mode(row) -> str | None:
    """"weak" when the per-device batch stayed the baseline's (the global batch grew with
    N: what a baseline match requires unless the run says otherwise), "strong" when the
    run records that the global batch stayed fixed; None where no efficiency exists."""
    if row["strategy"] == "single" or fmt.missing(row.get("efficiency")):
        return None
    return "strong" if row.get("scaling") == "strong" else "weak"


def _efficiency(row: dict, first: pd.Series, runs: pd.DataFrame) -> dict:
    out = {"baseline_tp": None, "baseline_runs": 0, "speedup": None, "efficiency": None,
           "efficiency_note": None, "baseline_spread": None, "baseline_run_range": None}
    matches, reason = baseline_for(first, runs)
    if matches.empty:
        out["efficiency_note"] = reason
        return out
    baseline = median(matches["tp_median"])
    out.update(baseline_tp=baseline, baseline_runs=len(matches),
               baseline_spread=spread_share(baseline, median(matches["tp_p10"]),
                                            median(matches["tp_p90"])),
               baseline_run_range=run_range(matches["tp_median"].tolist()))
    if row["tp_median"] is None or not baseline:
        out["efficiency_note"] = "no throughput measured"
        return out
    speedup, efficiency = scaling(row["tp_median"], baseline, int(row["n_devices"]))
    out["speedup"] = speedup
    if row["strategy"] == "single":
        out["efficiency_note"] = "baseline"
    elif row["n_devices"] == 1:
        out["efficiency_note"] = WORLD_SIZE_1
    else:
        out["efficiency"] = efficiency
    return out


def eval_curve(curves) -> list[dict]:
    """Repeats' evaluations as one curve: per epoch, the median accuracy and elapsed time."""
    by_epoch: dict[int, list[dict]] = {}
    for curve in curves:
        for point in curve or []:
            by_epoch.setdefault(point["epoch"], []).append(point)
    return [{"epoch": epoch, "accuracy": median(p["accuracy"] for p in points),
             "elapsed_s": median(p["elapsed_s"] for p in points)}
            for epoch, points in sorted(by_epoch.items())]


def _time_to_accuracy(row: dict, first: pd.Series, runs: pd.DataFrame) -> dict:
    """The speed-up in time to the target accuracy over the matching baseline:
    baseline's time / this configuration's time (> 1: it got there sooner)."""
    out = {"baseline_tta": None, "baseline_accuracy_eval": [], "tta_speedup": None,
           "tta_note": None, "baseline_global_batch": None, "baseline_lr": None}
    if not row["eval"]:
        out["tta_note"] = "no evaluation"
        return out
    if fmt.missing(row["target_accuracy"]):
        out["tta_note"] = "no target accuracy"
        return out
    if fmt.missing(row["time_to_accuracy_s"]):
        out["tta_note"] = f"target {fmt.pct(row['target_accuracy'])} not reached"
    if row["strategy"] == "single":
        return out
    matches, reason = baseline_for(first, runs)
    if matches.empty:
        out["tta_note"] = out["tta_note"] or reason
        return out
    out.update(baseline_global_batch=median(pd.to_numeric(matches["global_batch_size"],
                                                          errors="coerce")),
               baseline_lr=median(matches["lr"]))
    same_target = matches[matches["target_accuracy"].map(same_setting_key)
                          == same_setting_key(row["target_accuracy"])]
    out["baseline_accuracy_eval"] = eval_curve(same_target["eval"]) if not same_target.empty \
        else eval_curve(matches["eval"])
    if same_target.empty:
        out["tta_note"] = out["tta_note"] or "the baseline aimed at another target accuracy"
        return out
    baseline = median(same_target["time_to_accuracy_s"])
    out["baseline_tta"] = baseline
    if baseline is None:
        out["tta_note"] = out["tta_note"] or "the baseline did not reach the target"
    elif not fmt.missing(row["time_to_accuracy_s"]) and row["time_to_accuracy_s"] > 0:
        out["tta_speedup"] = baseline / row["time_to_accuracy_s"]
    return out


# --- validity: which figures can be trusted ---------------------------------------------

def run_range(run_medians: list) -> float | None:
    """The range of repeated runs' medians as a share of their median; None for one run."""
    values = [v for v in run_medians if v is not None and not pd.isna(v)]
    centre = median(values)
    if len(values) < 2 or not centre:
        return None
    return (max(values) - min(values)) / centre


def _over(value, limit: float) -> bool:
    return value is not None and not pd.isna(value) and value > limit


def validity_flags(row: dict) -> list[str]:
    """Why this configuration's figure is unreliable: one reason per rule it breaks, each
    as "kind: what was measured". Empty when it can be trusted. The fix is the same for
    every kind (RERUN); the report states it once."""
    flags = []
    limit = fmt.pct(SPREAD_LIMIT)
    if _over(row.get("efficiency"), SUPERLINEAR_LIMIT):
        flags.append(f"superlinear: {fmt.pct(row['efficiency'])} scaling efficiency, above "
                     f"the {fmt.pct(SUPERLINEAR_LIMIT)} that adding devices can give "
                     "(noise or a mismatched baseline)")
    if (row["strategy"] in ("dp", "ddp") and row["n_devices"] == 1
            and _over(row.get("speedup"), WRAPPER_FASTER_LIMIT)):
        flags.append(f"faster than its baseline: a one-device wrapper at "
                     f"{fmt.times(row['speedup'])} the baseline (limit "
                     f"{fmt.times(WRAPPER_FASTER_LIMIT)}); the wrapper only adds work")
    # Local SGD's steps differ by design (every H-th one averages the replicas): its
    # p10-p90 spread is its structure, not noise; repeated runs still tell noise apart.
    if _over(row.get("tp_spread"), SPREAD_LIMIT) and row.get("sync") != "local-sgd":
        flags.append(f"noisy: throughput p10–p90 spans {fmt.pct(row['tp_spread'])} of the "
                     f"median (limit {limit})")
    if _over(row.get("tp_run_range"), SPREAD_LIMIT):
        flags.append(f"repeats disagree: the {row['n_runs']} runs' medians span "
                     f"{fmt.pct(row['tp_run_range'])} of their median (limit {limit})")
    if row["strategy"] == "single":
        return flags  # a baseline's own noise is flagged above; it has no other baseline
    if _over(row.get("baseline_spread"), SPREAD_LIMIT):
        flags.append(f"noisy baseline: the baseline's throughput p10–p90 spans "
                     f"{fmt.pct(row['baseline_spread'])} of its median (limit {limit})")
    if _over(row.get("baseline_run_range"), SPREAD_LIMIT):
        flags.append(f"noisy baseline: the baseline's repeated runs span "
                     f"{fmt.pct(row['baseline_run_range'])} of their median (limit {limit})")
    return flags


def flag_kind(flag: str) -> str:
    """The short name of a flag ("superlinear", "noisy", ...), without its numbers."""
    return flag.split(":", 1)[0]


def reliable(table: pd.DataFrame) -> pd.Series:
    return table["flags"].map(len) == 0


# --- pairs that differ in one setting -------------------------------------------------------

def setting_pairs(table: pd.DataFrame, field: str) -> list[tuple[int, int]]:
    """(reference, variant) row positions of configurations equal in everything but
    ``field``; the reference is the setting that is off (amp "off", channels_last False)."""
    others = [f for f in CONFIG_FIELDS if f != field]
    keys = table[others].apply(lambda r: json.dumps([same_setting_key(v) for v in r]),
                               axis=1)
    pairs = []
    for _, group in table.groupby(keys, sort=False):
        if group[field].map(same_setting_key).nunique() < 2:
            continue
        off = [i for i in group.index if _describe(group.at[i, field]) == "off"]
        reference = off[0] if off else group.index[0]
        pairs += [(reference, i) for i in group.index
                  if same_setting_key(group.at[i, field])
                  != same_setting_key(group.at[reference, field])]
    return pairs


# --- step 01's all-reduce sweeps ------------------------------------------------------------

def allreduce_sweeps(environments: list[dict], file_of) -> list[dict]:
    """Every all-reduce sweep of the environment files that can predict a time."""
    sweeps = []
    for record in environments:
        probe = dig(record, "probes", "allreduce")
        world = num(dig(probe, "world_size"))
        results = dicts(dig(probe, "results"))
        if not results or world is None or world < 2:
            continue
        backend = str(dig(probe, "backend") or "")
        device = str(dig(probe, "device") or ("cpu" if backend == "gloo" else "cuda"))
        sweeps.append({"file": file_of(record), "world_size": int(world),
                       "backend": backend, "cpu": device.startswith("cpu"),
                       "all_correct": dig(probe, "all_correct") is not False
                       and all(r.get("correct") is not False for r in results),
                       "results": results})
    return sweeps


# --- labels -----------------------------------------------------------------------------

def short_method(strategy, n) -> str:
    if strategy == "single":
        return "Single"
    return f"{'DP' if strategy == 'dp' else 'DDP'} ×{int(n)}"


def precision(amp) -> str:
    """How a run computed: "fp32" without autocast, else the autocast dtype."""
    return "fp32" if amp in ("off", None, False) else str(amp)


def short_hardware(name: str) -> str:
    return name.replace("NVIDIA ", "").replace("GeForce ", "")


def unique_labels(table: pd.DataFrame) -> list[str]:
    """Short labels for plots and the table, made unique by the settings that differ."""
    labels = [short_method(s, n) for s, n in zip(table["strategy"], table["n_devices"])]
    detail = [("amp", "{}"), ("global_batch_size", "b{}"), ("hardware", "{}"),
              ("model", "{}"), ("img_size", "{}px"), ("channels_last", "NHWC {}"),
              ("compile", "compile {}"), ("data", "{}"), ("backend", "{}"),
              ("bucket_cap_mb", "bucket {} MB"), ("comm_hook", "hook {}"),
              ("cpu_threads", "threads {}"), ("lr", "lr {}"),
              ("target_accuracy", "target {}"), ("sync_words", "{}"),
              ("partition_words", "{}")]
    for field, pattern in detail:
        counts = pd.Series(labels).value_counts()
        clashing = [i for i, lab in enumerate(labels) if counts[lab] > 1]
        if not clashing:
            break
        values = {str(table.iloc[i][field]) for i in clashing}
        if len(values) > 1:
            for i in clashing:
                value = table.iloc[i][field]
                text = (short_hardware(str(value)) if field == "hardware" else
                        precision(value) if field == "amp" else _describe(value))
                if text:  # DDP's defaults (every step, IID data) add no words
                    labels[i] = f"{labels[i]} · {pattern.format(text)}"
    counts = pd.Series(labels).value_counts()
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if counts[lab] > 1:
            seen[lab] = seen.get(lab, 0) + 1
            labels[i] = f"{lab} #{seen[lab]}"
    return labels
