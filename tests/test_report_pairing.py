"""Step 05 pairs a run only with a baseline of the same machine, and reads no impossible value.

A machine is its host, its CPU model (for CPU runs), its accelerator model and its torch
version: every CPU is named "CPU", and containers or cloud VMs often share a host name, so
the device name alone paired a DDP run with another computer's baseline. A file with a
negative or non-finite time, or ``true`` where an integer belongs, is skipped with a reason
that names the field.

05 runs once, as a subprocess, on a folder holding every case (``mixed``); the contract's
finer cases are checked in-process with ``load_result``.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
from conftest import run_script
from test_report import (H100, machine_section, machine_sections, main_rows, make_run, part,
                         write)

from labs.contract import load_result

INTEL = "Intel(R) Xeon(R) Gold 6430"
AMD = "AMD EPYC 7763 64-Core Processor"
NEW_TORCH, OLD_TORCH = "2.5.1+cu124", "2.4.0+cu121"
ELSEWHERE = "ran only on another machine"  # the machine's sentence, in its verdict

SKIPPED = {  # file -> what its reason must say
    "04_negative_epoch.json": "metrics.epoch_time_s[0] is negative (-3)",
    "04_negative_step.json": "metrics.step_time_s.p10 is negative (-0.01)",
    "02_schema_true.json": "schema_version is true, not an integer",
    "04_world_size_true.json": "world.world_size is true, not an integer",
}


def on(record: dict, *, cpu_model: str, torch: str) -> dict:
    """``record`` with rank 0's machine: its CPU model and torch (host: make_run's)."""
    host = record["world"]["devices"][0]["host"]
    record["environment"] = {**record["environment"], "host": host, "cpu_model": cpu_model,
                             "torch": torch}
    return record


def cpu_run(real: dict, strategy: str, n: int, throughput: float, host: str,
            cpu_model: str, torch: str = NEW_TORCH) -> dict:
    return on(make_run(real, strategy=strategy, n=n, throughput=throughput, gpu="CPU",
                       host=host, run_name=f"{strategy}-{n}-{host}"),
              cpu_model=cpu_model, torch=torch)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, real_run):
    """(report HTML, 05's stdout) for a folder holding:

    - box-a (Intel) with a baseline, box-b (AMD) with a DDP ×2 run and none;
    - ci-runner twice, one host name on two computers (AMD: a baseline; Intel: DDP ×2),
      the reviewer's case: once a 0.12× "speed-up", 6% efficiency, nothing flagged;
    - gpu-1: a baseline under torch 2.5.1 and DDP ×2 under torch 2.4.0, same H100s;
    - four files with impossible values (SKIPPED)."""
    results = tmp_path_factory.mktemp("pairing") / "results"
    results.mkdir()
    write(results, "02_box_a.json", cpu_run(real_run, "single", 1, 100.0, "box-a", INTEL))
    write(results, "04_box_b.json", cpu_run(real_run, "ddp", 2, 150.0, "box-b", AMD))
    write(results, "02_ci_amd.json", cpu_run(real_run, "single", 1, 100.0, "ci-runner", AMD))
    write(results, "04_ci_intel.json", cpu_run(real_run, "ddp", 2, 12.0, "ci-runner", INTEL))
    gpu = dict(host="gpu-1", gpu=H100)
    write(results, "02_gpu_new.json", on(make_run(real_run, strategy="single", n=1,
                                                  throughput=1000.0, **gpu),
                                         cpu_model=INTEL, torch=NEW_TORCH))
    write(results, "04_gpu_old.json", on(make_run(real_run, strategy="ddp", n=2,
                                                  throughput=1900.0, **gpu),
                                         cpu_model=INTEL, torch=OLD_TORCH))
    bad = cpu_run(real_run, "ddp", 2, 150.0, "box-a", INTEL)
    bad["metrics"]["epoch_time_s"] = [-3.0, 5.0, 5.1]
    write(results, "04_negative_epoch.json", bad)
    bad = cpu_run(real_run, "ddp", 2, 150.0, "box-a", INTEL)
    bad["metrics"]["step_time_s"]["p10"] = -0.01
    write(results, "04_negative_step.json", bad)
    write(results, "02_schema_true.json",
          {**cpu_run(real_run, "single", 1, 100.0, "box-c", AMD), "schema_version": True})
    bad = cpu_run(real_run, "ddp", 2, 150.0, "box-b", AMD)
    bad["world"]["world_size"] = True
    write(results, "04_world_size_true.json", bad)
    out = results.parent / "report.html"
    proc = run_script("05_performance_comparison.py", "--results-dir", results,
                      "--output-report", out)
    assert proc.returncode == 0, proc.stderr
    return out.read_text(encoding="utf-8"), proc.stdout


def sentence(section: str, words: str) -> str:
    """The one verdict line of a section that holds ``words``."""
    lines = re.findall(r"<li>(.*?)</li>", section, re.S)
    found = [part(f'<ul class="verdict">{line}</ul>', "verdict") for line in lines]
    found = [line for line in found if words in line]
    assert len(found) == 1, f"no single verdict line with {words!r} in {found or lines}"
    return found[0]


def test_a_cpu_run_is_never_paired_with_another_hosts_baseline(mixed):
    """box-b has no baseline of its own: no figure, and its section says where matching
    ones ran (box-a, and the AMD ci-runner); box-a, with its own, is paired and says
    nothing of elsewhere."""
    raw, _ = mixed
    assert main_rows(machine_section(raw, "box-a · CPU processes"))["Single"]["speedup"] \
        .value == "1.00×"
    assert ELSEWHERE not in machine_section(raw, "box-a · CPU processes")
    section = machine_section(raw, "box-b · CPU processes")
    ddp = main_rows(section)["DDP ×2"]
    assert ddp["speedup"].value == "n/a" and ddp["efficiency"].value == "n/a"
    line = sentence(section, ELSEWHERE)
    assert line == (f"box-b · DDP ×2: no speed-up or scaling efficiency, because its "
                    f"matching 02 baseline {ELSEWHERE}, box-a (CPU {INTEL}, torch "
                    f"{NEW_TORCH}) and ci-runner (CPU {AMD}, torch {NEW_TORCH}); run 02 on "
                    "this machine with the same settings to compare.")


def test_one_host_name_on_two_cpus_is_two_machines(mixed):
    """The reviewer's case: ci-runner names two computers (AMD, Intel). Each is a section
    of its own, the DDP run on the Intel one gets no 0.12× "speed-up" against the AMD
    baseline, and its section says the baseline ran on the other."""
    raw, _ = mixed
    titles = [part(s, "title") for s in machine_sections(raw).values()]
    assert f"ci-runner · CPU processes · {AMD}" in titles
    intel = machine_section(raw, f"ci-runner · CPU processes · {INTEL}")
    ddp = main_rows(intel)["DDP ×2"]
    assert ddp["speedup"].value == "n/a" and ddp["efficiency"].value == "n/a"
    assert "0.12×" not in raw and "6%" not in part(intel, "table")
    assert f"ci-runner (CPU {AMD}, torch {NEW_TORCH})" in sentence(intel, ELSEWHERE)


def test_another_torch_version_on_the_same_gpus_is_another_machine(mixed):
    """Same host, same H100s, torch 2.4 against 2.5: other kernels (cuDNN, cuBLAS, the
    compiler), so a speed-up across the two would mix the software change into scaling."""
    raw, _ = mixed
    old = machine_section(raw, f"gpu-1 · 2 × H100 80GB HBM3 · torch {OLD_TORCH}")
    ddp = main_rows(old)["DDP ×2"]
    assert ddp["speedup"].value == "n/a" and ddp["efficiency"].value == "n/a"
    assert "1.90×" not in raw
    assert f"gpu-1 (H100 80GB HBM3, torch {NEW_TORCH})" in sentence(old, ELSEWHERE)
    new = machine_section(raw, f"gpu-1 · 1 × H100 80GB HBM3 · torch {NEW_TORCH}")
    assert main_rows(new)["Single"]["speedup"].value == "1.00×"  # its own baseline


@pytest.mark.parametrize("name", list(SKIPPED))
def test_impossible_values_skip_the_file_with_a_reason_naming_the_field(mixed, name):
    raw, stdout = mixed
    listed = dict(line[len("skipped  "):].split(": ", 1)
                  for line in stdout.splitlines() if line.startswith("skipped  "))
    assert SKIPPED[name] in listed.get(name, ""), listed
    match = re.search(r'<details id="skipped">(.*?)</details>', raw, re.S)
    assert name in match.group(1) and SKIPPED[name] in match.group(1)


# --- the contract, field by field (in-process) ---------------------------------------------

def _set(path: str, value):
    def change(record):
        *keys, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        holder = record
        for key in keys:
            holder = holder[key]
        holder[last] = value
    return change


def _ddp(real: dict) -> dict:
    run = make_run(real, strategy="ddp", n=2, throughput=180.0, eval=[0.3, 0.6, 0.7])
    run["config"]["timeout_s"] = 300.0
    return run


REJECTED = [  # (field, value, what the reason says)
    ("metrics.epoch_time_s", [5.0, float("inf")],
     "metrics.epoch_time_s[1] is not a finite number (inf)"),
    ("metrics.step_time_s.median", float("nan"),
     "metrics.step_time_s.median is not a finite number"),
    ("metrics.compute_only_step_time_s.p90", -1.0,
     "compute_only_step_time_s.p90 is negative"),
    ("metrics.per_rank.1.step_time_s.median", -0.2,
     "per_rank[1].step_time_s.median is negative"),
    ("metrics.per_rank.0.data_wait_s", -1.0,
     "metrics.per_rank[0].data_wait_s is negative"),
    ("metrics.per_device.0.step_time_s", -0.1,
     "metrics.per_device[0].step_time_s is negative"),
    ("metrics.eval.1.elapsed_s", -20.0,
     "metrics.eval[1].elapsed_s is negative"),
    ("metrics.time_to_accuracy_s", float("-inf"),
     "metrics.time_to_accuracy_s is not a finite number"),
    ("config.timeout_s", -5.0,
     "config.timeout_s is negative"),
    ("metrics.steps_measured", True,
     "metrics.steps_measured is true, not an integer"),
    ("config.per_device_batch_size", True,
     "config.per_device_batch_size is true, not an"),
    ("config.global_batch_size", False,
     "config.global_batch_size is false, not an integer"),
    ("config.epochs", True,
     "config.epochs is true, not an integer"),
    ("world.nnodes", True,
     "world.nnodes is true, not an integer"),
    ("metrics.per_rank.0.steps_measured", True,
     "per_rank[0].steps_measured is true"),
    ("config.grad_accum_steps", -2,
     "config.grad_accum_steps is negative (-2)"),
]


@pytest.mark.parametrize("field, value, why", REJECTED, ids=[f for f, _, _ in REJECTED])
def test_load_result_rejects_impossible_values(tmp_path, real_run, field, value, why):
    record = _ddp(real_run)
    _set(field, value)(record)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(record))  # NaN and Infinity as Python's json writes them
    loaded = load_result(path)
    assert not loaded.ok and why in loaded.reason, loaded.reason


def test_load_result_keeps_what_can_be_negative_or_absent(tmp_path, real_run):
    """Exposed communication can be negative (noise); a missing or null time is "not
    measured", and a non-number the report already treats as not recorded."""
    record = _ddp(real_run)
    record["metrics"]["exposed_comm_s"] = {"median": -0.002}
    record["metrics"]["time_to_accuracy_s"] = None
    record["metrics"]["per_device"][0]["step_time_s"] = None
    record["config"]["threads_per_process"] = None
    del record["config"]["timeout_s"]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(record))
    assert load_result(path).ok, load_result(path).reason


@pytest.mark.parametrize("version, why", [(True, "schema_version is true, not an integer"),
                                          (False, "schema_version is false, not an integer"),
                                          (0, "schema_version is 0, not a positive integer")])
def test_load_result_rejects_a_schema_version_that_is_no_version(tmp_path, real_run,
                                                                  version, why):
    for record in (copy.deepcopy(real_run), {"schema_version": 1, "kind": "environment"}):
        record["schema_version"] = version
        path = tmp_path / "file.json"
        path.write_text(json.dumps(record))
        loaded = load_result(path)
        assert not loaded.ok and why in loaded.reason, loaded.reason
