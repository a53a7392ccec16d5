"""``labs/`` is an ordered stack: a module imports only from below it, so there is no
cycle, and each module stays within a line budget, so growth is a decision.

Every import counts, wherever it stands: at the top, inside a function (a lazy import
for speed is still a dependency) and under ``TYPE_CHECKING``. The order, bottom first:

    torch-free leaves     errors, fmt, files, contract, bandwidth, launcher_env, image_check
    device, model         compat, envinfo, models, faults
    the command line      cli (torch-free at import; its torch checks import lazily)
    single-process core   measure, console, data, dp, train
    distributed           distributed
    results               results
    launchers, probes     launch, probes
    entry points          runner, __main__

``labs/report`` reads result files only: it imports the torch-free leaves and its own
modules (in their order), never torch or the training stack; only the entry points import
it (the runner checks ``--report`` with ``report.output`` before any training).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

LABS = REPO / "labs"

ORDER = ("errors", "fmt", "files", "contract", "bandwidth", "trace_analysis", "launcher_env",
         "image_check", "compat", "envinfo", "models", "faults", "partition",
         "cli",
         "measure", "console", "data", "dp", "profiling", "train",
         "distributed", "local_sgd",
         "results",
         "launch", "probes",
         "runner", "__main__")
TORCH_FREE = ("errors", "fmt", "files", "contract", "bandwidth", "trace_analysis",
              "launcher_env", "image_check", "cli")
REPORT_ORDER = ("output", "analysis", "loading", "environment", "machines", "scaling", "plots",
                "model_plots", "narrative", "overlap", "communicate", "render")
# Lines per module, with slack over the size when the budget was set: a module that
# outgrows it is split, or the budget raised in the same change, on purpose.
BUDGET = {
    "errors": 20, "fmt": 110, "files": 160, "contract": 320, "bandwidth": 180, "trace_analysis": 200, "profiling": 100, "local_sgd": 130, "partition": 140,
    "launcher_env": 200, "image_check": 80, "compat": 30, "envinfo": 200, "models": 60,
    "faults": 110,
    "cli": 570, "measure": 500, "console": 110, "data": 690, "dp": 80, "train": 360,
    "distributed": 480, "results": 330, "launch": 240, "probes": 540, "runner": 480,
    "__main__": 40, "__init__": 20,
    "report.__init__": 30, "report.output": 170, "report.analysis": 770,
    "report.loading": 140, "report.environment": 270, "report.machines": 270,
    "report.plots": 940, "report.scaling": 470, "report.model_plots": 250, "report.overlap": 130, "report.communicate": 170, "report.narrative": 580, "report.render": 430,
}


def module_name(path: Path) -> str:
    """labs/cli.py -> "cli", labs/report/render.py -> "report.render"."""
    parts = path.relative_to(LABS).with_suffix("").parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LABS.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every import of a labs module in ``path``, at any depth."""
    found = []
    package = module_name(path).rsplit(".", 1)[0] if "." in module_name(path) else ""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                base = ".".join(filter(None, ["labs", package, base]))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        targets = set()
        for name in names:
            if name == "labs" or not name.startswith("labs."):
                continue
            name = name[len("labs."):]
            # "from labs import fmt" names a module; "from labs.fmt import pct" its module
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
        # "from labs.report import analysis" also yields "report" (the package): keep
        # only the most specific module of each statement
        for name in targets:
            if not any(other.startswith(name + ".") for other in targets):
                found.append((node.lineno, name))
    return found


def rank_of(name: str) -> tuple[float, int]:
    # the report, beside the training stack, sits just below the entry points: the runner
    # checks the report's path with it before any training
    report = ORDER.index("runner") - 0.5
    if name.startswith("report."):
        return (report, REPORT_ORDER.index(name.split(".", 1)[1]))
    if name == "report":
        return (report, -1)
    return (ORDER.index(name), 0)


def test_every_module_has_a_place_in_the_order():
    unplaced = [name for name in modules() if name not in ("__init__", "report.__init__")
                and name not in ORDER and name.split(".", 1)[-1] not in REPORT_ORDER]
    assert not unplaced, f"add these modules to ORDER (or REPORT_ORDER): {unplaced}"


def upward_imports() -> list[str]:
    found = modules()
    known = {n for n in found if not n.endswith("__init__")} | {"report"}
    problems = []
    for name, path in found.items():
        if name.endswith("__init__"):
            continue
        for line, target in imports_of(path, known):
            if target == name or target == "report":
                continue
            if name.startswith("report.") and not target.startswith("report."):
                if target not in TORCH_FREE or target in ("cli", "launcher_env"):
                    problems.append(f"labs/{path.relative_to(LABS)}:{line}: the report "
                                    f"imports {target}, which is not a torch-free leaf")
                continue
            if rank_of(target) >= rank_of(name):
                problems.append(f"labs/{path.relative_to(LABS)}:{line}: {name} imports "
                                f"{target}, which is not below it")
    return problems


def test_imports_only_go_down():
    problems = upward_imports()
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    found = modules()
    known = {n for n in found if not n.endswith("__init__")} | {"report"}
    graph = {name: {t for _, t in imports_of(path, known) if t != name and t != "report"}
             for name, path in found.items() if not name.endswith("__init__")}

    def cycle_from(start):
        path, seen = [], set()

        def visit(node):
            if node in path:
                return path[path.index(node):] + [node]
            if node in seen:
                return None
            seen.add(node)
            path.append(node)
            for nxt in sorted(graph.get(node, ())):
                cycle = visit(nxt)
                if cycle:
                    return cycle
            path.pop()
            return None

        return visit(start)

    for name in graph:
        cycle = cycle_from(name)
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", TORCH_FREE)
def test_leaves_and_cli_do_not_import_torch_when_loaded(name):
    tree = ast.parse((LABS / f"{name}.py").read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    heavy = [ast.unparse(n) for n in top
             if any((a.name if isinstance(n, ast.Import) else (n.module or "")).split(".")[0]
                    in ("torch", "torchvision", "numpy", "pandas", "matplotlib")
                    for a in n.names)]
    assert not heavy, f"labs/{name}.py loads {heavy} at import"


def test_each_module_within_its_line_budget():
    over = []
    for name, path in modules().items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        budget = BUDGET.get(name)
        if budget is None:
            over.append(f"labs/{path.relative_to(LABS)}: no budget (add one to BUDGET)")
        elif lines > budget:
            over.append(f"labs/{path.relative_to(LABS)}: {lines} lines, budget {budget}")
    assert not over, "\n".join(over)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a leaf that imports the result writer is caught."""
    fake = tmp_path / "labs"
    (fake / "report").mkdir(parents=True)
    for name, path in modules().items():
        target = fake / path.relative_to(LABS)
        target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    leaf = fake / "fmt.py"
    leaf.write_text(leaf.read_text(encoding="utf-8") + "\n\ndef late():\n"
                    "    from labs import results  # upward, and lazy\n", encoding="utf-8")
    monkeypatch.setattr(__import__(__name__), "LABS", fake)
    problems = upward_imports()
    assert any("fmt imports results" in p for p in problems), problems
