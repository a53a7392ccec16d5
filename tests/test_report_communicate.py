"""The report's 'communicate less' block (labs/report/communicate.py): DDP against local SGD,
IID against Dirichlet shards, on four runs made from a real 02 record, whose bytes,
throughputs and accuracies are planted; and folders without such runs, unchanged."""

from __future__ import annotations

import html
import re
import subprocess
import sys

from test_report import make_run, write

from labs.report import analysis, communicate, loading

GRAD = 44_726_568
# (sync, partition, img/s, final accuracy, bytes per image)
RUNS = [("every-step", "iid", 200.0, 0.60, GRAD / 32),
        ("every-step", "dirichlet", 198.0, 0.59, GRAD / 32),
        ("local-sgd", "iid", 240.0, 0.595, GRAD / 32 / 8),
        ("local-sgd", "dirichlet", 236.0, 0.41, GRAD / 32 / 8)]


def build(folder, real, runs=RUNS, spread=(0.95, 1.03)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (sync, split, tp, accuracy, per_image) in enumerate(runs):
        rec = make_run(real, strategy="ddp", n=2, throughput=tp, batch=32,
                       gradient_bytes=GRAD, eval=[accuracy / 2, accuracy],
                       run_name=f"{sync}-{split}", spread=spread)
        rec["config"].update(sync=sync, partition=split,
                             average_every=8 if sync == "local-sgd" else None,
                             dirichlet_alpha=0.5 if split == "dirichlet" else None)
        rec["metrics"]["comm_bytes_per_sample"] = per_image
        if sync == "local-sgd":
            rec["metrics"]["local_sgd"] = {"divergence": {"median": 0.004 if split == "iid"
                                                          else 0.02}}
        write(folder, f"{i}.json", rec)


def block(folder):
    found = loading.load_folder(folder)
    return communicate.analyse(analysis.compare(analysis.run_frame(found)))


def test_the_table_sets_each_local_sgd_run_against_ddp_on_the_same_data(tmp_path, real_run):
    build(tmp_path / "r", real_run)
    result = block(tmp_path / "r")
    by_label = {r["label"]: r for r in result["rows"]}
    assert set(by_label) == {"DDP ×2", "DDP ×2 · Dirichlet α 0.5", "DDP ×2 · local SGD every 8",
                             "DDP ×2 · local SGD every 8 · Dirichlet α 0.5"}
    local_iid = by_label["DDP ×2 · local SGD every 8"]
    assert local_iid["bytes"].endswith("(0.12× DDP's)") and local_iid["divergence"] == "0.40%"
    assert by_label["DDP ×2"]["divergence"] == "—"
    iid, skewed = result["sentences"][:2] if "IID" in result["sentences"][0] \
        else result["sentences"][1::-1]
    # IID: 1.2x faster, 0.5 points lower: faster and as accurate
    assert "0.12× DDP's bytes per image" in iid and iid.endswith("faster and as accurate here.")
    # skewed: 1.19x faster, 18 points lower
    assert "(-18.0 points)" in skewed and skewed.endswith("faster but less accurate here.")
    skew = result["sentences"][2]
    assert "DDP, every step: -1.0 points" in skew and "-18.5 points" in skew


def test_the_report_shows_the_block_and_only_where_there_is_something_to_compare(
        tmp_path, real_run):
    build(tmp_path / "r", real_run)
    report = tmp_path / "report.html"
    subprocess.run([sys.executable, "05_performance_comparison.py", "--results-dir",
                    str(tmp_path / "r"), "--output-report", str(report)], check=True,
                   capture_output=True, text=True, timeout=300)
    page = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", report.read_text())).split())
    assert "Communicate less on node-a" in page
    assert "local SGD, averaged every 8 steps Dirichlet α = 0.5 (label-skewed)" in page
    assert 'id="plot-communicate_' in report.read_text()
    build(tmp_path / "plain", real_run, runs=RUNS[:1])  # DDP every step on IID data only
    assert block(tmp_path / "plain") is None


def test_local_sgds_uneven_steps_are_not_called_noise(tmp_path, real_run):
    """Every H-th local-SGD step averages the replicas, so its steps spread by design;
    the same spread on a DDP run is noise and is flagged."""
    build(tmp_path / "r", real_run, spread=(0.7, 1.3))  # p10-p90: 60 % of the median
    found = loading.load_folder(tmp_path / "r")
    table = analysis.compare(analysis.run_frame(found))
    flags = {r["label"]: r["flags"] for _, r in table.iterrows()}
    assert flags["DDP ×2"] and flags["DDP ×2"][0].startswith("noisy")
    assert flags["DDP ×2 · local SGD every 8"] == []
