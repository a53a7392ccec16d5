"""What step 01 found (``kind: environment`` files) and what each run recorded about its
machine. Environment files are not validated beyond their kind, so every field is read
defensively."""

from __future__ import annotations

from labs.report import fmt
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


def _scalar_text(value) -> str | None:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _text(value)


def _scalars(entry: dict, limit: int = 8) -> str:
    parts = [f"{k}: {_scalar_text(v)}" for k, v in entry.items()
             if _scalar_text(v) is not None]
    return ", ".join(parts[:limit])


def probe_lines(record: dict) -> list[tuple[str, str]]:
    """One line per probe of an environment file, from its scalar fields."""
    probes = record.get("probes")
    lines = []
    if not isinstance(probes, dict):
        return lines
    for name, probe in probes.items():
        if probe is None:
            lines.append((str(name), "not measured"))
        elif isinstance(probe, list):
            entries = [_scalars(e) for e in dicts(probe)][:4]
            lines.append((str(name), "; ".join(entries) or "no result"))
        elif isinstance(probe, dict):
            parts = [_scalars(probe)] if _scalars(probe) else []
            results = dicts(probe.get("results"))
            if results:
                peak = max((num(r.get("busbw_gb_s")) or 0 for r in results), default=0)
                parts.append(f"{len(results)} sizes measured, peak bus bandwidth "
                             f"{peak:.3g} GB/s")
            lines.append((str(name), "; ".join(parts) or "no details"))
        elif _text(probe) is not None:
            lines.append((str(name), _text(probe)))
    return lines


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
            points.sort()
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


def peak_busbw(series: list[dict]) -> float | None:
    values = [p[1] for s in series for p in s["points"] if p[4]]
    return max(values) if values else None


def run_machines(records: list[dict]) -> list[dict]:
    """One entry per distinct machine the runs report, for when 01 was not run."""
    machines: dict[tuple, dict] = {}
    for record in records:
        env = record.get("environment") if isinstance(record.get("environment"), dict) else {}
        key = tuple(_text(env.get(k)) for k in ("host", "torch", "cuda", "driver")) + \
            (gpu_summary(env),)
        entry = machines.setdefault(key, {"host": key[0] or "?", "torch": key[1] or "?",
                                          "cuda": key[2] or "none", "driver": key[3] or "none",
                                          "gpus": key[4], "runs": 0})
        entry["runs"] += 1
    return list(machines.values())
