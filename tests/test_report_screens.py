"""Step 05's report in a real browser at a phone's width (390 px) and a laptop's (1280 px):
no table may push the page sideways, and the screenshots are kept for a human to look at.
Two folders: test_report.populate()'s with long configuration names, and the two machines
of tests/two_machines.py, whose report must show its first table on the first screen, stay
short with every <details> closed, and keep the main columns in view on a phone.

The report's security policy blocks every script, so the layout is measured from outside:
a test page holds the untouched report in a same-origin ``srcdoc`` iframe exactly WIDTH
pixels wide (a headless window cannot be narrower than 500 px), measures it once loaded
and writes the numbers into its own DOM, which ``chromium --dump-dom`` prints.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import lab_env, run_script
from test_report import GIB, H100, environment_file, make_run, populate, write
from two_machines import build as two_machines


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser",
                                                  "google-chrome") if shutil.which(name)),
                None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary found")

WIDTHS = (390, 1280)
LONG_NAME = "ddp-resnet50-8xh100-bucket100mb-fp16-compress-" + "0123456789abcdef" * 4

# Runs in the test page once the report has loaded in the iframe. It opens every <details>
# first, as a reader may: a table folded away must fit as well once it is shown.
MEASURE = """<script>
const frame = document.getElementById("report");
frame.addEventListener("load", () => {
  const view = frame.contentWindow, doc = frame.contentDocument;
  doc.querySelectorAll("details").forEach((details) => { details.open = true; });
  const scroller = (element) => {  // the nearest box that scrolls it sideways, if any
    for (let e = element; e && e !== doc.body; e = e.parentElement) {
      if (["auto", "scroll"].includes(view.getComputedStyle(e).overflowX)) return e;
    }
    return null;
  };
  const tables = [...doc.querySelectorAll("table")].map((table) => {
    const box = scroller(table) || table;
    const rect = box.getBoundingClientRect();
    return {cls: table.className, left: rect.left, right: rect.right,
            table_width: table.scrollWidth, box_width: box.clientWidth,
            scrolls: scroller(table) !== null};
  });
  const mains = [...doc.querySelectorAll("table.main")].map((main) => ({
    right: (scroller(main) || main).getBoundingClientRect().right,
    width: main.scrollWidth, box_width: (scroller(main) || main).clientWidth,
    scrolls_inside: scroller(main) !== null}));
  const out = document.createElement("pre");
  out.id = "layout";
  out.textContent = JSON.stringify({
    inner_width: view.innerWidth, page_width: doc.documentElement.scrollWidth,
    mains, tables});
  document.body.appendChild(out);
});
</script>"""

# The two-machine report: its height with every <details> as it opens (closed), where its
# first table starts, and the first configuration row's key cells of the first main table.
KEY_COLUMNS = ("col-method", "col-throughput", "col-speedup", "col-efficiency")
MEASURE_MACHINES = """<script>
const frame = document.getElementById("report");
frame.addEventListener("load", () => {
  const view = frame.contentWindow, doc = frame.contentDocument;
  const scroller = (element) => {  // the nearest box that scrolls it sideways, if any
    for (let e = element; e && e !== doc.body; e = e.parentElement) {
      if (["auto", "scroll"].includes(view.getComputedStyle(e).overflowX)) return e;
    }
    return null;
  };
  const first = doc.querySelector("table");
  const main = doc.querySelector("table.main");
  const row = main && [...main.querySelectorAll("tr")].find(
    (tr) => tr.querySelector("td.col-method"));
  const cells = {};
  for (const cls of %s) {
    const cell = row && row.querySelector("td." + cls);
    if (!cell) { cells[cls] = null; continue; }
    const rect = cell.getBoundingClientRect(), box = scroller(cell);
    const boxRect = box && box.getBoundingClientRect();
    cells[cls] = {left: rect.left, right: rect.right, width: rect.width,
                  text: cell.textContent.trim().slice(0, 80),
                  box_left: boxRect ? boxRect.left : null,
                  box_right: boxRect ? boxRect.right : null};
  }
  const out = document.createElement("pre");
  out.id = "layout";
  out.textContent = JSON.stringify({
    inner_width: view.innerWidth, page_width: doc.documentElement.scrollWidth,
    page_height: doc.documentElement.scrollHeight,
    details: doc.querySelectorAll("details").length,
    open_details: doc.querySelectorAll("details[open]").length,
    first_table_class: first ? first.className : null,
    first_table_top: first ? first.getBoundingClientRect().top : null, cells});
  document.body.appendChild(out);
});
</script>""" % json.dumps(list(KEY_COLUMNS))
PAGE_HEIGHT_LIMIT = 9000   # px at 1280, every <details> closed
FIRST_TABLE_LIMIT = 1200   # px from the top at 1280: the first table is on the first screen


def wide_results(folder: Path, real: dict) -> Path:
    """The usual lab folder plus an 8-GPU machine whose configurations need long labels."""
    populate(folder, real)
    gpus = [{"index": i, "name": H100, "total_memory_bytes": 80 * GIB} for i in range(8)]

    def on_8_gpus(record: dict) -> dict:
        record["environment"].update(host="node-a", gpus=gpus)  # for the capacity marker
        return record

    write(folder, "03_dp8.json", on_8_gpus(make_run(
        real, strategy="dp", n=8, throughput=420.0, memory_gib=[31.0] + [11.0] * 7)))
    for bucket, throughput in ((25.0, 760.0), (100.0, 735.0)):
        record = on_8_gpus(make_run(real, strategy="ddp", n=8, throughput=throughput,
                                    run_name=f"{LONG_NAME}-{bucket:.0f}",
                                    eval=[0.31, 0.52, 0.64]))  # the accuracy column too
        record["config"].update(bucket_cap_mb=bucket, comm_hook="fp16_compress_hook")
        record["command"] = ("torchrun --nproc-per-node 8 /home/someone/labs/"
                             + "very_long_directory_name_" * 4 + "04_ddp_training.py "
                             f"--bucket-cap-mb {bucket:.0f} --comm-hook fp16")
        write(folder, f"04_{LONG_NAME}_{bucket:.0f}.json", record)
    env = environment_file(real)
    env["probes"]["copy_bandwidth"] = [
        {"device": "cuda:0", "direction": d, "size_bytes": 256 * 2**20, "gb_s": 24.6}
        for d in ("h2d", "d2h")]
    env["probes"]["allreduce"].update(predicted_gradient_allreduce_s=0.0041,
                                      gradient_model="resnet50", gradient_bytes=102228128)
    write(folder, "environment.json", env)
    return folder


def render_report(base: Path, results: Path) -> Path:
    """Step 05 on ``results``, as a user runs it; the report's path."""
    out = base / "comparison_report.html"
    proc = run_script("05_performance_comparison.py", "--results-dir", results,
                      "--output-report", out, cwd=base)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory, real_run) -> Path:
    base = tmp_path_factory.mktemp("screens")
    return render_report(base, wide_results(base / "results", real_run))


@pytest.fixture(scope="module")
def machines_report(tmp_path_factory, real_run) -> Path:
    base = tmp_path_factory.mktemp("screens_machines")
    return render_report(base, two_machines(base / "results", real_run))


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
               "--hide-scrollbars", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90,
                          env=lab_env(), check=False)


def measuring_page(report: Path, folder: Path, width: int, script: str = MEASURE) -> Path:
    frame = (f'<iframe id="report" style="width:{width}px;height:2400px;border:0" '
             f'srcdoc="{html.escape(report.read_text(encoding="utf-8"), quote=True)}"></iframe>')
    page = folder / f"measure_{width}.html"
    page.write_text(f'<!doctype html><html><body style="margin:0">{frame}{script}'
                    f'</body></html>', encoding="utf-8")
    return page


def layout(tmp_path: Path, report: Path, width: int, script: str = MEASURE) -> dict:
    page = measuring_page(report, tmp_path, width, script)
    proc = chromium(tmp_path, "--dump-dom", "--virtual-time-budget=5000",
                    f"--window-size={width + 40},2400", page.resolve().as_uri())
    found = re.search(r'<pre id="layout">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the measuring script did not run: {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.parametrize("width", WIDTHS)
def test_no_table_is_cut_off(tmp_path, report, width):
    measured = layout(tmp_path, report, width)
    assert measured["inner_width"] == width
    assert measured["page_width"] <= width, "the page scrolls sideways"
    assert measured["mains"], "no main table"
    for main in measured["mains"]:  # one per machine, or one for all
        assert main["right"] <= width, main
        if main["width"] > width:
            assert main["scrolls_inside"], f"a main table is cut off: {main}"
        if width >= 1280:
            # on a laptop every column of a main table is in view without scrolling
            assert main["width"] <= main["box_width"], (
                f"a main table needs scrolling at {width} px: {main}")
    for table in measured["tables"]:  # every <details> opened, as a reader may
        assert 0 <= table["left"] and table["right"] <= width, table
        fits = table["table_width"] <= table["box_width"]
        assert fits or table["scrolls"], f"table {table['cls']!r} is cut off: {table}"


@pytest.mark.parametrize("width", WIDTHS)
def test_screenshot(tmp_path, report, width):
    shot = tmp_path / f"report_{width}.png"
    chromium(tmp_path, f"--screenshot={shot}", f"--window-size={width},2400",
             report.resolve().as_uri())
    check_screenshot(shot, width, 2400)
    keep_screenshot(shot)


def check_screenshot(shot: Path, width: int, height: int) -> None:
    """A PNG of the window's size with a page drawn on it (text, tables), not blank."""
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (width, height)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 22)
    inked = sum(n for n, rgb in colors if rgb != (255, 255, 255))
    assert inked > width * height // 50, "the screenshot is (nearly) blank"
    assert len(colors) > 20, "the screenshot has hardly any colours: nothing rendered"


def keep_screenshot(shot: Path) -> None:
    keep = os.environ.get("REPORT_SCREENS_DIR")  # to look at them: set it to a folder
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)


# --- the two-machine report ---------------------------------------------------------------

def test_two_machines_first_screen_and_height_on_a_laptop(tmp_path, machines_report):
    measured = layout(tmp_path, machines_report, 1280, MEASURE_MACHINES)
    assert measured["inner_width"] == 1280
    problems = []
    if measured["details"] == 0:
        problems.append("nothing is folded into <details>")
    if measured["open_details"]:
        problems.append(f"{measured['open_details']} <details> open by default")
    if measured["page_height"] > PAGE_HEIGHT_LIMIT:
        problems.append(f"the page is {measured['page_height']:.0f} px tall with every "
                        f"<details> closed (limit {PAGE_HEIGHT_LIMIT})")
    top = measured["first_table_top"]
    if top is None:
        problems.append("no table")
    elif top > FIRST_TABLE_LIMIT:
        problems.append(f"the first table starts {top:.0f} px down "
                        f"(limit {FIRST_TABLE_LIMIT})")
    if "main" not in (measured["first_table_class"] or "").split():
        problems.append(f"the first table is {measured['first_table_class']!r}, not main")
    assert not problems, "; ".join(problems)


def test_two_machines_key_columns_in_view_on_a_phone(tmp_path, machines_report):
    width = 390
    measured = layout(tmp_path, machines_report, width, MEASURE_MACHINES)
    assert measured["inner_width"] == width
    assert measured["page_width"] <= width, "the page scrolls sideways"
    for cls in KEY_COLUMNS:  # the first configuration row of the first main table
        cell = measured["cells"][cls]
        assert cell is not None, f"no td.{cls} in the first row of the first main table"
        assert cell["width"] > 0, f"td.{cls} is not drawn: {cell}"
        assert cell["left"] >= 0 and cell["right"] <= width, (
            f"td.{cls} is off screen at {width} px: {cell}")
        if cell["box_right"] is not None:  # inside a box that scrolls sideways
            assert cell["box_left"] <= cell["left"] and cell["right"] <= cell["box_right"], (
                f"td.{cls} is hidden until the table is scrolled sideways: {cell}")


@pytest.mark.parametrize("width", WIDTHS)
def test_two_machines_screenshot(tmp_path, machines_report, width):
    shot = tmp_path / f"machines_{width}.png"
    height = 4000  # the first screen and more
    chromium(tmp_path, f"--screenshot={shot}", f"--window-size={width},{height}",
             machines_report.resolve().as_uri())
    check_screenshot(shot, width, height)
    keep_screenshot(shot)
