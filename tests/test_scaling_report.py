"""The report's scaling section (labs/report/scaling.py, issue 22): curves of DDP at several
world sizes, weak and strong, each point's prediction computed by the alpha-beta formula
from step 01's sweep, the refusal when there is no sweep, and old results without it.

The folder is made from a real 02 record (``real_run``) by ``test_report.make_run``: a
baseline at 1,000 img/s and DDP at N = 1, 2, 4 (weak) and 2 (strong), all on one H100
host, with a step-01 file whose sweeps at 2 and 4 ranks have a known latency and bus
bandwidth."""

from __future__ import annotations

import copy
import html
import re
import subprocess
import sys

import pytest

from test_report import H100, make_run, write

from labs import bandwidth
from labs.report import analysis, loading, scaling

ALPHA_S, BETA_GB_S = 50e-6, 2.0
GRADIENT = 44_726_568  # resnet18's fp32 gradients
HOST = "scale-node"
SIZES = [2 ** k for k in range(20, 29, 2)]


def _sweep(world: int) -> list[dict]:
    rows = []
    for size in SIZES:
        t = ALPHA_S + bandwidth.ring_factor(world) * size / (BETA_GB_S * 1e9)
        algbw = size / t / 1e9
        rows.append({"size_bytes": size, "time_s": t, "algbw_gb_s": algbw,
                     "busbw_gb_s": bandwidth.busbw(algbw, world), "correct": True})
    return rows


def environment(real: dict, *, with_sweep: bool = True) -> dict:
    env = copy.deepcopy(real["environment"])
    env.update(host=HOST, gpus=[{"index": i, "name": H100} for i in range(4)])
    allreduce = {"backend": "nccl", "world_size": 4, "device": "cuda", "results": _sweep(4),
                 "all_correct": True, "smaller_world_sizes": [
                     {"world_size": 2, "results": _sweep(2), "all_correct": True}],
                 "predicted_gradient_allreduce_s": None, "gradient_model": "resnet50",
                 "gradient_bytes": 102_228_128}
    return {"schema_version": 1, "kind": "environment", "written_at": "2026-12-06T01:00:00Z",
            "command": "python 01_environment_check.py", "environment": env,
            "gpus": env["gpus"], "topology": None, "disk_free_bytes": 10 ** 12,
            "backends": {"nccl": True, "gloo": True, "mpi": False},
            "probes": {"matmul": [], "copy_bandwidth": None,
                       "allreduce": allreduce if with_sweep else None},
            "recommendations": [], "notes": []}


# (strategy, N, per-device batch, img/s, exposed s, scaling)
RUNS = [("single", 1, 64, 1000.0, None, None),
        ("ddp", 1, 64, 960.0, 0.001, "weak"),
        ("ddp", 2, 64, 1800.0, 0.010, "weak"),
        ("ddp", 4, 64, 3300.0, 0.012, "weak"),
        ("ddp", 2, 32, 1500.0, 0.009, "strong")]


def build(folder, real: dict, *, with_sweep: bool = True, runs=RUNS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (strategy, n, batch, tp, exposed, mode) in enumerate(runs):
        rec = make_run(real, strategy=strategy, n=n, throughput=tp, batch=batch, host=HOST,
                       exposed_s=exposed, gradient_bytes=GRADIENT,
                       run_name=f"{strategy}-{n}-{mode}")
        rec["config"]["scaling"] = mode
        rec["started_at"] = f"2026-12-06T02:{i:02d}:00+00:00"
        if strategy == "ddp":
            rec["config"]["bucket_bytes"] = [28_872_744, 15_853_824]
        write(folder, f"{i}_{strategy}_{n}.json", rec)
    write(folder, "environment.json", environment(real, with_sweep=with_sweep))


def analysed(folder):
    found = loading.load_folder(folder)
    table = analysis.compare(analysis.run_frame(found))
    return scaling.analyse(table, found.environments, found.file_of)


def expected_step(n: int, compute_s: float, hidden: float) -> float:
    """The formula, written out: compute + (1 - hidden) x (buckets x alpha + bytes/beta)."""
    if n == 1:
        return compute_s
    return compute_s + (1 - hidden) * (2 * ALPHA_S + bandwidth.ring_factor(n) * GRADIENT
                                       / (BETA_GB_S * 1e9))


def test_each_point_is_predicted_by_the_formula_and_compared(tmp_path, real_run):
    build(tmp_path / "r", real_run)
    result = analysed(tmp_path / "r")
    assert result.refusal is None and sorted(result.model.fits) == [2, 4]
    assert result.model.fits[4].alpha_s == pytest.approx(ALPHA_S, rel=1e-6)
    assert result.model.fits[4].beta_gb_s == pytest.approx(BETA_GB_S, rel=1e-6)
    weak, strong = result.curves
    assert (weak.mode, strong.mode) == ("weak", "strong")
    assert [p.n for p in weak.points] == [1, 2, 4, 8, 16]  # 2x and 4x the largest measured
    assert [p.n for p in strong.points] == [1, 2, 4, 8]
    # The hidden share is calibrated on the N = 2 weak run, and only there.
    step2, exposed2 = 128 / 1800, 0.010
    hidden = 1 - exposed2 / (expected_step(2, 0, 0))
    assert result.model.hidden == pytest.approx(hidden, rel=1e-9)
    assert [p.role for p in weak.points] == ["measured", "calibration", "measured",
                                             "extrapolated", "extrapolated"]
    by_n = {p.n: p for p in weak.points}
    assert by_n[2].predicted_step_s == pytest.approx(step2, rel=1e-9)  # by construction
    step4 = 256 / 3300
    predicted4 = expected_step(4, step4 - 0.012, hidden)
    assert by_n[4].predicted_step_s == pytest.approx(predicted4, rel=1e-9)
    assert by_n[4].error == pytest.approx((256 / predicted4) / 3300 - 1, rel=1e-9)
    assert by_n[4].predicted_eff == pytest.approx(256 / predicted4 / (4 * 1000), rel=1e-9)
    # Beyond N = 4: N = 4's compute, alpha scaled by (N - 1)/3 from the N = 4 fit.
    alpha16 = ALPHA_S * 15 / 3
    step16 = (step4 - 0.012) + (1 - hidden) * (2 * alpha16 + bandwidth.ring_factor(16)
                                               * GRADIENT / (BETA_GB_S * 1e9))
    assert by_n[16].predicted_step_s == pytest.approx(step16, rel=1e-9)
    strong2 = {p.n: p for p in strong.points}[2]
    assert strong2.global_batch == 64 and strong2.per_device_batch == 32
    assert strong2.predicted_step_s == pytest.approx(expected_step(2, 64 / 1500 - 0.009,
                                                                   hidden), rel=1e-9)
    # Strong scaling keeps the global batch: N = 8 runs 8 images per device.
    assert {p.n: p.per_device_batch for p in strong.points}[8] == 8


def test_the_report_prints_each_prediction_beside_its_measurement(tmp_path, real_run):
    build(tmp_path / "r", real_run)
    report = tmp_path / "report.html"
    subprocess.run([sys.executable, "05_performance_comparison.py", "--results-dir",
                    str(tmp_path / "r"), "--output-report", str(report)], check=True,
                   capture_output=True, text=True, timeout=300)
    page = html.unescape(re.sub(r"<[^>]+>", " ", report.read_text()))
    page = " ".join(page.split())
    assert "Scaling on scale-node: 1 to N devices, measured and predicted" in page
    result = analysed(tmp_path / "r")
    by_n = {p.n: p for p in result.curves[0].points}
    row4 = f"N = 4 256 = 4 × 64 3,300 {by_n[4].predicted_tp:,.0f} {by_n[4].error:+.0%}"
    assert row4 in page
    assert "N = 2 128 = 2 × 64 1,800 1,800 calibrates the model" in page
    assert "N = 16 1,024 = 16 × 64 — " in page and "extrapolated" in page
    assert "DDP, strong scaling (global batch 64)" in page
    assert "If your link were" in page and "NVLink 4 (H100: 900 GB/s both ways)" in page
    assert re.search(r'id="plot-scaling_[a-z0-9_]+"', report.read_text())


def test_no_sweep_on_the_machine_means_no_prediction_and_says_why(tmp_path, real_run):
    build(tmp_path / "r", real_run, with_sweep=False)
    result = analysed(tmp_path / "r")
    assert result.model is None and "no all-reduce sweep" in result.refusal
    assert all(p.predicted_tp is None for c in result.curves for p in c.points)
    assert [p.n for p in result.curves[0].points] == [1, 2, 4]  # measured only


def test_a_folder_without_a_sweep_of_world_sizes_has_no_scaling_section(tmp_path, real_run):
    """Results from before sweeps existed: one DDP world size, no config.scaling."""
    old = [r[:5] + (None,) for r in RUNS if r[1] != 4 and r[5] != "strong"
           and not (r[0] == "ddp" and r[1] == 1)]
    build(tmp_path / "r", real_run, runs=old)
    assert analysed(tmp_path / "r") is None
    report = tmp_path / "report.html"
    subprocess.run([sys.executable, "05_performance_comparison.py", "--results-dir",
                    str(tmp_path / "r"), "--output-report", str(report)], check=True,
                   capture_output=True, text=True, timeout=300)
    assert "Scaling on" not in report.read_text()


def test_a_strong_scaling_run_is_paired_with_the_baseline_of_its_global_batch(tmp_path,
                                                                               real_run):
    build(tmp_path / "r", real_run)
    found = loading.load_folder(tmp_path / "r")
    table = analysis.compare(analysis.run_frame(found))
    strong = table[(table["scaling"] == "strong")].iloc[0]
    assert strong["baseline_tp"] == pytest.approx(1000.0)  # 02 at 64 = 2 x 32
    assert strong["efficiency"] == pytest.approx(1500 / (2 * 1000))
