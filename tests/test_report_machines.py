"""Step 05's report for a folder from two machines (tests/two_machines.py): one section per
machine, each read on its own, with the figures it can trust up front and the rest folded
away.

The contract, per machine, in this order: ``<section class="machine" id="machine-…">``
holding an ``<h2>`` that names the host and the device model, ``<p class="headline">``
(one sentence), ``<table class="main">`` (columns col-method … col-tta), ``<ul
class="verdict">`` (at most 6 items), ``<div class="why">``, ``<div class="unreliable">``
(only where runs are flagged), then figures and closed ``<details>``. 05 runs once, as a
user runs it; the page is read with the standard library's HTMLParser.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import two_machines as tm
from conftest import run_script
from test_report import OOM_REASON

HOSTS = {"dgx-h100": "H100", "ws-4090": "4090"}  # host -> how its device model is named
COLUMNS = {"col-method": "Method", "col-devices": "Devices", "col-batch": "Global batch",
           "col-throughput": "Throughput (img/s)", "col-speedup": "Speed-up",
           "col-efficiency": "Scaling efficiency", "col-memory": "Peak memory",
           "col-accuracy": "Final accuracy", "col-tta": "Time to target"}
CONFIGURATIONS = {"dgx-h100": 8, "ws-4090": 6}  # completed configurations per machine


# --- a small DOM: enough of a browser's tree to ask where a text is ----------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
        "source", "track", "wbr"}
BLOCK = {"address", "article", "aside", "blockquote", "details", "div", "dl", "dd", "dt",
         "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5",
         "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "summary",
         "table", "thead", "tbody", "tfoot", "tr", "td", "th", "ul", "br", "caption"}
CLOSES_P = BLOCK - {"li", "dd", "dt", "td", "th", "tr", "thead", "tbody", "tfoot",
                    "summary", "caption", "br", "figcaption"}
NOT_TEXT = {"style", "script", "head", "title"}


class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None", order: int):
        self.tag, self.attrs, self.parent, self.order = tag, attrs, parent, order
        self.children: list = []  # Node or str

    @property
    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()

    def walk(self):
        for child in self.children:
            if isinstance(child, Node):
                yield child
                yield from child.walk()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list["Node"]:
        return [n for n in self.walk()
                if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)]

    def find(self, tag: str | None = None, cls: str | None = None) -> "Node | None":
        found = self.find_all(tag, cls)
        return found[0] if found else None

    def ancestors(self):
        node = self.parent
        while node is not None:
            yield node
            node = node.parent

    def inside(self, tag: str, cls: str | None = None) -> bool:
        return any(a.tag == tag and (cls is None or cls in a.classes)
                   for a in self.ancestors())

    def pieces(self):
        """(text, the element it is in), in document order, without style and script."""
        if self.tag in NOT_TEXT:
            return
        for child in self.children:
            if isinstance(child, Node):
                yield from child.pieces()
            else:
                yield child, self

    def text(self) -> str:
        out: list[str] = []

        def visit(node: Node):
            if node.tag in NOT_TEXT:
                return
            block = node.tag in BLOCK
            if block:
                out.append(" ")
            for child in node.children:
                visit(child) if isinstance(child, Node) else out.append(child)
            if block:
                out.append(" ")

        visit(self)
        return " ".join("".join(out).split())

    def __repr__(self) -> str:
        return f"<{self.tag} {self.attrs}>"


class Tree(HTMLParser):
    """Builds the tree as a browser would for well-formed pages, closing what HTML closes
    implicitly (a paragraph before a block, a list item before the next one, cells)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None, 0)
        self.stack = [self.root]
        self.count = 0

    def _close(self, tag: str, stop: tuple[str, ...] = ()) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag in stop:
                return
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_starttag(self, tag, attrs):
        if tag in CLOSES_P:
            self._close("p", stop=("div", "section", "td", "th", "li", "details", "figure"))
        if tag == "li":
            self._close("li", stop=("ul", "ol"))
        if tag in ("td", "th"):
            self._close("td", stop=("tr", "table"))
            self._close("th", stop=("tr", "table"))
        if tag == "tr":
            self._close("tr", stop=("table",))
        self.count += 1
        node = Node(tag, {k: v if v is not None else "" for k, v in attrs},
                    self.stack[-1], self.count)
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.count += 1
        self.stack[-1].children.append(
            Node(tag, {k: v if v is not None else "" for k, v in attrs}, self.stack[-1],
                 self.count))

    def handle_endtag(self, tag):
        if any(n.tag == tag for n in self.stack[1:]):
            self._close(tag)

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(path: Path) -> Node:
    tree = Tree()
    tree.feed(path.read_text(encoding="utf-8"))
    tree.close()
    return tree.root


# --- the report, built once -----------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory, real_run) -> Path:
    return tm.build(tmp_path_factory.mktemp("machines") / "results", real_run)


@pytest.fixture(scope="module")
def report(folder) -> Path:
    out = folder.parent / "comparison_report.html"
    proc = run_script("05_performance_comparison.py", "--results-dir", folder,
                      "--output-report", out, cwd=folder.parent)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def page(report) -> Node:
    return parse(report)


def machine_sections(page: Node) -> dict[str, Node]:
    """host -> its ``section.machine``, each found by the host its h2 names."""
    sections = [s for s in page.find_all("section", "machine")]
    assert len(sections) == len(HOSTS), (
        f"expected one <section class=\"machine\"> per machine ({', '.join(HOSTS)}), "
        f"found {len(sections)}")
    found = {}
    for section in sections:
        h2 = section.find("h2")
        title = h2.text() if h2 else ""
        hosts = [host for host in HOSTS if host in title]
        assert len(hosts) == 1, f"the h2 {title!r} does not name exactly one host"
        found[hosts[0]] = section
    assert set(found) == set(HOSTS)
    return found


def one(section: Node, tag: str, cls: str) -> Node:
    found = section.find_all(tag, cls)
    assert len(found) == 1, f"expected one <{tag} class=\"{cls}\">, found {len(found)}"
    return found[0]


def data_rows(table: Node) -> list[Node]:
    """The rows of a main table that hold a configuration (they have a method cell)."""
    return [tr for tr in table.find_all("tr") if tr.find("td", "col-method")]


def around(text: str, needle: str, width: int = 100) -> str:
    """``needle`` in its context, for a failure message."""
    at = text.find(needle)
    return text[max(0, at - width):at + len(needle) + width]


def own_text(section: Node) -> str:
    """A machine section's text without its "If your link were…" table, whose nominal
    link speeds (10, 25, 300 GB/s, …) are reference figures, not another machine's."""
    text = section.text()
    for table in section.find_all("table", "scaling-links"):
        text = text.replace(table.text(), "")
    return text


def quoted_bandwidths(text: str, figures: list[float]) -> list[str]:
    """The "N GB/s" in ``text`` that print one of ``figures`` (to the digits shown)."""
    found = []
    for match in re.finditer(r"(\d[\d,]*(?:\.(\d+))?)\s*GB/s", text):
        value = float(match.group(1).replace(",", ""))
        tolerance = 0.5 * 10 ** -len(match.group(2) or "") + 1e-9
        if any(abs(value - figure) <= tolerance for figure in figures):
            found.append(match.group(0))
    return found


# Standalone 318 (H100's all-reduce bus bandwidth, 318.4 GB/s), not inside a longer number
# or a hex run id.
H100_PEAK = re.compile(r"(?<![\w.,])318(?:\.\d+)?(?![\d,])")
# How the report names DDP at world size 8: "DDP ×8", "DDP with 8 ranks", "8 ranks", or
# its figures (12,880 img/s, 7.36×).
DDP8 = re.compile(r"\bDDP\s*[×x]\s*8\b|\bDDP\b[^.;]{0,30}?\b8\s*(?:ranks|processes|GPUs)\b"
                  r"|\b8[\s-]*(?:ranks|rank|processes)\b|12,880|7\.36×")
NOT_REACHED = re.compile(r"\b(?:did not|didn't|never|not) reach", re.I)


# --- one section per machine -------------------------------------------------------------

def test_each_machine_section_names_its_machine(page):
    sections = machine_sections(page)
    for host, model in HOSTS.items():
        section = sections[host]
        assert section.attrs.get("id", "").startswith("machine-"), section.attrs
        title = section.find("h2").text()
        assert host in title and model in title, title
    ids = [s.attrs.get("id") for s in sections.values()]
    assert len(set(ids)) == len(ids), ids


def test_each_section_reads_headline_table_verdict_why_in_that_order(page):
    for host, section in machine_sections(page).items():
        headline = one(section, "p", "headline")
        table = one(section, "table", "main")
        verdict = one(section, "ul", "verdict")
        why = section.find_all("div", "why")
        assert why, f"{host}: no <div class=\"why\">"
        assert headline.order < table.order < verdict.order < why[0].order, host
        later = section.find_all("figure") + section.find_all("details")
        assert all(n.order > verdict.order for n in later), (
            f"{host}: a figure or <details> comes before the verdict")
        unreliable = section.find_all("div", "unreliable")
        if host == "ws-4090":  # the superlinear DDP ×2 and the noisy DP ×4
            assert len(unreliable) == 1, f"{host}: expected one <div class=\"unreliable\">"
            assert unreliable[0].order > why[0].order, host
            text = unreliable[0].text().lower()
            assert "superlinear" in text and "noisy" in text, text
        else:  # nothing on dgx-h100 is flagged
            assert not unreliable, f"{host} has no flagged run but a list of unreliable ones"


def test_no_explanation_cites_the_other_machine(page):
    sections = machine_sections(page)
    h100, rtx = own_text(sections["dgx-h100"]), own_text(sections["ws-4090"])
    # a bandwidth step 01 measured on the other machine (its sweep, its interpolated
    # bus bandwidth, its copies: tm.bandwidth_figures) came from the wrong file
    assert tm.ENV_B not in h100, f"the H100 section cites {tm.ENV_B}: …{around(h100, tm.ENV_B)}…"
    wrong = quoted_bandwidths(h100, tm.bandwidth_figures("ws-4090"))
    assert not wrong, f"the H100 section quotes the 4090's bandwidth: {wrong}"
    assert tm.ENV_A not in rtx, f"the 4090 section cites {tm.ENV_A}: …{around(rtx, tm.ENV_A)}…"
    assert not H100_PEAK.search(rtx), "the 4090 section quotes the H100's 318 GB/s"
    wrong = quoted_bandwidths(rtx, tm.bandwidth_figures("dgx-h100"))
    assert not wrong, f"the 4090 section quotes the H100's bandwidth: {wrong}"
    # DDP's explanation on the H100 uses its own measured bandwidth
    why = " ".join(d.text() for d in sections["dgx-h100"].find_all("div", "why"))
    assert "GB/s" in why, why


def test_h100_headline_does_not_recommend_the_run_that_missed_the_target(page):
    headline = one(machine_sections(page)["dgx-h100"], "p", "headline").text()
    if DDP8.search(headline):  # DDP ×8 ended at 49.0 %, under the 50 % target
        assert NOT_REACHED.search(headline), (
            f"the headline presents DDP ×8, which never reached the target: {headline!r}")


def test_headline_is_one_sentence(page):
    for host, section in machine_sections(page).items():
        headline = one(section, "p", "headline").text()
        assert headline, host
        ends = re.findall(r"[.!?](?=\s+[A-Z]|\s*$)", headline)
        assert len(ends) <= 1, f"{host}: more than one sentence: {headline!r}"


def test_no_flagged_figure_in_a_headline_or_verdict(page):
    said = [n for n in page.walk() if {"headline", "verdict"} & set(n.classes)]
    assert said, "no headline and no verdict"
    for node in said:
        text = node.text()
        for figure in tm.FLAGGED:  # 2.16×, 108% (superlinear DDP ×2), 1,373 (noisy DP ×4)
            if figure in text:
                pytest.fail(f"flagged figure {figure!r} in {node!r}: "
                            f"…{around(text, figure)}…")


def test_verdict_has_at_most_six_items_each_naming_its_machine(page):
    for host, section in machine_sections(page).items():
        items = one(section, "ul", "verdict").find_all("li")
        assert 1 <= len(items) <= 6, f"{host}: {len(items)} verdict items"
        for li in items:
            text = li.text()
            assert host in text or HOSTS[host] in text, f"{host}: {text!r}"


def test_first_table_is_the_first_machines_main_table(page):
    first = page.find("table")
    assert first is not None and "main" in first.classes, first
    sections = page.find_all("section", "machine")
    assert sections and first.inside("section", "machine"), "the first table is not in a machine"
    assert first in sections[0].walk(), "the first table is not in the first machine section"
    headers = {cls: first.find("th", cls) for cls in
               ("col-throughput", "col-speedup", "col-efficiency")}
    assert all(headers.values()), headers
    assert "Throughput" in headers["col-throughput"].text()
    assert "Speed-up" in headers["col-speedup"].text()
    assert "Scaling efficiency" in headers["col-efficiency"].text()


def test_main_tables_columns_rows_and_flags(page):
    for host, section in machine_sections(page).items():
        table = one(section, "table", "main")
        for cls, title in COLUMNS.items():
            cells = table.find_all("th", cls)
            assert len(cells) == 1, f"{host}: {len(cells)} header cells {cls}"
            assert title in cells[0].text(), f"{host}: {cls} reads {cells[0].text()!r}"
        rows = data_rows(table)
        assert len(rows) == CONFIGURATIONS[host], f"{host}: {len(rows)} rows"
        for tr in rows:
            classes = {c for td in tr.find_all("td") for c in td.classes}
            assert set(COLUMNS) <= classes, f"{host}: row lacks {set(COLUMNS) - classes}"
        flagged = [tr for tr in table.find_all("tr") if "flagged" in tr.classes]
        if host == "ws-4090":
            throughputs = sorted(tr.find("td", "col-throughput").text() for tr in flagged)
            assert len(flagged) == 2, f"{host}: {len(flagged)} flagged rows"
            assert any("2,808" in t for t in throughputs), throughputs  # superlinear DDP ×2
            assert any("1,373" in t for t in throughputs), throughputs  # noisy DP ×4
        else:
            assert not flagged, f"{host}: a row is flagged, none should be"


def test_no_markdown_syntax_in_the_text(page):
    text = page.text()
    for syntax in ("`", "**"):
        if syntax in text:
            pytest.fail(f"Markdown {syntax!r} in the text: …{around(text, syntax)}…")


def test_efficiency_says_weak_or_strong_scaling(page):
    for host, section in machine_sections(page).items():
        table = one(section, "table", "main")
        cells = table.find_all("th", "col-efficiency") + table.find_all("td", "col-efficiency")
        assert any("weak" in c.text().lower() for c in cells), (
            f"{host}: the efficiency column does not say weak (or strong) scaling")


def test_oom_run_is_listed_outside_the_main_tables(page):
    text = page.text()
    assert tm.OOM_RUN in text or OOM_REASON in text, "the run that ran out of memory is missing"
    assert "out of memory" in text.lower()
    for table in page.find_all("table", "main"):
        for tr in table.find_all("tr"):
            row = tr.text()
            assert tm.OOM_RUN not in row and "4096" not in row \
                and "out of memory" not in row.lower(), f"the OOM run is a table row: {row!r}"


def test_details_are_closed_and_hold_what_is_detailed(page):
    details = page.find_all("details")
    assert details, "no <details> at all"
    assert not [d for d in details if "open" in d.attrs], "a <details> is open by default"
    for table in page.find_all("table"):
        if "main" not in table.classes:
            assert table.inside("details"), f"a table outside <details>: {table!r}"
    # the commands, step 01's topology and recommendations: only inside <details>
    markers = ("--dataset-size 64000", "Connection traversing a bonded set",
               "DataLoader workers for --data fake")
    for marker in markers:
        where = [node for text, node in page.pieces() if marker in text]
        assert where, f"{marker!r} is not in the report"
        outside = [node for node in where if node.tag != "details"
                   and not node.inside("details")]
        assert not outside, f"{marker!r} outside <details>: {outside}"


def test_markdown_report_names_both_machines(folder):
    out = folder.parent / "comparison_report.md"
    proc = run_script("05_performance_comparison.py", "--results-dir", folder,
                      "--format", "md", "--output-report", out, cwd=folder.parent)
    assert proc.returncode == 0, proc.stderr
    headings = [line for line in out.read_text(encoding="utf-8").splitlines()
                if line.startswith("#")]
    for host in HOSTS:
        assert any(host in h for h in headings), f"no Markdown heading names {host}"
