"""Step 05 trusts neither what it draws nor where it writes (docs/guarantees.md, section 7).

- Text from result files is drawn literally: a ``$`` in a name never reaches mathtext.
- A malformed part of a file (a probe point, a field of a run) is skipped with a reason;
  the report is still written.
- An existing file that is not a previous report of 05 is never replaced: exit status 2.
- A full or read-only disk while writing: one line, exit status 1, nothing half-written.
- Hidden temporary files left by an interrupted writer are listed, never read.

05 runs in-process (its ``main``), except where a subprocess is the point.
"""

from __future__ import annotations

import copy
import errno
import io
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest
from test_report import (H100, SLUG_A, environment_file, machine_sections, make_run, parse,
                         run05, step05, write)

from labs import files
from labs.report import plots

__all__ = ["step05"]  # the fixture of test_report

GENERATOR = "dp-vs-ddp-lab 05"


def run(step05, capsys, *argv) -> tuple[int, str, str]:
    """05's main in-process: (exit status, stdout, stderr)."""
    code = 0
    try:
        run05(step05, *argv)
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def text_of(report: Path) -> str:
    return " ".join(" ".join(parse(report).text).split())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def two_runs(results: Path, real_run: dict) -> Path:
    """A baseline and a DDP run on 2 GPUs in ``results`` (created)."""
    results.mkdir()
    write(results, "02_base.json", make_run(real_run, strategy="single", n=1,
                                            throughput=100.0))
    write(results, "04_ddp2.json", make_run(real_run, strategy="ddp", n=2,
                                            throughput=180.0))
    return results


@pytest.fixture
def lab(tmp_path, real_run) -> Path:
    """A small results folder: a baseline, a DDP run on 2 GPUs, step 01's file."""
    results = two_runs(tmp_path / "results", real_run)
    write(results, "environment.json", environment_file(real_run))
    return results


# --- 1. text from files is drawn literally ---------------------------------------------

NASTY = ["$\\frac{1}{0}$", "$x^{", "cost $5", "$x^{$", "$\\notacommand$",
         "C:\\temp\\ \\\\", "lone \ud800 surrogate"]


def test_text_from_files_is_drawn_literally(tmp_path, real_run, step05, capsys,
                                            monkeypatch):
    """Model, setting and file names with ``$`` and ``\\`` reach the figures (tick
    labels, legends) and are drawn as the characters they are. Device names are in no
    figure (each machine has its own figures, and its labels never name its device): they
    are the machines' headings, text like the run names."""
    results = tmp_path / "results"
    results.mkdir()
    gpu_a, gpu_b = f"GPU {NASTY[0]}", f"GPU {NASTY[3]}"
    for i, (gpu, model) in enumerate(((gpu_a, NASTY[1]), (gpu_b, NASTY[5]))):
        base = make_run(real_run, strategy="single", n=1, throughput=100.0, gpu=gpu,
                        run_name=NASTY[6])
        base["config"]["model"] = model
        write(results, f"02_{i}.json", base)
        # A baseline of another model on the same GPUs: the machine's two single-device
        # rows are told apart by their model, so each model name is in its labels.
        other = make_run(real_run, strategy="single", n=1, throughput=90.0, gpu=gpu,
                         run_name=NASTY[6])
        other["config"]["model"] = NASTY[0]
        write(results, f"02_{i}_other.json", other)
        for hook, tp in ((NASTY[2], 170.0), (NASTY[4], 180.0)):
            ddp = make_run(real_run, strategy="ddp", n=2, throughput=tp, gpu=gpu,
                           comm_hook=hook, run_name=NASTY[3])
            ddp["config"]["model"] = model
            write(results, f"04_{i}_{tp:.0f}.json", ddp)
        write(results, f"03_{i}.json", make_run(real_run, strategy="dp", n=2,
                                                throughput=150.0, gpu=gpu))
    env = environment_file(real_run)  # step 01 of node-a: one gpu_a and one gpu_b
    env["environment"] = {**env["environment"], "host": "node-a",
                          "gpus": [{"index": 0, "name": gpu_a}, {"index": 1, "name": gpu_b}]}
    env["probes"]["allreduce"]["backend"] = NASTY[1]
    write(results, "01_$x^{$.json", env)

    drawn = []
    real_png = plots._png

    def spy(fig):
        drawn.append(fig)
        return real_png(fig)

    monkeypatch.setattr(plots, "_png", spy)
    out = tmp_path / "r.html"
    code, stdout, err = run(step05, capsys, "--results-dir", results, "--output-report",
                            out, "--generate-plots")
    assert code == 0, err
    assert "could not be drawn" not in text_of(out)
    # Each figure is METRIC_SLUG, one set per machine (node-a's gpu_a and gpu_b).
    slugs = list(machine_sections(out.read_text(encoding="utf-8")))
    assert len(slugs) == 2
    keys = [p.stem.removeprefix("r_") for p in tmp_path.glob("r_*.png")]
    for slug in slugs:
        metrics = {k.removesuffix(f"_{slug}") for k in keys if k.endswith(f"_{slug}")}
        assert metrics >= {"throughput", "epoch_time", "memory", "efficiency", "step_time",
                           "loss", "allreduce"}, (slug, metrics)
    assert len(drawn) == len(keys)
    from matplotlib.text import Text

    shown = set()
    for fig in drawn:
        for text in fig.findobj(Text):
            if "$" in text.get_text() or "\\" in text.get_text():
                assert not text.get_usetex()
                assert not text.get_parse_math(), text.get_text()
                shown.add(text.get_text())
    # Each name is on some figure exactly as written (the surrogate replaced).
    for name in NASTY[:6]:
        assert any(name in s for s in shown), (name, shown)
    report = text_of(out)
    assert f"node-a · 1 × {gpu_a}" in report and f"node-a · 1 × {gpu_b}" in report
    assert "lone \ufffd surrogate" in report


# --- 2. malformed parts are skipped with a reason ---------------------------------------------

def test_malformed_probe_points_are_skipped_with_a_reason(lab, tmp_path, real_run, step05,
                                                          capsys):
    env = environment_file(real_run)
    points = env["probes"]["allreduce"]["results"]
    points.append(dict(points[-1], algbw_gb_s=None))  # same size and busbw, no algbw
    points[0]["busbw_gb_s"] = None
    points[1]["time_s"] = "NaN"
    points[2]["size_bytes"] = -4096
    points[4]["correct"] = "yes"
    env["probes"]["matmul"] = [{"device": "cuda:0", "dtype": "bf16", "size": 8192,
                                "time_s": 0.00157, "tflops": 700.3},
                               {"device": "cuda:0", "dtype": "fp32", "size": 8192,
                                "time_s": None, "tflops": "fast"}]
    env["probes"]["copy_bandwidth"] = [{"device": "cuda:0", "direction": "h2d",
                                        "size_bytes": 2**28, "gb_s": "NaN"},
                                       {"device": "cuda:0", "direction": "d2h",
                                        "size_bytes": 2**28, "gb_s": 24.6}, "junk"]
    # node-a's own step 01 (the runs' host and GPU model): its figure is node-a's.
    env["environment"] = {**env["environment"], "host": "node-a",
                          "gpus": [{"index": 0, "name": H100,
                                    "total_memory_bytes": 80 * 2**30}]}
    write(lab, "environment.json", env)
    out = tmp_path / "r.html"
    code, stdout, err = run(step05, capsys, "--results-dir", lab, "--output-report", out,
                            "--generate-plots")
    assert code == 0, err
    page = parse(out)
    text = text_of(out)
    section = text[text.index("Step 01 on node-a: versions, probes and topology "
                              "(environment.json)"):]
    for reason in ("probes.allreduce.results[0] skipped: busbw_gb_s is null",
                   "probes.allreduce.results[1] skipped: time_s is a string",
                   "probes.allreduce.results[2] skipped: size_bytes is negative",
                   "probes.allreduce.results[4] skipped: correct is a string",
                   "probes.allreduce.results[8] skipped: algbw_gb_s is null",
                   "probes.matmul[1] skipped: time_s is null",
                   "probes.copy_bandwidth[0] skipped: gb_s is a string",
                   "probes.copy_bandwidth[2] skipped: not an object"):
        assert reason in section, reason
    # The tables hold the good points only; the figure is drawn from them.
    sizes = [r for r in page.rows if r and r[-1] in ("✓", "✗")]
    assert len(sizes) == 8 - 4
    assert ["cuda:0", "bf16", "8192", "1.57", "700"] in page.rows
    assert not any(r[:2] == ["cuda:0", "fp32"] for r in page.rows)
    assert (tmp_path / f"r_allreduce_{SLUG_A}.png").is_file()  # drawn from the good points
    assert "partly   environment.json: 8 part(s) skipped" in stdout


VALUES = {"null": None, "str": "NaN", "list": [1.0], "dict": {"v": 1}, "bool": True,
          "negative": -1, "huge": "huge"}


def wrong(original, kind: str):
    if kind != "huge":
        return copy.deepcopy(VALUES[kind])
    return 1e308 if isinstance(original, float) else 10**400  # beyond float: 10**400


def paths(value, prefix=()):
    """Every key of every object, and the first entry of every list, depth first."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield (*prefix, key)
            yield from paths(inner, (*prefix, key))
    elif isinstance(value, list) and value:
        yield (*prefix, 0)
        yield from paths(value[0], (*prefix, 0))


def mutated(record: dict, path: tuple, kind: str) -> dict:
    out = copy.deepcopy(record)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = wrong(target[path[-1]], kind)
    return out


def rich_environment(real: dict) -> dict:
    env = environment_file(real)
    env["probes"]["matmul"] = [{"device": "cuda:0", "dtype": "bf16", "size": 8192,
                                "time_s": 0.00157, "tflops": 700.3}]
    env["probes"]["copy_bandwidth"] = [{"device": "cuda:0", "direction": "h2d",
                                        "size_bytes": 2**28, "gb_s": 24.6}]
    env["probes"]["allreduce"].update(all_correct=False, gradient_model="resnet50",
                                      gradient_bytes=102228128,
                                      predicted_gradient_allreduce_s=0.0041)
    env["environment"]["gpus"] = [{"index": 0, "name": H100,
                                   "total_memory_bytes": 80 * 2**30}]
    return env


@pytest.fixture(scope="module")
def wrong_types_report(tmp_path_factory, real_run, step05) -> dict:
    """Each field of a DDP run, of a baseline run and of step 01's file, one at a time,
    set to a wrong value of each kind: one file per field and kind, all in one folder,
    and one run of 05 over them (the baseline's config fields are left to the DDP run's:
    each would be a table row of its own, and slow the test, through the same code)."""
    import contextlib

    tmp_path = tmp_path_factory.mktemp("wrong-types")
    results = tmp_path / "results"
    results.mkdir()
    base = make_run(real_run, strategy="single", n=1, throughput=100.0)
    ddp = make_run(real_run, strategy="ddp", n=2, throughput=180.0)
    env = rich_environment(real_run)
    write(results, "02_base.json", base)
    write(results, "04_ddp.json", ddp)
    write(results, "environment.json", env)
    names: dict[str, list[str]] = {kind: [] for kind in VALUES}
    for kind in VALUES:
        for prefix, template in (("02", base), ("04", ddp), ("01", env)):
            for i, path in enumerate(paths(template)):
                if prefix == "02" and path[0] == "config" and len(path) > 1:
                    continue
                record = mutated(template, path, kind)
                if prefix != "01" and path != ("run_id",):
                    record["run_id"] = uuid.uuid4().hex[:12]
                name = f"{prefix}_{kind}_{i:03d}.json"
                (results / name).write_text(json.dumps(record))
                names[kind].append(name)
    out = tmp_path / "r.html"
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            run05(step05, "--results-dir", results, "--output-report", out, "--generate-plots")
        except SystemExit as exit_info:
            code = exit_info.code if isinstance(exit_info.code, int) else 1
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
            "out": out, "names": names}


@pytest.mark.parametrize("kind", list(VALUES))
def test_wrong_types_in_any_field_never_stop_the_report(wrong_types_report, kind):
    """Every file with a field of this kind gone wrong is either in the report or listed
    as skipped with its reason; the report, its CSV and figures are written."""
    report = wrong_types_report
    assert report["code"] == 0, report["stderr"]
    out = report["out"]
    assert "error" not in report["stderr"] and out.is_file()
    assert out.with_suffix(".csv").is_file()
    text = text_of(out)
    skipped = dict(line[len("skipped  "):].split(": ", 1)
                   for line in report["stdout"].splitlines() if line.startswith("skipped  "))
    for name in report["names"][kind]:
        assert name in text, name
        if name in skipped:
            assert skipped[name].strip(), name


# --- 3. never replace a file that is not 05's own ------------------------------------------

def png_bytes(software: str | None) -> bytes:
    from matplotlib.figure import Figure

    buffer = io.BytesIO()
    Figure(figsize=(1, 1)).savefig(buffer, format="png", metadata={"Software": software})
    return buffer.getvalue()


@pytest.mark.parametrize("case", ["html", "md", "csv", "png", "json-in-results",
                                  "result-json"])
def test_refuses_to_replace_a_file_that_is_not_its_own(lab, tmp_path, step05, capsys, case):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    report = out_dir / "report.html"
    args = ["--generate-plots"]
    if case == "html":
        report.write_text("<html><body>my notes</body></html>")
    elif case == "md":
        report = out_dir / "report.md"
        report.write_text("# My notes\n")
        args += ["--format", "md"]
    elif case == "csv":
        report.with_suffix(".csv").write_text("name,value\nx,1\n")
    elif case == "png":
        # a picture of another program where 05 would save node-a's throughput figure
        (out_dir / f"report_throughput_{SLUG_A}.png").write_bytes(png_bytes("Matplotlib v3"))
    elif case == "json-in-results":
        report = lab / "summary.json"  # does not exist yet: still refused
    else:
        report = out_dir / "02_base.json"
        report.write_bytes((lab / "02_base.json").read_bytes())
    before_out, before_lab = snapshot(out_dir), snapshot(lab)
    code, stdout, err = run(step05, capsys, "--results-dir", lab, "--output-report",
                            report, *args)
    assert code == 2
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err
    assert "refus" in err or "--results-dir" in err
    assert snapshot(out_dir) == before_out and snapshot(lab) == before_lab


def test_replaces_only_its_own_previous_report(lab, tmp_path, step05, capsys):
    """05 marks what it writes and recognises the mark: HTML by a generator meta tag,
    Markdown by its first line, the CSV by its header, PNGs by their Software entry (or,
    written by an older 05 without one, by their name)."""
    out = tmp_path / "report.html"
    assert run(step05, capsys, "--results-dir", lab, "--output-report", out,
               "--generate-plots")[0] == 0
    assert f'<meta name="generator" content="{GENERATOR}">' in out.read_text()
    (png,) = tmp_path.glob("report_throughput_*.png")
    assert f"Software\x00{GENERATOR}".encode() in png.read_bytes()
    (loss,) = tmp_path.glob("report_loss_*.png")
    loss.write_bytes(png_bytes(None))  # an older 05's figure: no Software entry, its name
    code, _, err = run(step05, capsys, "--results-dir", lab, "--output-report", out,
                       "--generate-plots")
    assert code == 0, err
    assert f"Software\x00{GENERATOR}".encode() in loss.read_bytes()  # replaced by 05's own
    md = tmp_path / "report.md"
    assert run(step05, capsys, "--results-dir", lab, "--output-report", md,
               "--format", "md")[0] == 0
    assert md.read_text().splitlines()[0] == f"<!-- generator: {GENERATOR} -->"
    code, _, err = run(step05, capsys, "--results-dir", lab, "--output-report", md,
                       "--format", "md")
    assert code == 0, err
    # The HTML report may be replaced by a Markdown one of the same name, and back.
    code, _, err = run(step05, capsys, "--results-dir", lab, "--output-report", out,
                       "--format", "md")
    assert code == 0, err


# --- 4. a full or read-only disk while writing -----------------------------------------------

def full_disk(*_args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def previous(tmp_path_factory, real_run, step05) -> tuple[Path, Path]:
    """A results folder and a folder with 05's report, CSV and figures from it."""
    root = tmp_path_factory.mktemp("previous")
    results = two_runs(root / "results", real_run)
    out = root / "out"
    out.mkdir()
    run05(step05, "--results-dir", results, "--output-report", out / "report.html",
          "--generate-plots")
    return results, out


@pytest.mark.parametrize("failing", ["report.html", "report.csv", "report_loss_*.png"])
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_disk_errors_while_writing(previous, tmp_path, step05, capsys, monkeypatch, failing,
                                   error):
    """The fault is injected into labs.files.write_atomic (monkeypatched, in-process):
    ENOSPC as the temporary file is flushed to disk, EROFS as it is created. One line
    naming the file and the error, exit status 1, no temporary file, the previous report
    intact."""
    lab, before = previous
    out_dir = tmp_path / "out"
    shutil.copytree(before, out_dir)
    report = out_dir / "report.html"
    previous_report = report.read_bytes()
    real_fsync, real_create = files.os.fsync, files._create_hidden_beside
    (target,) = out_dir.glob(failing)  # a figure's name ends in its machine's slug

    def create(path):
        if error == errno.EROFS and Path(path) == target:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        fd, tmp = real_create(path)
        if error == errno.ENOSPC and Path(path) == target:
            doomed.add(fd)
        return fd, tmp

    doomed: set[int] = set()

    def fsync(fd):
        if fd in doomed:
            full_disk()
        real_fsync(fd)

    monkeypatch.setattr(files, "_create_hidden_beside", create)
    monkeypatch.setattr(files.os, "fsync", fsync)
    code, stdout, err = run(step05, capsys, "--results-dir", lab, "--output-report",
                            report, "--generate-plots")
    monkeypatch.undo()
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(target) in err and os.strerror(error) in err
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")]
    assert report.read_bytes() == previous_report


def test_an_unwritable_folder_is_found_before_any_work(lab, tmp_path, step05, capsys,
                                                       monkeypatch):
    """Where the probe of labs.files.unwritable_reason already fails (a read-only mount),
    it is bad usage: exit status 2 before anything is read."""
    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(files, "_create_hidden_beside", read_only)
    code, _, err = run(step05, capsys, "--results-dir", lab, "--output-report",
                       tmp_path / "r.html")
    assert code == 2 and os.strerror(errno.EROFS) in err and err.count("\n") == 1
    assert not (tmp_path / "r.html").exists()


# --- 5. leftover temporary files --------------------------------------------------------------

def test_leftover_temporary_files_are_listed_never_read(lab, tmp_path, step05, capsys):
    stale = lab / ".04_ddp2.json.0a1b2c3d.tmp"
    stale.write_bytes((lab / "04_ddp2.json").read_bytes().replace(b'"ok"', b'"ok" '))
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    fresh = lab / ".05_new.json.9f8e7d6c.tmp"
    fresh.write_text('{"half": ')
    out = tmp_path / "r.html"
    code, stdout, err = run(step05, capsys, "--results-dir", lab, "--output-report", out)
    assert code == 0, err
    assert "runs     2 on 1 machine(s): 2 table row(s)" in stdout
    assert (f"skipped  {stale.name}: a temporary file left by an interrupted write; "
            "safe to delete") in stdout
    assert f"skipped  {fresh.name}: a temporary file" in stdout
    assert "being written" in stdout.split(fresh.name, 1)[1].splitlines()[0]
    text = text_of(out)
    assert stale.name in text and "safe to delete" in text
