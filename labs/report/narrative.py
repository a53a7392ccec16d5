"""The report's prose, written from the numbers: the headline, the verdict, "what this
shows", the caveats that make a comparison invalid, and the methodology.

Only rows without validity flags (``analysis.validity_flags``) are stated as results;
every mechanism is stated from a measurement of the run, or not at all."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from labs import bandwidth, fmt
from labs.report.analysis import (RERUN, SPREAD_LIMIT, SUPERLINEAR_LIMIT,
                                  WORLD_SIZE_1, WRAPPER_FASTER_LIMIT, flag_kind, num,
                                  reliable, setting_pairs, short_hardware, short_method)

DATA_WAIT_LIMIT = 0.10  # above this share of step time the input pipeline is the bottleneck
LOW_EFFICIENCY = 0.80
NOISE_STEP_SHARE = 0.02  # exposed communication below 2% of the step is not told from zero
ACCURACY_GAP = 0.05  # two methods further apart than this at one epoch get an explanation
GUIDE = "docs/student_guide.md"


def _long_method(row) -> str:
    n = int(row["n_devices"])
    unit = "CPU process" if row["cpu"] else "GPU"
    if row["strategy"] == "dp":
        return f"DataParallel on {fmt.plural(n, unit)}"
    if row["strategy"] == "ddp":
        return f"DDP with {fmt.plural(n, 'rank')}"
    return f"the single-{'CPU' if row['cpu'] else 'GPU'} baseline"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _list(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _kinds(flags: list[str]) -> str:
    return ", ".join(dict.fromkeys(flag_kind(f) for f in flags))


def _given(value) -> bool:
    return not fmt.missing(value)


# --- what was measured about communication -----------------------------------------------

def noise_floor(r) -> float | None:
    """The smallest exposed communication told apart from zero: half the compute-only
    p10-p90 width, or 2% of the step, whichever is larger."""
    floors = []
    if _given(r["compute_p10"]) and _given(r["compute_p90"]):
        floors.append((r["compute_p90"] - r["compute_p10"]) / 2)
    if _given(r["step_median"]):
        floors.append(NOISE_STEP_SHARE * r["step_median"])
    return max(floors) if floors else None


def within_noise(r) -> bool:
    floor = noise_floor(r)
    return floor is not None and abs(r["exposed_comm_s"]) < floor


def _exposed(r) -> str:
    """The exposed communication and its share of the step, e.g. "3.0 ms (2.9% of the
    step)"."""
    text = fmt.seconds(r["exposed_comm_s"])
    if _given(r["step_median"]) and r["step_median"] > 0:
        text += f" ({fmt.pct(r['exposed_comm_s'] / r['step_median'], 1)} of the step)"
    return text


def _exposed_clause(r) -> str:
    if not _given(r["exposed_comm_s"]):
        return "its exposed communication was not measured"
    if within_noise(r):
        return "its exposed communication was within noise"
    return f"its exposed communication was {_exposed(r)}"


def gpu0_surplus(r) -> float | None:
    """How much more memory the busiest GPU peaked at than the least-loaded one."""
    if not _given(r["mem_max"]) or not r["mem_min"]:
        return None
    return (r["mem_max"] - r["mem_min"]) / r["mem_min"]


def _busiest_gpu(r) -> str:
    first = r["mem_by_device"][0] if r["mem_by_device"] else None
    return "GPU 0" if first is not None and first >= r["mem_max"] else "the busiest GPU"


# --- the headline: one sentence per hardware ----------------------------------------------

def headline(table: pd.DataFrame) -> list[str]:
    """Per hardware, the fastest reliable configuration and the measured reason, or why
    no figure can be trusted."""
    if table.empty:
        return []
    ok = reliable(table)
    out = []
    for _, rows in table.groupby("hardware", sort=False):
        good = rows[ok[rows.index] & rows["tp_median"].notna()]
        if good.empty:
            out.append(_nothing_reliable(rows))
        else:
            best = good.loc[good["tp_median"].astype(float).idxmax()]
            out.append(_best_sentence(best, table, ok))
    return out


def _where(r) -> str:
    if r["cpu"]:
        return "On the CPU (these are CPU figures, not a GPU measurement)"
    return f"On {short_hardware(str(r['hardware']))}"


def _nothing_reliable(rows: pd.DataFrame) -> str:
    kinds = Counter(flag_kind(f) for flags in rows["flags"] for f in flags)
    why = ", ".join(f"{kind} ×{n}" for kind, n in kinds.items()) or "no throughput measured"
    return (f"{_where(rows.iloc[0])}, no configuration gave a reliable figure ({why}; "
            f"details in the table): {RERUN}.")


def _other_wrapper(r, table: pd.DataFrame, ok: pd.Series):
    """The fastest reliable run of the other wrapper with the same settings and devices."""
    other = {"dp": "ddp", "ddp": "dp"}.get(r["strategy"])
    same = table[ok & (table["family"] == r["family"]) & (table["strategy"] == other)
                 & (table["n_devices"] == r["n_devices"]) & table["tp_median"].notna()]
    return None if same.empty else same.loc[same["tp_median"].astype(float).idxmax()]


def _best_sentence(r, table: pd.DataFrame, ok: pd.Series) -> str:
    text = (f"{_where(r)}, the fastest reliable configuration was {_long_method(r)} "
            f"({r['model']}, batch {r['global_batch_size']}{_setting_of(r)}): "
            f"{fmt.rate(r['tp_median'])} img/s")
    unit = "CPU" if r["cpu"] else "GPU"
    if r["strategy"] != "single":
        text += (f", {fmt.times(r['speedup'])} the single-{unit} baseline"
                 if _given(r["speedup"]) else
                 f" (no single-{unit} baseline to compare with)")
    other = _other_wrapper(r, table, ok)
    if other is not None:
        text += (f" and {fmt.times(r['tp_median'] / other['tp_median'])} "
                 f"{_long_method(other)}")
    reasons = _measured_reasons(r)
    return text + ("; " + "; ".join(reasons) if reasons else "") + "."


def _measured_reasons(r) -> list[str]:
    reasons = []
    if r["strategy"] == "ddp" and r["n_devices"] > 1:
        reasons.append(_exposed_clause(r))
    if r["strategy"] == "dp" and r["n_devices"] > 1:
        surplus = gpu0_surplus(r)
        reasons.append(f"{_busiest_gpu(r)} peaked {fmt.pct(surplus)} above the least-loaded "
                       "GPU in memory" if surplus is not None else
                       "its GPU memory was not measured")
    if _given(r["data_wait_fraction"]) and r["data_wait_fraction"] > DATA_WAIT_LIMIT:
        reasons.append(f"it waited for input data {fmt.pct(r['data_wait_fraction'])} of the "
                       "time")
    return reasons


# --- the verdict ----------------------------------------------------------------------------

def verdict(table: pd.DataFrame, unfinished: int) -> list[str]:
    if table.empty:
        return [f"No completed run to compare: {fmt.plural(unfinished, 'run')} did not finish "
                "(listed under “Runs that did not finish”)." if unfinished else
                "No run result in the folder, only environment information."]
    ok = reliable(table)
    scaled = table[table["efficiency"].notna()]
    shown = scaled[ok[scaled.index]]
    out = [_scaling_sentence(r) for _, r in shown.head(6).iterrows()]
    if len(shown) > 6:
        out.append(f"… and {len(shown) - 6} more in the table.")
    out += _wrapper_comparisons(table, ok)
    out += [effect["sentence"] for effect in setting_effects(table)]
    out += time_to_accuracy_sentences(table)
    left_out = table[~ok]
    if not left_out.empty:
        items = [f"{r['label']} ({_kinds(r['flags'])})" for _, r in left_out.iterrows()]
        were, they = ("was", "It is") if len(items) == 1 else ("were", "They are")
        out.append(f"{fmt.plural(len(items), 'figure')} {were} left out as unreliable: "
                   f"{'; '.join(items)}. {they} greyed in the table, with the reason and "
                   "the fix.")
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


def _setting_of(r) -> str:
    """What tells this configuration from others of its method (its label's suffix),
    less the batch and the hardware, which the sentence names anyway."""
    said = {f"b{r['global_batch_size']}", short_hardware(str(r["hardware"]))}
    parts = [p for p in str(r["label"]).split(" · ")[1:] if p not in said]
    return "".join(f", {p}" for p in parts)


def _scaling_sentence(r) -> str:
    return (f"{_capital(_long_method(r))} ({short_hardware(r['hardware'])}, {r['model']}, "
            f"batch {r['global_batch_size']}{_setting_of(r)}) reached "
            f"{fmt.times(r['speedup'])} the "
            f"single-device throughput: {fmt.pct(r['efficiency'])} scaling efficiency "
            f"({fmt.rate(r['tp_median'])} vs {fmt.rate(r['baseline_tp'])} img/s).")


def _wrapper_comparisons(table: pd.DataFrame, ok: pd.Series) -> list[str]:
    out = []
    for _, family in table[ok].groupby("family", sort=False):
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
    return out


# --- AMP and channels_last: pairs that differ in that setting only -------------------------

SETTINGS = {"amp": "Mixed precision (AMP)", "channels_last": "channels_last"}


def setting_effects(table: pd.DataFrame) -> list[dict]:
    """One statement per pair of configurations that differ only in amp, or only in
    channels_last: the throughput ratio and the peak-memory change."""
    if table.empty:
        return []
    effects = []
    for field, name in SETTINGS.items():
        for ref, var in setting_pairs(table, field):
            effects.append({"field": field, "sentence": _effect_sentence(
                name, field, table.loc[ref], table.loc[var])})
    return effects


def _setting_value(field: str, value) -> str:
    if isinstance(value, bool) or field == "channels_last":
        return "on" if value else "off"
    return str(value)


def _effect_sentence(name: str, field: str, ref, var) -> str:
    what = (f"{name} {_setting_value(field, var[field])} vs "
            f"{_setting_value(field, ref[field])}")
    where = f"{short_method(var['strategy'], var['n_devices'])}, " \
            f"{short_hardware(str(var['hardware']))}"
    if _given(var["tp_median"]) and ref["tp_median"]:
        speed = (f"{fmt.times(var['tp_median'] / ref['tp_median'])} the throughput "
                 f"({fmt.rate(var['tp_median'])} vs {fmt.rate(ref['tp_median'])} img/s)")
    else:
        speed = "throughput not measured"
    text = f"{what} ({where}): {speed}; {_memory_change(ref, var)}."
    flags = list(ref["flags"]) + list(var["flags"])
    if flags:
        text += f" Unreliable ({_kinds(flags)}): see the table before trusting it."
    return text


def _memory_change(ref, var) -> str:
    if _given(ref["mem_max"]) and _given(var["mem_max"]) and ref["mem_max"]:
        change = var["mem_max"] / ref["mem_max"] - 1
        return (f"peak GPU memory {fmt.gib(ref['mem_max'])} → {fmt.gib(var['mem_max'])} "
                f"({100 * change:+.0f}%)")
    if ref["cpu"] or var["cpu"]:
        return "memory not measured on CPU"
    return "peak memory not measured"


# --- what this shows ------------------------------------------------------------------------

def findings(table: pd.DataFrame, sweeps: list[dict]) -> list[dict]:
    """Sections of “what this shows”: title and paragraphs, each from the numbers."""
    if table.empty:
        return []
    out = []
    for finding in (_dataparallel(table), _ddp(table, sweeps), _accuracy(table),
                    _settings(table), _input_pipeline(table), _validity(table)):
        if finding:
            out.append(finding)
    return out


# --- accuracy: the same math, at another speed ---------------------------------------------

def _evaluated(table: pd.DataFrame) -> pd.DataFrame:
    if "eval" not in table.columns:
        return table.iloc[0:0]
    return table[table["eval"].map(lambda e: bool(e))]


def time_to_accuracy_text(r) -> str:
    """e.g. "50% after 13.20 s of training, a 1.25× speed-up against the single-device
    baseline (16.50 s)"."""
    if not _given(r["target_accuracy"]):
        return "no --target-accuracy, so no time to accuracy"
    target = fmt.pct(r["target_accuracy"])
    if not _given(r["time_to_accuracy_s"]):
        epochs = r["eval"][-1]["epoch"] if r["eval"] else 0
        return f"{target} not reached in {fmt.plural(epochs, 'epoch')}"
    text = f"{target} after {fmt.seconds(r['time_to_accuracy_s'])} of training"
    if _given(r.get("tta_speedup")):
        text += (f", {_speedup(r['tta_speedup'])} against the single-device baseline "
                 f"({fmt.seconds(r['baseline_tta'])})")
    elif r["strategy"] != "single" and r.get("tta_note"):
        text += f" (no speed-up: {r['tta_note']})"
    return text


def _speedup(factor: float) -> str:
    """e.g. "a 1.80× speed-up", or "0.55×: slower" below 1."""
    if factor < 1:
        return f"{fmt.times(factor)}: slower"
    return f"a {fmt.times(factor)} speed-up"


def time_to_accuracy_sentences(table: pd.DataFrame) -> list[str]:
    """The verdict's line on time to accuracy: each method that has a speed-up."""
    rows = _evaluated(table)
    rows = rows[rows["strategy"] != "single"] if not rows.empty else rows
    out = []
    for _, r in rows.iterrows():
        if _given(r.get("tta_speedup")):
            out.append(f"Time to {fmt.pct(r['target_accuracy'])} validation accuracy: "
                       f"{r['label']} {fmt.seconds(r['time_to_accuracy_s'])} of training "
                       f"against {fmt.seconds(r['baseline_tta'])} for the single-device "
                       f"baseline, {_speedup(r['tta_speedup'])} in time to accuracy.")
    return out


def accuracy_gap(r) -> dict | None:
    """The accuracy of ``r`` and of its baseline at their last common epoch, when they
    are more than ACCURACY_GAP apart: {epoch, accuracy, baseline, causes}."""
    if r["strategy"] == "single" or not r["eval"] or not r.get("baseline_accuracy_eval"):
        return None
    mine = {p["epoch"]: p["accuracy"] for p in r["eval"]}
    theirs = {p["epoch"]: p["accuracy"] for p in r["baseline_accuracy_eval"]}
    common = sorted(set(mine) & set(theirs))
    if not common:
        return None
    epoch = common[-1]
    if abs(mine[epoch] - theirs[epoch]) <= ACCURACY_GAP:
        return None
    return {"epoch": epoch, "accuracy": mine[epoch], "baseline": theirs[epoch],
            "causes": accuracy_causes(r)}


def accuracy_causes(r) -> list[str]:
    """What in the configuration can make ``r`` learn differently from its baseline."""
    causes = []
    n = int(r["n_devices"])
    per_device = r["per_device_batch_size"]
    if r["strategy"] == "ddp" and n > 1 and r["sync_bn"] is not True:
        gpus = "" if not r["cpu"] else " (--sync-bn needs GPUs)"
        causes.append(f"batch norm per rank: each of the {n} ranks normalises over its own "
                      f"{per_device} images, 1/{n} of the global batch of "
                      f"{r['global_batch_size']}, without --sync-bn{gpus}")
    if r["strategy"] == "dp" and n > 1:
        causes.append(f"batch norm per GPU: DataParallel's replicas normalise over their own "
                      f"share of the batch, 1/{n} of it")
    base_batch = r.get("baseline_global_batch")
    if _given(base_batch) and _given(r["global_batch_size"]) \
            and int(base_batch) != int(r["global_batch_size"]):
        causes.append(f"the global batch differs ({int(r['global_batch_size'])} vs "
                      f"{int(base_batch)}): {fmt.times(r['global_batch_size'] / base_batch)} "
                      "the images per optimizer step, so that many times fewer steps per "
                      "epoch")
    base_lr = r.get("baseline_lr")
    if _given(base_lr) and _given(r["lr"]) and abs(r["lr"] - base_lr) > 1e-12 * max(1, base_lr):
        rule = ("by the linear scaling rule" if not str(r["lr_rule"]).startswith("--lr")
                else "--lr given")
        causes.append(f"the learning rate differs ({r['lr']:g} vs {base_lr:g}, {rule})")
    return causes


def _accuracy(table: pd.DataFrame) -> dict | None:
    rows = _evaluated(table)
    if rows.empty:
        return None
    paragraphs = []
    for _, r in rows.iterrows():
        last = r["eval"][-1]
        paragraphs.append(f"{r['label']}: {fmt.pct(r['final_accuracy'], 1)} top-1 on the "
                          f"validation split after epoch {last['epoch']}; "
                          f"{time_to_accuracy_text(r)}.")
    for _, r in rows.iterrows():
        gap = accuracy_gap(r)
        if gap is None:
            continue
        causes = gap["causes"]
        why = ("Likely causes, from the configurations: " + "; ".join(causes) + "."
               if causes else "The recorded settings agree, so this is run-to-run noise "
               "(a different order of the same images): repeat the runs with "
               "`python -m labs run --repeat 3`.")
        paragraphs.append(
            f"At epoch {gap['epoch']} {r['label']} reached {fmt.pct(gap['accuracy'], 1)} "
            f"and the single-device baseline {fmt.pct(gap['baseline'], 1)}: "
            f"{100 * abs(gap['accuracy'] - gap['baseline']):.1f} points apart. {why}")
    if ((rows["strategy"] == "ddp") & (rows["n_devices"] > 1) & rows["cpu"]).any():
        paragraphs.append("On the CPU, batch norm in each DDP rank sees only that rank's "
                          "1/N of the global batch: --sync-bn, which computes the statistics "
                          "over the global batch, needs GPUs.")
    paragraphs.append("DDP with N ranks of B images computes the gradient of one step on "
                      "N·B images, as a single device would (tests/test_ddp_equivalence.py "
                      "checks it); batch norm aside, what changes the accuracy per epoch is "
                      "the global batch and the learning rate that goes with it. Time to "
                      f"accuracy is the fair speed comparison; see {GUIDE}, \"DDP changes "
                      "speed, not the math\".")
    return {"title": "Accuracy: the same math, at another speed", "paragraphs": paragraphs}


def _efficiencies(rows: pd.DataFrame) -> str | None:
    items = []
    for _, r in rows[rows["efficiency"].notna()].iterrows():
        if r["flags"]:
            items.append(f"{r['label']}: unreliable ({_kinds(r['flags'])}), see the table")
        else:
            items.append(f"{r['label']}: {fmt.pct(r['efficiency'])} "
                         f"({fmt.times(r['speedup'])})")
    return "Scaling efficiency: " + "; ".join(items) + "." if items else None


def _dataparallel(table: pd.DataFrame) -> dict | None:
    dp = table[(table["strategy"] == "dp") & (table["n_devices"] > 1)]
    if dp.empty:
        if (table["strategy"] == "dp").any():
            return {"title": "DataParallel", "paragraphs": [
                "DataParallel only ran on a single device (one GPU or the CPU), where it "
                "calls the module directly: it shows neither GPU 0's surplus nor its "
                "scaling. Run step 03 with --gpus 0,1 or more on a multi-GPU machine."]}
        return None
    paragraphs = [_dp_memory(r) for _, r in dp.iterrows()]
    paragraphs.append(_dp_step_times(dp))
    efficiencies = _efficiencies(dp)
    if efficiencies:
        paragraphs.append(efficiencies)
    paragraphs.append(f"How DataParallel splits each step over the GPUs is explained in "
                      f"{GUIDE} (checkpoint 1); this report states only what the runs "
                      "measured.")
    surplus = [gpu0_surplus(r) or 0 for _, r in dp.iterrows()]
    carried = max(surplus) > 0.05 and all(_busiest_gpu(r) == "GPU 0"
                                          for _, r in dp.iterrows() if gpu0_surplus(r))
    title = "DataParallel: GPU 0 carries the others" if carried else "DataParallel"
    return {"title": title, "paragraphs": paragraphs}


def _dp_memory(r) -> str:
    surplus = gpu0_surplus(r)
    if surplus is None:
        return (f"{r['label']}: device memory was not measured (no GPU), so GPU 0's "
                "surplus cannot be shown.")
    return (f"In {r['label']}, {_busiest_gpu(r)} peaked at {fmt.gib(r['mem_max'])} while "
            f"the least loaded GPU peaked at {fmt.gib(r['mem_min'])} "
            f"({fmt.pct(surplus)} more).")


def _dp_step_times(dp: pd.DataFrame) -> str:
    timed = [(r["label"], [d["step_time_s"] for d in r["device_detail"]])
             for _, r in dp.iterrows()]
    per_gpu = [f"{label}: " + ", ".join(f"GPU {i} {fmt.seconds(t)}"
                                        for i, t in enumerate(times))
               for label, times in timed if times and all(_given(t) for t in times)]
    if per_gpu:
        return "Step time per GPU: " + "; ".join(per_gpu) + "."
    return ("Step time per GPU: not measured per GPU (DataParallel times the whole step "
            "only); the global step time is in the table and under Run details.")


# --- DDP: predicted and measured communication ---------------------------------------------

def _ddp(table: pd.DataFrame, sweeps: list[dict]) -> dict | None:
    ddp = table[table["strategy"] == "ddp"]
    if ddp.empty:
        return None
    paragraphs = []
    efficiencies = _efficiencies(ddp)
    if efficiencies:
        paragraphs.append(efficiencies)
    buckets = sorted({str(b) for b in ddp["bucket_cap_mb"] if _given(b)}) or ["25"]
    paragraphs.append(
        f"DDP all-reduces the gradients in buckets of about {' / '.join(buckets)} MB "
        "(bucket_cap_mb). How much of that all-reduce stays hidden behind backward is "
        "measured per run: the same steps run once more inside "
        "model.no_sync() (compute only, no all-reduce), and exposed communication = synced "
        "step median − compute-only step median. Step 01's all-reduce sweep predicts the "
        "time the all-reduce itself needs.")
    paragraphs += [_ddp_run(r, sweeps) for _, r in ddp.iterrows()]
    paragraphs += _ddp_memory(ddp)
    paragraphs += _low_efficiency(ddp, sweeps)
    gloo_gpu = ddp[(ddp["backend"] == "gloo") & ~ddp["cpu"]]
    if not gloo_gpu.empty:
        paragraphs.append(f"{_list(list(gloo_gpu['label']))} used gloo on GPUs: its "
                          "all-reduce is far slower than NCCL's, so it understates DDP.")
    return {"title": "DDP: communication, predicted and measured", "paragraphs": paragraphs}


def _ddp_run(r, sweeps: list[dict]) -> str:
    text = (_ddp_overhead(r) if int(r["n_devices"]) < 2 else
            _ddp_communication(r, sweeps))
    if r["flags"]:
        text += f" This run's figures are flagged unreliable ({_kinds(r['flags'])})."
    return text


def _steps(r) -> str:
    return (f"synced step {fmt.seconds(r['step_median'])}, compute-only step (no_sync) "
            f"{fmt.seconds(r['compute_median'])}")


def _noise_text(r) -> str:
    return (f"{fmt.seconds(r['exposed_comm_s'])} is within noise (below "
            f"{fmt.seconds(noise_floor(r))}, the larger of half the compute-only p10–p90 "
            f"width and {fmt.pct(NOISE_STEP_SHARE)} of the step)")


def _ddp_overhead(r) -> str:
    label = r["label"]
    if not _given(r["exposed_comm_s"]):
        return (f"{label}: world size 1, nothing to exchange; DDP's own overhead was not "
                "measured (no compute-only steps in this result file).")
    if within_noise(r):
        return (f"{label}: world size 1, nothing to exchange; DDP's own overhead "
                f"(copying gradients into its buckets) is within noise here ({_steps(r)}): "
                f"the difference of {_noise_text(r)}.")
    return (f"{label}: world size 1, nothing to exchange, so the difference of "
            f"{fmt.seconds(r['exposed_comm_s'])} ({_steps(r)}) is DDP's own overhead "
            "(copying gradients into its buckets), not communication.")


def _ddp_communication(r, sweeps: list[dict]) -> str:
    wire, bytes_text = _wire_bytes(r)
    predicted, prediction_text = _prediction(r, wire, sweeps)
    return (f"{r['label']}: each step all-reduces {bytes_text}. {prediction_text} "
            f"{_measured_exposure(r, predicted)}")


def _wire_bytes(r) -> tuple[float | None, str]:
    grad = r["gradient_bytes"]
    hook = r["comm_hook"] if isinstance(r["comm_hook"], str) else "none"
    if not _given(grad):
        return None, "gradients of a size this result file does not record (an older file)"
    if hook in ("fp16", "bf16"):
        return grad / 2, (f"{fmt.size(grad)} of gradients, {fmt.size(grad / 2)} on the wire "
                          f"with the {hook} compression hook")
    if hook == "powersgd":
        return None, (f"{fmt.size(grad)} of gradients, compressed by the PowerSGD hook to "
                      "a size the file does not record")
    return grad, f"{fmt.size(grad)} of gradients"


def sweep_for(r, sweeps: list[dict]) -> tuple[dict | None, str]:
    """Step 01's sweep to predict ``r``'s all-reduce with, and how it was chosen (or why
    there is none)."""
    if not sweeps:
        return None, ("the prediction needs step 01's all-reduce sweep (run "
                      "01_environment_check.py on this machine)")
    kind = "the CPU" if r["cpu"] else "GPUs"
    usable = [s for s in sweeps if s["cpu"] == bool(r["cpu"])]
    if not usable:
        return None, f"step 01 measured no all-reduce on {kind}, which this run used"
    correct = [s for s in usable if s["all_correct"]]
    if not correct:
        return None, "step 01's all-reduce returned wrong sums, so it predicts nothing"
    world = int(r["n_devices"])
    same = [s for s in correct if s["world_size"] == world]
    if same:
        return same[0], f"step 01 measured for {world} ranks ({same[0]['file']})"
    near = min(correct, key=lambda s: abs(s["world_size"] - world))
    return near, (f"step 01 measured for {near['world_size']} ranks, not {world} "
                  f"({near['file']}; only that world size was measured, so it stands in)")


def _prediction(r, wire: float | None, sweeps: list[dict]) -> tuple[float | None, str]:
    if wire is None:
        return None, "No prediction without the bytes on the wire."
    sweep, how = sweep_for(r, sweeps)
    if sweep is None:
        return None, f"No prediction: {how}."
    world = int(r["n_devices"])
    busbw = bandwidth.interpolate_busbw(sweep["results"], wire)
    predicted = bandwidth.predict_allreduce_s(wire, world, sweep["results"])
    if busbw is None or predicted is None:
        return None, f"No prediction: {sweep['file']} has no usable bus bandwidth."
    return predicted, (f"At the {busbw:.1f} GB/s bus bandwidth {how}, that all-reduce "
                       f"takes {fmt.seconds(predicted)} (predicted).")


def _measured_exposure(r, predicted: float | None) -> str:
    if not _given(r["exposed_comm_s"]):
        return ("Exposed communication was not measured (no compute-only steps in this "
                "result file; rerun step 04).")
    if within_noise(r):
        return (f"Measured: {_steps(r)}; the exposed communication of {_noise_text(r)}, so "
                "no share hidden behind backward is claimed.")
    exposed = r["exposed_comm_s"]
    text = f"Measured: {_steps(r)}, so {_exposed(r)} of communication is exposed."
    if predicted:
        hidden = min(1.0, max(0.0, 1 - exposed / predicted))
        text += f" Hidden behind backward: {fmt.pct(hidden)} of the predicted all-reduce."
    return text


def _ddp_memory(ddp: pd.DataFrame) -> list[str]:
    measured = ddp[ddp["mem_max"].notna() & ddp["mem_min"].notna() & (ddp["n_devices"] > 1)]
    if measured.empty:
        return []
    spread = ((measured["mem_max"] - measured["mem_min"]) / measured["mem_min"]).max()
    same = ("is the same on every GPU of a DDP run" if spread < 0.005 else
            f"differs by at most {fmt.pct(spread)} between the GPUs of a DDP run")
    return [f"Peak memory {same}: every rank holds the same model and an equal share of "
            "the batch, unlike DataParallel's GPU 0."]


def peak_busbw(sweeps: list[dict], cpu: bool) -> float | None:
    values = [num(r.get("busbw_gb_s")) for s in sweeps if s["cpu"] == cpu and s["all_correct"]
              for r in s["results"]]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _low_efficiency(ddp: pd.DataFrame, sweeps: list[dict]) -> list[str]:
    low = ddp[ddp["efficiency"].notna() & (ddp["efficiency"] < LOW_EFFICIENCY)
              & reliable(ddp)]
    return [_cpu_advice(r) if r["cpu"] else _gpu_advice(r, sweeps)
            for _, r in low.iterrows()]


def _cpu_advice(r) -> str:
    n = int(r["n_devices"])
    text = f"{r['label']} stayed below {fmt.pct(LOW_EFFICIENCY)} on the CPU: "
    threads = r["threads_per_process"]
    if _given(threads):
        total = int(n * threads)
        cores = f" on {int(r['cpu_count'])} cores" if _given(r["cpu_count"]) else ""
        text += (f"{n} processes × {fmt.plural(int(threads), 'thread')} each = "
                 f"{total} threads{cores}")
        if _given(r["cpu_count"]) and total > r["cpu_count"]:
            text += ", more threads than cores, so the ranks compete for them"
        text += "; "
    else:
        text += "threads per process not recorded; "
    return text + ("keep processes × OMP_NUM_THREADS at or below the cores, and expect the "
                   "memory bandwidth all CPU processes share to bound CPU scaling.")


def _gpu_advice(r, sweeps: list[dict]) -> str:
    text = f"{r['label']} stayed below {fmt.pct(LOW_EFFICIENCY)}: "
    if _given(r["exposed_comm_s"]) and not within_noise(r):
        text += f"{_exposed(r)} of communication was exposed per step"
        peak = peak_busbw(sweeps, cpu=False)
        if peak is not None:
            text += (f" and step 01 measured at most {peak:.1f} GB/s all-reduce bus "
                     "bandwidth on the interconnect")
        return text + "; a larger per-GPU batch gives more compute per byte sent."
    if _given(r["exposed_comm_s"]):
        return text + ("exposed communication is within noise, so look at the data wait "
                       "and the per-rank step times (a straggler) under Run details.")
    return text + ("exposed communication was not measured; rerun step 04 to measure it, "
                   "and check the data wait below.")


def _settings(table: pd.DataFrame) -> dict | None:
    effects = setting_effects(table)
    if not effects:
        return None
    return {"title": "Mixed precision and channels_last, measured",
            "paragraphs": [e["sentence"] for e in effects] +
                          ["Each pair differs in that one setting only; the ratio is "
                           "throughput with the setting over throughput without it."]}


def _input_pipeline(table: pd.DataFrame) -> dict | None:
    waits = table[table["data_wait_fraction"].notna()]
    if waits.empty:
        return None
    slow = waits[waits["data_wait_fraction"] > DATA_WAIT_LIMIT]
    if not slow.empty:
        items = [f"{r['label']} ({fmt.pct(r['data_wait_fraction'])})"
                 for _, r in slow.iterrows()]
        text = (f"{_list(items)} waited for input data more than "
                f"{fmt.pct(DATA_WAIT_LIMIT)} of the measured time: for that share the "
                "devices waited for the input pipeline instead of computing. Raise "
                "--num-workers, or run with --data synthetic to measure "
                "without the input pipeline.")
    else:
        r = waits.loc[waits["data_wait_fraction"].idxmax()]
        text = (f"Data wait stayed below {fmt.pct(DATA_WAIT_LIMIT)} of step time everywhere "
                f"(at most {fmt.pct(r['data_wait_fraction'], 1)}, in {r['label']}): the "
                "input pipeline kept up.")
    return {"title": "Input pipeline", "paragraphs": [text]}


def _validity(table: pd.DataFrame) -> dict:
    out = [f"{r['label']}: {flag}." for _, r in table.iterrows() for flag in r["flags"]]
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
                   "hardware and settings, and no figure is flagged unreliable.")
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
        "Global step time: the median, p10 and p90 are those of the slowest rank's own "
        "per-step distribution, the slowest rank being the one with the largest measured "
        "time. Throughput is global: its median, p10 and p90 are the global samples per "
        "step over that distribution, and its mean is the global samples of all measured "
        "steps / the slowest rank's measured time. Repeated runs of one configuration are "
        "combined as the median of their medians, with the range of run medians.",
        "Exposed communication (DDP) = synced step median − compute-only step median, the "
        "compute-only steps being the same steps run inside model.no_sync() (no gradient "
        "all-reduce) after training. It is within noise when smaller than half the "
        "compute-only p10–p90 width or than "
        f"{fmt.pct(NOISE_STEP_SHARE)} of the step. Predicted all-reduce time = bytes on the "
        "wire × 2(N−1)/N / bus bandwidth, the bus bandwidth read from step 01's sweep at "
        "that message size; hidden share = 1 − exposed / predicted, clipped to 0–100%.",
        "Validity: a figure is flagged unreliable, greyed in the table and never "
        f"headlined, when its scaling efficiency is above {fmt.pct(SUPERLINEAR_LIMIT)} "
        "(superlinear); when a world-size-1 DataParallel or DDP run is more than "
        f"{fmt.pct(WRAPPER_FASTER_LIMIT - 1)} faster than its baseline; when its own "
        f"throughput p10–p90 spread, or its baseline's, exceeds {fmt.pct(SPREAD_LIMIT)} of "
        "the median; or when the medians of repeated runs (its own or its baseline's) span "
        f"more than {fmt.pct(SPREAD_LIMIT)} of their median. The fix: {RERUN}.",
        "Time per epoch is the median epoch wall time, leaving out the first epoch when "
        "there is more than one (it contains the warmup).",
        "Accuracy: after every epoch each run evaluates its validation split (model.eval(), "
        "no gradients, no augmentation, the training's mixed precision); under DDP each "
        "rank takes its own share, no image repeated, and the counts are added up over "
        "the ranks, so every image counts once. Evaluation is timed apart and enters no "
        "step, epoch or throughput. Time to accuracy is the training wall time (the sum of "
        "the epochs, evaluation left out) until the first evaluation at or above the "
        "target; its speed-up is the matching baseline's time over the run's. Accuracies "
        f"more than {100 * ACCURACY_GAP:g} points apart at the same epoch are explained "
        "from the configurations.",
        "GPU memory is the peak allocated by PyTorch on each GPU after warmup "
        "(torch.cuda.max_memory_allocated), less the synthetic data pool resident on that "
        "GPU (data_pool_bytes: the same for every method, but under DataParallel only on "
        "GPU 0, where it would inflate GPU 0's surplus); the table shows the largest and "
        "smallest GPU of a run. The CPU has no allocator statistics: n/a (CPU); the "
        "host's peak resident "
        "memory (RSS, the largest over the processes of a run) is shown instead, and for "
        "every run under Run details.",
        "Scaling efficiency = throughput on N devices / (N × throughput of the matching "
        "single-device 02 run); speedup = throughput / baseline throughput. N is the GPUs "
        "DataParallel splits each batch over, or the DDP world size. A baseline matches "
        "when model, image size, per-device batch, mixed precision, channels_last, "
        "torch.compile, data source and device name agree, and on CPUs threads per "
        "process (the host may differ; a setting missing from both files counts as "
        "equal). With N = "
        "1 efficiency is not a scaling measurement and is not given.",
    ]
