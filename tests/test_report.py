"""Step 05: the comparison report, from real and crafted result files.

One real run of step 02 (``--preset smoke``) per session gives a genuine result file; the
DataParallel and DDP runs are copies of it with the strategy, world, devices and metrics
changed, so the report is tested on multi-GPU numbers that a CPU cannot produce.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import REPO, lab_env, run_script

from labs.report import analysis, loading

GIB = 2**30
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
XSS = "<script>alert(1)</script>"
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


def test_html_report_table_rows(html_report):
    page = parse(html_report)
    rows: dict[str, list[str]] = {}
    for r in page.rows:  # the main table comes first; Run details repeat the labels
        if r:
            rows.setdefault(r[0], r)
    ddp4 = next(r for label, r in rows.items() if label.startswith("DDP ×4"))
    assert ddp4[1].startswith("32")  # total batch: 4 ranks x 8
    assert "360 img/s" in ddp4[4]
    assert ddp4[5].startswith("90%") and "3.60×" in ddp4[5]
    dp2 = next(r for label, r in rows.items() if label.startswith("DP ×2"))
    assert "max 14.00 GiB / min 9.00 GiB" in dp2[3]
    assert dp2[5].startswith("75%")
    ddp1 = next(r for label, r in rows.items() if label.startswith("DDP ×1"))
    assert "world size 1: scaling not measurable" in ddp1[5]
    cpu = next(r for r in page.rows if r and r[0].startswith("Single")
               and r[3].startswith("n/a (CPU)"))
    assert "host RSS" in cpu[3]  # the only memory figure a CPU run has
    assert cpu[5].startswith("baseline")
    a100 = next(r for r in page.rows if len(r) == 6 and "A100" in r[5])
    assert a100[5].startswith("n/a") and "no matching baseline" in a100[5]


def test_html_report_is_self_contained_with_embedded_plots(html_report):
    page = parse(html_report)
    raw = html_report.read_text(encoding="utf-8")
    pngs = [s for s in page.images if s.startswith("data:image/png;base64,")]
    assert len(pngs) == len(page.images) >= 6
    for src in pngs:
        assert len(src) > 2000
    for forbidden in ("<link", "<script", "http://", "https://", "@import", "url("):
        assert forbidden not in raw
    for key in ("throughput", "epoch_time", "memory", "efficiency", "step_time", "loss",
                "allreduce"):
        png = html_report.with_name(f"comparison_report_{key}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key


def test_html_report_escapes_run_names(html_report):
    raw = html_report.read_text(encoding="utf-8")
    page = parse(html_report)
    assert "script" not in page.tags
    assert XSS not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert XSS in "".join(page.text)  # shown to the reader as text


def test_html_report_sections(html_report):
    text = " ".join(" ".join(parse(html_report).text).split())
    for heading in ("Verdict", "Results", "Plots", "What this shows", "Environment",
                    "Methodology", "Commands that reproduce each run", "Skipped files",
                    "Notes from the runs", "Runs that did not finish"):
        assert heading in text
    for name in SKIPPED:
        assert name in text
    assert "newer than this lab understands" in text
    assert OOM_REASON in text  # the unfinished run, with its reason
    assert "python 04_ddp.py --batch-size 8 # n=4" in text  # commands
    assert "baseline note: quiet machine" in text  # notes
    assert "Use --num-workers 8 per process." in text  # step 01's environment
    # "What this shows", from the numbers
    assert "GPU 0 peaked at 14.00 GiB" in text
    assert "GIL" not in text and "docs/student_guide.md" in text  # measured, not asserted
    assert "not measured per GPU" in text
    assert "all-reduce" in text and "buckets of about 25.0 MB" in text
    assert "DP ×2 (25%) waited for input data" in text
    assert "world size 1" in text
    assert "different hardware" in text
    assert "reached 3.60× the single-device throughput: 90% scaling efficiency" in text


def test_csv_beside_the_report(html_report):
    import pandas as pd

    frame = pd.read_csv(html_report.with_suffix(".csv"))
    ddp4 = frame[frame["method"] == "DDP ×4"].iloc[0]
    assert ddp4["scaling_efficiency"] == pytest.approx(0.9)
    assert ddp4["speedup"] == pytest.approx(3.6)
    assert ddp4["total_batch"] == 32
    assert ddp4["runs"] == 2
    assert len(frame) == 6  # configurations, not runs: repeats are aggregated


def test_markdown_format(tmp_path, lab_dir, step05):
    out = tmp_path / "report.md"
    run05(step05, "--results-dir", lab_dir, "--format", "md", "--output-report", out)
    text = out.read_text(encoding="utf-8")
    assert "| method | total batch | time/epoch | GPU memory | throughput | scaling efficiency |" in text
    assert "90%" in text and "world size 1: scaling not measurable" in text
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert (tmp_path / "report.csv").is_file()
    assert not list(tmp_path.glob("*.png"))  # figures are saved only with --generate-plots
    assert "--generate-plots" in text


def test_only_one_device_says_not_measurable(tmp_path, real_run, step05):
    results = tmp_path / "results"
    results.mkdir()
    write(results, "a.json", real_run)
    write(results, "b.json", make_run(real_run, strategy="ddp", n=1, throughput=90.0,
                                      gpu="CPU"))
    out = tmp_path / "r.html"
    run05(step05, "--results-dir", results, "--output-report", out)
    text = " ".join(" ".join(parse(out).text).split())
    assert "Every completed run used one device, so nothing here measures scaling" in text
    assert "Not drawn: No scaling efficiency could be computed" in text
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
    text = " ".join(" ".join(parse(out).text).split())
    assert "No completed run to compare: 1 run did not finish" in text
    assert OOM_REASON in text
    assert parse(out).images  # step 01's all-reduce curve is still there
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
    assert "runs     29 compared" in proc.stdout  # 30 run files, one of them unfinished
    assert out.is_file() and out.with_suffix(".csv").is_file()
    assert len(list(tmp_path.glob("comparison_report_*.png"))) == 7


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
    page = parse(accuracy_report)
    header = next(r for r in page.rows if r and r[0] == "Method")
    assert header[5].startswith("Final accuracy")  # after throughput, before efficiency
    rows = {r[0]: r for r in page.rows if len(r) == 7 and r[0] != "Method"}
    ddp = next(r for label, r in rows.items() if label.startswith("DDP ×4"))
    single = next(r for label, r in rows.items() if label.startswith("Single"))
    dp = next(r for label, r in rows.items() if label.startswith("DP ×2"))
    assert single[5].startswith("70.0%") and "to 50% in 20.00 s" in single[5]
    # DDP got to 50% after its 3rd 3-s epoch, 9 s; the baseline after 20 s: 2.22x sooner
    assert ddp[5].startswith("60.0%") and "to 50% in 9.00 s" in ddp[5]
    assert "2.22× sooner than the baseline (20.00 s)" in ddp[5]
    assert dp[5].startswith("n/a") and "no evaluation" in dp[5]
    assert ddp[6].startswith("90%")  # the efficiency column follows
    text = " ".join(" ".join(page.text).split())
    assert ("Time to 50% validation accuracy: DDP ×4 9.00 s of training against 20.00 s "
            "for the single-device baseline, a 2.22× speed-up in time to accuracy.") in text
    assert ("DDP ×4: 60.0% top-1 on the validation split after epoch 3; 50% after 9.00 s "
            "of training, a 2.22× speed-up against the single-device baseline "
            "(20.00 s).") in text
    png = accuracy_report.with_name("report_accuracy.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_explains_a_different_accuracy_at_the_same_epoch(accuracy_report):
    text = " ".join(" ".join(parse(accuracy_report).text).split())
    assert ("At epoch 3 DDP ×4 reached 60.0% and the single-device baseline 70.0%: "
            "10.0 points apart.") in text
    assert ("batch norm per rank: each of the 4 ranks normalises over its own 8 images, "
            "1/4 of the global batch of 32, without --sync-bn") in text
    assert "the global batch differs (32 vs 8)" in text
    assert "the learning rate differs (0.0125 vs 0.003125, by the linear scaling rule)" in text


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
    assert "| throughput | final accuracy | scaling efficiency |" in text and "68.0%" in text
    assert "At epoch" not in text  # 2 points apart at epoch 3: within the noise allowed


def test_accuracy_columns_in_the_csv(accuracy_report):
    import pandas as pd

    frame = pd.read_csv(accuracy_report.with_suffix(".csv"))
    ddp = frame[frame["method"] == "DDP ×4"].iloc[0]
    assert ddp["final_accuracy"] == pytest.approx(0.6)
    assert ddp["time_to_accuracy_s"] == pytest.approx(9.0)
    assert ddp["time_to_accuracy_speedup"] == pytest.approx(20 / 9)
    dp = frame[frame["method"] == "DP ×2"].iloc[0]
    assert pd.isna(dp["final_accuracy"]) and pd.isna(dp["time_to_accuracy_s"])
