"""The report's sentences that depend on the numbers, one machine at a time: the headline,
the verdict, the why, and the list of unreliable runs.

Rules: only rows without validity flags (``analysis.validity_flags``) are stated as
results, and a flagged run is named only in ``unreliable``; every sentence that compares
names its machine; every mechanism is stated from a measurement of the same machine, or
not at all. Fixed text (methodology, definitions) lives in the templates."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from labs import bandwidth, fmt
from labs.report.analysis import ELSEWHERE, flag_kind, precision, reliable, setting_pairs
from labs.report.machines import Machine, gradient_bytes_of, interconnect, sweep_for

DATA_WAIT_LIMIT = 0.10  # above this share of step time the input pipeline is the bottleneck
NOISE_STEP_SHARE = 0.02  # exposed communication below 2% of the step is not told from zero
ACCURACY_GAP = 0.05  # further apart than this at any common epoch: explained
VERDICT_LINES = 6


def _given(value) -> bool:
    return not fmt.missing(value)


def _list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _trusted(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[reliable(rows)] if not rows.empty else rows


def _candidates(ok: pd.DataFrame) -> pd.DataFrame:
    """Configurations a reader could choose: a one-device wrapper is its baseline plus
    overhead, never one to use where the baseline itself is among ``ok``."""
    wrapped = (ok["strategy"] != "single") & (ok["n_devices"] == 1)
    return ok[~wrapped] if (ok["strategy"] == "single").any() else ok


def _fastest(rows: pd.DataFrame):
    rows = rows[rows["tp_median"].notna()]
    return None if rows.empty else rows.loc[rows["tp_median"].astype(float).idxmax()]


def _what(r) -> str:
    """A configuration in words: "DDP ×4 (bf16, global batch 256)"."""
    return f"{r['label']} ({precision(r['amp'])}, global batch {r['global_batch_size']})"


def _versus_baseline(r, m: Machine) -> str:
    if r["strategy"] == "single" or not _given(r["speedup"]):
        return ""
    text = f", {fmt.times(r['speedup'])} the one-{m.unit} baseline"
    if _given(r["efficiency"]):
        text += f" ({fmt.pct(r['efficiency'])} {r['scaling_mode']}-scaling efficiency)"
    return text


def _reached(r) -> bool:
    return _given(r["time_to_accuracy_s"])


def _targeted(r) -> bool:
    return bool(r["eval"]) and _given(r["target_accuracy"])


# --- the headline: one sentence -------------------------------------------------------------

def headline(m: Machine) -> str:
    """One sentence: what to use on this machine, and why; or why no figure can be
    trusted. With evaluations the practitioner's figure decides, time to the target
    accuracy, and only a run that reached the target is recommended; a faster run that
    missed it is named as such."""
    where = f"On {m.short}"
    rows = m.rows[m.rows["tp_median"].notna()]
    if rows.empty:
        return f"{where}, no completed run measured a throughput."
    ok = _candidates(_trusted(rows))
    if ok.empty:
        kinds = Counter(flag_kind(f) for flags in rows["flags"] for f in flags)
        why = ", ".join(f"{kind} ×{n}" for kind, n in kinds.items())
        text = (f"{where}, no figure is reliable ({why}): every run is listed below the "
                "table with its reason")
        if (m.rows["n_devices"] <= 1).all():
            text += f"; every run used one {m.unit}, so scaling is not measured here"
        return text + "."
    fastest = _fastest(ok)
    targeted = ok[ok.apply(_targeted, axis=1)]
    if targeted.empty:
        text = (f"{where}, the fastest reliable configuration was {_what(fastest)}: "
                f"{fmt.rate(fastest['tp_median'])} img/s{_versus_baseline(fastest, m)}")
    else:
        target = fmt.pct(targeted["target_accuracy"].iloc[0])
        reached = targeted[targeted.apply(_reached, axis=1)]
        if reached.empty:
            return (f"{where}, no reliable configuration reached the {target} target; the "
                    f"fastest was {_what(fastest)} at {fmt.rate(fastest['tp_median'])} "
                    "img/s.")
        best = reached.loc[reached["time_to_accuracy_s"].astype(float).idxmin()]
        text = (f"{where}, {_what(best)} reached {target} accuracy soonest, after "
                f"{fmt.seconds(best['time_to_accuracy_s'])} of training: "
                f"{fmt.rate(best['tp_median'])} img/s{_versus_baseline(best, m)}")
        if fastest["label"] != best["label"]:
            text += f"; {fastest['label']} was fastest ({fmt.rate(fastest['tp_median'])} img/s)"
            if _reached(fastest):
                text += (f" but needed {fmt.seconds(fastest['time_to_accuracy_s'])} to "
                         f"reach {target}")
            else:
                text += (f" but did not reach {target} ({fmt.pct(fastest['final_accuracy'], 1)}"
                         f" after {fmt.plural(fastest['eval'][-1]['epoch'], 'epoch')})")
    if (m.rows["n_devices"] <= 1).all():
        text += f"; every run used one {m.unit}, so scaling is not measured here"
    return text + "."


# --- the verdict: at most six lines, each naming the machine --------------------------------

def verdict(m: Machine) -> list[str]:
    ok = _trusted(m.rows)
    lines = [line for line in (_elsewhere_line(m), _scaling_line(m, ok, "ddp"),
                               _scaling_line(m, ok, "dp"),
                               _dp_versus_ddp(m, ok), _amp_line(m), _target_line(m, ok),
                               _unreliable_line(m)) if line]
    if (m.rows["n_devices"] > 1).any() and not (ok["efficiency"].notna()).any():
        notes = sorted({n for n in m.rows.loc[m.rows["n_devices"] > 1, "efficiency_note"]
                        if isinstance(n, str) and n.startswith("no ")})
        if notes:
            lines.insert(0, f"{m.host}: no scaling efficiency: " + "; ".join(notes) + ".")
    if m.cpu:
        threads = sorted({int(t) for t in m.rows["threads_per_process"] if _given(t)})
        each = ("one thread each" if threads == [1] else
                f"{' or '.join(map(str, threads))} threads each" if threads else
                "threads not recorded")
        lines.append(f"{m.host} · CPU processes of {each}; they show the mechanics, not GPU "
                     "speed.")
    return lines[:VERDICT_LINES]


def _elsewhere_line(m: Machine) -> str | None:
    """Runs whose matching 02 baseline ran only on another machine: no figure, and where
    that baseline is, so a reader neither trusts a cross-machine ratio nor misses why."""
    notes = m.rows["efficiency_note"]
    rows = m.rows[notes.map(lambda n: isinstance(n, str) and n.startswith(ELSEWHERE))]
    if rows.empty:
        return None
    where = list(dict.fromkeys(place for note in rows["efficiency_note"]
                               for place in note.split(": ", 1)[1].split("; ")))
    its = "its" if len(rows) == 1 else "their"
    return (f"{m.host} · {_list(list(rows['label']))}: no speed-up or scaling efficiency, "
            f"because {its} matching 02 baseline ran only on another machine, "
            f"{_list(where)}; run 02 on this machine with the same settings to compare.")


def _scaling_line(m: Machine, ok: pd.DataFrame, strategy: str) -> str | None:
    rows = ok[(ok["strategy"] == strategy) & ok["efficiency"].notna()]
    if rows.empty:
        return None
    name = "DDP" if strategy == "ddp" else "DataParallel"
    items = [f"{r['label'].replace('DDP ', '').replace('DP ', '')} "
             f"{fmt.times(r['speedup'])} ({fmt.pct(r['efficiency'])})"
             for _, r in rows.iterrows()]
    modes = set(rows["scaling_mode"])
    mode = ("weak scaling: the per-device batch stayed "
            f"{_list(sorted({str(b) for b in rows['per_device_batch_size']}))}"
            if modes == {"weak"} else "strong scaling: the global batch stayed fixed"
            if modes == {"strong"} else "weak and strong scaling mixed")
    return (f"{m.host} · {name}: {'; '.join(items)} the one-{m.unit} throughput, "
            f"efficiency in brackets ({mode}).")


def _dp_versus_ddp(m: Machine, ok: pd.DataFrame) -> str | None:
    dp = ok[(ok["strategy"] == "dp") & ok["efficiency"].notna()]
    ddp = ok[(ok["strategy"] == "ddp") & ok["efficiency"].notna()]
    common = sorted(set(dp["n_devices"]) & set(ddp["n_devices"]))
    if not common:
        return None
    n = common[-1]
    a, b = _fastest(ddp[ddp["n_devices"] == n]), _fastest(dp[dp["n_devices"] == n])
    units = fmt.plural(int(n), m.unit)
    if a["family"] == b["family"]:
        return (f"{m.host} · on {units} DDP gave {fmt.times(a['tp_median'] / b['tp_median'])} "
                f"DataParallel's throughput ({fmt.rate(a['tp_median'])} vs "
                f"{fmt.rate(b['tp_median'])} img/s, same settings).")
    return (f"{m.host} · on {units} DDP kept {fmt.pct(a['efficiency'])} efficiency and "
            f"DataParallel {fmt.pct(b['efficiency'])}, each against the baseline of its own "
            f"precision ({precision(a['amp'])} and {precision(b['amp'])}).")


def setting_effects(rows: pd.DataFrame, field: str = "amp") -> list[tuple]:
    """(reference, variant) rows of reliable configurations that differ in ``field`` only,
    the smallest device count first."""
    pairs = [(rows.loc[a], rows.loc[b]) for a, b in setting_pairs(rows, field)]
    pairs = [(a, b) for a, b in pairs if not a["flags"] and not b["flags"]
             and _given(a["tp_median"]) and _given(b["tp_median"])]
    return sorted(pairs, key=lambda p: p[1]["n_devices"])


def _amp_line(m: Machine) -> str | None:
    pairs = setting_effects(m.rows)
    if not pairs:
        return None
    ref, var = pairs[0]
    text = (f"{m.host} · {precision(var['amp'])} autocast gave "
            f"{fmt.times(var['tp_median'] / ref['tp_median'])} the fp32 throughput on "
            f"{fmt.plural(int(var['n_devices']), m.unit)} ({fmt.rate(var['tp_median'])} vs "
            f"{fmt.rate(ref['tp_median'])} img/s)")
    if _given(ref["mem_max"]) and _given(var["mem_max"]) and ref["mem_max"]:
        text += f", peak memory {100 * (var['mem_max'] / ref['mem_max'] - 1):+.0f}%"
    if ref["tf32"] is True:
        text += " (fp32 with TF32 matmuls on)"
    return text + "."


def _target_line(m: Machine, ok: pd.DataFrame) -> str | None:
    """Time to the target: the soonest configuration against its baseline, and every
    configuration that did not get there."""
    rows = ok[ok.apply(_targeted, axis=1)] if not ok.empty else ok
    if rows.empty:
        return None
    target = fmt.pct(rows["target_accuracy"].iloc[0])
    reached = _candidates(rows[rows.apply(_reached, axis=1)])
    items = []
    if not reached.empty:
        soonest = reached.loc[reached["time_to_accuracy_s"].astype(float).idxmin()]
        items.append(f"soonest {soonest['label']} after "
                     f"{fmt.seconds(soonest['time_to_accuracy_s'])}")
        if _given(soonest.get("baseline_tta")) and _given(soonest.get("tta_speedup")):
            items[-1] += (f", {fmt.times(soonest['tta_speedup'])} sooner than its baseline "
                          f"({fmt.seconds(soonest['baseline_tta'])})")
    missed = [r["label"] for _, r in rows.iterrows() if not _reached(r)]
    if missed:
        items.append(f"{_list(missed)} did not reach it")
    return f"{m.host} · time to {target} accuracy: {'; '.join(items)}."


def _unreliable_line(m: Machine) -> str | None:
    flagged = m.rows[~reliable(m.rows)]
    if flagged.empty:
        return None
    items = [f"{r['label']} ({', '.join(dict.fromkeys(map(flag_kind, r['flags'])))})"
             for _, r in flagged.iterrows()]
    return (f"{m.host} · left out as unreliable: {'; '.join(items)}; see the list below "
            "the table.")


def unreliable(m: Machine) -> list[dict]:
    """The machine's flagged configurations, each with its reasons."""
    return [{"label": r["label"], "flags": list(r["flags"])}
            for _, r in m.rows.iterrows() if r["flags"]]


# --- the why: each mechanism from this machine's measurements -------------------------------

def why(m: Machine, sweeps: list[dict], table: pd.DataFrame) -> list[dict]:
    """Short sections of explanation, each {"title", "paragraphs"}; ``table`` is the whole
    comparison (only for a model's parameter bytes, the same on every machine)."""
    out = []
    for section in (_dataparallel(m, table), _ddp(m, sweeps), _accuracy(m), _settings(m),
                    _input_pipeline(m), _caveats(m)):
        if section and section["paragraphs"]:
            out.append(section)
    return out


def gpu0_surplus(r) -> tuple[float, float] | None:
    """(device 0's peak, the median of the others') in bytes."""
    memory = [v for v in r["mem_by_device"] if _given(v)]
    if len(memory) < 2 or not _given(r["mem_by_device"][0]):
        return None
    others = sorted(memory[1:])
    return r["mem_by_device"][0], others[len(others) // 2]


def _utilisation(r) -> str | None:
    readings = [(d["index"], d["utilization_pct"]) for d in r["device_detail"]
                if _given(d["utilization_pct"])]
    if len(readings) < 2 or readings[0][0] != 0:
        return None
    others = [u for _, u in readings[1:]]
    low, high = min(others), max(others)
    spread = f"{low:.0f}%" if round(low) == round(high) else f"{low:.0f}–{high:.0f}%"
    last = readings[-1][0]
    who = "GPU 1" if last == 1 else f"GPUs 1–{last}"
    text = f"NVML saw GPU 0 busy {readings[0][1]:.0f}% of the time and {who} {spread}"
    if readings[0][1] > high + 5:
        text += ": the replicas wait while GPU 0 scatters, gathers and sums alone"
    return text


def dp_traffic(r, table: pd.DataFrame) -> str | None:
    """What crosses GPU 0 in one DataParallel step at this run's batch: the input it
    scatters, the weights it copies to every replica, the gradients it sums from them and
    the outputs it gathers."""
    n = int(r["n_devices"])
    weights = gradient_bytes_of(r["model"], r["num_classes"], table)
    if weights is None or not _given(r["img_size"]) or not _given(r["global_batch_size"]):
        return None
    images = float(r["global_batch_size"]) * 3 * float(r["img_size"]) ** 2 * 4  # fp32
    scattered = images * (n - 1) / n
    total = scattered + 2 * (n - 1) * weights
    text = (f"each step GPU 0 sends {fmt.size(scattered)} of input to the other "
            f"{fmt.plural(n - 1, 'GPU')}, copies the {fmt.size(weights)} of weights to every "
            "replica and "
            f"sums {n - 1} × {fmt.size(weights)} of gradients back: about "
            f"{fmt.size(total)} through GPU 0 per step")
    if _given(r["step_median"]) and r["step_median"] > 0:
        text += f", {total / r['step_median'] / 1e9:.1f} GB/s at the measured step time"
    return text


def _dataparallel(m: Machine, table: pd.DataFrame) -> dict | None:
    dp = m.rows[(m.rows["strategy"] == "dp") & (m.rows["n_devices"] > 1)]
    if dp.empty:
        if (m.rows["strategy"] == "dp").any():
            return {"title": "DataParallel", "paragraphs": [
                f"On {m.host} DataParallel ran on one device, where it calls the module "
                "directly: neither GPU 0's extra work nor scaling shows there."]}
        return None
    trusted = _trusted(dp)
    r = dp.loc[dp["n_devices"].astype(int).idxmax()] if trusted.empty else \
        trusted.loc[trusted["n_devices"].astype(int).idxmax()]
    facts = []
    surplus = gpu0_surplus(r)
    if surplus:
        first, others = surplus
        facts.append(f"GPU 0 peaked at {fmt.gib(first)} of memory and the other GPUs at "
                     f"{fmt.gib(others)} ({100 * (first / others - 1):+.0f}%)"
                     + (": it holds the master weights, the gathered outputs and the loss"
                        if first > 1.05 * others else ""))
    busy = _utilisation(r)
    if busy:
        facts.append(busy)
    traffic = dp_traffic(r, table)
    if traffic:
        facts.append(traffic)
    link = interconnect(m)
    if link:
        facts.append(link)
    elif not m.cpu:
        facts.append(f"how the GPUs of {m.host} connect was not recorded (run "
                     "01_environment_check.py there)")
    if not facts:
        return {"title": "DataParallel", "paragraphs": [
            f"{r['label']} on {m.host}: neither memory nor utilisation per GPU was "
            "measured, so GPU 0's extra work cannot be shown."]}
    lead = f"{r['label']} on {m.host}"
    if r["flags"]:
        lead += " (its throughput is unreliable; these readings are not)"
    return {"title": "Why DataParallel falls behind",
            "paragraphs": [f"{lead}: " + "; ".join(facts) + "."]}


# --- DDP: predicted and measured communication ----------------------------------------------

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


def exposed_text(r) -> str:
    """The exposed communication in words, a negative one explained."""
    exposed = r["exposed_comm_s"]
    if not _given(exposed):
        return "exposed communication was not measured (no compute-only steps in the file)"
    share = (f" ({fmt.pct(abs(exposed) / r['step_median'], 1)} of the step)"
             if _given(r["step_median"]) and r["step_median"] > 0 else "")
    if within_noise(r):
        return (f"the synced and compute-only steps differ by {fmt.seconds(exposed)}"
                f"{share}, within the noise of the measurement: no communication cost shows")
    if exposed < 0:
        return (f"the synced steps were {fmt.seconds(-exposed)}{share} faster than the "
                "compute-only ones, which cannot be communication: the machine's speed "
                "changed between the two measurements, so no cost can be read from it")
    return f"{fmt.seconds(exposed)}{share} of each step waited for communication"


def _wire_bytes(r) -> tuple[float | None, str]:
    grad = r["gradient_bytes"]
    hook = r["comm_hook"] if isinstance(r["comm_hook"], str) else "none"
    if not _given(grad):
        return None, "gradients of a size the file does not record"
    if hook in ("fp16", "bf16"):
        return grad / 2, f"{fmt.size(grad / 2)} of gradients ({hook}-compressed)"
    if hook == "powersgd":
        return None, f"{fmt.size(grad)} of gradients, PowerSGD-compressed"
    return grad, f"{fmt.size(grad)} of gradients"


def _ddp_paragraph(m: Machine, r, sweeps: list[dict]) -> str:
    n = int(r["n_devices"])
    wire, what = _wire_bytes(r)
    text = f"{r['label']} on {m.host}: each step all-reduces {what}. "
    sweep, how = sweep_for(m, sweeps, n, bool(r["cpu"]))
    predicted = None
    if sweep is not None and wire is not None:
        busbw = bandwidth.interpolate_busbw(sweep["results"], wire)
        predicted = bandwidth.predict_allreduce_s(wire, n, sweep["results"])
        if busbw is not None and predicted:
            text += (f"At the {busbw:.1f} GB/s bus bandwidth {how}, that takes "
                     f"{fmt.seconds(predicted)} (predicted). ")
    elif sweep is None:
        text += f"No prediction: {how}. "
    text += "Measured: " + exposed_text(r)
    exposed = r["exposed_comm_s"]
    if predicted and _given(exposed) and exposed > 0 and not within_noise(r):
        if exposed >= predicted:
            text += (": more than the whole predicted all-reduce, so none of it hid behind "
                     "backward and the ranks also waited for something else (the slowest "
                     "rank, or a slower link than step 01 measured)")
        else:
            text += (f", so about {fmt.pct(1 - exposed / predicted)} of the predicted "
                     "all-reduce hid behind backward")
    return text + "."


def _ddp(m: Machine, sweeps: list[dict]) -> dict | None:
    ddp = m.rows[m.rows["strategy"] == "ddp"]
    if ddp.empty:
        return None
    paragraphs = [_ddp_paragraph(m, r, sweeps) for _, r in _trusted(ddp).iterrows()
                  if int(r["n_devices"]) > 1]
    for _, r in _trusted(ddp[ddp["n_devices"] == 1]).iterrows():
        paragraphs.append(f"{r['label']} on {m.host} has nothing to exchange: its "
                          f"{fmt.times(r['speedup'])} of the baseline is DDP's own overhead "
                          "(copying gradients into buckets), not communication."
                          if _given(r["speedup"]) else
                          f"{r['label']} on {m.host} has nothing to exchange.")
    if ((ddp["backend"] == "gloo") & ~ddp["cpu"]).any():
        paragraphs.append(f"On {m.host} DDP used gloo on GPUs: far slower than NCCL, so it "
                          "understates DDP.")
    return {"title": "DDP: communication, predicted and measured", "paragraphs": paragraphs}


# --- accuracy -------------------------------------------------------------------------------

def accuracy_gap(r) -> dict | None:
    """The widest gap between ``r``'s accuracy and its baseline's at a common epoch, when
    it exceeds ACCURACY_GAP: {epoch, accuracy, baseline, causes}."""
    if r["strategy"] == "single" or not r["eval"] or not r.get("baseline_accuracy_eval"):
        return None
    mine = {p["epoch"]: p["accuracy"] for p in r["eval"]}
    theirs = {p["epoch"]: p["accuracy"] for p in r["baseline_accuracy_eval"]}
    common = sorted(set(mine) & set(theirs))
    if not common:
        return None
    epoch = max(common, key=lambda e: abs(mine[e] - theirs[e]))
    # in points, rounded as printed: 55% - 50% is 5.0 points, not 5.000000000000004
    if round(100 * abs(mine[epoch] - theirs[epoch]), 6) <= round(100 * ACCURACY_GAP, 6):
        return None
    return {"epoch": epoch, "accuracy": mine[epoch], "baseline": theirs[epoch],
            "causes": accuracy_causes(r)}


def accuracy_causes(r) -> list[str]:
    """What in the configuration can make ``r`` learn differently from its baseline."""
    causes = []
    n = int(r["n_devices"])
    if r["strategy"] == "ddp" and n > 1 and r["sync_bn"] is not True:
        causes.append(f"batch norm per rank over {r['per_device_batch_size']} of "
                      f"{r['global_batch_size']} images (no --sync-bn)")
    if r["strategy"] == "dp" and n > 1:
        causes.append(f"batch norm per GPU over 1/{n} of the batch")
    base_batch = r.get("baseline_global_batch")
    if _given(base_batch) and _given(r["global_batch_size"]) \
            and int(base_batch) != int(r["global_batch_size"]):
        causes.append(f"{r['global_batch_size'] / base_batch:g}× fewer optimizer steps per "
                      f"epoch (global batch {int(r['global_batch_size'])}, baseline "
                      f"{int(base_batch)})")
    base_lr = r.get("baseline_lr")
    if _given(base_lr) and _given(r["lr"]) and abs(r["lr"] - base_lr) > 1e-12 * max(1, base_lr):
        causes.append(f"learning rate {r['lr']:g} (baseline {base_lr:g})")
    return causes


def _accuracy(m: Machine) -> dict | None:
    rows = _trusted(m.rows)
    rows = rows[rows["eval"].map(bool)] if not rows.empty else rows
    if rows.empty:
        return None
    paragraphs = []
    for _, r in rows.iterrows():
        gap = accuracy_gap(r)
        if gap is None:
            continue
        why = ("; ".join(gap["causes"]) if gap["causes"] else
               "the settings agree, so it is run-to-run noise (repeat the runs)")
        paragraphs.append(
            f"{r['label']} on {m.host}: {100 * abs(gap['accuracy'] - gap['baseline']):.1f} "
            f"points {'below' if gap['accuracy'] < gap['baseline'] else 'above'} its baseline "
            f"at epoch {gap['epoch']} ({fmt.pct(gap['accuracy'], 1)} vs "
            f"{fmt.pct(gap['baseline'], 1)}); {why}.")
    grown = rows[(rows["n_devices"] > 1) & (rows["scaling_mode"] == "weak")]
    if not grown.empty:
        paragraphs.append(f"On {m.host} the global batch grew with the device count (weak "
                          "scaling), so an epoch has fewer, larger steps: compare time to "
                          "accuracy, not accuracy per epoch.")
    return {"title": "Accuracy", "paragraphs": paragraphs}


def _input_pipeline(m: Machine) -> dict | None:
    slow = _trusted(m.rows)
    slow = slow[slow["data_wait_fraction"] > DATA_WAIT_LIMIT] if not slow.empty else slow
    if slow.empty:
        return None
    items = [f"{r['label']} ({fmt.pct(r['data_wait_fraction'])})" for _, r in slow.iterrows()]
    return {"title": "Input pipeline", "paragraphs": [
        f"On {m.host} {_list(items)} waited for input data more than "
        f"{fmt.pct(DATA_WAIT_LIMIT)} of the measured time: raise --num-workers, or measure "
        "with --data synthetic."]}


# --- settings measured in pairs, and what the numbers cannot say ----------------------------

SETTINGS = {"amp": "autocast", "channels_last": "channels_last"}


def _settings(m: Machine) -> dict | None:
    """Every reliable pair of configurations that differ in amp only, or channels_last
    only: the throughput ratio and the peak-memory change."""
    paragraphs = []
    for field, name in SETTINGS.items():
        for ref, var in setting_effects(m.rows, field):
            what = (f"{precision(var['amp'])} {name} against fp32" if field == "amp" else
                    f"{name} {'on' if var[field] else 'off'} against "
                    f"{'on' if ref[field] else 'off'}")
            text = (f"{what}, {var['label']} on {m.host}: "
                    f"{fmt.times(var['tp_median'] / ref['tp_median'])} the throughput "
                    f"({fmt.rate(var['tp_median'])} vs {fmt.rate(ref['tp_median'])} img/s)")
            if _given(ref["mem_max"]) and _given(var["mem_max"]) and ref["mem_max"]:
                text += (f", peak memory {fmt.gib(ref['mem_max'], 1)} → "
                         f"{fmt.gib(var['mem_max'], 1)}")
            paragraphs.append(text + ".")
    if len(paragraphs) < 2:
        return None  # one pair: the verdict already says it
    return {"title": "Settings measured in pairs", "paragraphs": paragraphs}


def _caveats(m: Machine) -> dict | None:
    """What a reader must know before quoting this machine's numbers, when it applies."""
    paragraphs = []
    nodes = pd.to_numeric(m.rows["nnodes"], errors="coerce")
    several = m.rows[nodes > 1]
    if not several.empty:
        paragraphs.append(f"{_list(list(several['label']))} spanned several nodes from "
                          f"{m.host}: their efficiency includes the network between them.")
    for _, r in m.rows[m.rows["n_runs"] > 1].iterrows():
        if r["tp_run_min"] and r["tp_run_max"] / r["tp_run_min"] > 1.10 and not r["flags"]:
            paragraphs.append(f"The {r['n_runs']} runs of {r['label']} on {m.host} differ "
                              f"by {fmt.pct(r['tp_run_max'] / r['tp_run_min'] - 1)} in "
                              "throughput: the machine was not quiet, or the runs differ "
                              "in ways the files do not record.")
    if not paragraphs:
        return None
    return {"title": "Caveats", "paragraphs": paragraphs}
