"""The report itself: one context, rendered by a template as self-contained HTML (jinja2,
autoescaped) or as Markdown (the same context, every value escaped), plus the CSV of the
main table.

Everything that comes from a result file is text to display, never markup: the HTML
template is autoescaped, and the Markdown template passes every value through ``md``.
"""

from __future__ import annotations

import datetime as dt
import re

import jinja2
import pandas as pd
from markupsafe import Markup

from labs import fmt
from labs.report import (communicate as communicate_mod, environment, machines as machines_mod,
                         narrative, overlap as overlap_mod, scaling as scaling_mod)
from labs.report.analysis import (SPREAD_LIMIT, SUPERLINEAR_LIMIT, WORLD_SIZE_1,
                                  WRAPPER_FASTER_LIMIT, RERUN, allreduce_sweeps, flag_kind,
                                  precision)
from labs.report.loading import Folder, failure_reason
from labs.report.output import GENERATOR, MARKDOWN_MARK, TITLE


# --- the main table, one row per configuration ------------------------------------------

def _memory(r) -> tuple[str, str]:
    """(cell, detail): device 0's peak / the others' median, or the host's RSS on CPUs."""
    if fmt.missing(r["mem_max"]):
        rss = "" if fmt.missing(r["host_rss"]) else f"host RSS {fmt.gib(r['host_rss'], 1)}"
        return ("n/a (CPU)" if r["cpu"] else "n/a"), rss
    surplus = narrative.gpu0_surplus(r)
    if surplus and abs(surplus[0] - surplus[1]) > 0.005 * surplus[1]:
        return f"{surplus[0] / 2**30:.1f} / {surplus[1] / 2**30:.1f} GiB", "device 0 / others"
    return fmt.gib(r["mem_max"], 1), "every device" if len(r["mem_by_device"]) > 1 else ""


def _speedup(r, unit: str) -> tuple[str, str]:
    if r["efficiency_note"] == "baseline":
        return "1.00×", "the baseline"
    if fmt.missing(r["speedup"]):
        return "n/a", r["efficiency_note"] or ""
    detail = f"vs {fmt.rate(r['baseline_tp'])}"
    if r["efficiency_note"] == WORLD_SIZE_1:
        detail = f"one {unit}: the wrapper's overhead"
    return fmt.times(r["speedup"]), detail


def _efficiency(r) -> tuple[str, str, str]:
    """(cell, detail, CSS class). Only a trusted figure is coloured."""
    if not fmt.missing(r["efficiency"]):
        level = ("unreliable" if r["flags"] else "good" if r["efficiency"] >= 0.85
                 else "fair" if r["efficiency"] >= 0.6 else "poor")
        return fmt.pct(r["efficiency"]), f"{r['scaling_mode']} scaling", level
    if r["efficiency_note"] == "baseline":
        return "—", "baseline", "na"
    if r["efficiency_note"] == WORLD_SIZE_1:
        return "—", "one device: not scaling", "na"
    return "n/a", "", "na"


def _accuracy(r) -> tuple[str, str, str, str]:
    """(final accuracy, its detail, time to target, its detail)."""
    if not r.get("eval"):
        return "n/a", "no evaluation", "—", ""
    final = fmt.pct(r["final_accuracy"], 1)
    detail = f"after epoch {r['eval'][-1]['epoch']}"
    if fmt.missing(r["target_accuracy"]):
        return final, detail, "—", "no target"
    target = fmt.pct(r["target_accuracy"])
    if fmt.missing(r["time_to_accuracy_s"]):
        return final, detail, "not reached", f"{target} target"
    tta_detail = f"to {target}"
    if not fmt.missing(r.get("tta_speedup")):
        how = "sooner" if r["tta_speedup"] >= 1 else "slower"
        tta_detail += f" · {fmt.times(r['tta_speedup'])} {how}"
    return final, detail, fmt.seconds(r["time_to_accuracy_s"]), tta_detail


def _method_detail(r) -> str:
    parts = [str(r["lab"])]
    if precision(r["amp"]) not in str(r["label"]):
        parts.append(precision(r["amp"]))
    if r["amp"] == "off" and r["tf32"] is True:
        parts.append("TF32 on")
    if not fmt.missing(r["steps_measured"]):
        parts.append(f"{int(r['steps_measured']):,} steps")
    if r["n_runs"] > 1:
        parts.append(f"{r['n_runs']} runs")
    if r["strategy"] == "ddp" and isinstance(r["backend"], str):
        parts.append(r["backend"])
    return " · ".join(parts)


def table_rows(rows: pd.DataFrame, unit: str) -> list[dict]:
    out = []
    for _, r in rows.iterrows():
        n = int(r["n_devices"])
        eff, eff_detail, eff_class = _efficiency(r)
        speedup, speedup_detail = _speedup(r, unit)
        memory, memory_detail = _memory(r)
        accuracy, accuracy_detail, tta, tta_detail = _accuracy(r)
        tp_detail = f"p10–p90 {fmt.rate(r['tp_p10'])}–{fmt.rate(r['tp_p90'])}"
        if r["n_runs"] > 1:
            tp_detail += (f" · runs {fmt.rate(r['tp_run_min'])}–{fmt.rate(r['tp_run_max'])}")
        out.append({
            "label": r["label"], "strategy": r["strategy"], "detail": _method_detail(r),
            "devices": str(n), "batch": str(r["global_batch_size"]),
            "batch_detail": f"{n} × {r['per_device_batch_size']}" if n > 1 else "",
            "throughput": fmt.rate(r["tp_median"]), "throughput_detail": tp_detail,
            "speedup": speedup, "speedup_detail": speedup_detail,
            "efficiency": eff, "efficiency_detail": eff_detail, "efficiency_class": eff_class,
            "memory": memory, "memory_detail": memory_detail,
            "accuracy": accuracy, "accuracy_detail": accuracy_detail,
            "tta": tta, "tta_detail": tta_detail,
            "flagged": bool(r["flags"]),
            "flag_kinds": ", ".join(dict.fromkeys(flag_kind(f) for f in r["flags"])),
        })
    return out


# --- run details: everything else each configuration recorded ------------------------------

def _per_rank(r) -> list[str]:
    ranks = [d for d in r["rank_detail"] if not fmt.missing(d["median"])]
    if not ranks:
        return ["not recorded"]
    slowest = r["slowest_rank"]
    return [f"rank {int(d['rank']) if not fmt.missing(d['rank']) else '?'}"
            f"{' (slowest)' if len(ranks) > 1 and d['rank'] == slowest else ''}: "
            f"{fmt.seconds(d['median'])} ({fmt.seconds(d['p10'])} – "
            f"{fmt.seconds(d['p90'])})" for d in ranks]


def _communication(r) -> str:
    if r["strategy"] != "ddp":
        return "—"
    if fmt.missing(r["compute_median"]) or fmt.missing(r["exposed_comm_s"]):
        return "not measured"
    return (f"compute-only {fmt.seconds(r['compute_median'])} "
            f"({fmt.seconds(r['compute_p10'])} – {fmt.seconds(r['compute_p90'])}); "
            + narrative.exposed_text(r))


def _gpu_activity(r) -> list[str]:
    if r["cpu"]:
        return ["CPU: not applicable"]
    parts, readings = [], []
    for d in r["device_detail"]:
        util, power = d["utilization_pct"], d["power_w"]
        if fmt.missing(util) and fmt.missing(power):
            continue
        values = [f"{util:.0f}%" if not fmt.missing(util) else None,
                  f"{power:.0f} W" if not fmt.missing(power) else None]
        who = (f"rank {d['rank']}" if r["strategy"] == "ddp" and d["rank"] is not None
               else f"GPU {d['index']}")
        readings.append(" · ".join(v for v in values if v))
        parts.append(f"{who}: {readings[-1]}")
    if len(parts) > 1 and len(set(readings)) == 1:
        return [f"{len(parts)} {'ranks' if r['strategy'] == 'ddp' else 'GPUs'}: "
                f"{readings[0]} each"]
    return parts or ["not recorded (no NVML)"]


def detail_rows(rows: pd.DataFrame) -> list[dict]:
    epoch_unit = fmt.unit_for(rows["epoch_time_s"])  # one unit for the whole column
    return [{
        "label": r["label"], "strategy": r["strategy"],
        "epoch": fmt.seconds_in(r["epoch_time_s"], epoch_unit),
        "threads": "not recorded" if fmt.missing(r["threads_per_process"])
        else str(int(r["threads_per_process"])),
        "data_wait": fmt.pct(r["data_wait_fraction"], 1),
        "per_rank": _per_rank(r), "communication": _communication(r),
        "host_rss": fmt.gib(r["host_rss"]), "gpu_activity": _gpu_activity(r),
    } for _, r in rows.iterrows()]


def _step01(folder: Folder, record: dict) -> dict:
    file = folder.file_of(record)
    return {"file": file, "rows": environment.describe(environment.block(record)),
            "probes": environment.probe_tables(record, folder.parts_skipped.get(file, ())),
            "topology": record.get("topology") if isinstance(record.get("topology"), str)
            else None,
            "recommendations": environment.texts(record.get("recommendations")),
            "notes": environment.texts(record.get("notes"))}


def _unfinished(folder: Folder, records) -> list[dict]:
    return [{"file": folder.file_of(r), "run_name": str(r.get("run_name")),
             "lab": str(r.get("lab")), "status": str(r.get("status")),
             "reason": failure_reason(r)} for r in records]


# --- the context: what every output format shows ----------------------------------------

def _scaling(m, folder: Folder, scaling_plot) -> dict | None:
    found = scaling_mod.analyse(m.rows, m.step01, folder.file_of)
    if found is None:
        return None
    model = found.model
    return {
        "figure": scaling_plot(m, found.curves) if scaling_plot else None,
        "sentences": found.sentences,
        "curves": [{"name": c.name, "rows": scaling_mod.table_rows(c), "notes": c.notes}
                   for c in found.curves],
        "refusal": found.refusal,
        "model": None if model is None else {
            "fits": scaling_mod.fit_rows(model), "hidden": fmt.pct(model.hidden),
            "calibration": model.calibration, "buckets": model.buckets,
            "source": model.source},
        "links": found.links, "link_ns": found.link_ns,
    }


def _overlap(m, timeline_plot) -> dict | None:
    found = overlap_mod.analyse(m.rows)
    if found is None:
        return None
    figure = timeline_plot(m, found["timelines"], found["more_ranks"]) if timeline_plot \
        else None
    return {**found, "figure": figure}


def _communicate(m, communicate_plot) -> dict | None:
    found = communicate_mod.analyse(m.rows)
    if found is None:
        return None
    return {**found, "figure": communicate_plot(m, found["points"]) if communicate_plot
            else None}


def build_context(folder: Folder, table: pd.DataFrame, machine_plots, generated_by: str,
                  step01_plots=None, scaling_plot=None, timeline_plot=None,
                  communicate_plot=None) -> dict:
    """``machine_plots(machine) -> list[Plot]``: the figures of one machine's section;
    ``step01_plots(machine) -> Plot | None``: its step-01 bandwidth figure;
    ``scaling_plot(machine, curves) -> Plot``: its scaling figure;
    ``timeline_plot(machine, timelines, more_ranks) -> Plot``: its profiled step;
    ``communicate_plot(machine, points) -> Plot``: its accuracy against bytes."""
    found = machines_mod.group(table, folder.environments, folder.file_of, folder.unfinished)
    sweeps = allreduce_sweeps(folder.environments, folder.file_of)
    sections = []
    for m in found:
        figures = list(machine_plots(m)) if machine_plots else []
        bandwidth_plot = step01_plots(m) if step01_plots else None
        sections.append({
            "slug": m.slug, "title": m.title, "facts": m.facts, "host": m.host,
            "step01_files": m.step01_files,
            "headline": narrative.headline(m),
            "rows": table_rows(m.rows, m.unit),
            "cpu": m.cpu,
            "verdict": narrative.verdict(m),
            "why": narrative.why(m, sweeps, table),
            "unreliable": narrative.unreliable(m),
            "unfinished": _unfinished(folder, m.unfinished),
            "figures": [f for f in figures if getattr(f, "primary", False) and f.png],
            "more_figures": [f for f in figures if not getattr(f, "primary", False)],
            "bandwidth_plot": bandwidth_plot,
            "details": detail_rows(m.rows),
            "scaling": _scaling(m, folder, scaling_plot),
            "overlap": _overlap(m, timeline_plot),
            "communicate": _communicate(m, communicate_plot),
            "step01": [_step01(folder, e) for e in m.step01],
        })
    described = {id(e) for m in found for e in m.step01}
    label_of_file = {f: r["label"] for _, r in table.iterrows() for f in r["files"]}
    runs = sorted(({"file": folder.file_of(rec), "run_name": str(rec.get("run_name")),
                    "lab": str(rec.get("lab")), "status": str(rec.get("status")),
                    "label": label_of_file.get(folder.file_of(rec), ""),
                    "started_at": str(rec.get("started_at") or ""),
                    "command": str(rec.get("command") or "(not recorded)"),
                    "notes": environment.texts(rec.get("notes"))}
                   for rec in [*folder.runs, *folder.unfinished]),
                  key=lambda r: (r["started_at"], r["file"]))
    warm = sorted({int(w) for w in table["warmup_steps"].dropna()}) if not table.empty else []
    return {
        "title": TITLE,
        "generator": GENERATOR,  # the mark by which 05 knows its own report
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "generated_by": generated_by,
        "results_dir": str(folder.path),
        "counts": counts(folder, table, len(found)),
        "machines": sections,
        "orphan_unfinished": _unfinished(folder, machines_mod.orphans(found, folder.unfinished)),
        "other_step01": [_step01(folder, e) for e in folder.environments
                         if id(e) not in described],
        "runs": runs,
        "skipped": folder.skipped,
        "limits": {"superlinear": fmt.pct(SUPERLINEAR_LIMIT), "spread": fmt.pct(SPREAD_LIMIT),
                   "wrapper": fmt.pct(WRAPPER_FASTER_LIMIT - 1),
                   "noise": fmt.pct(narrative.NOISE_STEP_SHARE),
                   "gap": f"{100 * narrative.ACCURACY_GAP:g}",
                   "data_wait": fmt.pct(narrative.DATA_WAIT_LIMIT),
                   "warmup": "/".join(map(str, warm))},
        "rerun": RERUN,
    }


def counts(folder: Folder, table: pd.DataFrame, machines: int) -> dict:
    """Runs, and what they were run as: configurations are the settings a comparison
    holds fixed (model, image size, per-device batch, precision, ...), methods the rows."""
    return {"runs": len(folder.runs), "unfinished": len(folder.unfinished),
            "skipped": len(folder.skipped), "machines": machines,
            "rows": len(table),
            "configurations": int(table["family"].nunique()) if not table.empty else 0}


# --- rendering ------------------------------------------------------------------------

class Raw(str):
    """Markdown the template builds itself (a code fence): not escaped again."""


_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}#|!~<>])")


def md(value) -> str:
    """Markdown text for any value: HTML and Markdown syntax is backslash-escaped, so a
    run name cannot become markup."""
    if isinstance(value, Raw):
        return value
    text = " ".join(str(value).split())
    return _MD_SPECIAL.sub(r"\\\1", text.replace("&", "&amp;"))


def _fence(text) -> Raw:
    fence = "~~~"
    while fence in str(text):
        fence += "~"
    return Raw(f"{fence}sh\n{text}\n{fence}")


def _environment(markdown: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("labs.report", "templates"),
        autoescape=not markdown,  # HTML: every value from a result file is text
        finalize=md if markdown else None,  # Markdown: the same, by escaping
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    if markdown:
        env.globals["code"] = lambda text: Raw("`" + str(text).replace("`", "'") + "`")
        env.filters["fence"] = _fence
    else:
        env.globals["code"] = lambda text: Markup("<code>{}</code>").format(text)
    return env


def _paragraphs(env: jinja2.Environment, name: str, context: dict, markdown: bool) -> list:
    """A template of fixed prose (blank-line separated paragraphs) as a list."""
    text = env.get_template(name).render(**context)
    parts = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return [Raw(p) for p in parts] if markdown else [Markup(p) for p in parts]


def html(context: dict) -> str:
    env = _environment(markdown=False)
    methodology = _paragraphs(env, "methodology.j2", context, markdown=False)
    return env.get_template("report.html.j2").render(**context, methodology=methodology)


def markdown(context: dict, png_names: dict[str, str] | None) -> str:
    env = _environment(markdown=True)
    methodology = _paragraphs(env, "methodology.j2", context, markdown=True)
    return env.get_template("report.md.j2").render(
        **context, methodology=methodology,
        png_names={key: Raw(name) for key, name in (png_names or {}).items()},
        mark=Raw(MARKDOWN_MARK))


# --- CSV ------------------------------------------------------------------------------

CSV_COLUMNS = {
    "label": "method", "strategy": "strategy", "lab": "lab", "n_devices": "devices",
    "world_size": "world_size", "global_batch_size": "total_batch",
    "per_device_batch_size": "per_device_batch", "epoch_time_s": "time_per_epoch_s",
    "mem_max": "gpu_mem_peak_max_bytes", "mem_min": "gpu_mem_peak_min_bytes",
    "tp_median": "throughput_img_s_median", "tp_p10": "throughput_img_s_p10",
    "tp_p90": "throughput_img_s_p90", "baseline_tp": "baseline_img_s",
    "speedup": "speedup", "efficiency": "scaling_efficiency", "scaling_mode": "scaling",
    "efficiency_note": "efficiency_note", "n_runs": "runs",
    "tp_run_min": "throughput_run_min", "tp_run_max": "throughput_run_max",
    "step_median": "step_time_s_median", "steps_measured": "steps_measured",
    "data_wait_fraction": "data_wait_fraction",
    "model": "model", "img_size": "img_size", "amp": "amp", "tf32": "tf32",
    "channels_last": "channels_last", "compile": "compile", "data": "data",
    "host": "host", "hardware": "hardware", "backend": "backend", "hosts": "hosts",
    "threads_per_process": "threads_per_process", "gradient_bytes": "gradient_bytes",
    "compute_median": "compute_only_step_time_s_median",
    "exposed_comm_s": "exposed_comm_s", "host_rss": "host_peak_rss_bytes",
    "final_accuracy": "final_accuracy", "target_accuracy": "target_accuracy",
    "time_to_accuracy_s": "time_to_accuracy_s", "tta_speedup": "time_to_accuracy_speedup",
}


def csv(table: pd.DataFrame) -> str:
    if table.empty:
        return ",".join([*CSV_COLUMNS.values(), "runs_in_folder", "flags"]) + "\n"
    frame = table[list(CSV_COLUMNS)].rename(columns=CSV_COLUMNS)
    frame["runs_in_folder"] = [";".join(names) for names in table["run_names"]]
    frame["flags"] = ["; ".join(flags) for flags in table["flags"]]
    return frame.to_csv(index=False, lineterminator="\n")
