"""Result files (labs/results.py): written atomically and never overwritten, read back
with a clear reason when they are not valid, and written with a status by ``Run.guard``
when a run ends in an exception, an interrupt or an out-of-memory error."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from labs import cli, distributed, files, results
from labs.compat import OutOfMemoryError
from labs.errors import UsageError
from labs.launcher_env import Ranks
from labs.measure import Meter
from labs.files import write_json_atomic
from labs.results import MAX_RESULT_BYTES, SCHEMA_VERSION, load_result

CPU = torch.device("cpu")
BATCH = 24  # distinctive, so a message that names it can be recognised


def make_args(results_dir: Path, *extra: str):
    return cli.parse_args("02_baseline", argv=["--preset", "smoke", "--batch-size", str(BATCH),
                                                "--results-dir", str(results_dir), *extra])


def make_run(results_dir: Path, *extra: str) -> results.Run:
    args = make_args(results_dir, *extra)
    config = results.config_from_args(
        args, per_device_batch_size=args.batch_size, global_batch_size=args.batch_size,
        steps_per_epoch=5, amp="off", lr=0.1, num_workers=0)
    return results.Run("02_baseline", args, strategy="single", config=config, devices=[CPU])


def measured_meter(steps: int = 4, warmup: int = 1, loss: float = 1.5) -> Meter:
    meter = Meter(CPU, warmup_steps=warmup, samples_per_step=BATCH)
    meter.start_epoch()
    for _ in range(steps):
        torch.ones(32, 32) @ torch.ones(32, 32)
        meter.end_step(0.001)
    meter.end_epoch(loss)
    return meter


def all_files(folder: Path) -> list[Path]:
    """Everything in the folder, hidden temporary files included."""
    return sorted(Path(folder).iterdir())


@pytest.fixture(scope="module")
def valid_record(tmp_path_factory) -> dict:
    """A valid run record, written and read back once for the module."""
    folder = tmp_path_factory.mktemp("valid")
    path = make_run(folder).write(measured_meter())
    return json.loads(path.read_text())


def write_record(folder: Path, record, name="r.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(record))
    return path


# --- writing -----------------------------------------------------------------------------

def test_run_write_round_trips_through_load_result(results_dir):
    run = make_run(results_dir, "--run-name", "round trip")
    meter = measured_meter(steps=4, warmup=1)
    path = run.write(meter)
    assert path.parent == results_dir
    assert all_files(results_dir) == [path]  # no temporary file left behind
    loaded = load_result(path)
    assert loaded.ok, loaded.reason
    record = loaded.record
    assert record == json.loads(path.read_text())
    assert record["schema_version"] == SCHEMA_VERSION
    assert record["kind"] == "run"
    assert record["lab"] == "02_baseline"
    assert record["status"] == "ok"
    assert record["run_name"] == "round trip"
    assert record["run_id"] == run.run_id
    assert record["finished_at"] is not None
    assert record["config"]["strategy"] == "single"
    assert record["config"]["model"] == "resnet18"
    assert record["config"]["per_device_batch_size"] == BATCH
    assert record["config"]["preset"] == "smoke"
    assert record["world"]["world_size"] == 1
    assert record["metrics"]["steps_measured"] == 3  # 4 steps, 1 warmup
    assert record["metrics"]["final_loss"] == pytest.approx(1.5)
    assert record["environment"]["torch"] == torch.__version__
    assert "failure" not in record


def test_two_writes_never_overwrite(results_dir):
    first = make_run(results_dir, "--run-name", "same").write(measured_meter())
    before = first.read_bytes()
    second = make_run(results_dir, "--run-name", "same").write(measured_meter())
    assert first != second
    assert sorted(results_dir.glob("*.json")) == sorted([first, second])
    assert first.read_bytes() == before
    assert load_result(first).ok and load_result(second).ok
    assert load_result(first).record["run_id"] != load_result(second).record["run_id"]


def test_write_json_atomic_leaves_no_temporary_file(tmp_path):
    path = write_json_atomic({"a": 1}, tmp_path / "x.json", overwrite=False)
    assert all_files(tmp_path) == [path]
    assert json.loads(path.read_text()) == {"a": 1}


def test_write_json_atomic_refuses_an_existing_name(tmp_path):
    target = tmp_path / "x.json"
    target.write_text('{"original": true}')
    with pytest.raises(FileExistsError):
        write_json_atomic({"new": True}, target, overwrite=False)
    assert json.loads(target.read_text()) == {"original": True}
    assert all_files(tmp_path) == [target]  # the temporary file was removed


def test_write_json_atomic_overwrite_replaces(tmp_path):
    target = tmp_path / "environment.json"
    target.write_text('{"old": 1}')
    write_json_atomic({"new": 2}, target, overwrite=True)
    assert json.loads(target.read_text()) == {"new": 2}
    assert all_files(tmp_path) == [target]


def test_nan_and_infinity_become_null(results_dir):
    meter = measured_meter(loss=float("nan"))
    path = make_run(results_dir).write(meter)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)
    assert record["metrics"]["final_loss"] is None
    assert record["metrics"]["loss_per_epoch"] == [None]
    assert load_result(path).ok
    assert results._json_safe({"a": [1.0, float("inf"), {"b": float("-inf")}], "c": 2}) == \
        {"a": [1.0, None, {"b": None}], "c": 2}


def test_a_run_that_measured_nothing_is_not_ok(results_dir):
    meter = measured_meter(steps=2, warmup=5)
    path = make_run(results_dir).write(meter)
    loaded = load_result(path)
    assert loaded.ok, loaded.reason
    assert loaded.record["status"] == "failed"
    assert loaded.record["metrics"]["throughput_img_s"] is None


# --- ensure_writable_dir ---------------------------------------------------------------------------

def test_ensure_writable_dir_creates_nested_folders(tmp_path):
    folder = files.ensure_writable_dir(tmp_path / "a" / "b")
    assert folder.is_dir()
    assert list(folder.iterdir()) == []  # the write test leaves nothing behind


def test_ensure_writable_dir_under_a_regular_file_is_a_usage_error(tmp_path):
    regular = tmp_path / "file.txt"
    regular.write_text("not a folder")
    with pytest.raises(UsageError, match="cannot write results"):
        files.ensure_writable_dir(regular / "results")
    with pytest.raises(UsageError):
        files.ensure_writable_dir(regular)


# --- reading: every way a file can be wrong -------------------------------------------------

def test_load_result_accepts_the_valid_record(tmp_path, valid_record):
    assert load_result(write_record(tmp_path, valid_record)).ok


def test_load_result_accepts_an_environment_file(tmp_path):
    path = write_record(tmp_path, {"schema_version": SCHEMA_VERSION, "kind": "environment"})
    assert load_result(path).ok


def _mutated(record, change):
    record = copy.deepcopy(record)
    change(record)
    return record


def _set_p10_above_median(r):
    r["metrics"]["throughput_img_s"]["p10"] = r["metrics"]["throughput_img_s"]["median"] * 2


BAD_RECORDS = {
    "list": (lambda r: [r], "not a JSON object"),
    "no schema_version": (lambda r: _mutated(r, lambda x: x.pop("schema_version")),
                          "no schema_version"),
    "future schema": (lambda r: _mutated(r, lambda x: x.update(schema_version=SCHEMA_VERSION + 1)),
                      "newer than this lab"),
    "unknown kind": (lambda r: _mutated(r, lambda x: x.update(kind="checkpoint")),
                     "unknown kind 'checkpoint'"),
    "missing metrics": (lambda r: _mutated(r, lambda x: x.pop("metrics")), "missing 'metrics'"),
    "p10 above median": (lambda r: _mutated(r, _set_p10_above_median), "p10 <= median <= p90"),
    "unknown status": (lambda r: _mutated(r, lambda x: x.update(status="great")),
                       "unknown status"),
    "unknown lab": (lambda r: _mutated(r, lambda x: x.update(lab="06_fsdp")), "unknown lab"),
    "world size 0": (lambda r: _mutated(r, lambda x: x["world"].update(world_size=0)),
                     "world_size"),
    "ok without throughput": (
        lambda r: _mutated(r, lambda x: x["metrics"].update(throughput_img_s=None)),
        "throughput_img_s"),
    "ok without devices": (lambda r: _mutated(r, lambda x: x["metrics"].update(per_device=[])),
                           "per_device"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_load_result_rejects_bad_records_with_a_reason(tmp_path, valid_record, case):
    make, expected = BAD_RECORDS[case]
    loaded = load_result(write_record(tmp_path, make(valid_record)))
    assert not loaded.ok
    assert loaded.record is None
    assert expected in loaded.reason


def test_load_result_rejects_truncated_json(tmp_path, valid_record):
    text = json.dumps(valid_record, indent=2)
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) // 2])  # a write cut short
    loaded = load_result(path)
    assert not loaded.ok
    assert "not valid JSON" in loaded.reason


def test_load_result_rejects_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01garbage")
    loaded = load_result(path)
    assert not loaded.ok
    assert "binary" in loaded.reason or "not valid JSON" in loaded.reason


def test_load_result_rejects_an_oversized_file_without_reading_it(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as handle:  # sparse: costs no disk and no time
        handle.truncate(MAX_RESULT_BYTES + 1)
    loaded = load_result(path)
    assert not loaded.ok
    assert "too large" in loaded.reason


def test_load_result_of_a_missing_file_says_unreadable(tmp_path):
    loaded = load_result(tmp_path / "gone.json")
    assert not loaded.ok
    assert "unreadable" in loaded.reason


@pytest.mark.parametrize("text", [
    "[" * 100_000,  # nesting deeper than the JSON decoder's recursion limit
    '{"schema_version": ' + "1" * 5_000 + "}",  # an integer past int's digit limit
], ids=["deeply-nested", "huge-integer"])
def test_load_result_never_raises_on_corrupt_json(tmp_path, text):
    # The report loads every file of the results folder with load_result; a corrupt file
    # must be skipped with a reason, not crash the report.
    path = tmp_path / "corrupt.json"
    path.write_text(text)
    loaded = load_result(path)
    assert not loaded.ok
    assert loaded.reason


# --- guard: every way a run can end still writes one valid file ------------------------------

def only_result(folder: Path) -> dict:
    files = all_files(folder)
    assert len(files) == 1, files
    loaded = load_result(files[0])
    assert loaded.ok, loaded.reason
    return loaded.record


def test_guard_writes_failed_and_reraises(results_dir):
    run = make_run(results_dir)
    meter = measured_meter()
    with pytest.raises(ValueError, match="boom"):
        with run.guard(meter):
            meter.start_epoch()
            meter.end_step(0.0)
            raise ValueError("boom")
    record = only_result(results_dir)
    assert record["status"] == "failed"
    assert "ValueError: boom" in record["failure"]["reason"]
    # the steps of the unfinished epoch were kept: 3 from the full epoch + 1
    assert record["metrics"]["steps_measured"] == 4


def test_guard_keyboard_interrupt_writes_interrupted_and_exits(results_dir):
    run = make_run(results_dir)
    meter = measured_meter()
    with pytest.raises(SystemExit) as exit_info:
        with run.guard(meter):
            raise KeyboardInterrupt
    assert exit_info.value.code not in (0, None)
    record = only_result(results_dir)
    assert record["status"] == "interrupted"
    assert record["metrics"]["steps_measured"] == 3


def test_guard_sigterm_writes_interrupted_and_restores_the_handler(results_dir):
    before = signal.getsignal(signal.SIGTERM)
    run = make_run(results_dir)
    meter = measured_meter()
    with pytest.raises(SystemExit) as exit_info:
        with run.guard(meter):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                torch.zeros(1)
    assert exit_info.value.code not in (0, None)
    assert only_result(results_dir)["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.compat
def test_guard_out_of_memory_writes_oom_with_advice(results_dir):
    run = make_run(results_dir)
    meter = measured_meter()
    with pytest.raises(SystemExit) as exit_info:
        with run.guard(meter):
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert exit_info.value.code not in (0, None)
    record = only_result(results_dir)
    assert record["status"] == "oom"
    reason = record["failure"]["reason"]
    assert "--grad-accum-steps" in reason
    assert str(BATCH) in reason
    assert "CUDA out of memory" in reason


def test_guard_interrupt_before_any_measured_step_is_still_a_valid_file(results_dir):
    run = make_run(results_dir)
    meter = Meter(CPU, warmup_steps=10, samples_per_step=BATCH)
    with pytest.raises(SystemExit):
        with run.guard(meter):
            meter.start_epoch()
            meter.end_step(0.0)
            raise KeyboardInterrupt
    record = only_result(results_dir)
    assert record["status"] == "interrupted"
    assert record["metrics"]["throughput_img_s"] is None


def test_guard_lets_usage_errors_through_without_writing(results_dir):
    run = make_run(results_dir)
    with pytest.raises(UsageError):
        with run.guard(measured_meter()):
            raise UsageError("bad input")
    assert all_files(results_dir) == []


def test_guard_without_an_exception_writes_nothing(results_dir):
    before = signal.getsignal(signal.SIGTERM)
    run = make_run(results_dir)
    with run.guard(measured_meter()):
        pass
    assert all_files(results_dir) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_non_writer_rank_writes_nothing(results_dir, monkeypatch):
    """Rank 1 of two sends its measurements to rank 0 and writes no file of its own (the
    collectives stood in for: no process group here)."""
    sent = []
    monkeypatch.setattr(distributed, "describe_world", lambda *a: {"world_size": 2})
    monkeypatch.setattr(distributed, "ddp_settings", lambda *a: {"backend": "gloo"})
    monkeypatch.setattr(distributed, "launch_notes", lambda *a: [])
    monkeypatch.setattr(distributed, "PeerReports", lambda rank, world_size: None)
    monkeypatch.setattr(distributed, "gather_to_rank0", lambda obj: sent.append(obj))
    ranks = Ranks(rank=1, local_rank=1, world_size=2, local_world_size=2, nnodes=1,
                  launcher="env", restart_count=0)
    run = results.Run("04_ddp", make_args(results_dir), strategy="ddp", config={},
                      devices=[CPU], ranks=ranks, backend="gloo", model=None, resumed=None)
    assert run.write(measured_meter()) is None
    assert all_files(results_dir) == []
    assert [summary["rank"] for summary in sent] == [1]
