"""Step 04 end to end, launched every way a student launches it (CPU, gloo, 1 thread/rank)."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from conftest import (lab_env, read_single_result, result_files, run_in_process, run_script,
                      torchrun)
from labs import cli, envinfo, launcher_env
from labs.errors import UsageError
from labs.results import load_result

SCRIPT = "04_ddp_training.py"
# lab_env's CUDA_VISIBLE_DEVICES as a result's command records it ('' hides the GPUs)
VISIBLE = "CUDA_VISIBLE_DEVICES=" + shlex.quote(lab_env()["CUDA_VISIBLE_DEVICES"])
SMOKE = ("--preset", "smoke")
PLAIN_TORCHRUN = ("--nproc_per_node=2",)
STANDALONE_TORCHRUN = ("--standalone", "--nproc_per_node=2")


class SharedRun(NamedTuple):
    """One launch of 04, made once per module and read by several tests."""
    proc: subprocess.CompletedProcess
    folder: Path

    def assert_succeeded(self) -> None:
        # checked in each reading test, so a failed run fails all of them with its stderr
        assert self.proc.returncode == 0, self.proc.stderr[-3000:]


def launch_shared_run(tmp_path_factory, name: str, *args: str,
                      launcher: list[str] | None = None) -> SharedRun:
    folder = tmp_path_factory.mktemp(name)
    proc = run_script(SCRIPT, *SMOKE, *args, "--results-dir", folder, launcher=launcher)
    return SharedRun(proc, folder)


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """One torchrun launch per command line; the standalone one also carries
    --static-graph and --profile-steps, so a single 2-rank run covers torchrun, static
    graph and profiling under torchrun."""
    runs: dict[tuple[str, ...], SharedRun] = {}

    def get(launch: tuple[str, ...]) -> SharedRun:
        if launch not in runs:
            extra = ("--static-graph", "--profile-steps", "2") \
                if launch == STANDALONE_TORCHRUN else ()
            runs[launch] = launch_shared_run(tmp_path_factory, "torchrun", *extra,
                                             launcher=torchrun(*launch))
        return runs[launch]
    return get


@pytest.fixture(scope="module")
def nproc_options_run(tmp_path_factory) -> SharedRun:
    """Self-launch with --nproc 2 and every DDP option: one 2-rank run for both tests."""
    return launch_shared_run(tmp_path_factory, "nproc_options", "--nproc", "2",
                             "--bucket-cap-mb", "5", "--comm-hook", "fp16",
                             "--grad-accum-steps", "2", "--run-name", "options",
                             "--scaling", "strong", "--profile-steps", "3")


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> SharedRun:
    """One process given the legacy --local_rank and --no-comm-probe (independent)."""
    return launch_shared_run(tmp_path_factory, "one_process", "--local_rank=0",
                             "--no-comm-probe")


def assert_valid_ddp_result(folder, world_size: int, nnodes: int = 1) -> dict:
    record = read_single_result(folder)
    loaded = load_result(result_files(folder)[0])
    assert loaded.ok, loaded.reason
    assert record["status"] == "ok"
    assert record["config"]["strategy"] == "ddp"
    assert record["config"]["backend"] == "gloo"
    assert record["world"]["world_size"] == world_size
    assert record["world"]["nnodes"] == nnodes
    assert sorted(d["rank"] for d in record["world"]["devices"]) == list(range(world_size))
    metrics = record["metrics"]
    assert sorted(d["rank"] for d in metrics["per_device"]) == list(range(world_size))
    assert [r["rank"] for r in metrics["per_rank"]] == list(range(world_size))
    assert all(r["steps_measured"] == metrics["steps_measured"] for r in metrics["per_rank"])
    # global samples per step = per-rank batch x accumulation x ranks: never counted twice
    config = record["config"]
    per_rank_step = config["per_device_batch_size"] * config["grad_accum_steps"]
    assert metrics["global_samples_per_step"] == per_rank_step * world_size
    assert config["global_batch_size"] == per_rank_step * world_size
    tp = metrics["throughput_img_s"]
    assert 0 < tp["p10"] <= tp["median"] <= tp["p90"]
    assert record["config"]["threads_per_process"] == 1  # OMP_NUM_THREADS=1 in lab_env
    # ResNet-18 with 10 classes: 11,181,642 trainable fp32 parameters
    assert record["config"]["gradient_bytes"] == 11_181_642 * 4
    # the compute-only probe ran on every rank, after training
    compute_only = metrics["compute_only_step_time_s"]
    assert 0 < compute_only["p10"] <= compute_only["median"] <= compute_only["p90"]
    assert all(r["compute_only_step_time_s"]["median"] > 0 for r in metrics["per_rank"])
    assert metrics["exposed_comm_s"]["median"] == pytest.approx(
        metrics["step_time_s"]["median"] - compute_only["median"])
    assert metrics["slowest_rank"] in range(world_size)
    return record


@pytest.mark.parametrize("launch", [PLAIN_TORCHRUN, STANDALONE_TORCHRUN])
def test_torchrun_two_ranks_writes_one_result_with_both_ranks(torchrun_run, launch):
    run = torchrun_run(launch)
    run.assert_succeeded()
    record = assert_valid_ddp_result(run.folder, world_size=2)
    assert record["world"]["launcher"] == "torchrun"
    command = record["command"]
    # lab_env's variables first; not OMP_NUM_THREADS=1, which torchrun would have set for
    # two ranks anyway: a rank cannot tell who set it
    assert command.startswith(f"MKL_NUM_THREADS=1 {VISIBLE} torchrun --nnodes=1 "
                              f"--nproc_per_node=2 04_ddp"), command
    # rank 0 alone prints the summary
    assert run.proc.stdout.count("== 04_ddp") == 1


@pytest.mark.compat
def test_self_launch_with_nproc(nproc_options_run):
    nproc_options_run.assert_succeeded()
    record = assert_valid_ddp_result(nproc_options_run.folder, world_size=2)
    assert record["world"]["launcher"] == "spawn"
    # the user's command, not the spawned child's `python -c 'from multiprocessing...'`
    assert "04_ddp_training.py" in record["command"]
    assert "--nproc 2" in record["command"] and "multiprocessing" not in record["command"]
    # the launcher's environment (lab_env's), before the launcher's own line
    assert record["command"].startswith(f"OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 {VISIBLE} "
                                        f"python ")


def test_no_comm_probe_skips_the_compute_only_phase(one_process_run):
    one_process_run.assert_succeeded()
    record = read_single_result(one_process_run.folder)
    assert record["config"]["comm_probe"] is False
    assert record["metrics"]["compute_only_step_time_s"] is None
    assert record["metrics"]["exposed_comm_s"] is None


def test_two_nodes_on_localhost(results_dir):
    """Two torchrun agents, one per "node", meeting at a c10d rendezvous on localhost."""
    port = launcher_env.free_port()
    common = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=labtest"]
    cmd = [*torchrun(*common), "04_ddp_training.py", *SMOKE, "--results-dir",
           str(results_dir)]
    from conftest import REPO

    agents = [subprocess.Popen(cmd, cwd=REPO, env=lab_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=180)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    record = assert_valid_ddp_result(results_dir, world_size=2, nnodes=2)
    assert record["world"]["local_world_size"] == 1


@pytest.mark.compat
def test_a_rank_killed_mid_run_restarts_from_the_checkpoint(results_dir, tmp_path):
    checkpoints = tmp_path / "ckpt"
    env = lab_env(LAB_FAULT="kind=exit,rank=1,step=7")  # rank 1 vanishes in epoch 2
    proc = run_script(SCRIPT, *SMOKE, "--epochs", "3", "--checkpoint-every", "1",
                      "--checkpoint-dir", checkpoints, "--resume", "auto",
                      "--results-dir", results_dir, env=env, timeout=240,
                      launcher=torchrun("--nproc_per_node=2", "--max-restarts=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in result_files(results_dir)]
    finished = [r for r in records if r["status"] == "ok"]
    assert len(finished) == 1
    # rank 0 saw its peer vanish (a gloo error) or was stopped by torchrun (SIGTERM),
    # whichever came first, and recorded what it had measured of the first attempt
    assert [r["status"] for r in records if r is not finished[0]] in (["failed"],
                                                                        ["interrupted"])
    world = finished[0]["world"]
    assert world["restart_count"] == 1
    assert world["resumed_from"].endswith("epoch0001.pt") and world["start_epoch"] == 1
    assert any("restarted" in note for note in finished[0]["notes"])
    assert len(finished[0]["metrics"]["epoch_time_s"]) == 2  # epochs 2 and 3 only
    # the checkpoint holds the unwrapped model: loads without DDP, no "module." prefix
    state = torch.load(checkpoints / "epoch0003.pt", weights_only=True)
    assert state["epoch"] == 3
    assert not any(key.startswith("module.") for key in state["model"])


@pytest.mark.parametrize("extra", [
    ("--backend", "nccl"),                 # one process, no GPU
    ("--backend", "nccl", "--nproc", "2"),  # refused before spawning
])
def test_nccl_without_gpus_is_refused_with_exit_2(results_dir, extra):
    argv = [*SMOKE, *extra, "--results-dir", str(results_dir)]
    # --nproc is the launcher's (a new process); the plain refusal runs main() here
    proc = run_script(SCRIPT, *argv) if "--nproc" in extra else run_in_process(SCRIPT, argv)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nccl" in lines[0].lower() and "gloo" in lines[0]
    assert result_files(results_dir) == []


def test_more_ranks_than_gpus_is_refused_for_nccl(monkeypatch):
    monkeypatch.setattr(envinfo, "gpu_count", lambda: 1)
    for backend in ("nccl", "auto"):
        with pytest.raises(UsageError, match="NCCL cannot put two ranks on one GPU"):
            cli.check_backend(backend, "auto", local_world_size=2)
    cli.check_backend("gloo", "auto", local_world_size=2)  # the rehearsal is allowed
    cli.check_backend("nccl", "auto", local_world_size=1)


def test_ddp_options_are_recorded(nproc_options_run):
    nproc_options_run.assert_succeeded()
    config = read_single_result(nproc_options_run.folder)["config"]
    assert config["bucket_cap_mb"] == 5.0
    assert config["static_graph"] is False
    assert config["comm_hook"] == "fp16"
    assert config["grad_accum_steps"] == 2
    assert config["global_batch_size"] == config["per_device_batch_size"] * 2 * 2
    assert config["gradient_as_bucket_view"] is True
    assert config["find_unused_parameters"] is False
    assert config["broadcast_buffers"] is False
    assert config["scaling"] == "strong"  # a label every spawned rank parsed alike
    # --bucket-cap-mb 5: DDP's buckets, as it built them, hold every gradient byte once
    buckets = config["bucket_bytes"]
    assert len(buckets) > 1 and sum(buckets) == config["gradient_bytes"]


def test_legacy_local_rank_argument_is_accepted(one_process_run):
    """torch.distributed.launch passes --local-rank=N (and --local_rank in old releases)."""
    one_process_run.assert_succeeded()
    assert read_single_result(one_process_run.folder)["world"]["world_size"] == 1


def test_static_graph_with_accumulation_is_refused_before_any_work(results_dir):
    proc = run_script(SCRIPT, *SMOKE, "--static-graph", "--grad-accum-steps", "2",
                      "--results-dir", results_dir)
    assert proc.returncode == 2
    assert "--static-graph" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert result_files(results_dir) == []


def test_static_graph_runs_and_is_recorded(torchrun_run):
    """The standalone torchrun run carries --static-graph; the plain one does not."""
    static = torchrun_run(STANDALONE_TORCHRUN)
    static.assert_succeeded()
    assert read_single_result(static.folder)["config"]["static_graph"] is True
    plain = torchrun_run(PLAIN_TORCHRUN)
    plain.assert_succeeded()
    assert read_single_result(plain.folder)["config"]["static_graph"] is False


def test_sync_bn_on_the_cpu_is_refused_with_exit_2(results_dir):
    proc = run_in_process(SCRIPT, [*SMOKE, "--sync-bn", "--results-dir", str(results_dir)])
    assert proc.returncode == 2
    assert "--sync-bn needs CUDA" in proc.stderr and "Traceback" not in proc.stderr
    assert result_files(results_dir) == []


def assert_traced(folder, record: dict, steps: int) -> list[dict]:
    """Every rank wrote a Chrome trace with all-reduces in it, and its overlap figures."""
    trace = record["metrics"]["trace"]
    assert [t["rank"] for t in trace] == [0, 1]
    files = sorted((folder / "traces").glob("*.json"))
    assert [f"traces/{f.name}" for f in files] == [t["file"] for t in trace]
    for t, path in zip(trace, files):
        assert record["run_id"] in path.name and path.name.endswith(f"_rank{t['rank']}.json")
        events = json.loads(path.read_text())["traceEvents"]  # what Perfetto loads
        assert any(e.get("name") == "gloo:all_reduce" for e in events), path.name
        assert t["steps"] == steps and t["trace_bytes"] == path.stat().st_size
        assert 0 <= t["overlap_pct"] <= 100
        assert 0 <= t["exposed_comm_s"] <= t["comm_s"] <= t["step_s"]
        assert t["buckets"] and t["timeline"]["all_reduce"] and t["wait_s"] >= 0
    assert min(t["wait_s"] for t in trace) == 0  # the slowest rank waits for no one
    return trace


def test_profile_steps_write_a_trace_per_rank_kept_out_of_the_timings(nproc_options_run):
    nproc_options_run.assert_succeeded()
    record = read_single_result(nproc_options_run.folder)
    assert record["config"]["profile_steps"] == 3
    assert_traced(nproc_options_run.folder, record, steps=3)
    # the profiled steps (and the one before them) are not training's measured steps
    config = record["config"]
    assert record["metrics"]["steps_measured"] == \
        config["steps_per_epoch"] * config["epochs"] - config["warmup_steps"]
    # and the report draws them: the timeline and each rank's overlap
    report = nproc_options_run.folder / "report.html"
    proc = run_script("05_performance_comparison.py", "--results-dir",
                      nproc_options_run.folder, "--output-report", report)
    assert proc.returncode == 0, proc.stderr
    page = report.read_text()
    assert 'id="plot-timeline_' in page and "what the profiler saw" in page
    assert "rank 0" in page and "no_sync estimate" in page


def test_torchrun_ranks_profile_too_and_a_plain_run_has_a_null_trace(torchrun_run):
    profiled = torchrun_run(STANDALONE_TORCHRUN)
    profiled.assert_succeeded()
    assert_traced(profiled.folder, read_single_result(profiled.folder), steps=2)
    plain = torchrun_run(PLAIN_TORCHRUN)
    plain.assert_succeeded()
    record = read_single_result(plain.folder)
    assert record["metrics"]["trace"] is None and record["config"]["profile_steps"] == 0
    assert not (plain.folder / "traces").exists()
