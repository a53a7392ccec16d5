"""Faults and bad input: the lab keeps working and never loses or corrupts results.

Runs are subprocesses started as a user starts them (bad flags that fail before any work
also run in this process, through the same ``cli.run``, to save start-up time). Bad
invocations must end with exit status 2, one line on stderr and nothing written. Faults
come from ``LAB_FAULT`` (see ``labs/faults.py``) or from real signals, and must still leave
a valid result file that says what happened. The slow multi-rank failures run in the
background while the other tests run, so the module takes about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, lab_env, result_files, run_in_process, run_script, torchrun
from labs.results import load_result

GPU_VISIBLE = bool(os.environ.get("LAB_TEST_CUDA_VISIBLE_DEVICES"))
SMOKE = ["--preset", "smoke"]
S01, S02, S03, S04, S05 = ("01_environment_check.py", "02_baseline_single_gpu.py",
                           "03_dataparallel_training.py", "04_ddp_training.py",
                           "05_performance_comparison.py")

# --- bad invocations: (case, script, arguments, words the one error line must contain) ---
# In the arguments, {results} is the case's results folder (not created beforehand),
# {file} a regular file, {missing} a path that does not exist, {garbage} a file of junk,
# {pickled} a checkpoint holding a pickled object, {lab} a folder with one result file.
# 02-04 runs get --preset smoke and --results-dir {results} first; 04 also
# --checkpoint-dir {ckpt}: the flag under test is the only thing wrong with a run.
BAD = [
    ("01-require-gpus-negative", S01, ["--require-gpus", "-1"], "--require-gpus"),
    ("01-unwritable-results", S01, ["--quick", "--results-dir", "{file}/results"],
     "cannot write results"),
    ("03-gpus-absent", S03, ["--gpus", "0,1"], "--gpus 0,1"),
    ("03-gpus-not-numbers", S03, ["--gpus", "a,b"], "--gpus"),
    ("03-steps-per-epoch-0", S03, ["--steps-per-epoch", "0"], "--steps-per-epoch"),
    ("03-img-size-tiny", S03, ["--img-size", "8"], "--img-size"),
    ("03-missing-data-dir", S03, ["--data", "cifar10", "--data-dir", "{missing}"],
     "{missing}"),
    ("03-unknown-model", S03, ["--model", "resnet51"], "resnet51"),
    ("03-unwritable-results", S03, ["--results-dir", "{file}/results"],
     "cannot write results"),
    ("03-device-flag", S03, ["--device", "cpu"], "--device"),  # 03 takes --gpus
    ("04-device-cuda", S04, ["--device", "cuda"], "--device cuda"),
    ("04-backend-mpi", S04, ["--backend", "mpi"], "--backend"),
    ("04-comm-hook-zstd", S04, ["--comm-hook", "zstd"], "--comm-hook"),
    ("04-precision-fp32", S04, ["--amp", "fp32"], "--amp"),
    ("04-timeout-0", S04, ["--timeout-s", "0"], "--timeout-s"),
    ("04-bucket-cap-negative", S04, ["--bucket-cap-mb", "-1"], "--bucket-cap-mb"),
    ("04-checkpoint-every-negative", S04, ["--checkpoint-every", "-1"],
     "--checkpoint-every"),
    ("04-nproc-0", S04, ["--nproc", "0"], "--nproc"),
    ("04-grad-accum-0", S04, ["--grad-accum-steps", "0"], "--grad-accum-steps"),
    ("04-missing-data-dir", S04, ["--data", "imagefolder", "--data-dir", "{missing}"],
     "{missing}"),
    ("04-resume-missing", S04, ["--resume", "{missing}"], "no such checkpoint file"),
    # Found after init_process_group, inside the rank(s).
    ("04-resume-garbage", S04, ["--resume", "{garbage}"],
     "not a readable checkpoint"),
    ("04-resume-garbage-nproc-2", S04, ["--resume", "{garbage}", "--nproc", "2"],
     "not a readable checkpoint"),
    ("04-resume-pickled-object", S04, ["--resume", "{pickled}"], "weights_only=True"),
    ("04-dataset-too-small", S04, ["--dataset-size", "4"], "not even one optimizer step"),
    ("04-unwritable-results-nproc-2", S04, ["--results-dir", "{file}/results",
                                            "--nproc", "2"], "cannot write results"),
    ("05-missing-results", S05, ["--results-dir", "{missing}"], "does not exist"),
    ("05-results-is-a-file", S05, ["--results-dir", "{file}"], "not a folder"),
    ("05-unwritable-report", S05, ["--results-dir", "{lab}", "--output-report",
                                   "{file}/report.html"], "cannot write"),
    ("02-unknown-preset", S02, ["--preset", "huge"], "--preset"),
    ("02-blank-run-name", S02, ["--run-name", " "], "--run-name"),
]
NEEDS_NO_GPU = {"03-gpus-absent", "04-device-cuda"}
# Run as a subprocess, as a user does: what fails inside the ranks, what must not see this
# process's GPUs, and one quick case per script. The rest run in this process (cli.run on
# the script's main, as `python SCRIPT` does): the same code path without 3 s of start-up.
SUBPROCESS = {"01-require-gpus-negative", "03-gpus-absent", "04-device-cuda",
              "04-resume-garbage-nproc-2", "04-resume-pickled-object", "05-missing-results"}


class Payload:
    """Pickles to a call of open(marker, "w"): unpickling it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def files_in(folder: Path) -> list[Path]:
    """Everything in the folder, hidden temporary files included."""
    return sorted(folder.iterdir()) if folder.is_dir() else []


def hidden_or_tmp(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def good_run_record(folder: Path) -> dict:
    """A minimal valid 02 result, without running anything."""
    record = {"schema_version": 1, "kind": "run", "lab": "02_baseline", "status": "ok",
              "run_id": "abc123", "run_name": "tiny", "started_at": "2026-01-01T00:00:00",
              "finished_at": "2026-01-01T00:01:00", "command": "python 02",
              "config": {"strategy": "single", "model": "resnet18", "img_size": 32,
                         "per_device_batch_size": 8, "global_batch_size": 8, "amp": "off",
                         "channels_last": False, "compile": False, "data": "synthetic"},
              "world": {"world_size": 1, "nnodes": 1, "backend": None,
                        "devices": [{"device": "cpu", "name": "cpu", "host": "h"}]},
              "metrics": {"throughput_img_s": {"median": 10.0, "p10": 9.0, "p90": 11.0,
                                               "mean": 10.0},
                          "steps_measured": 8, "per_device": [{"device": "cpu"}]}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(record))
    return record


def prepare_bad_case(case: str, script: str, argv: list[str], base: Path):
    folder = base / case
    folder.mkdir()
    places = {"results": folder / "results", "ckpt": folder / "ckpt",
              "file": folder / "a-file", "missing": folder / "missing",
              "garbage": folder / "garbage.pt", "pickled": folder / "pickled.pt",
              "lab": folder / "lab", "out": folder / "out"}
    places["file"].write_text("a regular file, not a folder\n")
    places["garbage"].write_bytes(b"this is not a checkpoint\n" * 100)
    torch.save({"epoch": 1, "model": Payload(folder / "UNPICKLED"), "optimizer": {},
                "scaler": {}}, places["pickled"])
    good_run_record(places["lab"])
    places["out"].mkdir()
    argv = [arg.format(**places) for arg in argv]
    if script in (S02, S03, S04):
        argv = [*SMOKE, "--results-dir", str(places["results"]), *argv]
    if script == S04:
        argv = ["--checkpoint-dir", str(places["ckpt"]), *argv]
    if script == S01 and "--results-dir" not in argv:
        argv += ["--results-dir", str(places["results"])]
    if script == S05 and "--output-report" not in argv:
        argv += ["--output-report", str(places["out"] / "report.html")]
    return argv, places


class Jobs:
    """Subprocesses started together at the start of the module, in the background of
    the tests that run in the foreground; each test waits only for the one it checks.
    The multi-rank failures, which mostly wait on a timeout, have a lane of their own."""

    def __init__(self, base: Path):
        self.base = base
        self.quick = ThreadPoolExecutor(max_workers=1)
        self.slow = ThreadPoolExecutor(max_workers=1)
        self.futures = {}

    def submit(self, name: str, fn, *args, slow: bool = False):
        if name not in self.futures:
            self.futures[name] = (self.slow if slow else self.quick).submit(fn, *args)
        return self.futures[name]

    def get(self, name: str):
        return self.futures[name].result()

    def close(self):
        for pool in (self.quick, self.slow):
            pool.shutdown(wait=True, cancel_futures=True)


def _bad_case(base: Path, case: str, script: str, argv: list[str]):
    argv, places = prepare_bad_case(case, script, argv, base)
    if case in SUBPROCESS:
        return run_script(script, *argv, timeout=90, cwd=places["out"]), argv, places
    return run_in_process(script, argv), argv, places


PROCESS_GROUP_TIMEOUT_S = 10
# A dead or hung rank must end the job within the process-group timeout plus start-up and
# a result write; 12x leaves room for a loaded machine and still tells "ended" from "hung"
# (the subprocess itself is killed at 18x).
JOB_ENDS_WITHIN_S = 12 * PROCESS_GROUP_TIMEOUT_S


def _torchrun_fault(base: Path, name: str, fault: str):
    """2 ranks under torchrun, rank 1 failing at its 5th step, 10 s process-group timeout."""
    results = base / name
    started = time.monotonic()
    proc = run_script(S04, *SMOKE, "--timeout-s", str(PROCESS_GROUP_TIMEOUT_S),
                      "--results-dir", results, env=lab_env(LAB_FAULT=fault),
                      timeout=18 * PROCESS_GROUP_TIMEOUT_S,
                      launcher=torchrun("--nproc_per_node=2"))
    return proc, results, time.monotonic() - started


def _concurrent_02(base: Path):
    """Two runs at once, same --run-name, same folder."""
    results = base / "concurrent"
    cmd = [sys.executable, str(REPO / S02), *SMOKE, "--run-name", "same",
           "--results-dir", str(results)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=lab_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    return [p.returncode for p in procs], outputs, results


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    jobs = Jobs(tmp_path_factory.mktemp("faults"))
    jobs.submit("hang", _torchrun_fault, jobs.base, "hang", "kind=hang,rank=1,step=4",
                slow=True)
    jobs.submit("exit", _torchrun_fault, jobs.base, "exit", "kind=exit,rank=1,step=4",
                slow=True)
    for case, script, argv, _ in BAD:
        if case in SUBPROCESS:
            jobs.submit(case, _bad_case, jobs.base, case, script, argv)
    jobs.submit("concurrent", _concurrent_02, jobs.base)
    yield jobs
    jobs.close()


# --- 1. bad input: exit status 2, one line, nothing written -------------------------------

def _bad_params():
    for case, script, _, expected in BAD:
        marks = [pytest.mark.skip(reason="a GPU is visible to the children")] \
            if case in NEEDS_NO_GPU and GPU_VISIBLE else []
        yield pytest.param(case, script, expected, id=case, marks=marks)


@pytest.mark.parametrize("case, script, expected", list(_bad_params()))
def test_bad_invocation_exits_2_with_one_line_and_writes_nothing(jobs, case, script,
                                                                  expected):
    argv = next(argv for name, _, argv, _ in BAD if name == case)
    proc, argv, places = (jobs.get(case) if case in SUBPROCESS
                          else _bad_case(jobs.base, case, script, argv))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, (argv, proc.returncode, output[-3000:])
    assert "Traceback" not in output
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{script}: error: "), lines[0]
    assert expected.format(**places) in lines[0]
    assert files_in(places["results"]) == []  # no result, no temporary file
    assert not places["ckpt"].exists()
    assert files_in(places["out"]) == []  # 05 wrote no report, no CSV
    assert not (places["file"].parent / "UNPICKLED").exists()


@pytest.mark.compat
def test_pickled_object_in_a_checkpoint_is_refused_never_unpickled(jobs, tmp_path):
    proc, _, places = jobs.get("04-resume-pickled-object")
    assert proc.returncode == 2
    assert not (places["file"].parent / "UNPICKLED").exists()
    # The payload is live: loading it the unsafe way does run it.
    control = tmp_path / "control.pt"
    torch.save({"model": Payload(tmp_path / "RAN")}, control)
    torch.load(control, weights_only=False)
    assert (tmp_path / "RAN").exists()


# --- 2. out of memory --------------------------------------------------------------------

def assert_oom_result(folder: Path, failing_rank: int) -> dict:
    (path,) = result_files(folder)
    loaded = load_result(path)
    assert loaded.ok, loaded.reason
    record = loaded.record
    assert record["status"] == "oom"
    reason = record["failure"]["reason"]
    assert "8 images per device" in reason  # the smoke preset's batch
    assert "--grad-accum-steps" in reason
    assert record["failure"]["rank"] == failing_rank
    assert hidden_or_tmp(folder) == []
    return record


def test_oom_on_02_writes_an_oom_result(tmp_path):
    proc = run_script(S02, *SMOKE, "--results-dir", tmp_path / "r",
                      env=lab_env(LAB_FAULT="kind=oom,step=3"))
    assert proc.returncode not in (0, 2)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("02_baseline: oom: out of memory at 8 images per device") == 1
    record = assert_oom_result(tmp_path / "r", failing_rank=0)
    assert record["metrics"]["steps_measured"] == 1  # steps 0-1 warmup, step 2 measured


def test_oom_on_rank_1_is_recorded_by_rank_0_and_checkpoints_stay_whole(tmp_path):
    """Rank 0 sees only a broken collective; rank 1 leaves its reason for it."""
    checkpoints = tmp_path / "ckpt"
    proc = run_script(S04, *SMOKE, "--nproc", "2", "--timeout-s", "20",
                      "--checkpoint-every", "1", "--checkpoint-dir", checkpoints,
                      "--results-dir", tmp_path / "r",
                      env=lab_env(LAB_FAULT="kind=oom,rank=1,step=6"))  # in epoch 2
    assert proc.returncode not in (0, 2)
    assert "Traceback" not in proc.stderr
    assert "04_ddp: oom on rank 1: out of memory at 8 images per device" in proc.stderr, \
        proc.stderr[-3000:]
    assert_oom_result(tmp_path / "r", failing_rank=1)
    # The epoch-1 checkpoint is whole (atomic write, nothing left behind) and is data.
    assert [p.name for p in files_in(checkpoints)] == ["epoch0001.pt"]
    state = torch.load(checkpoints / "epoch0001.pt", weights_only=True)
    assert state["epoch"] == 1


# --- 3. signals --------------------------------------------------------------------------

class Live:
    """A run started with Popen whose stderr (tqdm progress included) is read as it comes."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=lab_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.err = b""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while chunk := os.read(self.proc.stderr.fileno(), 4096):
            self.err += chunk

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.err:
            assert self.proc.poll() is None, self.err.decode()[-3000:]
            assert time.monotonic() < deadline, f"no {text!r} in {self.err[-2000:]!r}"
            time.sleep(0.05)

    def stop(self, signum, timeout: float = 20) -> tuple[int, float, str]:
        sent = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        time.sleep(0.2)  # let the reader thread drain the pipe
        return code, time.monotonic() - sent, self.err.decode(errors="replace")


def assert_interrupted_result(folder: Path) -> dict:
    (path,) = result_files(folder)
    loaded = load_result(path)
    assert loaded.ok, loaded.reason
    assert loaded.record["status"] == "interrupted"
    assert loaded.record["metrics"]["steps_measured"] > 0
    assert hidden_or_tmp(folder) == []
    return loaded.record


# SIGHUP (a terminal that closed) reaches a step the same way: tests/test_runner_signals.py
# sends it to the whole process group, runner and step, as a dropped SSH session does.
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_mid_run_writes_an_interrupted_result(tmp_path, signum, code):
    results = tmp_path / "r"
    run = Live([sys.executable, str(REPO / S02), *SMOKE, "--epochs", "50",
                "--results-dir", str(results)])
    run.wait_for("epoch 2/50")  # the 5 steps of epoch 1 are done: 3 measured
    returned, _, err = run.stop(signum, timeout=60)  # stopped within it, or the test fails
    assert returned == code, err[-3000:]
    assert "Traceback" not in err
    assert "02_baseline: interrupted" in err
    assert_interrupted_result(results)


def test_ctrl_c_to_the_nproc_launcher_stops_every_rank(tmp_path):
    """SIGINT to the launching process alone (``kill -INT``, a notebook's stop button):
    it passes the signal on instead of leaving the ranks to train on."""
    results = tmp_path / "r"
    run = Live([sys.executable, str(REPO / S04), *SMOKE, "--nproc", "2", "--epochs", "50",
                "--timeout-s", "10", "--results-dir", str(results)])
    run.wait_for("epoch 2/50")
    ranks = psutil.Process(run.proc.pid).children(recursive=True)
    returned, _, err = run.stop(signal.SIGINT, timeout=60)  # stopped within it, or fails
    assert returned == 130, err[-3000:]
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert alive == [], f"left over: {alive}"
    assert assert_interrupted_result(results)["world"]["world_size"] == 2


def test_sigterm_to_torchrun_stops_every_rank(tmp_path):
    results, checkpoints = tmp_path / "r", tmp_path / "ckpt"
    run = Live([*torchrun("--nproc_per_node=2"), str(REPO / S04), *SMOKE, "--epochs", "50",
                "--timeout-s", "10", "--checkpoint-every", "1", "--checkpoint-dir",
                str(checkpoints), "--results-dir", str(results)])
    run.wait_for("epoch 2/50")
    ranks = psutil.Process(run.proc.pid).children(recursive=True)
    assert len(ranks) >= 2
    returned, _, err = run.stop(signal.SIGTERM, timeout=60)  # stopped within it, or fails
    assert returned != 0
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert alive == [], f"left over: {alive}"
    record = assert_interrupted_result(results)
    assert record["world"]["world_size"] == 2
    assert hidden_or_tmp(checkpoints) == []  # a save cut short leaves nothing behind
    for path in checkpoints.glob("*.pt"):
        torch.load(path, weights_only=True)


# --- 4. a rank that dies or hangs under torchrun ------------------------------------------

def rank0_record(folder: Path) -> dict:
    (path,) = result_files(folder)
    loaded = load_result(path)
    assert loaded.ok, loaded.reason
    return loaded.record


def test_a_rank_that_exits_ends_the_job_and_torchrun_names_it(jobs):
    proc, results, took = jobs.get("exit")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert took < JOB_ENDS_WITHIN_S, output[-3000:]
    # torchrun's error summary names the failing rank and its exit status (13)
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", output), output[-3000:]
    assert re.search(r"exitcode\s*:\s*13\b", output), output[-3000:]
    record = rank0_record(results)
    assert record["status"] in ("failed", "interrupted")
    assert record["failure"]["reason"]


def test_a_hung_rank_times_out_instead_of_hanging_the_job(jobs):
    proc, results, took = jobs.get("hang")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert took < JOB_ENDS_WITHIN_S, output[-3000:]
    record = rank0_record(results)
    assert record["status"] == "failed"
    # rank 0 gave up on its own, at the process-group timeout, not killed by torchrun
    reason = record["failure"]["reason"]
    assert re.search(r"timed out|timeout", reason, re.I), reason
    assert record["failure"]["rank"] == 0
    assert record["metrics"]["steps_measured"] > 0


# --- 5. the results folder ----------------------------------------------------------------

def test_a_crash_leaves_a_valid_failed_result_and_no_temporary_file(tmp_path):
    results = tmp_path / "r"
    proc = run_script(S02, *SMOKE, "--results-dir", results,
                      env=lab_env(LAB_FAULT="kind=raise,step=3"))
    assert proc.returncode == 1
    assert "02_baseline: failed: RuntimeError: injected fault at step 3" in proc.stderr
    (path,) = result_files(results)
    record = json.loads(path.read_text())  # whole, valid JSON
    assert load_result(path).ok
    assert record["status"] == "failed"
    assert "injected fault" in record["failure"]["reason"]
    assert hidden_or_tmp(results) == []


def test_two_runs_at_once_into_one_folder_keep_both_results(jobs):
    codes, outputs, results = jobs.get("concurrent")
    assert codes == [0, 0], [err[-2000:] for _, err in outputs]
    files = result_files(results)
    assert len(files) == 2
    records = [load_result(p) for p in files]
    assert all(r.ok for r in records), [r.reason for r in records]
    assert {r.record["run_name"] for r in records} == {"same"}
    assert len({r.record["run_id"] for r in records}) == 2
    assert hidden_or_tmp(results) == []
    # each run printed its own file
    assert {p.name for p in files} == {
        Path(re.search(r"result\s+(\S+\.json)", out).group(1)).name for out, _ in outputs}


def test_report_skips_bad_files_and_never_unpickles(jobs, tmp_path):
    _, _, runs = jobs.get("concurrent")
    lab = tmp_path / "results"
    lab.mkdir()
    good = result_files(runs)[0]
    (lab / good.name).write_bytes(good.read_bytes())
    text = good.read_text()
    (lab / "truncated.json").write_text(text[: len(text) // 3])
    (lab / "garbage.json").write_bytes(bytes(range(256)) * 8)
    with open(lab / "huge.json", "wb") as handle:  # sparse: 21 MiB without the disk
        handle.write(b'{"schema_version": 1, "kind": "run", "pad": "')
        handle.truncate(21 * 2**20)
    marker = tmp_path / "UNPICKLED"
    torch.save({"model": Payload(marker)}, lab / "model.pt")
    (lab / "state.pkl").write_bytes(pickle.dumps(Payload(marker)))
    (lab / "pickled.json").write_bytes(pickle.dumps(Payload(marker)))
    report = tmp_path / "report.html"
    proc = run_script(S05, "--results-dir", lab, "--output-report", report)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()
    skipped = dict(re.findall(r"^skipped\s+(\S+): (.*)$", proc.stdout, re.M))
    assert set(skipped) == {"truncated.json", "garbage.json", "huge.json", "pickled.json"}
    assert "too large" in skipped["huge.json"]
    assert "not valid JSON" in skipped["truncated.json"]
    assert "runs     1 on 1 machine(s)" in proc.stdout
    html = report.read_text()
    for name in skipped:
        assert name in html
    assert "model.pt" not in html and "state.pkl" not in html
    assert hidden_or_tmp(tmp_path) == []
