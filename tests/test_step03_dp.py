"""Step 03: DataParallel wiring on CPU, and the autocast-dtype mechanism it relies on.

On a CPU-only machine nn.DataParallel has no devices and calls the module directly, so CI
checks the wiring and the degenerate case; the multi-GPU behaviour is in the gpu-marked
tests at the bottom, run on a GPU machine.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from conftest import read_single_result, result_files, run_in_process, run_script
from labs import envinfo
from labs.dp import AutocastForward, check_compile
from labs.errors import UsageError
from labs.results import load_result

SCRIPT = "03_dataparallel_training.py"


def _output_dtype_in_thread(module: nn.Module, outer_dtype: torch.dtype) -> torch.dtype:
    """Call `module` the way DataParallel's replicas are called: in another thread that
    enters autocast itself, with a dtype of its own choosing."""
    seen = {}

    def replica():
        with torch.autocast("cpu", dtype=outer_dtype):
            seen["dtype"] = module(torch.randn(4, 8)).dtype

    worker = threading.Thread(target=replica)
    worker.start()
    worker.join()
    return seen["dtype"]


def test_autocast_forward_keeps_the_requested_dtype_inside_a_replica_thread():
    linear = nn.Linear(8, 3)
    # the trap: whatever autocast the replica thread sets up wins for the plain module
    assert _output_dtype_in_thread(linear, torch.float16) == torch.float16
    # the fix: autocast inside forward is the innermost, so bf16 stays bf16
    wrapped = AutocastForward(linear, "cpu", torch.bfloat16)
    assert _output_dtype_in_thread(wrapped, torch.float16) == torch.bfloat16
    # amp off means off, even inside a thread that turned autocast on
    plain = AutocastForward(linear, "cpu", None)
    assert _output_dtype_in_thread(plain, torch.bfloat16) == torch.float32


def test_compile_is_refused_where_dataparallel_would_run_uncompiled_replicas():
    with pytest.raises(UsageError, match="replicas run uncompiled"):
        check_compile(True, [0, 1])
    check_compile(True, [0])  # one GPU: DataParallel calls the compiled module itself
    check_compile(True, [])   # the CPU: the same
    check_compile(False, [0, 1, 2, 3])


def test_the_first_listed_gpu_becomes_the_current_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert envinfo.select_gpus([2, 3]) == [2, 3]
    assert chosen == [torch.device("cuda", 2)]  # not GPU 0: no stray context there
    assert envinfo.select_gpus(None) == [0, 1, 2, 3]
    assert chosen[-1] == torch.device("cuda", 0)


@pytest.mark.compat
def test_03_on_cpu_runs_and_records_the_degenerate_case(results_dir):
    proc = run_script(SCRIPT, "--preset", "smoke", "--results-dir", results_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_result(result_files(results_dir)[0]).ok
    record = read_single_result(results_dir)
    assert record["lab"] == "03_dataparallel" and record["config"]["strategy"] == "dp"
    assert record["world"]["world_size"] == 1
    assert [d["device"] for d in record["world"]["devices"]] == ["cpu"]
    assert any("plain module" in note and "world size 1" in note for note in record["notes"])
    assert "plain module" in proc.stdout  # said on screen too, not only in the file
    assert record["config"]["global_batch_size"] == record["config"]["per_device_batch_size"]


@pytest.mark.parametrize("gpus", ["0", "0,1,2,3"])
def test_03_asking_for_gpus_that_do_not_exist_is_a_usage_error(results_dir, gpus):
    if torch.cuda.is_available() and torch.cuda.device_count() > 4:
        pytest.skip("this machine has those GPUs")
    # in this process: test_faults tries the same refusal as a subprocess
    proc = run_in_process(SCRIPT, ["--preset", "smoke", "--gpus", gpus, "--results-dir",
                                   str(results_dir)])
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--gpus" in proc.stderr
    assert result_files(results_dir) == []


def test_03_help_says_the_batch_is_global():
    proc = run_script(SCRIPT, "--help")
    assert proc.returncode == 0
    assert "GLOBAL batch size" in proc.stdout and "--gpus" in proc.stdout


# --- on GPUs (skipped in CI) -------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_holds_inside_dataparallel_replicas_on_cuda():
    model = nn.Sequential(nn.Linear(8, 8)).cuda()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ids = list(range(torch.cuda.device_count()))
    plain = nn.DataParallel(model, device_ids=ids)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain(torch.randn(8, 8, device="cuda"))
    # DataParallel re-enters autocast without a dtype in its threads (float16 on CUDA)
    # whenever it has more than one device; with one it calls the module directly
    expected_plain = torch.float16 if len(ids) > 1 else torch.bfloat16
    assert set(seen) == {expected_plain}
    seen.clear()
    fixed = nn.DataParallel(AutocastForward(model, "cuda", torch.bfloat16), device_ids=ids)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fixed(torch.randn(8, 8, device="cuda"))
    assert set(seen) == {torch.bfloat16}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_03_on_gpus_records_memory_for_every_gpu(results_dir):
    from conftest import lab_env

    env = lab_env(CUDA_VISIBLE_DEVICES=",".join(map(str, range(torch.cuda.device_count()))))
    proc = run_script(SCRIPT, "--preset", "smoke", "--amp", "bf16", "--results-dir",
                      results_dir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = read_single_result(results_dir)
    per_device = record["metrics"]["per_device"]
    assert len(per_device) == torch.cuda.device_count()
    assert all(d["peak_allocated_bytes"] > 0 for d in per_device)
