"""The report's prose, written from the numbers: the verdict, "what this shows", the
caveats that make a comparison invalid, and the methodology."""

from __future__ import annotations

import pandas as pd

from labs.report import fmt
from labs.report.analysis import WORLD_SIZE_1, short_hardware

DATA_WAIT_LIMIT = 0.10  # above this share of step time the input pipeline is the bottleneck
LOW_EFFICIENCY = 0.80


def _long_method(row) -> str:
    n = int(row["n_devices"])
    unit = "CPU process" if row["cpu"] else "GPU"
    if row["strategy"] == "dp":
        return f"DataParallel on {fmt.plural(n, unit)}"
    if row["strategy"] == "ddp":
        return f"DDP with {fmt.plural(n, 'rank')}"
    return f"the single-{'CPU' if row['cpu'] else 'GPU'} baseline"


def _list(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def verdict(table: pd.DataFrame, unfinished: int) -> list[str]:
    if table.empty:
        return [f"No completed run to compare: {fmt.plural(unfinished, 'run')} did not finish "
                "(listed under “Runs that did not finish”)." if unfinished else
                "No run result in the folder, only environment information."]
    out = []
    scaled = table[table["efficiency"].notna()]
    for _, r in scaled.head(6).iterrows():
        out.append(f"{_long_method(r)[0].upper()}{_long_method(r)[1:]} "
                   f"({short_hardware(r['hardware'])}, {r['model']}, batch "
                   f"{r['global_batch_size']}) reached {fmt.times(r['speedup'])} the "
                   f"single-device throughput: {fmt.pct(r['efficiency'])} scaling efficiency "
                   f"({fmt.rate(r['tp_median'])} vs {fmt.rate(r['baseline_tp'])} img/s).")
    if len(scaled) > 6:
        out.append(f"… and {len(scaled) - 6} more in the table.")
    for _, family in table.groupby("family", sort=False):
        for n in sorted(set(family["n_devices"])):
            dp = family[(family["strategy"] == "dp") & (family["n_devices"] == n)]
            ddp = family[(family["strategy"] == "ddp") & (family["n_devices"] == n)]
            if n < 2 or dp.empty or ddp.empty:
                continue
            a, b = ddp["tp_median"].iloc[0], dp["tp_median"].iloc[0]
            if a and b:
                faster = "DDP" if a >= b else "DataParallel"
                out.append(f"On {n} {'devices' if family['cpu'].iloc[0] else 'GPUs'} "
                           f"{faster} was the faster method: DDP {fmt.rate(a)} img/s, "
                           f"DataParallel {fmt.rate(b)} img/s ({fmt.times(a / b)}).")
    if scaled.empty:
        if (table["n_devices"] <= 1).all():
            out.append("Every completed run used one device, so nothing here measures "
                       "scaling: run steps 03 and 04 with two or more GPUs.")
        else:
            notes = sorted({n for n in table.loc[table["n_devices"] > 1, "efficiency_note"]
                            if n})
            out.append("No scaling efficiency could be computed: " + "; ".join(notes) + ".")
    if table["cpu"].all():
        out.append("All runs ran on the CPU: they show that the code paths work, "
                   "not how GPUs scale.")
    return out


def findings(table: pd.DataFrame, peak_busbw: float | None) -> list[dict]:
    """Sections of “what this shows”: title and paragraphs, each from the numbers."""
    if table.empty:
        return []
    out = []
    for finding in (_dataparallel(table), _ddp(table, peak_busbw), _input_pipeline(table),
                    _validity(table)):
        if finding:
            out.append(finding)
    return out


def _dataparallel(table: pd.DataFrame) -> dict | None:
    dp = table[(table["strategy"] == "dp") & (table["n_devices"] > 1)]
    if dp.empty:
        if (table["strategy"] == "dp").any():
            return {"title": "DataParallel", "paragraphs": [
                "DataParallel only ran on a single device (one GPU or the CPU), where it "
                "calls the module directly: it shows neither GPU 0's surplus nor its "
                "scaling. Run step 03 with --gpus 0,1 or more on a multi-GPU machine."]}
        return None
    paragraphs = []
    measured = dp[dp["mem_max"].notna() & dp["mem_min"].notna()]
    if not measured.empty:
        surplus = (measured["mem_max"] - measured["mem_min"]) / measured["mem_min"]
        r = measured.loc[surplus.idxmax()]
        first = r["mem_by_device"][0] if r["mem_by_device"] else None
        which = "GPU 0" if first is not None and first >= r["mem_max"] else "the busiest GPU"
        paragraphs.append(
            f"In {r['label']}, {which} peaked at {fmt.gib(r['mem_max'])} while the least "
            f"loaded GPU peaked at {fmt.gib(r['mem_min'])} "
            f"({fmt.pct(surplus.max())} more).")
    else:
        paragraphs.append("Device memory was not measured for these runs (no GPU), so "
                          "GPU 0's surplus cannot be shown here.")
    effs = [f"{r['label']}: {fmt.pct(r['efficiency'])} ({fmt.times(r['speedup'])})"
            for _, r in dp.iterrows() if r["efficiency"] is not None
            and not pd.isna(r["efficiency"])]
    if effs:
        paragraphs.append("Scaling efficiency: " + "; ".join(effs) + ".")
    paragraphs.append(
        "Why: nn.DataParallel is one process. Every step it copies the model from GPU 0 to "
        "every other GPU (replicate), splits the input batch from GPU 0 (scatter), runs the "
        "replicas in Python threads that share one interpreter and its GIL, gathers every "
        "output back onto GPU 0 to compute the loss, and sums the gradients there. GPU 0 "
        "therefore holds the gathered outputs and does extra work while the others wait, "
        "and the copies grow with the model and the number of GPUs, so efficiency falls as "
        "GPUs are added.")
    return {"title": "DataParallel: GPU 0 carries the others", "paragraphs": paragraphs}


def _ddp(table: pd.DataFrame, peak_busbw: float | None) -> dict | None:
    ddp = table[(table["strategy"] == "ddp") & (table["n_devices"] > 1)]
    if ddp.empty:
        return None
    paragraphs = []
    effs = [f"{r['label']}: {fmt.pct(r['efficiency'])} ({fmt.times(r['speedup'])})"
            for _, r in ddp.iterrows() if not pd.isna(r["efficiency"])]
    if effs:
        paragraphs.append("Scaling efficiency: " + "; ".join(effs) + ".")
    buckets = sorted({str(b) for b in ddp["bucket_cap_mb"] if b is not None
                      and not pd.isna(b)}) or ["25"]
    paragraphs.append(
        "How: DDP runs one process per GPU, each with its own replica, its own share of the "
        "data (DistributedSampler) and its own interpreter, so there is no shared GIL and "
        "nothing is gathered on one GPU. Gradients are grouped into buckets of about "
        f"{' / '.join(buckets)} MB; as soon as backward has produced every gradient of a "
        "bucket, DDP starts that bucket's all-reduce while backward goes on with earlier "
        "layers, so most of the communication hides behind computation.")
    measured = ddp[ddp["mem_max"].notna() & ddp["mem_min"].notna()]
    if not measured.empty:
        spread = ((measured["mem_max"] - measured["mem_min"]) / measured["mem_min"]).max()
        same = ("is the same on every GPU of a DDP run" if spread < 0.005 else
                f"differs by at most {fmt.pct(spread)} between the GPUs of a DDP run")
        paragraphs.append(f"Peak memory {same}: every rank holds the same model and an "
                          "equal share of the batch, unlike DataParallel's GPU 0.")
    low = ddp[ddp["efficiency"].notna() & (ddp["efficiency"] < LOW_EFFICIENCY)]
    if not low.empty:
        text = (f"{_list(list(low['label']))} stayed below {fmt.pct(LOW_EFFICIENCY)}: the "
                "all-reduce is not hidden behind backward. Check the interconnect")
        if peak_busbw is not None:
            text += f" (step 01 measured at most {peak_busbw:.1f} GB/s all-reduce bus bandwidth)"
        text += (", try a larger per-GPU batch (more compute per byte sent), and check the "
                 "data wait below.")
        paragraphs.append(text)
    gloo_gpu = ddp[(ddp["backend"] == "gloo") & ~ddp["cpu"]]
    if not gloo_gpu.empty:
        paragraphs.append(f"{_list(list(gloo_gpu['label']))} used gloo on GPUs: its "
                          "all-reduce is far slower than NCCL's, so it understates DDP.")
    return {"title": "DDP: all-reduce overlapped with backward", "paragraphs": paragraphs}


def _input_pipeline(table: pd.DataFrame) -> dict | None:
    waits = table[table["data_wait_fraction"].notna()]
    if waits.empty:
        return None
    slow = waits[waits["data_wait_fraction"] > DATA_WAIT_LIMIT]
    if not slow.empty:
        items = [f"{r['label']} ({fmt.pct(r['data_wait_fraction'])})"
                 for _, r in slow.iterrows()]
        text = (f"{_list(items)} waited for input data more than "
                f"{fmt.pct(DATA_WAIT_LIMIT)} of the measured time: the input pipeline "
                "(DataLoader workers decoding and augmenting on the CPU) sets the pace, not "
                "the devices, and more GPUs cannot help until it is faster. Raise "
                "--num-workers, or run with --data synthetic to see the compute-only ceiling.")
    else:
        r = waits.loc[waits["data_wait_fraction"].idxmax()]
        text = (f"Data wait stayed below {fmt.pct(DATA_WAIT_LIMIT)} of step time everywhere "
                f"(at most {fmt.pct(r['data_wait_fraction'], 1)}, in {r['label']}): the "
                "model, not the input pipeline, sets the pace.")
    return {"title": "Input pipeline", "paragraphs": [text]}


def _validity(table: pd.DataFrame) -> dict:
    out = []
    ws1 = table[table["efficiency_note"] == WORLD_SIZE_1]
    for _, r in ws1.iterrows():
        out.append(f"{r['label']} has world size 1: against the baseline "
                   f"({fmt.times(r['speedup'])}) it measures the wrapper's overhead, "
                   "not scaling.")
    missing = table[table["efficiency_note"].fillna("").str.startswith("no ")]
    for _, r in missing.iterrows():
        out.append(f"{r['label']} ({short_hardware(r['hardware'])}): "
                   f"{r['efficiency_note']}.")
    hardware = sorted(set(table["hardware"]))
    if len(hardware) > 1:
        out.append(f"The runs come from different hardware ({'; '.join(hardware)}): each "
                   "is compared only with a baseline on the same device.")
    if table["family"].nunique() > len(hardware):
        out.append("The runs differ in settings (model, image size, per-device batch, "
                   "precision, layout, compile or data): each is compared only with a "
                   "baseline of the same settings.")
    if table["cpu"].all():
        out.append("Every run used the CPU: these numbers rehearse the code paths; "
                   "CPU cores share memory bandwidth, so they say nothing about GPU scaling.")
    elif table["cpu"].any():
        out.append(f"{_list(list(table.loc[table['cpu'], 'label']))}: run on the CPU, "
                   "not a GPU measurement.")
    multinode = table[pd.to_numeric(table["nnodes"], errors="coerce") > 1]
    if not multinode.empty:
        out.append(f"{_list(list(multinode['label']))} spanned several nodes: their "
                   "efficiency includes the network between nodes.")
    for _, r in table[table["n_runs"] > 1].iterrows():
        if r["tp_run_min"] and r["tp_run_max"] / r["tp_run_min"] > 1.10:
            out.append(f"Repeated runs of {r['label']} differ by "
                       f"{fmt.pct(r['tp_run_max'] / r['tp_run_min'] - 1)} in throughput: "
                       "the machine was not quiet, or the runs differ in ways the file "
                       "does not record.")
    if not out:
        out.append("No caveat: every multi-device run has a matching baseline on the same "
                   "hardware and settings.")
    return {"title": "When a comparison is not valid", "paragraphs": out}


def methodology(table: pd.DataFrame) -> list[str]:
    warm = sorted({int(w) for w in table.get("warmup_steps", pd.Series([], dtype=float))
                   .dropna()}) if not table.empty else []
    warm_text = (f" ({'/'.join(map(str, warm))} steps in these runs)" if warm else "")
    return [
        "Warmup: the first steps of every run (cuDNN autotuning, torch.compile, allocator "
        f"growth) are excluded from every measurement{warm_text}; peak-memory statistics "
        "are reset when warmup ends.",
        "Timing: a step lasts from the end of the previous step to the end of this one, "
        "measured with CUDA events on a GPU (read once per epoch, no host synchronisation "
        "in the timed loop) and with the host clock on the CPU, so time the device waits "
        "for data counts against throughput; the wait for data is also reported on its own.",
        "Throughput is global: the samples of one step over all ranks divided by the "
        "slowest rank's step time. The table shows the median over measured steps with its "
        "p10–p90 range; repeated runs of one configuration are combined as the median of "
        "their medians, with the range of run medians.",
        "Time per epoch is the median epoch wall time, leaving out the first epoch when "
        "there is more than one (it contains the warmup).",
        "GPU memory is the peak allocated by PyTorch on each GPU after warmup "
        "(torch.cuda.max_memory_allocated); the table shows the largest and smallest GPU of "
        "a run. The CPU has no allocator statistics: n/a (CPU).",
        "Scaling efficiency = throughput on N devices / (N × throughput of the matching "
        "single-device 02 run); speedup = throughput / baseline throughput. N is the GPUs "
        "DataParallel splits each batch over, or the DDP world size. A baseline matches "
        "when model, image size, per-device batch, mixed precision, channels_last, "
        "torch.compile, data source and device name agree (the host may differ). With N = "
        "1 efficiency is not a scaling measurement and is not given.",
    ]
