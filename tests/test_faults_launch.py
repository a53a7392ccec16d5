"""Faults, round 2: a bad launch environment, numeric edges, a disk that fills up, a dying
rank 0 or launcher, and checkpoints with impossible contents. Every case runs the script
as a user would (a subprocess) and holds it to docs/guarantees.md: bad input is one line
and exit status 2, a fault leaves a result that says what happened, nothing hangs."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import psutil
import pytest
import torch

from conftest import REPO, lab_env, result_files, run_in_process, run_script
from labs import distributed
from labs.results import load_result
from test_faults import Live

SMOKE = ["--preset", "smoke"]
S02, S04 = "02_baseline_single_gpu.py", "04_ddp_training.py"
# A launch that waited for its process group would wait --timeout-s: far longer than
# the subprocess is given, so "ended in time" is "did not wait for the group at all".
PATIENT_GROUP = ["--timeout-s", "600"]
QUICK_EXIT_S = 120


def assert_one_line_exit_2(proc, *words: str) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, (proc.returncode, output[-3000:])
    assert "Traceback" not in output and "frame #" not in output, output[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- 1. the launch environment is checked, not trusted -------------------------------------

def _port_in_use():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


RANKED = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
          "MASTER_ADDR": "127.0.0.1"}
BAD_ENV = [  # (case, environment, words the one line must hold, run as a subprocess?)
    ("rank-not-a-number", {**RANKED, "RANK": "abc"}, ["RANK", "'abc'"], True),
    ("world-size-not-a-number", {**RANKED, "WORLD_SIZE": "two"}, ["WORLD_SIZE"], False),
    ("rank-outside-the-world", {**RANKED, "RANK": "5", "WORLD_SIZE": "2",
                                "LOCAL_WORLD_SIZE": "2"}, ["RANK=5", "WORLD_SIZE=2"], True),
    ("negative-local-rank", {**RANKED, "LOCAL_RANK": "-1"}, ["LOCAL_RANK"], False),
    ("local-world-size-not-a-number", {**RANKED, "LOCAL_WORLD_SIZE": "zz"},
     ["LOCAL_WORLD_SIZE"], False),
    ("port-out-of-range", {"MASTER_PORT": "99999"}, ["MASTER_PORT", "99999"], False),
    ("port-not-a-number", {"MASTER_PORT": "http"}, ["MASTER_PORT"], False),
    ("address-does-not-resolve", {"MASTER_ADDR": "no-such-host.invalid"},
     ["MASTER_ADDR", "does not resolve"], True),
    ("port-in-use", {"MASTER_PORT": "{busy}"}, ["rendezvous", "MASTER_PORT"], True),
    ("port-in-use-nproc", {"MASTER_PORT": "{busy}", "NPROC": "2"}, ["rendezvous"], True),
]


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    """The subprocess cases of this module, started together (they mostly wait for
    imports) while the tests run; each test waits only for its own."""
    base = tmp_path_factory.mktemp("round2")
    listener = _port_in_use()
    busy = str(listener.getsockname()[1])
    clean = {k: v for k, v in lab_env().items() if k not in RANKED and k != "MASTER_PORT"}

    def launch(case, env):
        env = {k: v.format(busy=busy) for k, v in env.items()}
        nproc = ["--nproc", env.pop("NPROC")] if "NPROC" in env else []
        return run_script(S04, *SMOKE, *PATIENT_GROUP, *nproc, "--results-dir",
                          base / case, env={**clean, **env}, timeout=QUICK_EXIT_S), base / case

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(launch, case, env)
                   for case, env, _, subprocess_ in BAD_ENV if subprocess_}
        futures["checkpoints"] = pool.submit(_checkpoint_cases, base / "ckpt")
        yield futures
    listener.close()


@pytest.mark.parametrize("case, env, words, in_subprocess", BAD_ENV,
                         ids=[c for c, *_ in BAD_ENV])
def test_a_bad_launch_environment_is_one_line_and_exit_2(background, tmp_path, case, env,
                                                         words, in_subprocess):
    if in_subprocess:
        proc, results = background[case].result()
    else:  # the same check, without the seconds of a new interpreter
        results = tmp_path / "r"
        with mock.patch.dict(os.environ, env):
            proc = run_in_process(S04, [*SMOKE, "--results-dir", str(results)])
    assert_one_line_exit_2(proc, *words)
    assert result_files(results) == []


# --- 2. numeric edges -----------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"),
                                         ("--timeout-s", "inf"), ("--bucket-cap-mb", "-inf")])
def test_non_finite_numbers_are_refused(flag, value):
    from labs import cli
    from labs.errors import UsageError

    with pytest.raises(UsageError, match=flag):
        cli.parse_args("04_ddp", argv=["--preset", "smoke", flag, value])


def test_an_infinite_learning_rate_is_refused_by_the_script(results_dir):
    proc = run_script(S02, *SMOKE, "--lr", "inf", "--results-dir", results_dir)
    assert_one_line_exit_2(proc, "--lr", "finite")
    assert result_files(results_dir) == []


def test_an_image_size_no_memory_holds_is_one_line_not_a_traceback(results_dir):
    proc = run_script(S02, *SMOKE, "--img-size", "200000", "--results-dir", results_dir)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "out of memory" in line and "--img-size" in line
    assert result_files(results_dir) == []


# --- 3. the disk fills up, or is full from the start ----------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as handle:
        try:
            while True:
                handle.write(bytes(1 << 16))
        except OSError:
            pass


def test_a_full_disk_is_found_before_training_even_though_empty_files_still_fit(small_disk):
    fill(small_disk)
    (small_disk / "empty").touch()  # creating a file still works on a full disk
    proc = run_script(S02, *SMOKE, "--results-dir", small_disk / "results")
    assert_one_line_exit_2(proc, "cannot write results", "No space left")


def test_a_disk_that_fills_during_the_run_keeps_the_metrics(small_disk):
    results = small_disk / "results"
    run = Live([sys.executable, str(REPO / S02), *SMOKE, "--epochs", "12",
                "--run-name", f"full-{uuid.uuid4().hex[:6]}", "--results-dir", str(results)])
    run.wait_for("epoch 2/12")
    fill(small_disk)
    code = run.proc.wait(timeout=QUICK_EXIT_S)
    err = run.err.decode(errors="replace")
    assert code == 1, err[-3000:]
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if "cannot write the result" in line)
    assert str(results) in line and "No space left" in line
    saved = Path(line.split("saved it to ")[1].split(" instead")[0])
    try:
        loaded = load_result(saved)
        assert loaded.ok and loaded.record["status"] == "ok", loaded.reason
        assert loaded.record["metrics"]["steps_measured"] > 0
    finally:
        saved.unlink(missing_ok=True)
    assert [p for p in results.iterdir()] == []  # no half-written or hidden file


# --- 4. rank 0 or the launcher dies ----------------------------------------------------------

def _ranks_of(launcher: psutil.Process) -> list[psutil.Process]:
    """The --nproc ranks of a launcher, rank 0 first (spawned in rank order)."""
    ranks = [c for c in launcher.children() if "spawn_main" in " ".join(c.cmdline())]
    return sorted(ranks, key=lambda c: c.create_time())


def _two_ranks_training(results: Path) -> tuple[Live, list[psutil.Process]]:
    """`04 --nproc 2` well into a long run: the launcher and its ranks, rank 0 first."""
    run = Live([sys.executable, str(REPO / S04), *SMOKE, "--nproc", "2", "--epochs", "50",
                "--timeout-s", "20", "--results-dir", str(results)])
    run.wait_for("epoch 2/50")
    return run, _ranks_of(psutil.Process(run.proc.pid))


def test_a_killed_rank_0_is_recorded_by_rank_1(tmp_path):
    results = tmp_path / "r"
    run, ranks = _two_ranks_training(results)
    ranks[0].kill()
    code = run.proc.wait(timeout=QUICK_EXIT_S)
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert alive == []
    err = run.err.decode(errors="replace")
    assert code == 128 + signal.SIGKILL, err[-3000:]
    assert "frame #" not in err and "Traceback" not in err, err[-3000:]
    assert "rank 0 was killed by SIGKILL" in err and "OOM killer" in err
    (path,) = result_files(results)
    record = load_result(path).record
    assert record["status"] == "failed"
    assert record["failure"]["rank"] == 0
    assert "rank 0" in record["failure"]["reason"] and "rank 1 recorded" in \
        record["failure"]["reason"]
    assert record["metrics"]["steps_measured"] > 0  # rank 1's own measurements


def _peers_of_rank_1(rank_0_pid: int) -> distributed.PeerReports:
    peers = object.__new__(distributed.PeerReports)  # no process group: places by hand
    peers.rank, peers.world_size = 1, 2
    peers.processes = [distributed._Process(socket.gethostname(), rank_0_pid,
                                            psutil.Process(rank_0_pid).create_time()),
                       distributed._Process.this()]
    return peers


def test_rank_1_gives_a_dying_rank_0_a_moment_to_be_marked_dead():
    """A SIGKILLed rank's sockets close a moment before the kernel marks it dead. Rank 1,
    its collective broken, asked once in that moment, took rank 0 for alive and left the
    run unrecorded (once in a suite run). Here rank 0 ends a moment after the question."""
    dying = subprocess.Popen(["sleep", "0.3"])
    try:
        assert _peers_of_rank_1(dying.pid).writer_lost() == 0
    finally:
        dying.kill()
        dying.wait()
    alive = subprocess.Popen(["sleep", "600"])
    try:
        assert _peers_of_rank_1(alive.pid).writer_lost() is None  # alive: not rank 1's job
    finally:
        alive.kill()
        alive.wait()


def test_a_killed_launcher_is_not_recorded_as_ctrl_c(tmp_path):
    results = tmp_path / "r"
    run, ranks = _two_ranks_training(results)
    run.proc.kill()
    _, alive = psutil.wait_procs(ranks, timeout=QUICK_EXIT_S)
    assert alive == []
    (path,) = result_files(results)
    record = load_result(path).record
    assert record["status"] == "failed"
    assert "launcher" in record["failure"]["reason"]
    assert "Ctrl-C" not in record["failure"]["reason"]


# --- 5. checkpoints with impossible contents ------------------------------------------------

CHECKPOINTS = [("negative.pt", ["-1"]), ("beyond.pt", ["99"]), ("fraction.pt", ["1.5"]),
               ("plain.pkl", ["not a readable checkpoint"])]


def _checkpoint_cases(folder: Path) -> dict:
    """A real checkpoint after the run's last epoch, copies with impossible epochs and a
    pickle that is no checkpoint; then 04 resumed from each."""
    proc = run_script(S04, *SMOKE, "--checkpoint-every", "2", "--checkpoint-dir", folder,
                      "--results-dir", folder / "results")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(folder / "epoch0002.pt", weights_only=True)
    for name, epoch in (("negative", -1), ("beyond", 99), ("fraction", 1.5)):
        torch.save({**state, "epoch": epoch}, folder / f"{name}.pt")
    with open(folder / "plain.pkl", "wb") as handle:
        pickle.dump({"epoch": 1, "weights": [1.0, 2.0]}, handle)
    runs = {}
    for name in [n for n, _ in CHECKPOINTS] + ["epoch0002.pt"]:
        results = folder / f"results-{name}"
        runs[name] = run_script(S04, *SMOKE, "--resume", folder / name, "--results-dir",
                                results), results
    return runs


@pytest.mark.parametrize("name, words", CHECKPOINTS, ids=[n for n, _ in CHECKPOINTS])
def test_a_checkpoint_with_impossible_contents_is_one_line(background, name, words):
    proc, results = background["checkpoints"].result()[name]
    assert_one_line_exit_2(proc, "--resume", *words)
    assert result_files(results) == []


def test_resuming_a_finished_run_says_so_and_writes_nothing(background):
    proc, results = background["checkpoints"].result()["epoch0002.pt"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already finished all 2 epochs" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert result_files(results) == []
