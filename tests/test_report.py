"""Step 05: the comparison report, from real and crafted result files.

One real run of step 02 (``--preset smoke``) per session gives a genuine result file; the
DataParallel and DDP runs are copies of it with the strategy, world, devices and metrics
changed, so the report is tested on multi-GPU numbers that a CPU cannot produce.
"""

from __future__ import annotations

import copy
import html as html_lib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import REPO, lab_env, run_script

from labs.report import analysis, loading

GIB = 2**30
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
XSS = "<script>alert(1)</script>"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The slugs of populate()'s GPU machines: a section's anchor (id="machine-SLUG") and the
# end of each of its figures' names (comparison_report_METRIC_SLUG.png).
SLUG_A = "node_a_h100_80gb_hbm3"
SLUG_B = "node_b_a100_sxm4_80gb"
MAIN_COLUMNS = ["Method", "Devices", "Global batch", "Throughput (img/s)", "Speed-up",
                "Scaling efficiency", "Peak memory", "Final accuracy", "Time to target"]
MARKDOWN_HEADER = "| " + " | ".join(MAIN_COLUMNS) + " |"
OOM_REASON = "out of memory at 512 images per device; try a smaller --batch-size"


# --- fixtures: real and crafted result files --------------------------------------------

RESNET18_GRADIENT_BYTES = 11_181_642 * 4


def make_run(base: dict, *, strategy: str, n: int, throughput: float, gpu: str = H100,
             memory_gib: list[float] | None = None, run_name: str | None = None,
             host: str = "node-a", data_wait: float = 0.01, batch: int = 8,
             status: str = "ok", notes: tuple[str, ...] = (), amp: str = "off",
             channels_last: bool = False, threads: int | None = 1,
             spread: tuple[float, float] = (0.95, 1.03), exposed_s: float | None = None,
             compute_spread: tuple[float, float] = (0.99, 1.01),
             gradient_bytes: int | None = RESNET18_GRADIENT_BYTES, comm_hook: str = "none",
             host_rss_gib: float = 3.0, eval: list[float] | None = None,
             epoch_s: float = 10.0, sync_bn: bool = False) -> dict:
    """A copy of a real 02 record turned into a single / DP / DDP run on ``n`` GPUs.

    ``spread`` gives throughput p10 and p90 as factors of the median. A DDP run's exposed
    communication is ``exposed_s`` (default a tenth of the step), its compute-only step the
    rest, with p10/p90 at ``compute_spread``. ``threads=None`` leaves the field out, as in
    files written before it existed. ``eval`` lists a validation accuracy per epoch (the
    run evaluated, epochs of ``epoch_s`` seconds, target 50%, the default learning rate of
    its global batch); without it the run did not evaluate, as on random data."""
    rec = copy.deepcopy(base)
    lab = {"single": "02_baseline", "dp": "03_dataparallel", "ddp": "04_ddp"}[strategy]
    rec.update(lab=lab, status=status, run_id=uuid.uuid4().hex[:12],
               run_name=run_name or f"{strategy}-{n}-{gpu[-8:]}",
               command=f"python {lab}.py --batch-size {batch} # n={n}",
               notes=list(notes))
    rec["config"].update(strategy=strategy, per_device_batch_size=batch,
                         global_batch_size=batch * n, amp=amp, channels_last=channels_last,
                         threads_per_process=threads)
    if threads is None:
        del rec["config"]["threads_per_process"]
    if strategy == "ddp":
        rec["config"].update(backend="nccl", bucket_cap_mb=25.0, comm_hook=comm_hook,
                             gradient_bytes=gradient_bytes, sync_bn=sync_bn)
    memory = memory_gib or [10.0] * n
    devices = [{"device": f"cuda:{0 if strategy == 'ddp' else i}", "index": i, "host": host,
                "name": gpu, **({"rank": i} if strategy == "ddp" else {})} for i in range(n)]
    rec["world"] = {"world_size": n if strategy == "ddp" else 1, "nnodes": 1,
                    "backend": "nccl" if strategy == "ddp" else None, "devices": devices}
    step = batch * n / throughput
    ranks = n if strategy == "ddp" else 1
    compute = None
    if strategy == "ddp":
        exposed = step / 10 if exposed_s is None else exposed_s
        compute = {"median": step - exposed, "p10": (step - exposed) * compute_spread[0],
                   "p90": (step - exposed) * compute_spread[1]}
    cpu = gpu == "CPU"
    m = rec["metrics"]
    m.update(global_samples_per_step=batch * n, data_wait_fraction=data_wait,
             throughput_img_s={"median": throughput, "p10": throughput * spread[0],
                               "p90": throughput * spread[1], "mean": throughput},
             step_time_s={"median": step, "p10": step / spread[1], "p90": step / spread[0]},
             epoch_time_s=[step * 20, step * 10, step * 10.2],
             loss_per_epoch=[2.3, 2.1, 1.9], slowest_rank=ranks - 1,
             compute_only_step_time_s=compute,
             exposed_comm_s={"median": step - compute["median"]} if compute else None,
             host_peak_rss_bytes=int(host_rss_gib * GIB))
    per_gpu_step = None if strategy == "dp" and n > 1 else step  # DP: not timed per GPU
    m["per_device"] = [{"device": d["device"], "index": i, "host": host, "rank": i,
                        "name": gpu, "peak_allocated_bytes": None if cpu else int(g * GIB),
                        "peak_reserved_bytes": None if cpu else int(g * GIB * 1.1),
                        "total_memory_bytes": None if cpu else 80 * GIB,
                        "step_time_s": per_gpu_step,
                        "utilization_pct": None if cpu else 95.0,
                        "power_w": None if cpu else 500.0}
                       for i, (d, g) in enumerate(zip(devices, memory))]
    # Rank r is 2% faster per rank below the last: the last rank is the slowest, and the
    # global distribution is its own.
    m["per_rank"] = [{"rank": r, "host": host, "steps_measured": 8,
                      "step_time_s": {"median": step * (1 - 0.02 * (ranks - 1 - r)),
                                      "p10": step * 0.96, "p90": step * 1.08},
                      "compute_only_step_time_s": compute, "data_wait_s": 0.001}
                     for r in range(ranks)]
    if eval is not None:
        entries = [{"epoch": e + 1, "accuracy": a, "loss": 2.0 - a, "samples": 512,
                    "elapsed_s": epoch_s * (e + 1), "eval_time_s": 0.5}
                   for e, a in enumerate(eval)]
        m.update(eval=entries, final_accuracy=eval[-1],
                 time_to_accuracy_s=next((x["elapsed_s"] for x in entries
                                          if x["accuracy"] >= 0.5), None))
        rec["config"].update(eval=True, val_size=512, target_accuracy=0.5,
                             lr=0.1 * batch * n / 256, lr_rule=f"0.1 × global batch "
                             f"{batch * n} / 256, linear warmup over 8 steps")
    if status != "ok":
        rec["failure"] = {"reason": OOM_REASON, "rank": 0}
    return rec


def environment_file(base: dict) -> dict:
    sizes = [2**k for k in range(12, 28, 2)]
    return {
        "schema_version": 1, "kind": "environment", "written_at": base["started_at"],
        "command": "python 01_environment_check.py", "environment": base["environment"],
        "probes": {"matmul": [{"device": "cuda:0", "dtype": "bf16", "size": 8192,
                               "time_s": 0.00157, "tflops": 700.0}],
                   "copy_bandwidth": None,
                   "allreduce": {"backend": "nccl", "world_size": 4, "device": "cuda",
                                 "results": [{"size_bytes": s, "time_s": 2e-5 + s / 2e11,
                                              "algbw_gb_s": s / (2e-5 + s / 2e11) / 1e9,
                                              "busbw_gb_s": 1.5 * s / (2e-5 + s / 2e11) / 1e9,
                                              "correct": s != sizes[3]} for s in sizes]}},
        "recommendations": ["Use --num-workers 8 per process."],
        "notes": ["The all-reduce probe ran over NVLink."],
    }


def write(folder: Path, name: str, record) -> Path:
    path = folder / name
    path.write_text(json.dumps(record, indent=1))
    return path


SKIPPED = ("truncated.json", "garbage.json", "foreign.json", "future.json",
           "dup_02_h100.json")


def populate(folder: Path, real: dict) -> Path:
    """The lab's results folder after a day on two machines, with some bad files."""
    folder.mkdir(parents=True, exist_ok=True)
    write(folder, "02_cpu_real.json", real)  # the genuine CPU smoke run, unchanged
    baseline = make_run(real, strategy="single", n=1, throughput=100.0,
                        notes=("baseline note: quiet machine",))
    write(folder, "02_h100.json", baseline)
    write(folder, "dup_02_h100.json", baseline)  # the same run copied: counted once
    write(folder, "03_dp2.json", make_run(real, strategy="dp", n=2, throughput=150.0,
                                          memory_gib=[14.0, 9.0], data_wait=0.25))
    # Two repeats of one DDP configuration: their medians 356 and 364 aggregate to 360.
    write(folder, "04_ddp4_a.json", make_run(real, strategy="ddp", n=4, throughput=356.0))
    write(folder, "04_ddp4_b.json", make_run(real, strategy="ddp", n=4, throughput=364.0))
    write(folder, "04_ddp1.json", make_run(real, strategy="ddp", n=1, throughput=95.0))
    # Another machine with another GPU: no baseline there, so no efficiency.
    write(folder, "04_ddp2_a100.json", make_run(real, strategy="ddp", n=2, throughput=170.0,
                                                gpu=A100, host="node-b", run_name=XSS))
    write(folder, "04_oom.json", make_run(real, strategy="ddp", n=4, throughput=1.0,
                                          status="oom", run_name="too-big"))
    write(folder, "environment.json", environment_file(real))
    text = json.dumps(real)
    (folder / "truncated.json").write_text(text[: len(text) // 2])
    (folder / "garbage.json").write_bytes(bytes(range(256)) * 4)
    write(folder, "foreign.json", {"name": "some-package", "version": "1.0.0"})
    write(folder, "future.json", {**real, "schema_version": 99})
    (folder / "readme.txt").write_text("not a result: ignored")
    return folder


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory, real_run) -> Path:
    return populate(tmp_path_factory.mktemp("lab") / "results", real_run)


@pytest.fixture(scope="module")
def table(lab_dir) -> "analysis.pd.DataFrame":
    folder = loading.load_folder(lab_dir)
    return analysis.compare(analysis.run_frame(folder))


def row(table, label: str):
    match = table[table["label"] == label]
    assert len(match) == 1, f"no single row {label!r} in {list(table['label'])}"
    return match.iloc[0]


@pytest.fixture(scope="module")
def step05():
    """The script as a module, to call its main(argv) in-process (fast)."""
    spec = importlib.util.spec_from_file_location("step05",
                                                  REPO / "05_performance_comparison.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run05(step05, *argv) -> None:
    from labs import cli
    old = sys.argv
    sys.argv = ["05_performance_comparison.py", *map(str, argv)]
    try:
        cli.run(step05.main)
    finally:
        sys.argv = old


class Page(HTMLParser):
    """What a browser would see: elements, image sources, table rows, text."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self.rows:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


# --- the report's parts, machine by machine -----------------------------------------------

INLINE = re.compile(r"</?(?:strong|em|code|b|i)>")


def text_of(fragment: str) -> str:
    """What a reader sees of an HTML fragment: tags dropped (inline ones without a gap),
    entities decoded, white space collapsed."""
    text = re.sub(r"<[^>]+>", " ", INLINE.sub("", fragment))
    return " ".join(html_lib.unescape(text).split())


def machine_sections(raw: str) -> dict[str, str]:
    """Each machine's ``<section class="machine" id="machine-SLUG">``, by SLUG, in order."""
    return dict(re.findall(
        r'<section class="machine" id="machine-([a-z0-9_]+)">(.*?)</section>', raw, re.S))


PARTS = {"title": r"<h2>(.*?)</h2>", "headline": r'<p class="headline">(.*?)</p>',
         "table": r'<table class="main">(.*?)</table>',
         "verdict": r'<ul class="verdict">(.*?)</ul>', "why": r'<div class="why">(.*?)</div>',
         "unreliable": r'<div class="unreliable">(.*?)</div>'}


def part(section: str, name: str) -> str:
    """The text of one part of a machine's section (PARTS); "" where it has none."""
    match = re.search(PARTS[name], section, re.S)
    return text_of(match.group(1)) if match else ""


def machine_section(raw: str, title: str) -> str:
    """The section of the machine whose <h2> reads ``title``."""
    found = [s for s in machine_sections(raw).values() if part(s, "title") == title]
    titles = [part(s, "title") for s in machine_sections(raw).values()]
    assert len(found) == 1, f"no single section {title!r} among {titles}"
    return found[0]


def why_paragraphs(section: str) -> list[str]:
    """The paragraphs of a machine's why, as text."""
    match = re.search(PARTS["why"], section, re.S)
    return ([text_of(p) for p in re.findall(r"<p>(.*?)</p>", match.group(1), re.S)]
            if match else [])


@dataclass
class Cell:
    value: str          # the cell's text before its first <span>
    detail: str         # the text of its spans (the grey line beneath, a flag)
    classes: list[str]


def main_rows(section: str) -> dict[str, dict]:
    """The main table of a machine's section, by method label: {"flagged": bool, and each
    column by its class without "col-" (method, devices, batch, throughput, speedup,
    efficiency, memory, accuracy, tta): a Cell}."""
    match = re.search(r'<table class="main">.*?<thead>(.*?)</thead>.*?<tbody>(.*?)</tbody>',
                      section, re.S)
    assert match, "the section has no main table"
    header = [text_of(th.split("<span")[0])
              for th in re.findall(r"<th[^>]*>(.*?)</th>", match.group(1), re.S)]
    assert header == MAIN_COLUMNS, header
    rows = {}
    for attrs, tr in re.findall(r"<tr([^>]*)>(.*?)</tr>", match.group(2), re.S):
        cells = {}
        for classes, cell in re.findall(r'<td class="([^"]*)"[^>]*>(.*?)</td>', tr, re.S):
            column = next(c for c in classes.split() if c.startswith("col-"))[4:]
            value, span, rest = cell.partition("<span")
            cells[column] = Cell(text_of(value), text_of(span + rest), classes.split())
        assert list(cells) == ["method", "devices", "batch", "throughput", "speedup",
                               "efficiency", "memory", "accuracy", "tta"], list(cells)
        assert cells["method"].value not in rows, "labels are unique within a machine"
        rows[cells["method"].value] = {"flagged": 'class="flagged"' in attrs, **cells}
    return rows


# --- analysis -----------------------------------------------------------------------------

def test_scaling_arithmetic():
    speedup, efficiency = analysis.scaling(360.0, 100.0, 4)
    assert speedup == pytest.approx(3.6)
    assert efficiency == pytest.approx(0.90)
    assert analysis.scaling(150.0, 100.0, 2) == pytest.approx((1.5, 0.75))


def test_epoch_time_leaves_out_the_warmup_epoch():
    assert analysis.epoch_time([9.0, 2.0, 4.0]) == pytest.approx(3.0)
    assert analysis.epoch_time([9.0]) == pytest.approx(9.0)
    assert analysis.epoch_time([]) is None


def test_loading_sorts_every_file(lab_dir):
    folder = loading.load_folder(lab_dir)
    assert len(folder.runs) == 7
    assert [r["run_name"] for r in folder.unfinished] == ["too-big"]
    assert len(folder.environments) == 1
    reasons = dict(folder.skipped)
    assert set(reasons) == set(SKIPPED)  # readme.txt is not *.json: not even looked at
    assert "not valid JSON" in reasons["truncated.json"]
    assert "not text" in reasons["garbage.json"]
    assert "schema_version" in reasons["foreign.json"]
    assert "newer" in reasons["future.json"]
    assert "a copy of 02_h100.json" in reasons["dup_02_h100.json"]


def test_table_efficiency_memory_and_repeats(table):
    ddp4 = row(table, "DDP ×4")
    assert ddp4["n_runs"] == 2
    assert ddp4["tp_median"] == pytest.approx(360.0)
    assert ddp4["baseline_tp"] == pytest.approx(100.0)
    assert ddp4["speedup"] == pytest.approx(3.6)
    assert ddp4["efficiency"] == pytest.approx(0.90)
    assert ddp4["tp_run_min"] == pytest.approx(356.0)
    assert ddp4["tp_run_max"] == pytest.approx(364.0)

    dp2 = row(table, "DP ×2")
    assert dp2["n_devices"] == 2  # DP: one process, N = the GPUs it splits over
    assert dp2["efficiency"] == pytest.approx(0.75)
    assert dp2["mem_max"] == 14 * GIB and dp2["mem_min"] == 9 * GIB
    assert dp2["global_batch_size"] == 16


def test_world_size_one_is_not_a_scaling_measurement(table):
    ddp1 = row(table, "DDP ×1")
    assert ddp1["efficiency"] is None or ddp1["efficiency"] != ddp1["efficiency"]
    assert ddp1["efficiency_note"] == "world size 1: scaling not measurable"
    assert ddp1["speedup"] == pytest.approx(0.95)  # the wrapper's overhead is still shown


def test_other_hardware_has_no_baseline_and_says_why(table):
    other = table[table["hardware"] == A100].iloc[0]
    assert other["efficiency"] is None or other["efficiency"] != other["efficiency"]
    assert "no matching baseline" in other["efficiency_note"]
    assert A100 in other["efficiency_note"] and H100 in other["efficiency_note"]


def test_cpu_baseline_has_no_device_memory(table):
    cpu = table[table["hardware"] == "CPU"].iloc[0]
    assert cpu["mem_max"] is None or cpu["mem_max"] != cpu["mem_max"]
    assert cpu["efficiency_note"] == "baseline"


# --- the HTML report ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def html_report(tmp_path_factory, lab_dir, step05) -> Path:
    out = tmp_path_factory.mktemp("report") / "comparison_report.html"
    run05(step05, "--results-dir", lab_dir, "--generate-plots", "--output-report", out)
    return out


def test_html_report_table_rows(html_report, real_run):
    """One table per machine (host and device model), its labels without a hardware suffix;
    each figure in its column, the grey detail beneath it."""
    raw = html_report.read_text(encoding="utf-8")
    rows = main_rows(machine_section(raw, "node-a · 4 × H100 80GB HBM3"))
    assert list(rows) == ["Single", "DP ×2", "DDP ×1", "DDP ×4"]  # single, DP, DDP by N
    ddp4 = rows["DDP ×4"]
    assert ddp4["devices"].value == "4"
    assert ddp4["batch"].value == "32" and ddp4["batch"].detail == "4 × 8"  # 4 ranks x 8
    assert ddp4["throughput"].value == "360"
    assert "runs 356–364" in ddp4["throughput"].detail and "2 runs" in ddp4["method"].detail
    assert ddp4["speedup"].value == "3.60×" and ddp4["speedup"].detail == "vs 100"
    assert ddp4["efficiency"].value == "90%" and "good" in ddp4["efficiency"].classes
    assert not ddp4["flagged"]
    dp2 = rows["DP ×2"]
    assert dp2["memory"].value == "14.0 / 9.0 GiB"
    assert dp2["memory"].detail == "device 0 / others"
    assert dp2["efficiency"].value == "75%"
    ddp1 = rows["DDP ×1"]
    assert ddp1["efficiency"].value == "—"
    assert ddp1["efficiency"].detail == "one device: not scaling"
    assert ddp1["speedup"].value == "0.95×"  # the wrapper's overhead is still shown
    assert "the wrapper's overhead" in ddp1["speedup"].detail
    host = real_run["environment"]["host"]  # the genuine CPU run's
    cpu = main_rows(machine_section(raw, f"{host} · CPU processes"))
    assert list(cpu) == ["Single"]
    assert cpu["Single"]["memory"].value == "n/a (CPU)"
    assert cpu["Single"]["memory"].detail.startswith("host RSS")  # a CPU run's only memory
    assert cpu["Single"]["efficiency"].detail == "baseline"
    a100 = main_rows(machine_section(raw, "node-b · 2 × A100-SXM4-80GB"))
    assert list(a100) == ["DDP ×2"]
    speedup = a100["DDP ×2"]["speedup"]
    assert speedup.value == "n/a" and "no matching baseline" in speedup.detail
    assert A100 in speedup.detail and H100 in speedup.detail
    assert a100["DDP ×2"]["efficiency"].value == "n/a"


def test_html_report_is_self_contained_with_embedded_plots(html_report, real_run):
    page = parse(html_report)
    raw = html_report.read_text(encoding="utf-8")
    pngs = [s for s in page.images if s.startswith("data:image/png;base64,")]
    assert len(pngs) == len(page.images) >= 6
    for src in pngs:
        assert len(src) > 2000
    for forbidden in ("<link", "<script", "http://", "https://", "@import", "url("):
        assert forbidden not in raw
    # Figures are per machine: comparison_report_METRIC_SLUG.png, SLUG the machine's.
    for key in ("throughput", "epoch_time", "memory", "efficiency", "step_time", "loss"):
        png = html_report.with_name(f"comparison_report_{key}_{SLUG_A}.png")
        assert png.read_bytes()[:8] == PNG_SIGNATURE, key
    # Step 01's all-reduce is drawn for the one machine its file describes (the genuine
    # CPU run's host), and for no other: node-a and node-b have no step-01 file.
    sections = machine_sections(raw)
    cpu_title = f"{real_run['environment']['host']} · CPU processes"
    (cpu_slug,) = [slug for slug, s in sections.items() if part(s, "title") == cpu_title]
    allreduce = sorted(html_report.parent.glob("comparison_report_allreduce_*.png"))
    assert [p.name for p in allreduce] == [f"comparison_report_allreduce_{cpu_slug}.png"]
    assert allreduce[0].read_bytes()[:8] == PNG_SIGNATURE
    for png in html_report.parent.glob("comparison_report_*.png"):
        key = png.stem.removeprefix("comparison_report_")
        owner = [slug for slug in sections if key.endswith(f"_{slug}")]
        assert len(owner) == 1, key  # every figure belongs to one machine
        assert f'<figure id="plot-{key}">' in sections[owner[0]]  # and is shown in its section


def test_html_report_escapes_run_names(html_report):
    raw = html_report.read_text(encoding="utf-8")
    page = parse(html_report)
    assert "script" not in page.tags
    assert XSS not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert XSS in "".join(page.text)  # shown to the reader as text


def test_html_report_sections(html_report, real_run):
    raw = html_report.read_text(encoding="utf-8")
    text = " ".join(" ".join(parse(html_report).text).split())
    host = real_run["environment"]["host"]
    assert ("7 completed runs on 3 machines: 6 table rows (repeats combined) in 3 "
            "configurations") in text
    # One section per machine, each in the order a student reads it.
    sections = machine_sections(raw)
    assert sorted(part(s, "title") for s in sections.values()) == sorted(
        ["node-a · 4 × H100 80GB HBM3", "node-b · 2 × A100-SXM4-80GB",
         f"{host} · CPU processes"])
    for slug, section in sections.items():
        starts = [section.find(marker) for marker in
                  ("<h2>", '<p class="headline">', '<table class="main">',
                   '<ul class="verdict">', '<div class="why">', '<div class="unreliable">',
                   "<details>")]
        present = [i for i in starts if i >= 0]
        assert starts[:4] == present[:4] and present == sorted(present), slug
    # Then the reference: methodology, commands, skipped files, notes.
    reference = raw.index('<section id="reference">')
    assert all(raw.index(f'id="machine-{slug}"') < reference for slug in sections)
    for anchor in ("methodology", "commands", "skipped", "notes"):
        assert raw.index(f'<details id="{anchor}">') > reference, anchor
    for name in SKIPPED:
        assert name in text
    assert "newer than this lab understands" in text
    node_a, node_b = sections[SLUG_A], sections[SLUG_B]
    assert "Did not finish on node-a" in text_of(node_a)
    assert OOM_REASON in text_of(node_a)  # the unfinished run, under its machine
    assert "python 04_ddp.py --batch-size 8 # n=4" in text  # commands
    assert "baseline note: quiet machine" in text  # notes
    # Step 01's file describes the host it ran on (the genuine CPU run's), and only that one.
    (cpu,) = [s for s in sections.values() if part(s, "title") == f"{host} · CPU processes"]
    assert "Use --num-workers 8 per process." in text_of(cpu)
    for host_name, section in (("node-a", node_a), ("node-b", node_b)):
        assert "no step-01 file from this machine in the folder" in text_of(section)
        assert (f"No prediction: no step-01 file from {host_name} is in the folder, so "
                f"nothing predicts the all-reduce there") in part(section, "why")
        assert "environment.json" not in text_of(section)
        assert "Use --num-workers 8 per process." not in text_of(section)
    # The headline, the verdict and the why, from the numbers.
    assert part(node_a, "headline") == (
        "On node-a (H100 80GB HBM3), the fastest reliable configuration was DDP ×4 (fp32, "
        "global batch 32): 360 img/s, 3.60× the one-GPU baseline (90% weak-scaling "
        "efficiency).")
    assert "node-a · DDP: ×4 3.60× (90%)" in part(node_a, "verdict")
    why = part(node_a, "why")
    assert "GPU 0 peaked at 14.00 GiB of memory and the other GPUs at 9.00 GiB (+56%)" in why
    assert "GIL" not in text  # measured, not asserted
    assert "DDP ×4 on node-a: each step all-reduces 42.7 MiB of gradients" in why
    assert "Measured: 8.9 ms (10.0% of the step) of each step waited for communication" in why
    assert "DP ×2 (25%) waited for input data" in why
    assert "DDP ×1 on node-a has nothing to exchange" in why
    assert ("node-b: no scaling efficiency: no matching baseline: no 02 run on "
            f"{A100}") in part(node_b, "verdict")


def test_csv_beside_the_report(html_report):
    import pandas as pd

    frame = pd.read_csv(html_report.with_suffix(".csv"))
    ddp4 = frame[frame["method"] == "DDP ×4"].iloc[0]
    assert ddp4["scaling_efficiency"] == pytest.approx(0.9)
    assert ddp4["speedup"] == pytest.approx(3.6)
    assert ddp4["total_batch"] == 32
    assert ddp4["runs"] == 2
    assert len(frame) == 6  # table rows, not runs: repeats are aggregated


def markdown_outside_code(text: str) -> str:
    """A Markdown report less its first line (05's mark, an HTML comment), its code fences
    and inline code: what a Markdown renderer would read as text or markup."""
    body = text.split("\n", 1)[1]
    body = re.sub(r"^(~{3,})sh\n.*?\n\1$", "", body, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", body)


def test_markdown_format(tmp_path, lab_dir, step05):
    out = tmp_path / "report.md"
    run05(step05, "--results-dir", lab_dir, "--format", "md", "--output-report", out)
    text = out.read_text(encoding="utf-8")
    assert MARKDOWN_HEADER in text
    assert "| DDP ×4 | 4 | 32 | 360 | 3.60× | 90% weak scaling |" in text
    assert "| DDP ×1 | 1 | 8 | 95.0 | 0.95× | — one device: not scaling |" in text
    # The hostile run name is text: every "<" outside code is backslash-escaped.
    assert "<script>" not in text
    assert "**\\<script\\>alert(1)\\</script\\>**" in text
    assert not re.search(r"(?<!\\)<", markdown_outside_code(text))
    assert (tmp_path / "report.csv").is_file()
    assert not list(tmp_path.glob("*.png"))  # figures are saved only with --generate-plots
    assert "--generate-plots" in text  # ...and the reader is told so


def test_only_one_device_says_not_measurable(tmp_path, real_run, step05):
    """A baseline and a DDP run of world size 1 on one machine's CPU: nothing measures
    scaling, and the report says so instead of drawing an efficiency."""
    results = tmp_path / "results"
    results.mkdir()
    write(results, "a.json", make_run(real_run, strategy="single", n=1, throughput=100.0,
                                      gpu="CPU"))
    write(results, "b.json", make_run(real_run, strategy="ddp", n=1, throughput=90.0,
                                      gpu="CPU"))
    out = tmp_path / "r.html"
    run05(step05, "--results-dir", results, "--output-report", out)
    (section,) = machine_sections(out.read_text(encoding="utf-8")).values()
    assert part(section, "headline").endswith(
        "every run used one process, so scaling is not measured here.")
    rows = main_rows(section)
    assert rows["DDP ×1"]["efficiency"].value == "—"
    assert rows["DDP ×1"]["efficiency"].detail == "one device: not scaling"
    assert rows["Single"]["efficiency"].detail == "baseline"
    assert ("Scaling efficiency against the ideal: not drawn: No scaling efficiency: every "
            "DataParallel or DDP run here used one device") in text_of(section)
    assert not list(tmp_path.glob("*.png"))


def test_odd_values_in_a_valid_file_do_not_break_the_report(tmp_path, real_run, step05):
    odd = copy.deepcopy(real_run)
    odd["run_name"] = "odd"
    odd["config"]["model"] = ["not", "a", "name"]
    odd["world"]["devices"] = "two GPUs"
    odd["metrics"].update(epoch_time_s="slow", loss_per_epoch=[None, "x", 2.0],
                          per_rank="none", step_time_s=None, data_wait_fraction=float("nan"),
                          per_device=[1, {"peak_allocated_bytes": "lots"}])
    odd["notes"] = "not a list"
    results = tmp_path / "results"
    results.mkdir()
    write(results, "odd.json", odd)
    out = tmp_path / "r.html"
    run05(step05, "--results-dir", results, "--output-report", out, "--generate-plots")
    page = parse(out)
    assert any(r and r[0].startswith("Single") for r in page.rows)
    assert page.images  # throughput and loss still drawn from what is there


def test_only_unfinished_runs(tmp_path, real_run, step05):
    results = tmp_path / "results"
    results.mkdir()
    write(results, "oom.json", make_run(real_run, strategy="dp", n=2, throughput=1.0,
                                        status="oom", run_name="too-big"))
    write(results, "environment.json", environment_file(real_run))
    out = tmp_path / "r.html"
    run05(step05, "--results-dir", results, "--output-report", out)
    raw = out.read_text(encoding="utf-8")
    text = " ".join(" ".join(parse(out).text).split())
    assert machine_sections(raw) == {}
    assert "No completed run to compare: 1 run(s) did not finish (listed below)." in text
    reference = text_of(raw[raw.index('<section id="reference">'):])
    assert "Did not finish, on a machine with no completed run: too-big" in reference
    assert OOM_REASON in reference
    # Step 01's file is still described, in the reference (no machine of it ran): every
    # size of its all-reduce sweep.
    assert "Step 01 file of a machine with no run here (environment.json)" in reference
    assert len([r for r in parse(out).rows if r and r[-1] in ("✓", "✗")]) == 8
    assert out.with_suffix(".csv").read_text().startswith("method,")


# --- usage errors: one line, exit status 2, nothing written -------------------------------

@pytest.mark.parametrize("case", ["missing-dir", "nothing-readable", "no-such-folder",
                                  "output-is-folder"])
def test_usage_errors_write_nothing(tmp_path, step05, capsys, case):
    results = tmp_path / "results"
    results.mkdir()
    out = tmp_path / "report.html"
    if case == "missing-dir":
        args = ["--results-dir", tmp_path / "nope", "--output-report", out]
    elif case == "nothing-readable":
        (results / "garbage.json").write_bytes(b"\xff\xfe\x00garbage")
        args = ["--results-dir", results, "--output-report", out]
    elif case == "no-such-folder":
        (results / "ok.json").write_text("{}")
        args = ["--results-dir", results, "--output-report", tmp_path / "no" / "r.html"]
    else:
        (tmp_path / "out.html").mkdir()
        args = ["--results-dir", results, "--output-report", tmp_path / "out.html"]
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        run05(step05, *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before


def test_bad_flag_exits_2_from_the_command_line(tmp_path):
    proc = run_script("05_performance_comparison.py", "--format", "pdf",
                      "--output-report", tmp_path / "r.html", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--format" in proc.stderr
    assert not list(tmp_path.iterdir())


# --- performance and a real browser ---------------------------------------------------------

def test_thirty_run_files_in_one_command(tmp_path, real_run):
    """The whole command, as a user runs it (imports included), on 30 run files plus the
    environment file and the broken ones."""
    results = populate(tmp_path / "results", real_run)
    runs = sorted(p for p in results.glob("0*.json") if p.name != "04_oom.json")
    for k in range(30 - len(runs) - 1):
        record = json.loads(runs[k % len(runs)].read_text())
        record["run_id"] = uuid.uuid4().hex[:12]
        write(results, f"0_repeat_{k:02d}.json", record)
    assert len(list(results.glob("0*.json"))) == 30
    out = tmp_path / "comparison_report.html"
    proc = run_script("05_performance_comparison.py", "--results-dir", results,
                      "--generate-plots", "--output-report", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # 30 run files, one of them unfinished; repeats aggregate into the same 6 table rows
    assert ("runs     29 on 3 machine(s): 6 table row(s) in 3 configuration(s), "
            "1 unfinished, 5 file(s) skipped") in proc.stdout
    assert out.is_file() and out.with_suffix(".csv").is_file()
    # One PNG per figure the report draws, each machine's named by its slug.
    raw = out.read_text(encoding="utf-8")
    drawn = re.findall(r'<figure id="plot-([a-z0-9_]+)">\s*<img ', raw)
    pngs = sorted(p.stem.removeprefix("comparison_report_")
                  for p in tmp_path.glob("comparison_report_*.png"))
    assert pngs == sorted(drawn) and len(pngs) >= 3
    assert f"plots    {len(pngs)} PNG file(s) beside the report" in proc.stdout
    for slug in machine_sections(raw):
        assert f"throughput_{slug}" in pngs


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_headless_browser_renders_the_report(tmp_path, html_report):
    shot = tmp_path / "report.png"
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    url = html_report.resolve().as_uri()
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,4000", url],
                   capture_output=True, timeout=60, env=lab_env(), check=False)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(shot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    ddp_blue = sum(count for count, rgb in colors if rgb == (0x25, 0x63, 0xEB))
    assert ddp_blue > 20_000  # the bars of the embedded figures were decoded and drawn
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True,
                         timeout=60, env=lab_env(), check=False).stdout
    assert dom.count('src="data:image/png;base64,') >= 6
    assert "<script>alert(1)" not in dom


# --- accuracy: the same math, at another speed ----------------------------------------------

@pytest.fixture(scope="module")
def accuracy_report(tmp_path_factory, real_run, step05) -> Path:
    """A baseline and a DDP x4 run that evaluated, and a DataParallel run that did not."""
    results = tmp_path_factory.mktemp("accuracy") / "results"
    results.mkdir()
    write(results, "02.json", make_run(real_run, strategy="single", n=1, throughput=100.0,
                                       eval=[0.30, 0.55, 0.70], epoch_s=10.0))
    write(results, "04.json", make_run(real_run, strategy="ddp", n=4, throughput=360.0,
                                       eval=[0.20, 0.45, 0.60], epoch_s=3.0))
    write(results, "03.json", make_run(real_run, strategy="dp", n=2, throughput=150.0))
    out = results.parent / "report.html"
    run05(step05, "--results-dir", results, "--generate-plots", "--output-report", out)
    return out


def test_report_shows_accuracy_time_to_target_and_speed_up(accuracy_report):
    raw = accuracy_report.read_text(encoding="utf-8")
    (section,) = machine_sections(raw).values()
    rows = main_rows(section)  # ... efficiency, memory, final accuracy, time to target
    single, dp, ddp = rows["Single"], rows["DP ×2"], rows["DDP ×4"]
    assert single["accuracy"].value == "70.0%" and single["accuracy"].detail == "after epoch 3"
    assert single["tta"].value == "20.00 s" and single["tta"].detail == "to 50%"
    # DDP got to 50% after its 3rd 3-s epoch, 9 s; the baseline after 20 s: 2.22x sooner
    assert ddp["accuracy"].value == "60.0%" and ddp["accuracy"].detail == "after epoch 3"
    assert ddp["tta"].value == "9.00 s" and ddp["tta"].detail == "to 50% · 2.22× sooner"
    assert dp["accuracy"].value == "n/a" and dp["accuracy"].detail == "no evaluation"
    assert dp["tta"].value == "—"
    assert ddp["efficiency"].value == "90%"
    # With evaluations the headline recommends the run that reached the target soonest.
    assert part(section, "headline") == (
        "On node-a (H100 80GB HBM3), DDP ×4 (fp32, global batch 32) reached 50% accuracy "
        "soonest, after 9.00 s of training: 360 img/s, 3.60× the one-GPU baseline (90% "
        "weak-scaling efficiency).")
    assert ("node-a · time to 50% accuracy: soonest DDP ×4 after 9.00 s, 2.22× sooner than "
            "its baseline (20.00 s).") in part(section, "verdict")
    (png,) = accuracy_report.parent.glob("report_accuracy_*.png")
    assert png.name == f"report_accuracy_{SLUG_A}.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_report_explains_a_different_accuracy_at_the_same_epoch(accuracy_report):
    (section,) = machine_sections(accuracy_report.read_text(encoding="utf-8")).values()
    (said,) = [p for p in why_paragraphs(section) if "points below its baseline" in p]
    # 10 points apart at every epoch: the widest gap may be told at any of them, with the
    # accuracies of that epoch.
    assert re.match(r"DDP ×4 on node-a: 10\.0 points below its baseline at epoch "
                    r"(1 \(20\.0% vs 30\.0%\)|2 \(45\.0% vs 55\.0%\)"
                    r"|3 \(60\.0% vs 70\.0%\)); ", said), said
    assert "batch norm per rank over 8 of 32 images (no --sync-bn)" in said
    assert "4× fewer optimizer steps per epoch (global batch 32, baseline 8)" in said
    assert "learning rate 0.0125 (baseline 0.003125)" in said


def test_no_explanation_when_the_accuracies_agree(tmp_path, real_run, step05):
    results = tmp_path / "results"
    results.mkdir()
    write(results, "02.json", make_run(real_run, strategy="single", n=1, throughput=100.0,
                                       eval=[0.30, 0.55, 0.70]))
    write(results, "04.json", make_run(real_run, strategy="ddp", n=4, throughput=360.0,
                                       eval=[0.25, 0.50, 0.68], sync_bn=True))
    out = tmp_path / "r.md"
    run05(step05, "--results-dir", results, "--format", "md", "--output-report", out)
    text = out.read_text(encoding="utf-8")
    assert MARKDOWN_HEADER in text and "| 68.0% |" in text
    # 5, 5 and 2 points apart at epochs 1, 2 and 3: never more than the 5 points allowed
    assert "points below its baseline" not in text and "points above its baseline" not in text


def test_accuracy_columns_in_the_csv(accuracy_report):
    import pandas as pd

    frame = pd.read_csv(accuracy_report.with_suffix(".csv"))
    ddp = frame[frame["method"] == "DDP ×4"].iloc[0]
    assert ddp["final_accuracy"] == pytest.approx(0.6)
    assert ddp["time_to_accuracy_s"] == pytest.approx(9.0)
    assert ddp["time_to_accuracy_speedup"] == pytest.approx(20 / 9)
    dp = frame[frame["method"] == "DP ×2"].iloc[0]
    assert pd.isna(dp["final_accuracy"]) and pd.isna(dp["time_to_accuracy_s"])
