"""From run records to the comparison: one row per run, one row per configuration.

``run_frame`` flattens each valid run into a row (pandas). ``compare`` aggregates
repeated runs of one configuration (median across runs, with the range of run medians),
finds each configuration's single-device baseline and computes speedup and scaling
efficiency:

    speedup    = throughput_N / throughput_baseline
    efficiency = throughput_N / (N x throughput_baseline)

N is the number of devices doing the work: the GPUs DataParallel splits each batch over,
or the DDP world size. The baseline is the median throughput of the ``02_baseline`` runs
with the same model, image size, per-device batch, precision, memory layout, compile
setting, data source and device name (the host may differ).
"""

from __future__ import annotations

import json
import math
import statistics

import pandas as pd

METHOD = {"single": "Single", "dp": "DataParallel", "ddp": "DDP"}
STRATEGY_ORDER = {"single": 0, "dp": 1, "ddp": 2}
WORLD_SIZE_1 = "world size 1: scaling not measurable"

# What must agree between a run and its baseline (besides the device name).
BASELINE_FIELDS = ("model", "img_size", "per_device_batch_size", "amp", "channels_last",
                   "compile", "data")
# What makes two runs "the same configuration" (repeats are aggregated).
CONFIG_FIELDS = ("lab", "strategy", "n_devices", "world_size", "nnodes", "hardware",
                 *BASELINE_FIELDS, "global_batch_size", "grad_accum_steps", "backend",
                 "bucket_cap_mb", "comm_hook", "static_graph", "sync_bn")
FIELD_NAMES = {"model": "model", "img_size": "image size", "per_device_batch_size":
               "per-device batch", "amp": "amp", "channels_last": "channels_last",
               "compile": "torch.compile", "data": "data source", "hardware": "device"}


# --- safe access: a valid run file still has free-form fields ----------------------------

def num(value) -> float | None:
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


def run_row(record: dict, file: str) -> dict:
    cfg = record.get("config") if isinstance(record.get("config"), dict) else {}
    metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
    world = record.get("world") if isinstance(record.get("world"), dict) else {}
    hardware, cpu = hardware_of(record)
    tp = spread_of(metrics.get("throughput_img_s"))
    st = spread_of(metrics.get("step_time_s"))
    per_device = dicts(metrics.get("per_device"))
    memory = [num(d.get("peak_allocated_bytes")) for d in per_device]
    measured = [m for m in memory if m is not None]
    strategy = cfg.get("strategy")
    n = device_count(record)
    hosts = sorted({str(d.get("host")) for d in devices_used(record) if d.get("host")})
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
        **{f: scalar(cfg.get(f)) for f in BASELINE_FIELDS},
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
        "data_wait_fraction": num(metrics.get("data_wait_fraction")),
        "mem_max": max(measured) if measured else None,
        "mem_min": min(measured) if measured else None,
        "mem_by_device": memory,
        "per_rank": [(num(dig(r, "rank")), *spread_of(r.get("step_time_s")))
                     for r in dicts(metrics.get("per_rank"))],
        "loss_per_epoch": numbers(metrics.get("loss_per_epoch")),
        "warmup_steps": num(metrics.get("warmup_steps")),
        "steps_measured": num(metrics.get("steps_measured")),
        "started_at": str(record.get("started_at") or ""),
        "command": str(record.get("command") or ""),
    }


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
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def baseline_for(row: pd.Series, runs: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The 02 runs that match ``row``, or an empty frame and the reason there is none."""
    single = runs[runs["strategy"] == "single"]
    if " + " in row["hardware"]:
        return single.iloc[0:0], (f"no baseline: the run mixes device types "
                                  f"({row['hardware']})")
    fields = ["hardware", *BASELINE_FIELDS]
    same = single
    for f in fields:
        same = same[same[f].astype(str) == str(row[f])]
    if not same.empty:
        return same, None
    if single.empty:
        return same, ("no baseline: the folder has no completed 02_baseline run "
                      "to compare with")
    same_device = single[single["hardware"] == row["hardware"]]
    if same_device.empty:
        elsewhere = ", ".join(sorted(set(single["hardware"])))
        return same, (f"no matching baseline: no 02 run on {row['hardware']} "
                      f"(02 runs exist on {elsewhere})")
    # Explain with the closest 02 run on this device: which settings differ.
    diffs = same_device.apply(lambda b: [f for f in fields if str(b[f]) != str(row[f])],
                              axis=1)
    closest = min(range(len(same_device)), key=lambda i: len(diffs.iloc[i]))
    b = same_device.iloc[closest]
    what = ", ".join(f"{FIELD_NAMES[f]} {_describe(b[f])} vs {_describe(row[f])}"
                     for f in diffs.iloc[closest])
    return same, (f"no matching baseline: the closest 02 run on this device "
                  f"({b['run_name']}) differs in {what}")


def compare(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration, with its baseline, speedup and efficiency."""
    if runs.empty:
        return pd.DataFrame()
    rows = []
    for config_id, group in runs.groupby("config_id", sort=False):
        first = group.iloc[0]
        row = {f: first[f] for f in (*CONFIG_FIELDS, "method", "cpu", "family")}
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
            step_median=median(group["step_median"]),
            step_p10=median(group["step_p10"]), step_p90=median(group["step_p90"]),
            data_wait_fraction=median(group["data_wait_fraction"]),
            mem_max=median(group["mem_max"]), mem_min=median(group["mem_min"]),
            mem_by_device=[median(m[i] if i < len(m) else None for m in mem_lists)
                           for i in range(width)],
            per_rank=group.iloc[-1]["per_rank"],
            loss_per_epoch=[median(l[i] if i < len(l) else None
                                   for l in group["loss_per_epoch"])
                            for i in range(max(map(len, group["loss_per_epoch"]), default=0))],
            warmup_steps=median(group["warmup_steps"]),
            commands=list(group["command"]),
        )
        row.update(_efficiency(row, first, runs))
        rows.append(row)
    table = pd.DataFrame(rows)
    table["order"] = table["strategy"].map(STRATEGY_ORDER).fillna(9)
    table = table.sort_values(["family", "order", "n_devices", "global_batch_size"],
                              key=_sort_key,
                              kind="stable").reset_index(drop=True)
    table["label"] = unique_labels(table)
    return table.drop(columns="order")


def _sort_key(column: pd.Series) -> pd.Series:
    if column.name == "family":
        return column.astype(str)
    return pd.to_numeric(column, errors="coerce")


def _efficiency(row: dict, first: pd.Series, runs: pd.DataFrame) -> dict:
    out = {"baseline_tp": None, "baseline_runs": 0, "speedup": None, "efficiency": None,
           "efficiency_note": None}
    matches, reason = baseline_for(first, runs)
    if matches.empty:
        out["efficiency_note"] = reason
        return out
    baseline = median(matches["tp_median"])
    out.update(baseline_tp=baseline, baseline_runs=len(matches))
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


# --- labels -----------------------------------------------------------------------------

def short_method(strategy, n) -> str:
    if strategy == "single":
        return "Single"
    return f"{'DP' if strategy == 'dp' else 'DDP'} ×{int(n)}"


def short_hardware(name: str) -> str:
    return name.replace("NVIDIA ", "").replace("GeForce ", "")


def unique_labels(table: pd.DataFrame) -> list[str]:
    """Short labels for plots and the table, made unique by the settings that differ."""
    labels = [short_method(s, n) for s, n in zip(table["strategy"], table["n_devices"])]
    detail = [("global_batch_size", "b{}"), ("hardware", "{}"), ("model", "{}"),
              ("amp", "amp {}"), ("img_size", "{}px"), ("channels_last", "NHWC {}"),
              ("compile", "compile {}"), ("data", "{}"), ("backend", "{}"),
              ("bucket_cap_mb", "bucket {} MB"), ("comm_hook", "hook {}")]
    for field, fmt in detail:
        counts = pd.Series(labels).value_counts()
        clashing = [i for i, lab in enumerate(labels) if counts[lab] > 1]
        if not clashing:
            break
        values = {str(table.iloc[i][field]) for i in clashing}
        if len(values) > 1:
            for i in clashing:
                value = table.iloc[i][field]
                text = short_hardware(str(value)) if field == "hardware" else _describe(value)
                labels[i] = f"{labels[i]} · {fmt.format(text)}"
    counts = pd.Series(labels).value_counts()
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if counts[lab] > 1:
            seen[lab] = seen.get(lab, 0) + 1
            labels[i] = f"{lab} #{seen[lab]}"
    return labels
