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
import math
import re
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "interrupted", "failed")


@dataclass
class Outcome:
    """How a run ended: one of STATUSES, the process's exit code, and why."""
    status: str
    exit_code: int
    reason: str | None


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


def _json_int(text: str) -> int | float:
    """An integer of a JSON file. One with more than 18 digits is no count this lab writes:
    it becomes a float (``inf`` past 1e308), which every reader treats as "not a usable
    number", instead of an int that overflows the first float conversion."""
    return int(text) if len(text.lstrip("-")) <= 18 else float(text)


_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_lone_surrogates(value):
    """``value`` with every lone surrogate (``"\\ud800"`` in the JSON text: valid JSON, but
    no character) replaced by U+FFFD: such a string cannot be encoded as UTF-8, so it would
    stop whatever writes or draws it."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_no_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_no_lone_surrogates(k): _no_lone_surrogates(v) for k, v in value.items()}
    return value


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


# --- step 01's probes: every measured point checked, a malformed one left out -------------

# probe name -> (where its list of entries is, {field: what it must be}). Every field is
# required: a point without its time or its bandwidth measures nothing.
PROBE_ENTRIES = {
    "matmul": (("probes", "matmul"),
               {"size": "count", "time_s": "seconds", "tflops": "rate"}),
    "copy_bandwidth": (("probes", "copy_bandwidth"),
                       {"size_bytes": "count", "gb_s": "rate"}),
    "allreduce": (("probes", "allreduce", "results"),
                  {"size_bytes": "count", "time_s": "seconds", "algbw_gb_s": "rate",
                   "busbw_gb_s": "rate", "correct": "bool"}),
}
# Beyond these a value is no measurement: a message of a petabyte, a probe of 11 days,
# a million GB/s or TFLOP/s.
_LIMITS = {"count": 2**50, "seconds": 1e6, "rate": 1e6}
_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}


def _type_name(value) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _field_problem(value, kind: str) -> str | None:
    """Why ``value`` is not a valid ``kind`` ("count", "seconds", "rate", "bool")."""
    if value is None:
        return "is null"
    if kind == "bool":
        return None if isinstance(value, bool) else \
            f"is {_type_name(value)}{_shown(value)}, not true or false"
    if not _is_number(value):
        return f"is {_type_name(value)}{_shown(value)}, not a number"
    if not math.isfinite(value):
        return f"is not a finite number ({value})"
    if value < 0:
        return f"is negative ({value:g})"
    if value == 0:
        return "is zero"
    if value > _LIMITS[kind]:
        return f"is implausibly large ({value:g})"
    if kind == "count" and value != int(value):
        return f"is not a whole number ({value:g})"
    return None


def _shown(value) -> str:
    return f" ({value!r})" if isinstance(value, str) and len(value) <= 20 else ""


def clean_probes(record: dict) -> list[tuple[str, str]]:
    """Remove from step 01's environment ``record``, in place, every probe entry with a
    missing or malformed number, and say why: a list of (probe name, sentence naming the
    entry, e.g. ``probes.allreduce.results[3] skipped: busbw_gb_s is null``). What is
    left is safe to compute with. A probe that is not a list of entries is left as it is
    (the report says it is not readable)."""
    skipped = []
    for name, (where, fields) in PROBE_ENTRIES.items():
        holder = record
        for key in where[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        entries = holder.get(where[-1]) if isinstance(holder, dict) else None
        if not isinstance(entries, list):
            continue
        kept = []
        for i, entry in enumerate(entries):
            if isinstance(entry, dict):
                problems = [f"{field} {why}" if field in entry else f"no {field}"
                            for field, kind in fields.items()
                            for why in [_field_problem(entry.get(field), kind)] if why]
            else:
                problems = [f"not an object ({_type_name(entry)})"]
            if problems:
                skipped.append((name, f"{'.'.join(where)}[{i}] skipped: "
                                      + "; ".join(problems)))
            else:
                kept.append(entry)
        holder[where[-1]] = kept
    return skipped


def load_result(path: Path) -> Loaded:
    """Read one file of the results folder as JSON only (nothing is executed or unpickled)
    and check it against the contract."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_RESULT_BYTES:
            return Loaded(path, None, f"too large to be a result file ({size:,} bytes)")
        text = path.read_text(encoding="utf-8")
        record = json.loads(text, parse_int=_json_int)
        if _ESCAPED_SURROGATE.search(text):
            record = _no_lone_surrogates(record)
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
