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

from labs.report import environment, fmt, narrative
from labs.report.analysis import WORLD_SIZE_1
from labs.report.loading import Folder, failure_reason
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
    parts += [f"{r['data']} data", str(r["hardware"])]
    return " · ".join(parts)


def _memory(r) -> str:
    if fmt.missing(r["mem_max"]):
        return "n/a (CPU)" if r["cpu"] else "n/a"
    if len(r["mem_by_device"]) > 1 and r["mem_max"] != r["mem_min"]:
        return f"max {fmt.gib(r['mem_max'])} / min {fmt.gib(r['mem_min'])}"
    return fmt.gib(r["mem_max"])


def _efficiency(r) -> tuple[str, str, str]:
    """(cell text, detail line, CSS class)"""
    note = r["efficiency_note"]
    if not fmt.missing(r["efficiency"]):
        level = "good" if r["efficiency"] >= 0.85 else "fair" if r["efficiency"] >= 0.6 else "poor"
        return (fmt.pct(r["efficiency"]), f"{fmt.times(r['speedup'])} vs "
                f"{fmt.rate(r['baseline_tp'])} img/s", level)
    if note == "baseline":
        return "baseline", f"{fmt.rate(r['tp_median'])} img/s = 100%", "base"
    if note == WORLD_SIZE_1:
        return WORLD_SIZE_1, f"{fmt.times(r['speedup'])} the baseline", "na"
    return "n/a", note or "", "na"


def table_rows(table: pd.DataFrame) -> list[dict]:
    rows = []
    for _, r in table.iterrows():
        eff, eff_detail, eff_class = _efficiency(r)
        tp_detail = f"p10 {fmt.rate(r['tp_p10'])} – p90 {fmt.rate(r['tp_p90'])}"
        if r["n_runs"] > 1:
            tp_detail += (f"; {r['n_runs']} runs {fmt.rate(r['tp_run_min'])}–"
                          f"{fmt.rate(r['tp_run_max'])}")
        n = int(r["n_devices"])
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
            "epoch": fmt.seconds(r["epoch_time_s"]),
            "memory": _memory(r),
            "throughput": f"{fmt.rate(r['tp_median'])} img/s",
            "throughput_detail": tp_detail,
            "efficiency": eff,
            "efficiency_detail": eff_detail,
            "efficiency_class": eff_class,
        })
    return rows


def _sections(rows: list[dict]) -> list[dict]:
    sections: list[dict] = []
    for row in rows:
        if not sections or sections[-1]["title"] != row["family"]:
            sections.append({"title": row["family"], "rows": []})
        sections[-1]["rows"].append(row)
    return sections


def build_context(folder: Folder, table: pd.DataFrame, plots: list[Plot],
                  allreduce: list[dict], generated_by: str) -> dict:
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
                  "probes": environment.probe_lines(e),
                  "recommendations": environment.texts(e.get("recommendations")),
                  "notes": environment.texts(e.get("notes"))}
                 for e in folder.environments]
    return {
        "title": TITLE,
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "generated_by": generated_by,
        "results_dir": str(folder.path),
        "counts": {"runs": len(folder.runs), "unfinished": len(folder.unfinished),
                   "environments": len(folder.environments), "skipped": len(folder.skipped),
                   "configs": len(table)},
        "verdict": narrative.verdict(table, len(folder.unfinished)),
        "sections": _sections(table_rows(table)) if not table.empty else [],
        "plots": plots,
        "findings": narrative.findings(table, environment.peak_busbw(allreduce)),
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


def markdown(context: dict, png_names: dict[str, str] | None) -> str:
    c = context
    out = [f"# {md(c['title'])}", "",
           f"Generated {md(c['generated_at'])} from `{md(c['results_dir'])}`: "
           f"{c['counts']['runs']} completed runs, {c['counts']['unfinished']} unfinished, "
           f"{c['counts']['skipped']} files skipped.", "", "## Verdict", ""]
    out += [f"- {md(s)}" for s in c["verdict"]] + [""]
    out += ["## Results", ""]
    for section in c["sections"]:
        out += [f"**{md(section['title'])}**", ""]
        out += _md_table(["method", "total batch", "time/epoch", "GPU memory", "throughput",
                          "scaling efficiency"],
                         [[r["label"], r["batch"], r["epoch"], r["memory"],
                           f"{r['throughput']} ({r['throughput_detail']})",
                           r["efficiency"] + (f" ({r['efficiency_detail']})"
                                              if r["efficiency_detail"] else "")]
                          for r in section["rows"]]) + [""]
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
        out += _md_table(["", ""], [list(row) for row in env["rows"]] +
                         [[f"probe: {k}", v] for k, v in env["probes"]]) + [""]
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
}


def csv(table: pd.DataFrame) -> str:
    if table.empty:
        return ",".join(CSV_COLUMNS.values()) + "\n"
    frame = table[list(CSV_COLUMNS)].rename(columns=CSV_COLUMNS)
    frame["runs_in_folder"] = [";".join(names) for names in table["run_names"]]
    return frame.to_csv(index=False, lineterminator="\n")
