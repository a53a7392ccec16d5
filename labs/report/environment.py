"""What step 01 found (``kind: environment`` files) and what each run recorded about its
machine. Environment files are not validated beyond their kind, so every field is read
defensively."""

from __future__ import annotations

from labs import fmt
from labs.report.analysis import dicts, dig, num

FIELDS = (("host", "Host"), ("platform", "Platform"), ("cpu_model", "CPU"),
          ("cpu_count", "CPU cores"), ("ram_bytes", "RAM"), ("python", "Python"),
          ("torch", "PyTorch"), ("torchvision", "torchvision"), ("cuda", "CUDA"),
          ("cudnn", "cuDNN"), ("nccl", "NCCL"), ("driver", "NVIDIA driver"))


def block(record: dict) -> dict:
    """The machine description: ``record["environment"]`` or the record itself."""
    env = record.get("environment")
    return env if isinstance(env, dict) else record


def _text(value) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)


def gpu_summary(env: dict) -> str:
    counts: dict[str, int] = {}
    for gpu in dicts(env.get("gpus")):
        memory = num(gpu.get("total_memory_bytes"))
        key = f"{gpu.get('name', 'GPU')}" + (f" ({fmt.gib(memory)})" if memory else "")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} × {name}" for name, n in counts.items()) or "none"


def describe(env: dict) -> list[tuple[str, str]]:
    rows = []
    for key, title in FIELDS:
        value = env.get(key)
        if key == "ram_bytes" and num(value):
            rows.append((title, fmt.gib(num(value))))
        elif _text(value) is not None:
            rows.append((title, _text(value)))
    rows.append(("GPUs", gpu_summary(env)))
    return rows


# --- step 01's probes: one small table each, every point a row --------------------------

DIRECTIONS = {"h2d": "host → device", "d2h": "device → host"}


def _probe(title: str, header=(), rows=(), lines=(), missing: str | None = None) -> dict:
    """One probe as the report shows it. ``header`` is (text, numeric) pairs; a probe
    with nothing to tabulate has ``missing``, a short sentence, instead of rows."""
    return {"title": title, "header": list(header), "rows": list(rows),
            "lines": list(lines), "missing": missing}


def _unreadable(title: str, value) -> dict:
    if value is None:
        return _probe(title, missing="not measured")
    return _probe(title, missing=f"not readable in this file (a {type(value).__name__})")


def _time_column(values) -> tuple[str, float]:
    """The unit of a column of durations in seconds, and the factor that converts to it."""
    unit = fmt.unit_for(values)
    return unit, 1e3 if unit == "ms" else 1.0


def _no_rows(title: str, probe) -> dict:
    if isinstance(probe, list):
        return _probe(title, missing="no result recorded")
    return _unreadable(title, probe)


def _cell(value) -> str:
    return _text(value) or "n/a"


def _scaled(value, scale: float) -> float | None:
    number = num(value)
    return None if number is None else number * scale


def _direction(value) -> str:
    text = _cell(value)
    return DIRECTIONS.get(text, text)


def _mark(correct) -> str:
    return "✓" if correct is True else "✗" if correct is False else "n/a"


def _integer(value) -> str:
    number = num(value)
    return "n/a" if number is None else f"{number:.0f}"


def matmul_table(probe) -> dict:
    title = "Matrix multiply"
    entries = dicts(probe)
    if not entries:
        return _no_rows(title, probe)
    unit, scale = _time_column([num(e.get("time_s")) for e in entries])
    rows = [[_cell(e.get("device")), _cell(e.get("dtype")), _integer(e.get("size")),
             fmt.figure(_scaled(e.get("time_s"), scale)), fmt.figure(num(e.get("tflops")))]
            for e in entries]
    return _probe(title, [("device", False), ("dtype", False), ("n", True),
                          (f"time ({unit})", True), ("TFLOP/s", True)], rows,
                  ["An n × n by n × n product; TFLOP/s = 2n³ / time."])


def copy_table(probe) -> dict:
    title = "Host ↔ device copies"
    entries = dicts(probe)
    if probe is None:
        return _probe(title, missing="not measured (no GPU)")
    if not entries:
        return _no_rows(title, probe)
    rows = [[_cell(e.get("device")), _direction(e.get("direction")),
             fmt.size(num(e.get("size_bytes"))), fmt.figure(num(e.get("gb_s")))]
            for e in entries]
    return _probe(title, [("device", False), ("direction", False), ("size", True),
                          ("GB/s", True)], rows, ["From pinned host memory."])


def _allreduce_summary(probe: dict) -> str:
    world = num(probe.get("world_size"))
    parts = [_text(probe.get("backend")), f"{world:.0f} ranks" if world else None,
             f"on {_text(probe.get('device'))}" if _text(probe.get("device")) else None]
    if probe.get("all_correct") is True:
        parts.append("every sum correct")
    elif probe.get("all_correct") is False:
        parts.append("WRONG SUMS: do not trust DDP results on this machine")
    return ", ".join(p for p in parts if p)


def _prediction(probe: dict) -> str:
    model = _text(probe.get("gradient_model")) or "the model"
    size = num(probe.get("gradient_bytes"))
    what = f"{model}'s gradients" + (f" ({size / 1e6:.0f} MB fp32)" if size else "")
    predicted = num(probe.get("predicted_gradient_allreduce_s"))
    if predicted is None:
        why = " (some sums were wrong)" if probe.get("all_correct") is False else ""
        return f"Predicted time to all-reduce {what}: not predicted{why}."
    return (f"Predicted time to all-reduce {what}: {fmt.seconds(predicted)} per step, "
            f"interpolated from the sizes below.")


def allreduce_table(probe) -> dict:
    title = "All-reduce"
    if not isinstance(probe, dict):
        return _unreadable(title, probe)
    entries = dicts(probe.get("results"))
    lines = [line for line in (_allreduce_summary(probe), _prediction(probe)) if line]
    if not entries:
        return _probe(title, lines=lines[:1], missing="no message size measured")
    unit, scale = _time_column([num(e.get("time_s")) for e in entries])
    rows = [[fmt.size(num(e.get("size_bytes"))), fmt.figure(_scaled(e.get("time_s"), scale)),
             fmt.figure(num(e.get("algbw_gb_s"))), fmt.figure(num(e.get("busbw_gb_s"))),
             _mark(e.get("correct"))]
            for e in entries]
    return _probe(title, [("size", True), (f"time ({unit})", True), ("algbw (GB/s)", True),
                          ("busbw (GB/s)", True), ("correct", False)], rows, lines)


PROBES = {"matmul": matmul_table, "copy_bandwidth": copy_table, "allreduce": allreduce_table}


SKIPPED_SHOWN = 5  # malformed points named per probe; the rest are counted


def _skipped_lines(reasons: list[str]) -> list[str]:
    lines = list(reasons[:SKIPPED_SHOWN])
    if len(reasons) > SKIPPED_SHOWN:
        lines.append(f"… and {len(reasons) - SKIPPED_SHOWN} more malformed entries skipped.")
    return lines


def probe_tables(record: dict, skipped=()) -> list[dict]:
    """Step 01's probes of an environment file as tables; anything missing or odd reads as
    a short sentence, never an error. ``skipped``: the (probe, why) pairs of the entries
    ``labs.contract.clean_probes`` left out of this file, each shown under its probe."""
    probes = record.get("probes")
    if probes is None:
        return [_probe("Probes", missing="not measured (step 01 ran with --quick)")]
    if not isinstance(probes, dict):
        return [_unreadable("Probes", probes)]
    tables = [draw(probes.get(name)) for name, draw in PROBES.items()]
    for (name, _), table in zip(PROBES.items(), tables):
        table["lines"] += _skipped_lines([why for probe, why in skipped if probe == name])
    others = [str(name) for name in probes if name not in PROBES]
    if others:
        tables.append(_probe("Other probes", missing=f"recorded but not shown here: "
                                                     f"{', '.join(others)}"))
    return tables


def texts(value) -> list[str]:
    """A list of sentences (notes, recommendations), whatever the file holds."""
    if not isinstance(value, list):
        return []
    return [str(v) for v in value if isinstance(v, (str, int, float))]


def allreduce_series(records: list[dict], label_of) -> tuple[list[dict], str | None]:
    """The all-reduce bandwidth curves of step 01, or why there are none."""
    series, reasons = [], []
    for record in records:
        probe = dig(record, "probes", "allreduce")
        if not isinstance(probe, dict):
            continue
        points = []
        for r in dicts(probe.get("results")):
            size, bus = num(r.get("size_bytes")), num(r.get("busbw_gb_s"))
            if size and size > 0 and bus is not None:
                points.append((size, bus, num(r.get("algbw_gb_s")), num(r.get("time_s")),
                               r.get("correct") is not False))
        if points:
            points.sort(key=lambda p: p[:2])  # by size; None in later fields cannot compare
            world = dig(probe, "world_size")
            backend = dig(probe, "backend")
            extra = ", ".join(str(x) for x in (backend, f"{world} ranks" if world else None)
                              if x)
            series.append({"label": label_of(record) + (f" ({extra})" if extra else ""),
                           "points": points})
        else:
            why = next((_text(probe.get(k)) for k in ("reason", "skipped", "note", "error")
                        if _text(probe.get(k))), None)
            reasons.append(why or "the probe recorded no result")
    if series:
        return series, None
    if reasons:
        return [], "Step 01 ran no all-reduce measurement: " + "; ".join(reasons) + "."
    if records:
        return [], "The environment file from step 01 has no all-reduce probe."
    return [], ("No environment file from step 01 in the folder, so there is no all-reduce "
                "bandwidth curve (run 01_environment_check.py on the GPU machine).")
