"""The result-file contract (docs/results_format.md): names, limits and validation.

Torch-free on purpose: step 05's report reads results with nothing but this module and
the standard library, so it runs (and answers quickly) on a machine without torch. The
writer, ``labs.results``, imports the same names, so what is written and what is
accepted cannot drift apart.

``load_result`` reads one file as JSON only (nothing is executed or unpickled) and says
why when it is not a valid result.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "interrupted", "failed")
LAB_NAMES = ("02_baseline", "03_dataparallel", "04_ddp")
STRATEGIES = ("single", "dp", "ddp")
MAX_RESULT_BYTES = 20 * 1024 * 1024  # a larger file is not one of ours; never parse it


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Loaded:
    path: Path
    record: dict | None
    reason: str | None  # why the file was skipped; None when it is valid

    @property
    def ok(self) -> bool:
        return self.record is not None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_run(record: dict) -> list[str]:
    """Problems that make a dict not a valid run record (empty list: valid)."""
    problems = []
    for key in ("lab", "status", "run_id", "run_name", "started_at", "command", "config",
                "world", "metrics"):
        if key not in record:
            problems.append(f"missing {key!r}")
    if problems:
        return problems
    if record["lab"] not in LAB_NAMES:
        problems.append(f"unknown lab {record['lab']!r}")
    if record["status"] not in STATUSES:
        problems.append(f"unknown status {record['status']!r}")
    config, world, metrics = record["config"], record["world"], record["metrics"]
    if not isinstance(config, dict) or config.get("strategy") not in STRATEGIES:
        problems.append("config.strategy is missing or unknown")
    if not isinstance(world, dict) or not isinstance(world.get("world_size"), int) \
            or world["world_size"] < 1:
        problems.append("world.world_size is missing or not a positive integer")
    if not isinstance(metrics, dict):
        return problems + ["metrics is not an object"]
    if record["status"] == "ok":
        tp = metrics.get("throughput_img_s")
        if not isinstance(tp, dict) or not all(_is_number(tp.get(k)) for k in
                                               ("median", "p10", "p90", "mean")):
            problems.append("metrics.throughput_img_s needs numeric median, p10, p90, mean")
        elif not (0 < tp["p10"] <= tp["median"] <= tp["p90"]):
            problems.append("metrics.throughput_img_s is not positive and ordered "
                            "p10 <= median <= p90")
        if not isinstance(metrics.get("steps_measured"), int) or metrics["steps_measured"] < 1:
            problems.append("metrics.steps_measured must be a positive integer")
        if not isinstance(metrics.get("per_device"), list) or not metrics["per_device"]:
            problems.append("metrics.per_device must list at least one device")
    return problems


def load_result(path: Path) -> Loaded:
    """Read one file of the results folder as JSON only (nothing is executed or unpickled)
    and check it against the contract."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_RESULT_BYTES:
            return Loaded(path, None, f"too large to be a result file ({size:,} bytes)")
        record = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return Loaded(path, None, "not text (binary file)")
    except json.JSONDecodeError as err:
        return Loaded(path, None, f"not valid JSON (truncated or corrupt?): {err.msg} "
                                  f"at line {err.lineno}")
    except (ValueError, RecursionError) as err:  # absurdly nested or huge numbers
        return Loaded(path, None, f"not valid JSON (corrupt?): {str(err)[:200]}")
    except OSError as err:
        return Loaded(path, None, f"unreadable: {err.strerror or err}")
    if not isinstance(record, dict):
        return Loaded(path, None, "not a JSON object")
    version = record.get("schema_version")
    if not isinstance(version, int):
        return Loaded(path, None, "no schema_version: not a file written by this lab")
    if version > SCHEMA_VERSION:
        return Loaded(path, None, f"schema_version {version} is newer than this lab "
                                  f"understands ({SCHEMA_VERSION}); update the lab")
    kind = record.get("kind")
    if kind == "environment":
        return Loaded(path, record, None)
    if kind != "run":
        return Loaded(path, None, f"unknown kind {kind!r}")
    problems = validate_run(record)
    if problems:
        return Loaded(path, None, "invalid run file: " + "; ".join(problems))
    return Loaded(path, record, None)
