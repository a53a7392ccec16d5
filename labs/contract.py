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


# Counts, where not null: non-negative integers, never true or false (Python's True is an
# int). Times: a number there is finite and >= 0 ("[]": each entry; "*": a spread's values).
COUNT_FIELDS = tuple(f"{block}.{name}" for block, names in (
    ("config", "img_size num_classes dataset_size per_device_batch_size global_batch_size "
               "grad_accum_steps epochs steps_per_epoch warmup_steps lr_warmup_steps seed "
               "num_workers threads_per_process val_size gradient_bytes checkpoint_every "
               "gpus.[] train_set.images train_set.classes"),
    ("world", "nnodes local_world_size restart_count start_epoch"),
    ("metrics", "warmup_steps global_samples_per_step slowest_rank per_rank.[].rank "
                "per_rank.[].steps_measured per_device.[].index per_device.[].rank "
                "eval.[].epoch eval.[].samples")) for name in names.split())
TIME_FIELDS = ("config.timeout_s", *(f"metrics.{name}" for name in (
    "epoch_time_s.[] step_time_s.* compute_only_step_time_s.* time_to_accuracy_s "
    "per_rank.[].step_time_s.* per_rank.[].compute_only_step_time_s.* "
    "per_rank.[].data_wait_s per_device.[].step_time_s eval.[].elapsed_s "
    "eval.[].eval_time_s").split()))


def _at(holder, keys: list[str], name: str = ""):
    """(dotted name, value) of every value at ``keys`` under ``holder`` that is there."""
    if not keys:
        yield name, holder
    elif keys[0] == "[]" and isinstance(holder, list):
        for i, value in enumerate(holder):
            yield from _at(value, keys[1:], f"{name}[{i}]")
    elif isinstance(holder, dict):
        for key in ("median", "p10", "p90") if keys[0] == "*" else keys[:1]:
            if key in holder:
                yield from _at(holder[key], keys[1:], f"{name}.{key}" if name else key)


def count_problem(value, least: int = 0) -> str | None:
    """Why ``value`` is not an integer of at least ``least`` (None: it is one)."""
    if isinstance(value, (bool, float)) or value is None:  # as the file says it: true, 8.5
        return f"is {json.dumps(value)}, not an integer"
    if not isinstance(value, int):
        return f"is {_type_name(value)}{_shown(value)}, not an integer"
    if value < 0:
        return f"is negative ({value})"
    if value < least:
        return f"is {value}, not a positive integer"
    return None


def time_problem(value) -> str | None:
    """Why a number of seconds is impossible; a non-number is "not recorded" to the report."""
    if _is_number(value) and not math.isfinite(value):
        return f"is not a finite number ({value})"
    return f"is negative ({value:g})" if _is_number(value) and value < 0 else None


def validate_run(record: dict) -> list[str]:
    """Problems that make a dict not a valid run record (empty list: valid)."""
    problems = [f"missing {key!r}" for key in ("lab", "status", "run_id", "run_name",
                                                "started_at", "command", "config", "world",
                                                "metrics") if key not in record]
    if problems:
        return problems
    if record["lab"] not in LAB_NAMES:
        problems.append(f"unknown lab {record['lab']!r}")
    if record["status"] not in STATUSES:
        problems.append(f"unknown status {record['status']!r}")
    config, metrics = record["config"], record["metrics"]
    if not isinstance(config, dict) or config.get("strategy") not in STRATEGIES:
        problems.append("config.strategy is missing or unknown")
    required = ["world.world_size"]
    if record["status"] == "ok":
        required.append("metrics.steps_measured")
    for field in required:
        found = [value for _, value in _at(record, field.split("."))]
        why = count_problem(found[0], 1) if found else "is missing"
        if why:
            problems.append(f"{field} {why}")
    if not isinstance(metrics, dict):
        return problems + ["metrics is not an object"]
    if record["status"] == "ok":
        tp = metrics.get("throughput_img_s")
        if not isinstance(tp, dict) or not all(_is_number(tp.get(k)) and math.isfinite(tp[k])
                                               for k in ("median", "p10", "p90", "mean")):
            problems.append("metrics.throughput_img_s needs finite median, p10, p90, mean")
        elif not (0 < tp["p10"] <= tp["median"] <= tp["p90"]):
            problems.append("metrics.throughput_img_s is not 0 < p10 <= median <= p90")
        if not isinstance(metrics.get("per_device"), list) or not metrics["per_device"]:
            problems.append("metrics.per_device must list at least one device")
    # Counts that are no integers, times that are no durations, each named by its field.
    for fields, problem in ((COUNT_FIELDS, count_problem), (TIME_FIELDS, time_problem)):
        for path in fields:
            for name, value in _at(record, path.split(".")):
                why = problem(value) if value is not None else None
                if why:
                    problems.append(f"{name} {why}")
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
    if time_problem(value):  # not finite, or negative
        return time_problem(value)
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
    why = count_problem(version, 1)  # true is no version 1, though Python's True == 1
    if why:
        what = "no schema_version" if version is None else f"schema_version {why}"
        return Loaded(path, None, f"{what}: not a file written by this lab")
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
