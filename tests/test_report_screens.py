"""Step 05's report in a real browser at a phone's width (390 px) and a laptop's (1280 px):
no table may push the page sideways, and the screenshots are kept for a human to look at.

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


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser",
                                                  "google-chrome") if shutil.which(name)),
                None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary found")

WIDTHS = (390, 1280)
LONG_NAME = "ddp-resnet50-8xh100-bucket100mb-fp16-compress-" + "0123456789abcdef" * 4

# Runs in the test page once the report has loaded in the iframe.
MEASURE = """<script>
const frame = document.getElementById("report");
frame.addEventListener("load", () => {
  const view = frame.contentWindow, doc = frame.contentDocument;
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
  const main = doc.querySelector("table.main");
  const out = document.createElement("pre");
  out.id = "layout";
  out.textContent = JSON.stringify({
    inner_width: view.innerWidth, page_width: doc.documentElement.scrollWidth,
    main_right: (scroller(main) || main).getBoundingClientRect().right,
    main_width: main.scrollWidth, main_scrolls_inside: scroller(main) !== null, tables});
  document.body.appendChild(out);
});
</script>"""


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


@pytest.fixture(scope="module")
def report(tmp_path_factory, real_run) -> Path:
    base = tmp_path_factory.mktemp("screens")
    results = wide_results(base / "results", real_run)
    out = base / "comparison_report.html"
    proc = run_script("05_performance_comparison.py", "--results-dir", results,
                      "--output-report", out, cwd=base)
    assert proc.returncode == 0, proc.stderr
    return out


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
               "--hide-scrollbars", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90,
                          env=lab_env(), check=False)


def measuring_page(report: Path, folder: Path, width: int) -> Path:
    frame = (f'<iframe id="report" style="width:{width}px;height:2400px;border:0" '
             f'srcdoc="{html.escape(report.read_text(encoding="utf-8"), quote=True)}"></iframe>')
    page = folder / f"measure_{width}.html"
    page.write_text(f'<!doctype html><html><body style="margin:0">{frame}{MEASURE}'
                    f'</body></html>', encoding="utf-8")
    return page


def layout(tmp_path: Path, report: Path, width: int) -> dict:
    page = measuring_page(report, tmp_path, width)
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
    assert measured["main_right"] <= width
    if measured["main_width"] > width:
        assert measured["main_scrolls_inside"]
    assert len(measured["tables"]) >= 6
    for table in measured["tables"]:
        assert 0 <= table["left"] and table["right"] <= width, table
        fits = table["table_width"] <= table["box_width"]
        assert fits or table["scrolls"], f"table {table['cls']!r} is cut off: {table}"
        if width >= 1280 and "main" in str(table["cls"]):
            # on a laptop every column of the main table is in view without scrolling
            assert fits, f"the main table needs scrolling at {width} px: {table}"


@pytest.mark.parametrize("width", WIDTHS)
def test_screenshot(tmp_path, report, width):
    shot = tmp_path / f"report_{width}.png"
    chromium(tmp_path, f"--screenshot={shot}", f"--window-size={width},2400",
             report.resolve().as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (width, 2400)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 22)
    ddp_border = sum(n for n, rgb in colors if rgb == (0x25, 0x63, 0xEB))
    assert ddp_border > 100  # the table's DDP rows (blue left border) are on screen
    keep = os.environ.get("REPORT_SCREENS_DIR")  # to look at them: set it to a folder
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
