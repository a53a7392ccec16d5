"""The report itself: one context, rendered as self-contained HTML (jinja2, autoescaped)
or Markdown, plus the CSV of the main table.

Everything that comes from a result file is text to display, never markup: the HTML
template is autoescaped, and the Markdown writer escapes every value.
"""

from __future__ import annotations

import datetime as dt
import re

import jinja2
import pandas as pd

from labs import fmt
from labs.report import environment, narrative
from labs.report.analysis import WORLD_SIZE_1, allreduce_sweeps
from labs.report.loading import Folder, failure_reason
from labs.report.output import GENERATOR, MARKDOWN_MARK
from labs.report.plots import Plot

TITLE = "DataParallel vs DistributedDataParallel: performance comparison"


# --- the context: what every output format shows ----------------------------------------

def _family_title(r) -> str:
    parts = [str(r["model"]), f"{r['img_size']} px", f"{r['per_device_batch_size']} per device",
             f"amp {r['amp']}"]
    if r["channels_last"]:
        parts.append("channels_last")
    if r["compile"]:
        parts.append("compiled")
    if not fmt.missing(r["cpu_threads"]):
        parts.append(fmt.plural(int(r["cpu_threads"]), "thread") + " per process")
    parts += [f"{r['data']} data", str(r["hardware"])]
    return " · ".join(parts)


def _memory(r) -> str:
    if fmt.missing(r["mem_max"]):
        if not r["cpu"]:
            return "n/a"
        rss = "" if fmt.missing(r["host_rss"]) else f" · host RSS {fmt.gib(r['host_rss'])}"
        return "n/a (CPU)" + rss
    if len(r["mem_by_device"]) > 1 and r["mem_max"] != r["mem_min"]:
        return f"max {fmt.gib(r['mem_max'])} / min {fmt.gib(r['mem_min'])}"
    return fmt.gib(r["mem_max"])


def _efficiency(r) -> tuple[str, str, str]:
    """(cell text, detail line, CSS class)"""
    note = r["efficiency_note"]
    if not fmt.missing(r["efficiency"]) and r["flags"]:
        return (fmt.pct(r["efficiency"]), f"{fmt.times(r['speedup'])} vs "
                f"{fmt.rate(r['baseline_tp'])} img/s · unreliable", "unreliable")
    if not fmt.missing(r["efficiency"]):
        level = "good" if r["efficiency"] >= 0.85 else "fair" if r["efficiency"] >= 0.6 else "poor"
        return (fmt.pct(r["efficiency"]), f"{fmt.times(r['speedup'])} vs "
                f"{fmt.rate(r['baseline_tp'])} img/s", level)
    if note == "baseline":
        return "baseline", f"{fmt.rate(r['tp_median'])} img/s = 100%", "base"
    if note == WORLD_SIZE_1:
        return WORLD_SIZE_1, f"{fmt.times(r['speedup'])} the baseline", "na"
    return "n/a", note or "", "na"


def _accuracy(r) -> tuple[str, str]:
    """(cell text, detail line) of the final-accuracy column."""
    if not r.get("eval"):
        return "n/a", "no evaluation"
    text = fmt.pct(r["final_accuracy"], 1)
    if fmt.missing(r["target_accuracy"]):
        return text, f"after epoch {r['eval'][-1]['epoch']}"
    target = fmt.pct(r["target_accuracy"])
    if fmt.missing(r["time_to_accuracy_s"]):
        return text, f"{target} not reached"
    detail = f"to {target} in {fmt.seconds(r['time_to_accuracy_s'])}"
    if not fmt.missing(r.get("tta_speedup")):
        how = ("sooner than the baseline" if r["tta_speedup"] >= 1
               else "the baseline's speed: slower")
        detail += (f" · {fmt.times(r['tta_speedup'])} {how} "
                   f"({fmt.seconds(r['baseline_tta'])})")
    return text, detail


def table_rows(table: pd.DataFrame) -> list[dict]:
    rows = []
    epoch_unit = fmt.unit_for(table["epoch_time_s"])  # one unit for the whole column
    for _, r in table.iterrows():
        eff, eff_detail, eff_class = _efficiency(r)
        tp_detail = f"p10 {fmt.rate(r['tp_p10'])} – p90 {fmt.rate(r['tp_p90'])}"
        if r["n_runs"] > 1:
            tp_detail += (f"; {r['n_runs']} runs {fmt.rate(r['tp_run_min'])}–"
                          f"{fmt.rate(r['tp_run_max'])} ({fmt.pct(r['tp_run_range'])} "
                          "apart)")
        n = int(r["n_devices"])
        accuracy, accuracy_detail = _accuracy(r)
        rows.append({
            "family": _family_title(r),
            "label": r["label"],
            "strategy": r["strategy"],
            "method_detail": f"{r['lab']}" + (f" · {r['n_runs']} runs" if r["n_runs"] > 1
                                              else "") + (f" · {r['backend']}"
                                                          if r["strategy"] == "ddp"
                                                          and r["backend"] else ""),
            "batch": str(r["global_batch_size"]),
            "batch_detail": f"{n} × {r['per_device_batch_size']}" if n > 1 else "",
            "epoch": fmt.seconds_in(r["epoch_time_s"], epoch_unit),
            "memory": _memory(r),
            "throughput": f"{fmt.rate(r['tp_median'])} img/s",
            "throughput_detail": tp_detail,
            "efficiency": eff,
            "efficiency_detail": eff_detail,
            "efficiency_class": eff_class,
            "flags": list(r["flags"]),
            "accuracy": accuracy,
            "accuracy_detail": accuracy_detail,
        })
    return rows


# --- run details: everything else each configuration recorded --------------------------------

def _per_rank(r) -> list[str]:
    """One line per rank: its own step-time median and p10–p90."""
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
    noise = " (within noise)" if narrative.within_noise(r) else ""
    return (f"compute-only {fmt.seconds(r['compute_median'])} "
            f"({fmt.seconds(r['compute_p10'])} – {fmt.seconds(r['compute_p90'])}) · "
            f"exposed {fmt.seconds(r['exposed_comm_s'])}{noise}")


def _gpu_activity(r) -> list[str]:
    """One line per GPU with NVML readings, or one line when every GPU read the same."""
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


def detail_rows(table: pd.DataFrame) -> list[dict]:
    return [{
        "label": r["label"],
        "strategy": r["strategy"],
        "threads": "not recorded" if fmt.missing(r["threads_per_process"])
        else str(int(r["threads_per_process"])),
        "data_wait": fmt.pct(r["data_wait_fraction"], 1),
        "per_rank": _per_rank(r),
        "communication": _communication(r),
        "host_rss": fmt.gib(r["host_rss"]),
        "gpu_activity": _gpu_activity(r),
    } for _, r in table.iterrows()]


def _sections(rows: list[dict]) -> list[dict]:
    sections: list[dict] = []
    for row in rows:
        if not sections or sections[-1]["title"] != row["family"]:
            sections.append({"title": row["family"], "rows": []})
        sections[-1]["rows"].append(row)
    return sections


def build_context(folder: Folder, table: pd.DataFrame, plots: list[Plot],
                  generated_by: str) -> dict:
    label_of_file = {}
    for _, r in table.iterrows():
        for f in r["files"]:
            label_of_file[f] = r["label"]
    runs = []
    for record in [*folder.runs, *folder.unfinished]:
        file = folder.file_of(record)
        runs.append({"file": file, "run_name": str(record.get("run_name")),
                     "lab": str(record.get("lab")), "status": str(record.get("status")),
                     "label": label_of_file.get(file, ""),
                     "started_at": str(record.get("started_at") or ""),
                     "command": str(record.get("command") or "(not recorded)"),
                     "notes": environment.texts(record.get("notes"))})
    runs.sort(key=lambda r: (r["started_at"], r["file"]))
    env_files = [{"file": folder.file_of(e), "rows": environment.describe(environment.block(e)),
                  "probes": environment.probe_tables(
                      e, folder.parts_skipped.get(folder.file_of(e), ())),
                  "recommendations": environment.texts(e.get("recommendations")),
                  "notes": environment.texts(e.get("notes"))}
                 for e in folder.environments]
    return {
        "title": TITLE,
        "generator": GENERATOR,  # the mark by which 05 knows its own report
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "generated_by": generated_by,
        "results_dir": str(folder.path),
        "counts": {"runs": len(folder.runs), "unfinished": len(folder.unfinished),
                   "environments": len(folder.environments), "skipped": len(folder.skipped),
                   "configs": len(table)},
        "headline": narrative.headline(table),
        "verdict": narrative.verdict(table, len(folder.unfinished)),
        "sections": _sections(table_rows(table)) if not table.empty else [],
        # the final-accuracy column, when some run evaluated (n/a for the others)
        "show_accuracy": bool(not table.empty and "eval" in table.columns
                              and table["eval"].map(bool).any()),
        "details": detail_rows(table) if not table.empty else [],
        "plots": plots,
        "findings": narrative.findings(
            table, allreduce_sweeps(folder.environments, folder.file_of)),
        "env_files": env_files,
        "machines": environment.run_machines([*folder.runs, *folder.unfinished]),
        "methodology": narrative.methodology(table),
        "runs": runs,
        "unfinished": [{"file": folder.file_of(r), "run_name": str(r.get("run_name")),
                        "lab": str(r.get("lab")), "status": str(r.get("status")),
                        "reason": failure_reason(r)} for r in folder.unfinished],
        "skipped": folder.skipped,
    }


# --- HTML -----------------------------------------------------------------------------

def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("labs.report", "templates"),
        autoescape=True,  # every value from a result file is text, never markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )


def html(context: dict) -> str:
    return _environment().get_template("report.html.j2").render(**context)


# --- Markdown ---------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}#|!~])")


def md(value) -> str:
    """Markdown text for any value: HTML special characters become entities and Markdown
    syntax is backslash-escaped, so a run name cannot become markup."""
    text = " ".join(str(value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def _md_code(text: str) -> list[str]:
    fence = "~~~"
    while fence in text:
        fence += "~"
    return [fence + "sh", text, fence]


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]
    return lines


def _md_probe(probe: dict) -> list[str]:
    out = [f"**{md(probe['title'])}**" + (f": {md(probe['missing'])}" if probe["missing"]
                                           else ""), ""]
    out += [md(line) + "  " for line in probe["lines"]]
    if probe["rows"]:
        out += [""] + _md_table([text for text, _ in probe["header"]], probe["rows"])
    return out + [""]


def _md_efficiency(row: dict) -> str:
    text = row["efficiency"] + (f" ({row['efficiency_detail']})"
                                if row["efficiency_detail"] else "")
    if row["flags"]:
        text += " — unreliable: " + "; ".join(row["flags"])
    return text


def markdown(context: dict, png_names: dict[str, str] | None) -> str:
    c = context
    out = [MARKDOWN_MARK,  # the mark by which 05 knows its own report (hidden when shown)
           f"# {md(c['title'])}", "",
           f"Generated {md(c['generated_at'])} from `{md(c['results_dir'])}`: "
           f"{c['counts']['runs']} completed runs, {c['counts']['unfinished']} unfinished, "
           f"{c['counts']['skipped']} files skipped.", ""]
    for sentence in c["headline"]:
        out += [f"**Headline.** {md(sentence)}", ""]
    out += ["## Verdict", ""]
    out += [f"- {md(s)}" for s in c["verdict"]] + [""]
    out += ["## Results", ""]
    for section in c["sections"]:
        out += [f"**{md(section['title'])}**", ""]
        accuracy = c["show_accuracy"]
        out += _md_table(["method", "total batch", "time/epoch", "GPU memory", "throughput"]
                         + (["final accuracy"] if accuracy else []) + ["scaling efficiency"],
                         [[r["label"], r["batch"], r["epoch"], r["memory"],
                           f"{r['throughput']} ({r['throughput_detail']})"]
                          + ([f"{r['accuracy']} ({r['accuracy_detail']})"] if accuracy
                             else []) + [_md_efficiency(r)]
                          for r in section["rows"]]) + [""]
    if c["details"]:
        out += ["### Run details", ""]
        out += _md_table(["method", "threads/process", "data wait",
                          "step time per rank: median (p10 – p90)",
                          "compute-only step: median (p10 – p90) · exposed comm",
                          "host peak RSS",
                          "GPU utilisation · power"],
                         [[d["label"], d["threads"], d["data_wait"], "; ".join(d["per_rank"]),
                           d["communication"], d["host_rss"], "; ".join(d["gpu_activity"])]
                          for d in c["details"]]) + [""]
    if c["unfinished"]:
        out += ["## Runs that did not finish", ""]
        out += _md_table(["run", "step", "status", "reason", "file"],
                         [[u["run_name"], u["lab"], u["status"], u["reason"], u["file"]]
                          for u in c["unfinished"]]) + [""]
    out += ["## Plots", ""]
    for plot in c["plots"]:
        out += [f"### {md(plot.title)}", ""]
        if plot.png is None:
            out += [md(plot.reason), ""]
        elif png_names and plot.key in png_names:
            out += [f"![{md(plot.title)}]({png_names[plot.key]})", "", md(plot.caption), ""]
        else:
            out += ["(Run with --generate-plots to save this figure beside the report.) "
                    + md(plot.caption), ""]
    out += ["## What this shows", ""]
    for finding in c["findings"]:
        out += [f"### {md(finding['title'])}", ""]
        for paragraph in finding["paragraphs"]:
            out += [md(paragraph), ""]
    out += ["## Environment", ""]
    for env in c["env_files"]:
        out += [f"From `{md(env['file'])}` (step 01):", ""]
        out += _md_table(["", ""], [list(row) for row in env["rows"]]) + [""]
        for probe in env["probes"]:
            out += _md_probe(probe)
        out += [f"- {md(n)}" for n in env["recommendations"] + env["notes"]] + [""]
    if c["machines"]:
        out += ["Machines named in the run files:", ""]
        out += _md_table(["host", "GPUs", "PyTorch", "CUDA", "driver", "runs"],
                         [[m["host"], m["gpus"], m["torch"], m["cuda"], m["driver"],
                           m["runs"]] for m in c["machines"]]) + [""]
    out += ["## Methodology", ""] + [f"- {md(s)}" for s in c["methodology"]] + [""]
    out += ["## Commands that reproduce each run", ""]
    for run in c["runs"]:
        out += [f"**{md(run['run_name'])}** ({md(run['lab'])}, {md(run['status'])}, "
                f"`{md(run['file'])}`)", ""] + _md_code(run["command"]) + [""]
    out += ["## Skipped files", ""]
    out += ([f"- `{md(name)}`: {md(reason)}" for name, reason in c["skipped"]]
            or ["None: every file was read."]) + [""]
    out += ["## Notes from the runs", ""]
    noted = [r for r in c["runs"] if r["notes"]]
    for run in noted:
        out += [f"- **{md(run['run_name'])}** (`{md(run['file'])}`):"]
        out += [f"  - {md(n)}" for n in run["notes"]]
    if not noted:
        out.append("No run recorded a note.")
    out += ["", f"Generated by `{md(c['generated_by'])}`.", ""]
    return "\n".join(out)


# --- CSV ------------------------------------------------------------------------------

CSV_COLUMNS = {
    "label": "method", "strategy": "strategy", "lab": "lab", "n_devices": "devices",
    "world_size": "world_size", "global_batch_size": "total_batch",
    "per_device_batch_size": "per_device_batch", "epoch_time_s": "time_per_epoch_s",
    "mem_max": "gpu_mem_peak_max_bytes", "mem_min": "gpu_mem_peak_min_bytes",
    "tp_median": "throughput_img_s_median", "tp_p10": "throughput_img_s_p10",
    "tp_p90": "throughput_img_s_p90", "baseline_tp": "baseline_img_s",
    "speedup": "speedup", "efficiency": "scaling_efficiency",
    "efficiency_note": "efficiency_note", "n_runs": "runs",
    "tp_run_min": "throughput_run_min", "tp_run_max": "throughput_run_max",
    "step_median": "step_time_s_median", "data_wait_fraction": "data_wait_fraction",
    "model": "model", "img_size": "img_size", "amp": "amp",
    "channels_last": "channels_last", "compile": "compile", "data": "data",
    "hardware": "hardware", "backend": "backend", "hosts": "hosts",
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
