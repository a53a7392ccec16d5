"""Step 01: the environment check and its probes (CPU only; GPU tests skip without GPUs)."""

from __future__ import annotations

import json
import math
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import lab_env, run_script
from labs import bandwidth, probes, results

SCRIPT = "01_environment_check.py"
TOP_KEYS = ["schema_version", "kind", "written_at", "command", "environment", "gpus",
            "topology", "disk_free_bytes", "backends", "probes", "recommendations", "notes"]


def _path_without_nvidia_smi(*first: Path) -> str:
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not (Path(d) / "nvidia-smi").exists()]
    return os.pathsep.join([*map(str, first), *keep])


def _fake_nvidia_smi(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + body)
    smi.chmod(0o755)
    return folder


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


# --- a full CPU run with probes ------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("env") / "results"
    env = lab_env(PATH=_path_without_nvidia_smi())
    start = time.perf_counter()
    done = run_script(SCRIPT, "--results-dir", folder, env=env, timeout=120)
    return done, folder, time.perf_counter() - start


def test_cpu_run_with_probes_writes_a_valid_environment_file(full_run):
    done, folder, wall_s = full_run
    assert done.returncode == 0, done.stderr
    assert wall_s < 60, f"step 01 with probes took {wall_s:.1f} s on this machine"
    loaded = results.load_result(folder / "environment.json")
    assert loaded.ok, loaded.reason
    record = loaded.record
    assert list(record) == TOP_KEYS
    assert record["schema_version"] == results.SCHEMA_VERSION
    assert record["kind"] == "environment"
    assert record["written_at"].endswith("+00:00")
    assert SCRIPT in record["command"]
    assert record["gpus"] == [] and record["topology"] is None
    assert record["environment"]["torch"] == torch.__version__
    assert record["backends"]["gloo"] is True
    assert set(record["backends"]) == {"nccl", "gloo", "mpi"}
    assert isinstance(record["disk_free_bytes"], int) and record["disk_free_bytes"] > 0
    assert record["recommendations"] and all(isinstance(s, str) for s in
                                             record["recommendations"])
    assert any("No GPU" in s for s in record["recommendations"])
    assert [p.name for p in folder.iterdir()] == ["environment.json"]  # no temp files left


def test_cpu_matmul_probe_reports_the_rate(full_run):
    record = json.loads((full_run[1] / "environment.json").read_text())
    (cpu,) = record["probes"]["matmul"]
    assert (cpu["device"], cpu["dtype"], cpu["size"]) == ("cpu", "fp32", 1024)
    assert cpu["time_s"] > 0
    assert cpu["tflops"] == pytest.approx(2 * 1024**3 / cpu["time_s"] / 1e12)
    assert record["probes"]["copy_bandwidth"] is None
    assert any("copy bandwidth" in note for note in record["notes"])


def test_gloo_allreduce_sweep_is_checked_and_consistent(full_run):
    done, folder, _ = full_run
    ar = json.loads((folder / "environment.json").read_text())["probes"]["allreduce"]
    assert (ar["backend"], ar["world_size"], ar["device"]) == ("gloo", 2, "cpu")
    rows = ar["results"]
    assert [r["size_bytes"] for r in rows] == list(probes.CPU_ALLREDUCE_SIZES)
    assert all(r["correct"] is True for r in rows) and ar["all_correct"] is True
    for r in rows:
        assert r["time_s"] > 0
        assert r["algbw_gb_s"] == pytest.approx(r["size_bytes"] / r["time_s"] / 1e9)
        assert r["busbw_gb_s"] == pytest.approx(r["algbw_gb_s"] * 2 * (2 - 1) / 2)
    assert ar["gradient_model"] == "resnet50"
    assert ar["gradient_bytes"] == 25_557_032 * 4
    # 102 MB is beyond the largest message: the largest message's busbw is used.
    largest = rows[-1]["busbw_gb_s"]
    assert ar["predicted_gradient_allreduce_s"] == pytest.approx(
        ar["gradient_bytes"] * 2 * (2 - 1) / 2 / (largest * 1e9))
    out = done.stdout
    assert "probe: matmul fp32" in out and "probe: all-reduce sweep, gloo" in out
    assert "all sums correct" in out and str(folder / "environment.json") in out


# --- arithmetic ---------------------------------------------------------------------------

def test_bandwidth_formulas_follow_nccl_tests():
    assert bandwidth.algbw_gb_s(2 * 10**9, 0.5) == pytest.approx(4.0)
    assert bandwidth.busbw(4.0, 2) == pytest.approx(4.0)    # 2(n-1)/n = 1
    assert bandwidth.busbw(4.0, 4) == pytest.approx(6.0)    # 1.5
    assert bandwidth.busbw(4.0, 8) == pytest.approx(7.0)    # 1.75
    assert bandwidth.busbw(None, 8) is None
    assert bandwidth.algbw_gb_s(100, 0.0) is None           # never an infinity in the file
    assert probes.matmul_tflops(8192, 1.0) == pytest.approx(2 * 8192**3 / 1e12)


def _sweep(*points):
    return [{"size_bytes": s, "busbw_gb_s": b} for s, b in points]


def test_predicted_allreduce_time_arithmetic():
    rows = _sweep((2**20, 10.0), (2**22, 20.0), (2**24, 40.0))
    # beyond the largest message: the largest message's busbw
    assert bandwidth.predict_allreduce_s(100 * 10**6, 8, rows) == pytest.approx(
        100e6 * 2 * 7 / 8 / 40e9)
    # between two sizes: log-linear interpolation (2^23 is halfway between 2^22 and 2^24)
    assert bandwidth.interpolate_busbw(rows, 2**23) == pytest.approx(30.0)
    assert bandwidth.predict_allreduce_s(2**23, 2, rows) == pytest.approx(2**23 / 30e9)
    # ResNet-50's 102 MB of gradients over 8 NVLink GPUs at 370 GB/s busbw: ~0.5 ms
    nvlink = _sweep((2**28, 370.0))
    assert bandwidth.predict_allreduce_s(probes.GRADIENT_BYTES, 8, nvlink) == pytest.approx(
        0.000483, rel=0.01)
    assert bandwidth.predict_allreduce_s(probes.GRADIENT_BYTES, 1, rows) == 0.0
    assert bandwidth.predict_allreduce_s(probes.GRADIENT_BYTES, 2, []) is None


def test_batch_size_recommendation_scales_memory_with_headroom():
    h100 = 79 * 2**30
    # 0.8 x 79 GiB / (11 GiB / 256) = 1470 images -> 1024; fp32: 594 -> 512
    assert probes.recommend_batch_size(h100, "bf16") == 1024
    assert probes.recommend_batch_size(h100, "fp32") == 512
    assert probes.recommend_batch_size(16 * 2**30, "fp32") == 64  # 120.5 images -> 64
    assert probes.recommend_batch_size(2**20, "fp32") == 0


def test_recommendations_say_what_is_meaningful():
    def record(gpus):
        return {"gpus": gpus, "environment": {"cpu_count": 16}, "probes": None}

    gpu = {"index": 0, "name": "GPU", "total_memory_bytes": 79 * 2**30,
           "compute_capability": "9.0", "multiprocessors": 132, "peer_access": []}
    one = " ".join(probes.recommendations(record([gpu])))
    assert "world size 1" in one and "1024" in one and "--num-workers 8" in one
    two = [dict(gpu), dict(gpu, index=1)]
    said = " ".join(probes.recommendations(record(two)))
    assert "--nproc 2" in said and "--num-workers 7" in said
    assert "No peer-to-peer access between GPUs 0-1" in said
    two[0]["peer_access"], two[1]["peer_access"] = [1], [0]
    assert "peer-to-peer" not in " ".join(probes.recommendations(record(two)))
    assert "on 79.0 GiB (GPU)" in one  # a GPU's capacity: one decimal, as on screen


@pytest.mark.parametrize("cores, gpus", [(16, 0), (16, 1), (16, 8), (6, 4), (2, 0), (1, 2)])
def test_the_worker_advice_is_what_the_steps_choose(monkeypatch, cores, gpus):
    """Step 01's --num-workers advice for N GPUs is what 02-04 pick for N processes."""
    from types import SimpleNamespace

    from labs import data

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)),
                        raising=False)
    gpu = {"name": "GPU", "total_memory_bytes": 80 * 2**30, "compute_capability": "9.0"}
    record = {"gpus": [dict(gpu, index=i, peer_access=[]) for i in range(gpus)],
              "environment": {"cpu_count": cores}, "probes": None}
    chosen = data.default_num_workers(SimpleNamespace(data="fake", num_workers=None),
                                      processes_per_host=max(1, gpus))
    assert f"--num-workers {chosen} per process" in " ".join(probes.recommendations(record))


# --- the correctness check can fail ---------------------------------------------------------

def test_allreduce_checker_rejects_a_wrong_sum():
    assert probes.allreduce_expected(2) == 3 and probes.allreduce_expected(8) == 36
    assert probes.allreduce_correct(torch.full((1024,), 3.0), 2) is True
    assert probes.allreduce_correct(torch.full((1024,), 4.0), 2) is False
    almost = torch.full((1024,), 36.0)
    almost[517] = 35.0
    assert probes.allreduce_correct(almost, 8) is False


def test_one_wrong_rank_marks_the_size_wrong():
    rank0 = [{"size_bytes": 4096, "time_s": 0.001, "correct": True}]
    rank1 = [{"size_bytes": 4096, "time_s": 0.002, "correct": False}]
    (row,) = probes.combine_allreduce([rank0, rank1], 2)
    assert row["correct"] is False
    assert row["time_s"] == 0.002  # the slowest rank's time
    assert row["algbw_gb_s"] == pytest.approx(4096 / 0.002 / 1e9)


def test_timed_allreduce_detects_a_sum_that_is_not_n_n_plus_1_over_2(tmp_path):
    """A one-rank gloo group returns 1 where two ranks would give 3: the check must see it."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        cpu = torch.device("cpu")
        right = probes._time_allreduce(4096, 0, 1, cpu, warmup=1, iters=2)
        wrong = probes._time_allreduce(4096, 0, 2, cpu, warmup=1, iters=2)
    finally:
        dist.destroy_process_group()
    assert right["correct"] is True and right["size_bytes"] == 4096
    assert wrong["correct"] is False


# --- the command line --------------------------------------------------------------------

def test_quick_skips_probes_and_rerun_replaces_the_file(results_dir):
    env = lab_env(PATH=_path_without_nvidia_smi())
    first = run_script(SCRIPT, "--quick", "--results-dir", results_dir, env=env)
    assert first.returncode == 0, first.stderr
    assert "probe:" not in first.stdout and "probes       skipped (--quick)" in first.stdout
    second = run_script(SCRIPT, "--quick", "--results-dir", results_dir, env=env)
    assert second.returncode == 0, second.stderr
    assert [p.name for p in results_dir.iterdir()] == ["environment.json"]
    loaded = results.load_result(results_dir / "environment.json")
    assert loaded.ok and loaded.record["kind"] == "environment"
    assert loaded.record["probes"] is None
    assert loaded.record["topology"] is None  # no nvidia-smi on PATH: not an error


def test_topology_is_read_from_nvidia_smi_when_present(results_dir, tmp_path):
    matrix = "\tGPU0\tGPU1\nGPU0\t X \tNV18\nGPU1\tNV18\t X "
    smi = _fake_nvidia_smi(tmp_path / "bin",
                           f'[ "$1 $2" = "topo -m" ] || exit 9\nprintf "{matrix}\\n"\n')
    done = run_script(SCRIPT, "--quick", "--results-dir", results_dir,
                      env=lab_env(PATH=_path_without_nvidia_smi(smi)))
    assert done.returncode == 0, done.stderr
    record = json.loads((results_dir / "environment.json").read_text())
    assert record["topology"] == matrix
    assert "NV18" in done.stdout


def test_a_failing_nvidia_smi_is_a_note_not_a_crash(results_dir, tmp_path):
    smi = _fake_nvidia_smi(tmp_path / "bin", 'echo "NVML: driver not loaded" >&2\nexit 9\n')
    done = run_script(SCRIPT, "--quick", "--results-dir", results_dir,
                      env=lab_env(PATH=_path_without_nvidia_smi(smi)))
    assert done.returncode == 0, done.stderr
    record = json.loads((results_dir / "environment.json").read_text())
    assert record["topology"] is None
    assert any("exit 9" in n and "driver not loaded" in n for n in record["notes"])


@pytest.mark.skipif(torch.cuda.is_available() and os.environ.get(
    "LAB_TEST_CUDA_VISIBLE_DEVICES"), reason="GPUs are visible to the scripts")
def test_require_gpus_fails_with_one_line_on_a_machine_without(tmp_path):
    folder = tmp_path / "results"
    done = run_script(SCRIPT, "--require-gpus", "1", "--results-dir", folder)
    assert done.returncode == 1
    line = _one_line(done.stderr)
    assert "0 CUDA GPU(s) visible" in line and "--require-gpus 1" in line
    assert not folder.exists()  # nothing written


@pytest.mark.parametrize("argv, expected", [
    (["--require-gpus", "-1"], "--require-gpus"),
    (["--require-gpus", "two"], "--require-gpus"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_exit_2_with_one_line_and_write_nothing(tmp_path, argv, expected):
    folder = tmp_path / "results"
    done = run_script(SCRIPT, *argv, "--results-dir", folder)
    assert done.returncode == 2
    assert expected in _one_line(done.stderr)
    assert not folder.exists()


def test_unwritable_results_dir_is_a_usage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = run_script(SCRIPT, "--quick", "--results-dir", blocker / "results")
    assert done.returncode == 2
    assert "cannot write results to" in _one_line(done.stderr)


# --- on a GPU (skipped without) ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_probes_measure_plausible_rates():
    notes: list[str] = []
    rows = [probes.matmul_gpu(0, dtype, notes, n=4096) for dtype in probes.GPU_MATMUL_DTYPES]
    measured = {r["dtype"]: r for r in rows if r is not None}
    assert "fp32" in measured and measured["fp32"]["tflops"] > 0.5
    if "bf16" in measured:
        assert measured["bf16"]["tflops"] > measured["fp32"]["tflops"]
    copies = probes.copy_bandwidth(0, notes, size_bytes=64 * 2**20)
    assert {c["direction"] for c in copies} == {"h2d", "d2h"}
    assert all(c["gb_s"] > 0.5 for c in copies)
    inventory = probes.gpu_inventory([{"index": i} for i in range(torch.cuda.device_count())])
    assert all(i["index"] not in i["peer_access"] for i in inventory)


@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_sweep_across_gpus_is_correct():
    notes: list[str] = []
    ar = probes.allreduce_sweep(torch.cuda.device_count(), notes, say=lambda _: None)
    assert ar is not None, notes
    assert ar["backend"] == "nccl" and ar["all_correct"] is True
    assert math.isfinite(ar["predicted_gradient_allreduce_s"])
