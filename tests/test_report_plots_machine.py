"""The figures of one machine's section (``plots.machine_plots``), for 1 to 20 runs:
readable on a phone (520 px wide, text of 10 points or more, nothing outside the figure),
lines that stay apart (no two alike in a panel, identical runs still two lines), world
size 1 never on the efficiency axis, weak or strong scaling named, keys per machine."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from unittest import mock

import matplotlib.colors as mcolors
import pytest
from matplotlib.text import Text
from test_report import environment_file, make_run, write

from labs.report import analysis, environment, loading, output, plots

ACC = [0.2, 0.35, 0.48, 0.55]
# One machine's day: baselines in two precisions, DataParallel, DDP from 1 to 8 ranks and
# two DDP settings at 4 ranks. Every run has the same loss curve: identical lines.
MACHINE = (
    dict(strategy="single", n=1, throughput=100.0),
    dict(strategy="single", n=1, throughput=160.0, amp="bf16"),
    dict(strategy="dp", n=2, throughput=150.0, memory_gib=[14.0, 9.0]),
    dict(strategy="dp", n=4, throughput=220.0, memory_gib=[18.0, 9.0, 9.0, 9.0]),
    dict(strategy="ddp", n=1, throughput=95.0),
    dict(strategy="ddp", n=2, throughput=190.0),
    dict(strategy="ddp", n=4, throughput=360.0),
    dict(strategy="ddp", n=8, throughput=700.0),
    dict(strategy="ddp", n=4, throughput=600.0, amp="bf16"),
    dict(strategy="ddp", n=4, throughput=370.0, comm_hook="fp16_compress"),
)


def _twenty() -> list[dict]:
    specs = []
    for amp, base in (("off", 100.0), ("bf16", 160.0)):
        specs.append(dict(strategy="single", n=1, throughput=base, amp=amp))
        specs += [dict(strategy="dp", n=n, throughput=base * n * (0.8 - 0.05 * n), amp=amp,
                       memory_gib=[14.0] + [9.0] * (n - 1)) for n in (2, 4, 8)]
        specs += [dict(strategy="ddp", n=n, throughput=base * n * 0.93, amp=amp)
                  for n in (1, 2, 4, 8, 16)]
    specs += [dict(strategy="ddp", n=n, throughput=95.0 * n, comm_hook="fp16_compress")
              for n in (2, 4)]
    return specs


def build(folder: Path, real_run: dict, specs, eval_: bool = True):
    """``analysis.compare`` over runs of ``specs`` on one machine (node-a, H100s)."""
    folder.mkdir(parents=True)
    for i, spec in enumerate(specs):
        acc = [min(0.9, a + 0.01 * i) for a in ACC] if eval_ else None
        write(folder, f"r{i:02d}.json", make_run(real_run, eval=acc, **spec))
    return analysis.compare(analysis.run_frame(loading.load_folder(folder)))


@pytest.fixture(scope="module")
def machine(tmp_path_factory, real_run):
    table = build(tmp_path_factory.mktemp("machine") / "r", real_run, MACHINE)
    assert len(table) == len(MACHINE) and table["label"].is_unique
    return table


@pytest.fixture(scope="module")
def twenty(tmp_path_factory, real_run):
    table = build(tmp_path_factory.mktemp("twenty") / "r", real_run, _twenty())
    assert len(table) == 20
    return table


@pytest.fixture(scope="module")
def one(tmp_path_factory, real_run):
    return build(tmp_path_factory.mktemp("one") / "r", real_run, MACHINE[:1])


@pytest.fixture(scope="module")
def long_labels(machine):
    """The machine's rows with labels far longer than the lab makes them."""
    labels = list(machine["label"])
    labels[3] = "DDP ×4 · bucket 25 MB · hook fp16_compress · static graph on · SyncBN on"
    labels[6] = "a setting whose one value alone runs far past forty characters · amp off"
    return machine.assign(label=labels)


def drawn_texts(fig) -> list[Text]:
    """The texts a draw of ``fig`` really draws (tick labels out of view are not)."""
    drawn = []
    original = Text.draw

    def spy(self, renderer):
        original(self, renderer)
        if self.get_visible() and self.get_text():
            drawn.append(self)

    with mock.patch.object(Text, "draw", spy):
        fig.canvas.draw()
    return drawn


def data_lines(ax) -> list:
    """The lines of runs or configurations (the reference lines have no marker)."""
    return [line for line in ax.get_lines() if line.get_marker() not in (None, "None", "")]


def png_size(png: bytes) -> tuple[int, int]:
    return struct.unpack(">II", png[16:24])


# --- the section: keys, order, which figures are shown open --------------------------------

def test_machine_plots_keys_order_and_primary(machine):
    made = plots.machine_plots(machine, "node_a_h100")
    order = ["throughput", "efficiency", "accuracy", "memory", "step_time", "loss",
             "epoch_time"]
    assert [p.metric for p in made] == order
    assert [p.key for p in made] == [f"{m}_node_a_h100" for m in order]
    assert all(p.png for p in made), [(p.key, p.reason) for p in made]
    assert [p.metric for p in made if p.primary] == ["throughput", "efficiency"]
    for p in made:
        assert output._FIGURE_NAME.fullmatch(f"report_{p.key}.png")
        assert png_size(p.png)[0] == plots.WIDTH * plots.DPI == 520
        assert output.png_text(p.png)["Software"] == output.GENERATOR
        assert p.caption and p.title and p.reason is None


def test_without_efficiency_accuracy_is_shown_open(tmp_path, real_run):
    """World size 1 cannot measure scaling: no efficiency figure, and the reason says
    why; accuracy is then the second figure shown open."""
    table = build(tmp_path / "r", real_run, [MACHINE[0], MACHINE[4]])
    made = {p.metric: p for p in plots.machine_plots(table, "m1")}
    assert made["efficiency"].png is None
    assert "world size 1" in made["efficiency"].reason
    assert [m for m, p in made.items() if p.primary] == ["throughput", "accuracy"]
    no_eval = build(tmp_path / "r2", real_run, [MACHINE[0], MACHINE[4]], eval_=False)
    made = plots.machine_plots(no_eval, "m1")
    assert [p.metric for p in made if p.primary] == ["throughput"]


def test_one_and_twenty_runs_draw(one, twenty):
    made = {p.metric: p for p in plots.machine_plots(one, "solo")}
    assert made["efficiency"].png is None and made["efficiency"].reason
    assert all(p.png for m, p in made.items() if m != "efficiency"), \
        [(p.key, p.reason) for p in made.values()]
    made = plots.machine_plots(twenty, "big_box")
    assert all(p.png for p in made), [(p.key, p.reason) for p in made]
    assert plots.machine_plots(one.iloc[0:0], "empty")[0].reason == "No completed run to plot."


@pytest.mark.parametrize("key", ["Node-A", "a b", "", "ä", "x/../y"])
def test_machine_key_is_a_slug(machine, key):
    with pytest.raises(ValueError):
        plots.machine_plots(machine, key)
    with pytest.raises(ValueError):
        plots.allreduce_plot([], "none", key)


def test_allreduce_plot_of_one_machine(real_run):
    series, _ = environment.allreduce_series([environment_file(real_run)],
                                             lambda r: "environment.json")
    plot = plots.allreduce_plot(series, None, "node_a_h100")
    assert plot.key == "allreduce_node_a_h100" and plot.png and not plot.primary
    assert "wrong result" in plot.caption
    empty = plots.allreduce_plot([], "Step 01 did not run here.", "node_a_h100")
    assert empty.png is None and empty.reason == "Step 01 did not run here."
    fig, _ = plots.plot_allreduce(series, None)
    assert_inside_and_large(fig)


# --- readable on a phone: size, fonts, nothing clipped -------------------------------------

def assert_inside_and_large(fig) -> None:
    assert tuple(fig.get_size_inches())[0] == pytest.approx(plots.WIDTH)
    assert fig.dpi == plots.DPI
    box = fig.bbox
    texts = drawn_texts(fig)
    assert texts
    for text in texts:
        extent = text.get_window_extent()
        assert (box.x0 - 0.5 <= extent.x0 and extent.x1 <= box.x1 + 0.5
                and box.y0 - 0.5 <= extent.y0 and extent.y1 <= box.y1 + 0.5), \
            (text.get_text(), extent, box)
        assert text.get_fontsize() >= 10, (text.get_text(), text.get_fontsize())
    for legend in fig.legends:  # below the axes: never over the data
        top = legend.get_window_extent().y1
        assert all(top <= ax.get_tightbbox().y0 + 1 for ax in fig.axes)


@pytest.mark.parametrize("rows", ["one", "machine", "twenty", "long_labels"])
@pytest.mark.parametrize("metric", [m for m, _, _ in plots.PLOTS])
def test_no_text_outside_the_figure_and_none_small(request, rows, metric):
    table = request.getfixturevalue(rows)
    draw = dict((m, f) for m, _, f in plots.PLOTS)[metric]
    try:
        fig, _ = draw(table)
    except plots.NoData:
        assert (rows, metric) == ("one", "efficiency")
        return
    assert_inside_and_large(fig)


def test_figures_grow_with_their_rows(machine, twenty, one):
    heights = [plots.plot_throughput(t)[0].get_size_inches()[1] for t in (one, machine, twenty)]
    assert heights == sorted(heights) and heights[0] < heights[1] < heights[2]
    fig, _ = plots.plot_loss(twenty)
    ax_height = fig.axes[0].get_position().height * fig.get_size_inches()[1]
    assert ax_height > 2.4  # the legend of 20 runs took room of its own, not the axes'


# --- labels: wrapped, never cut ------------------------------------------------------------

def test_labels_wrap_at_their_separators_and_are_never_cut():
    assert plots.wrap_label("DDP ×4 · amp bf16") == "DDP ×4 · amp bf16"
    label = "DDP ×4 · b32 · amp off · hook fp16_compress"
    wrapped = plots.wrap_label(label)
    assert wrapped == "DDP ×4 · b32 · amp off ·\nhook fp16_compress"
    assert plots.unwrap_label(wrapped) == label
    assert all(len(line) <= plots.LINE for line in wrapped.split("\n"))
    part = "a setting whose one value alone runs far past forty characters"
    shortened = plots.wrap_label(f"DDP ×2 · {part}")
    first, second = shortened.split(" ·\n")
    assert first == "DDP ×2" and len(second) == plots.PART and "…" in second
    assert part.startswith(second.split("…")[0]) and part.endswith(second.split("…")[1])
    assert plots.wrap_label("cost $5 · C:\\temp\\ \\\\") == "cost $5 · C:\\temp\\ \\\\"


def test_figures_show_the_whole_label(long_labels):
    fig, _ = plots.plot_throughput(long_labels)
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert ticks == [plots.wrap_label(label) for label in long_labels["label"]]
    assert plots.unwrap_label(ticks[3]) == long_labels["label"].iloc[3]
    fig, _ = plots.plot_loss(long_labels)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert plots.unwrap_label(legend[3]) == long_labels["label"].iloc[3]


def test_text_from_files_stays_literal(machine):
    odd = machine.assign(label=[f"{label} · cost $5 · $x^{{$" for label in machine["label"]])
    for metric, _, draw in plots.PLOTS:
        fig, _ = draw(odd)
        texts = [t for t in drawn_texts(fig) if "$" in t.get_text()]
        assert texts or metric == "efficiency", metric  # efficiency names no run
        assert all(not t.get_parse_math() and not t.get_usetex() for t in texts)


# --- lines: 1 to 20 stay apart ---------------------------------------------------------------

@pytest.mark.parametrize("rows", ["machine", "twenty"])
def test_no_two_lines_of_a_panel_look_alike(request, rows):
    table = request.getfixturevalue(rows)
    for draw in (plots.plot_loss, plots.plot_accuracy, plots.plot_efficiency):
        fig, _ = draw(table)
        for ax in fig.axes:
            looks = [(mcolors.to_hex(line.get_color()), line.get_linestyle(),
                      line.get_marker()) for line in data_lines(ax)]
            assert looks and len(set(looks)) == len(looks), (draw.__name__, looks)


def test_one_configuration_one_look_in_every_figure(machine):
    loss, _ = plots.plot_loss(machine)
    accuracy, _ = plots.plot_accuracy(machine)
    look = {}
    for fig in (loss, accuracy):
        for line in data_lines(fig.axes[0]):
            key = plots.unwrap_label(line.get_label())
            seen = (mcolors.to_hex(line.get_color()), line.get_linestyle(), line.get_marker())
            assert look.setdefault(key, seen) == seen, key
    assert set(look) == set(machine["label"])
    styles = {plots.unwrap_label(line.get_label()): line.get_linestyle()
              for line in data_lines(loss.axes[0])}
    for _, r in machine.iterrows():  # the line style says the method
        assert styles[r["label"]] == {"single": "-", "dp": "--", "ddp": "-."}[r["strategy"]]


def test_identical_runs_show_as_two_lines(machine):
    """Every run of the machine has the same loss curve: each later line is thinner, with
    a smaller hollow marker of another shape, drawn on top: all stay visible."""
    fig, _ = plots.plot_loss(machine)
    lines = data_lines(fig.axes[0])
    assert len(lines) == len(machine)
    assert all(list(line.get_ydata()) == list(lines[0].get_ydata()) for line in lines)
    for earlier, later in zip(lines, lines[1:]):
        assert later.get_linewidth() < earlier.get_linewidth()
        assert later.get_markersize() < earlier.get_markersize()
        assert later.get_zorder() > earlier.get_zorder()
        assert later.get_marker() != earlier.get_marker()
    assert all(line.get_markerfacecolor() == "white" for line in lines)
    assert lines[-1].get_linewidth() >= 1.0  # the thinnest still a line


# --- scaling efficiency ----------------------------------------------------------------------

def test_world_size_one_never_on_the_efficiency_axis(machine, twenty):
    for table in (machine, twenty):
        assert ((table["n_devices"] == 1) & (table["strategy"] != "single")).any()
        fig, caption = plots.plot_efficiency(table)
        ax = fig.axes[0]
        for line in data_lines(ax):
            assert min(line.get_xdata()) >= 2, line.get_label()
        at_one = [tuple(p) for c in ax.collections for p in c.get_offsets() if p[0] <= 1]
        assert at_one == [(1, 100)]  # only the baseline star
        assert "two or more devices" in caption


def test_efficiency_names_weak_scaling(machine):
    fig, caption = plots.plot_efficiency(machine)
    assert fig.axes[0].get_ylabel() == "weak-scaling efficiency (%)"
    assert caption.startswith("Weak scaling: every device kept the baseline's per-device "
                              "batch (8 images), so the global batch grew with N.")


@pytest.mark.parametrize("column", ["scaling", "scaling_mode"])
def test_efficiency_names_strong_scaling(machine, column):
    wrappers = machine["strategy"] != "single"
    strong = machine.assign(**{column: ["strong" if w else None for w in wrappers]})
    strong = strong.drop(columns=[c for c in ("scaling", "scaling_mode")
                                  if c != column and c in strong.columns])
    fig, caption = plots.plot_efficiency(strong)
    assert fig.axes[0].get_ylabel() == "strong-scaling efficiency (%)"
    assert caption.startswith("Strong scaling: the global batch stayed fixed")


def test_weak_and_strong_lines_are_not_joined(machine):
    ddp8 = (machine["strategy"] == "ddp") & (machine["n_devices"] == 8)
    mixed = machine.assign(scaling=["strong" if s else None for s in ddp8]).drop(
        columns=[c for c in ("scaling_mode",) if c in machine.columns])
    fig, caption = plots.plot_efficiency(mixed)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "scaling efficiency (%)"
    lines = {plots.unwrap_label(line.get_label()): line for line in data_lines(ax)}
    strong = [name for name in lines if name.endswith("strong")]
    assert len(strong) == 1 and list(lines[strong[0]].get_xdata()) == [8]
    assert all(8 not in line.get_xdata() for name, line in lines.items()
               if name not in strong)
    assert "strong kept the global batch fixed" in caption


def test_few_points_carry_their_value(tmp_path, real_run):
    table = build(tmp_path / "r", real_run, MACHINE[:1] + MACHINE[4:8])
    fig, _ = plots.plot_efficiency(table)
    values = [t.get_text() for t in fig.axes[0].texts]
    assert values == ["95%", "90%", "88%"]
    assert_inside_and_large(fig)
    assert re.fullmatch(r"\d+%", values[0])
