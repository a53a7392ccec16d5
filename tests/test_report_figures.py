"""Step 05's figures and small tables say exactly what they measured: axes from zero, no
efficiency point for world size 1, device capacity on the memory plot, legends that
describe what is drawn, flagged runs greyed out, step 01's probes as tables with units,
and one time unit per column. (The figures of one machine: test_report_plots_machine.)"""

from __future__ import annotations

import copy

import matplotlib.colors as mcolors
import pytest
from test_report import (GIB, H100, environment_file, make_run, parse, populate,
                         row, run05, step05, write)

from labs import fmt
from labs.report import analysis, environment, loading, plots, render

__all__ = ["step05"]  # the fixture of test_report


def value_labels(fig) -> list[str]:
    """The value column of a bar chart (its right-hand child axes), top row first."""
    right = fig.axes[0].child_axes[0]
    return [t.get_text() for t in right.get_yticklabels()]


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory, real_run):
    return populate(tmp_path_factory.mktemp("figures") / "results", real_run)


def compare(folder):
    return analysis.compare(analysis.run_frame(loading.load_folder(folder)))


@pytest.fixture(scope="module")
def table(lab_dir):
    """The comparison with no validity flag: the tests below set their own."""
    table = compare(lab_dir)
    return table.assign(flags=[[] for _ in range(len(table))])


def flagged(table, label: str):
    """The table with the row ``label`` flagged unreliable, the others not."""
    marked = table.copy()
    marked["flags"] = [["noisy: a test flag"] if lab == label else []
                       for lab in marked["label"]]
    return marked


def same_color(a, b) -> bool:
    return mcolors.to_hex(a) == mcolors.to_hex(b)


# --- time units -------------------------------------------------------------------------------

def test_one_time_unit_per_column():
    assert fmt.unit_for([0.2, 0.95, None, float("nan")]) == "ms"
    assert fmt.unit_for([0.2, 1.5]) == "s"
    assert fmt.unit_for([]) == "s"
    assert fmt.seconds_in(0.2, "ms") == "200.0 ms"
    assert fmt.seconds_in(0.2, "s") == "0.20 s"
    assert fmt.seconds_in(None, "ms") == "n/a"


def test_epoch_column_uses_one_unit(table):
    """Run details' time per epoch: one unit for the column, ms only when all are < 1 s."""
    epochs = [r["epoch"] for r in render.detail_rows(table) if r["epoch"] != "n/a"]
    assert len(epochs) >= 5
    unit = epochs[0].split()[-1]
    assert all(e.split()[-1] == unit for e in epochs), epochs
    fast = table[table["epoch_time_s"] < 1]
    assert not fast.empty and len(fast) < len(table)  # the data mixes < 1 s and > 1 s
    assert all(r["epoch"].endswith(" ms") for r in render.detail_rows(fast))


# --- step 01's probes ------------------------------------------------------------------------

def test_probes_become_tables_with_units(real_run):
    record = environment_file(real_run)
    record["probes"]["matmul"] = [{"device": "cuda:0", "dtype": "bf16", "size": 8192,
                                   "time_s": 0.00157, "tflops": 700.3}]
    record["probes"]["copy_bandwidth"] = [{"device": "cuda:0", "direction": "h2d",
                                           "size_bytes": 256 * 2**20, "gb_s": 24.61}]
    record["probes"]["allreduce"].update(predicted_gradient_allreduce_s=0.0041,
                                         gradient_model="resnet50", gradient_bytes=102228128)
    matmul, copies, allreduce = environment.probe_tables(record)
    assert [h for h, _ in matmul["header"]] == ["device", "dtype", "n", "time (ms)", "TFLOP/s"]
    assert matmul["rows"] == [["cuda:0", "bf16", "8192", "1.57", "700"]]
    assert copies["rows"] == [["cuda:0", "host → device", "256 MiB", "24.6"]]
    assert [h for h, _ in allreduce["header"]] == ["size", "time (ms)", "algbw (GB/s)",
                                                   "busbw (GB/s)", "correct"]
    assert len(allreduce["rows"]) == 8  # every measured size, not a summary
    assert [r[-1] for r in allreduce["rows"]].count("✗") == 1
    assert allreduce["rows"][0][0] == "4 KiB"
    assert any("nccl, 4 ranks, on cuda" in line for line in allreduce["lines"])
    assert any("resnet50's gradients (102 MB fp32): 4.1 ms per step" in line
               for line in allreduce["lines"])


@pytest.mark.parametrize("probes", [
    None, "broken", 3, [], {}, {"matmul": "fast", "copy_bandwidth": {"x": 1},
                                "allreduce": [1, 2]},
    {"matmul": [1, None, {"device": ["a"], "size": "big", "time_s": "slow"}],
     "copy_bandwidth": [{"direction": ["h2d"], "gb_s": float("nan")}],
     "allreduce": {"results": [{"correct": [1]}, "x"], "world_size": "four"},
     "mystery": {"a": 1}},
])
def test_odd_probes_read_as_short_text(probes):
    tables = environment.probe_tables({"probes": probes})
    assert tables
    for probe in tables:
        assert probe["rows"] or probe["missing"], probe
        for cells in probe["rows"]:
            assert len(cells) == len(probe["header"])
            assert all(isinstance(c, str) and len(c) < 40 for c in cells)


def test_report_shows_probe_tables_not_key_dumps(tmp_path, lab_dir, step05):
    out = tmp_path / "r.html"
    run05(step05, "--results-dir", lab_dir, "--output-report", out)
    page = parse(out)
    assert ["size", "time (ms)", "algbw (GB/s)", "busbw (GB/s)", "correct"] in page.rows
    assert sum(1 for r in page.rows if r[:1] == ["16 MiB"] and r[-1] == "✓") == 1
    text = " ".join(page.text)
    assert "probe:" not in text and "size_bytes" not in text and "busbw_gb_s" not in text
    md = tmp_path / "r.md"
    run05(step05, "--results-dir", lab_dir, "--format", "md", "--output-report", md)
    markdown = md.read_text(encoding="utf-8")
    assert "| size | time (ms) | algbw (GB/s) | busbw (GB/s) | correct |" in markdown
    assert "**Host ↔ device copies**: not measured (no GPU)" in markdown
    assert "probe: " not in markdown and "busbw_gb_s" not in markdown


# --- figures ----------------------------------------------------------------------------------

def test_magnitude_axes_start_at_zero(table, real_run):
    for draw in (plots.plot_throughput, plots.plot_epoch_time, plots.plot_memory,
                 plots.plot_step_time):
        fig, _ = draw(table)
        assert fig.axes[0].get_xlim()[0] == 0, draw.__name__
    fig, _ = plots.plot_efficiency(table)
    assert fig.axes[0].get_ylim()[0] == 0
    series, _ = environment.allreduce_series([environment_file(real_run)], lambda r: "env")
    fig, _ = plots.plot_allreduce(series, None)
    assert fig.axes[0].get_ylim()[0] == 0
    assert fig.axes[0].get_xscale() == "log"  # message size may be logarithmic


def test_world_size_one_is_not_an_efficiency_point(table):
    """DDP x1 ran at 0.95x its baseline: a wrapper's overhead, not scaling. It is no point
    of the efficiency figure; only the baseline star sits at N = 1."""
    assert row(table, "DDP ×1")["speedup"] == pytest.approx(0.95)
    fig, caption = plots.plot_efficiency(table)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["DDP"].get_xdata()) == [4]
    assert list(lines["DDP"].get_ydata()) == pytest.approx([90.0])
    assert list(lines["DataParallel"].get_xdata()) == [2]
    at_one = [tuple(p) for c in ax.collections for p in c.get_offsets() if p[0] == 1]
    assert at_one == [(1, 100)]  # the star: the baseline, 100% by definition
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["DataParallel", "DDP", "single-device baseline (100% by definition)",
                      "ideal scaling (100%)"]
    assert "two or more devices" in caption and "N = 1" not in caption
    assert ax.get_ylabel() == "weak-scaling efficiency (%)"
    assert caption.startswith("Weak scaling: every device kept the baseline's per-device "
                              "batch (8 images), so the global batch grew with N.")


def test_memory_plot_marks_device_capacity(table):
    assert row(table, "DP ×2")["mem_capacity"] == [80 * GIB, 80 * GIB]
    fig, caption = plots.plot_memory(table)
    ax = fig.axes[0]
    ticks = [seg for c in ax.collections for seg in c.get_segments()]
    gpu_rows = len(ax.patches)  # one bar per GPU configuration; the CPU run has none
    assert len(ticks) == gpu_rows >= 5
    assert all(seg[0][0] == pytest.approx(80) for seg in ticks)
    assert ax.get_xlim()[1] > 80
    assert "device's total memory" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert "total memory" in caption
    no_capacity = table.assign(mem_capacity=[[] for _ in range(len(table))])
    fig, caption = plots.plot_memory(no_capacity)
    assert not fig.axes[0].collections and "total memory" not in caption


def test_memory_plot_shows_every_device_of_a_configuration(table):
    """One row per configuration, however many devices: the bar is the largest peak, a
    dot each device's, and DataParallel's heavier GPU 0 shows in the value."""
    fig, caption = plots.plot_memory(table)
    ax = fig.axes[0]
    labels = [plots.unwrap_label(t.get_text()) for t in ax.get_yticklabels()]
    dp = labels.index("DP ×2")
    assert ax.patches[dp].get_width() == pytest.approx(14.0)
    assert value_labels(fig)[dp] == "9.0–14.0 GiB"
    dots = [line for line in ax.get_lines() if list(line.get_ydata()) == [dp, dp]]
    assert len(dots) == 1 and sorted(dots[0].get_xdata()) == pytest.approx([9.0, 14.0])
    assert "each device's peak" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert "GPU 0" in caption


def test_device_capacity_from_the_device_or_the_environment():
    gpu = {"index": 1, "name": H100, "total_memory_bytes": 80 * GIB}
    record = {"environment": {"host": "a", "gpus": [gpu]}}
    devices = [{"index": 1, "name": H100, "host": "a"},
               {"index": 1, "name": H100, "host": "a", "total_memory_bytes": 40 * GIB},
               {"index": 1, "name": "other GPU", "host": "a"},
               {"index": 1, "name": H100, "host": "b"},
               {"index": [1], "name": H100}]
    assert analysis.device_capacities(record, devices) == [80 * GIB, 40 * GIB, None, None,
                                                           None]
    assert analysis.device_capacities({"environment": "odd"}, devices[:1]) == [None]


def test_step_time_legend_says_what_is_drawn(table):
    fig, _ = plots.plot_step_time(table)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "global step time: median, bar p10–p90", "each rank's step time: median, bar p10–p90"]
    assert fig.axes[0].get_xlabel() == "milliseconds per step"
    single_rank = table[table["strategy"] != "ddp"]
    fig, _ = plots.plot_step_time(single_rank)
    assert len(fig.legends[0].get_texts()) == 1  # no rank dots drawn, none in the legend


def test_flagged_rows_are_grey_and_hatched(table):
    for draw in (plots.plot_throughput, plots.plot_epoch_time):
        fig, caption = draw(flagged(table, "DDP ×4"))
        bars = fig.axes[0].patches
        labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        bad = bars[labels.index("DDP ×4")]
        assert same_color(bad.get_facecolor(), plots.UNRELIABLE) and bad.get_hatch() == "///"
        good = bars[labels.index("DP ×2")]
        assert same_color(good.get_facecolor(), plots.COLORS["dp"]) and not good.get_hatch()
        assert "flagged unreliable" in [t.get_text() for t in fig.legends[0].get_texts()]
    fig, caption = plots.plot_throughput(flagged(table, "DDP ×4"))
    assert "Grey hatched" in caption
    fig, _ = plots.plot_throughput(table.drop(columns="flags"))  # no column: no greying
    assert not any(bar.get_hatch() for bar in fig.axes[0].patches)


def test_flagged_efficiency_point_is_not_a_method_point(table):
    fig, caption = plots.plot_efficiency(flagged(table, "DDP ×4"))
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert "DDP" not in lines  # its one point (x4) is flagged: no DDP line
    assert list(lines["DataParallel"].get_xdata()) == [2]
    greyed = [c for c in ax.collections if c.get_label() == "flagged unreliable (not joined)"]
    assert len(greyed) == 1
    assert [tuple(p) for p in greyed[0].get_offsets()] == [(4, pytest.approx(90.0))]
    assert same_color(greyed[0].get_facecolor()[0], plots.UNRELIABLE)
    assert "Grey crosses" in caption


def test_plots_survive_tables_without_new_columns(table):
    old = table.drop(columns=[c for c in ("mem_capacity", "flags", "scaling", "scaling_mode")
                              if c in table.columns])
    made = plots.machine_plots(old, "m")
    drawn = {p.metric for p in made if p.png}
    assert {"throughput", "memory", "efficiency", "step_time"} <= drawn, \
        [(p.key, p.reason) for p in made]


def test_odd_step_percentiles_do_not_break_the_figure(table):
    odd = copy.deepcopy(table)
    odd["step_p10"] = None
    odd["step_p90"] = odd["step_median"] * 0.5  # below the median: clipped to it
    fig, _ = plots.plot_step_time(odd)
    assert fig.axes[0].get_xlim()[0] == 0


def test_one_efficiency_line_per_ddp_setting(tmp_path, real_run):
    results = tmp_path / "results"
    results.mkdir()
    write(results, "02.json", make_run(real_run, strategy="single", n=1, throughput=100.0))
    for name, n, bucket, throughput in (("a", 2, 25.0, 190.0), ("b", 2, 100.0, 180.0),
                                        ("c", 4, 25.0, 360.0)):
        record = make_run(real_run, strategy="ddp", n=n, throughput=throughput)
        record["config"]["bucket_cap_mb"] = bucket
        write(results, f"04_{name}.json", record)
    fig, _ = plots.plot_efficiency(compare(results))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["DDP · bucket 25 MB"].get_xdata()) == [2, 4]
    assert list(lines["DDP · bucket 25 MB"].get_ydata()) == pytest.approx([95.0, 90.0])
    assert list(lines["DDP · bucket 100 MB"].get_xdata()) == [2]  # not joined to the others


def test_epoch_plot_labels_use_the_axis_unit(table):
    fig, _ = plots.plot_epoch_time(table)
    ax = fig.axes[0]
    labels = value_labels(fig)
    assert ax.get_xlabel().startswith("seconds per epoch")  # one epoch takes over 1 s
    assert len(labels) == len(table) and all(label.endswith(" s") for label in labels), labels
    fast = table[table["epoch_time_s"] < 1]
    fig, _ = plots.plot_epoch_time(fast)
    assert fig.axes[0].get_xlabel().startswith("milliseconds per epoch")
    assert all(label.endswith(" ms") for label in value_labels(fig))
