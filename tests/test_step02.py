"""Step 02 end to end, as a user runs it: `python 02_baseline_single_gpu.py ...`.

Every run is a subprocess. They are started together by one module-scoped fixture, two at
a time on a 2-core machine, and each test waits only for the run it checks.
"""

from __future__ import annotations

import os
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import run_script
from test_data import make_image_folder
from labs import envinfo
from labs.results import load_result

SCRIPT = "02_baseline_single_gpu.py"
TIMEOUT_S = 60

# Runs that must succeed: case -> arguments (--results-dir is added to each).
GOOD = {
    "smoke": ["--preset", "smoke"],
    "fake-1-worker": ["--preset", "smoke", "--data", "fake", "--num-workers", "1"],
    "bf16-channels-last": ["--preset", "smoke", "--amp", "bf16", "--channels-last"],
    "grad-accum-2": ["--preset", "smoke", "--grad-accum-steps", "2"],
    # 3 classes of 8 files; the first 16 in class order would be classes a and b only
    "image-folder-subset": ["--preset", "smoke", "--data", "imagefolder", "--num-classes", "3",
                            "--dataset-size", "16", "--no-eval"],
}

GPU_VISIBLE = bool(os.environ.get("LAB_TEST_CUDA_VISIBLE_DEVICES"))
UNWRITABLE = "<a path under a regular file>"

# Runs that must be refused: (case, arguments, words the one error line must contain).
BAD = [
    ("batch-size-0", ["--batch-size", "0"], "--batch-size"),
    ("epochs-negative", ["--epochs", "-1"], "--epochs"),
    ("unknown-model", ["--model", "not_a_model"], "not_a_model"),
    ("imagefolder-without-dir", ["--data", "imagefolder"], "--data-dir"),
    ("missing-data-dir", ["--data-dir", "/nonexistent", "--data", "imagefolder"],
     "/nonexistent"),
    ("amp-fp8", ["--amp", "fp8"], "--amp"),
    ("device-cuda", ["--device", "cuda"], "--device cuda"),
    ("device-cuda-7", ["--device", "cuda:7"], "cuda:7"),
    ("warmup-too-long", ["--warmup-steps", "1000"], "--warmup-steps 1000"),
    ("num-workers-negative", ["--num-workers", "-2"], "--num-workers"),
    ("unwritable-results-dir", [], "cannot write results"),
    ("unknown-flag", ["--bogus-flag", "3"], "--bogus-flag"),
]
BAD_ARGS = {case: argv for case, argv, _ in BAD}


def _argv(case: str, results_dir: Path) -> list[str]:
    if case in GOOD:
        return GOOD[case] + ["--results-dir", str(results_dir)]
    # Every refused run is otherwise a smoke run, so the flag under test is the only
    # thing wrong with it.
    return ["--preset", "smoke", *BAD_ARGS[case], "--results-dir", str(results_dir)]


class Runs:
    def __init__(self, base: Path, cases: list[str]):
        self.base = base
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.futures = {}
        for case in cases:
            self.submit(case)

    def submit(self, case: str):
        if case not in self.futures:
            folder = self.base / case
            folder.mkdir()
            results_dir = folder / "results"  # not created: the script must create it
            if case == "unwritable-results-dir":
                (folder / "a-file").write_text("not a folder")
                results_dir = folder / "a-file" / "results"
            argv = _argv(case, results_dir)
            if case == "image-folder-subset":
                images = make_image_folder(folder / "images", ("a", "b", "c"), per_class=8)
                argv += ["--data-dir", str(images)]
            future = self.pool.submit(run_script, SCRIPT, *argv, timeout=TIMEOUT_S)
            self.futures[case] = (future, results_dir, argv)
        return self.futures[case]

    def get(self, case: str):
        """(CompletedProcess, results folder, arguments) of a case, once it has finished."""
        future, results_dir, argv = self.submit(case)
        return future.result(), results_dir, argv


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    # Start every case the selected tests of this module need, longest first.
    here = Path(__file__).resolve()
    wanted = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if Path(str(item.path)).resolve() == here and params.get("case") not in wanted:
            if params.get("case"):
                wanted.append(params["case"])
    wanted.sort(key=lambda case: case not in GOOD)
    runs = Runs(tmp_path_factory.mktemp("step02"), wanted)
    yield runs
    runs.pool.shutdown(wait=True, cancel_futures=True)


def files_in(folder: Path) -> list[Path]:
    """Everything in the folder, hidden temporary files included."""
    return sorted(folder.iterdir()) if folder.is_dir() else []


def ok_record(runs: Runs, case: str) -> tuple[dict, Path, object]:
    proc, results_dir, _ = runs.get(case)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = files_in(results_dir)
    assert len(files) == 1, files
    loaded = load_result(files[0])
    assert loaded.ok, loaded.reason
    return loaded.record, files[0], proc


# --- runs that work ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(GOOD))
def test_run_writes_one_valid_ok_result(runs, case):
    record, _, _ = ok_record(runs, case)
    assert record["status"] == "ok"
    assert record["lab"] == "02_baseline"
    assert record["world"]["world_size"] == 1
    assert len(record["world"]["devices"]) == 1
    cfg, metrics = record["config"], record["metrics"]
    assert cfg["strategy"] == "single"
    tp = metrics["throughput_img_s"]
    assert 0 < tp["p10"] <= tp["median"] <= tp["p90"]
    assert tp["mean"] > 0
    assert 0 < metrics["step_time_s"]["p10"] <= metrics["step_time_s"]["median"] \
        <= metrics["step_time_s"]["p90"]
    # Warmup recorded and excluded: every step of the run but the warmup steps is measured.
    assert metrics["warmup_steps"] == cfg["warmup_steps"] > 0
    assert metrics["steps_measured"] == cfg["epochs"] * cfg["steps_per_epoch"] \
        - cfg["warmup_steps"] > 0
    assert len(metrics["epoch_time_s"]) == cfg["epochs"]
    assert len(metrics["loss_per_epoch"]) == cfg["epochs"]
    assert isinstance(cfg["per_device_batch_size"], int)
    assert isinstance(cfg["global_batch_size"], int)
    assert metrics["global_samples_per_step"] == cfg["global_batch_size"]


@pytest.mark.parametrize("case", ["smoke"])
def test_smoke_run_records_config_environment_and_command(runs, case):
    record, _, _ = ok_record(runs, case)
    _, results_dir, argv = runs.get(case)
    cfg = record["config"]
    assert cfg["preset"] == "smoke"
    assert cfg["per_device_batch_size"] == cfg["global_batch_size"] > 0
    assert cfg["amp"] == "off"  # auto on the CPU
    assert cfg["channels_last"] is False
    env = record["environment"]
    for key in ("host", "cpu_count", "ram_bytes", "python", "torch", "torchvision"):
        assert env[key], key
    command = shlex.split(record["command"])
    assert any(Path(part).name == SCRIPT for part in command)
    assert "--preset smoke" in record["command"]
    assert command[-len(argv):] == argv  # the command reproduces the run
    assert record["started_at"] <= record["finished_at"]
    assert cfg["threads_per_process"] == 1  # OMP_NUM_THREADS=1 in the tests' environment


@pytest.mark.parametrize("case", ["smoke"])
def test_smoke_run_prints_a_summary(runs, case):
    _, path, proc = ok_record(runs, case)
    assert "img/s" in proc.stdout
    assert str(path) in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["fake-1-worker"])
def test_fake_data_with_a_worker(runs, case):
    record, _, _ = ok_record(runs, case)
    assert record["config"]["data"] == "fake"
    assert record["config"]["num_workers"] == 1


@pytest.mark.parametrize("case", ["bf16-channels-last"])
def test_bf16_and_channels_last_are_recorded(runs, case):
    record, _, _ = ok_record(runs, case)
    assert record["config"]["amp"] == "bf16"
    assert record["config"]["channels_last"] is True


@pytest.mark.parametrize("case", ["grad-accum-2"])
def test_grad_accumulation_doubles_the_global_batch(runs, case):
    record, _, _ = ok_record(runs, case)
    cfg = record["config"]
    assert cfg["grad_accum_steps"] == 2
    assert cfg["global_batch_size"] == 2 * cfg["per_device_batch_size"]
    assert record["metrics"]["global_samples_per_step"] == cfg["global_batch_size"]


@pytest.mark.parametrize("case", ["image-folder-subset"])
def test_a_dataset_size_subset_of_an_image_folder_covers_every_class(runs, case):
    record, _, _ = ok_record(runs, case)
    assert record["config"]["train_set"] == {"images": 16, "classes": 3}


@pytest.mark.parametrize("case", ["smoke"])
def test_generated_data_records_its_size_and_no_classes(runs, case):
    record, _, _ = ok_record(runs, case)
    assert record["config"]["train_set"] == {"images": record["config"]["dataset_size"],
                                             "classes": None}


# --- runs that must be refused -----------------------------------------------------------------

def _bad_params():
    for case, _, expected in BAD:
        marks = []
        if case == "device-cuda" and GPU_VISIBLE:
            marks.append(pytest.mark.skip(reason="a GPU is visible to the children"))
        yield pytest.param(case, expected, id=case, marks=marks)


@pytest.mark.parametrize("case, expected", list(_bad_params()))
def test_bad_usage_exits_2_with_one_line_and_writes_nothing(runs, case, expected):
    proc, results_dir, _ = runs.get(case)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{SCRIPT}: error: ")
    assert expected in lines[0]
    assert files_in(results_dir) == []  # no result, no temporary file



def test_the_device_named_by_device_becomes_the_current_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert envinfo.select_device("cuda:3") == torch.device("cuda", 3)
    assert chosen == [torch.device("cuda", 3)]  # AMP's checks and pinning use GPU 3 now
    assert envinfo.select_device("cpu") == torch.device("cpu")
    assert chosen == [torch.device("cuda", 3)]  # the CPU sets nothing


@pytest.mark.compat
def test_a_cpu_run_with_nvml_installed_notes_that_nvml_saw_no_gpu(runs):
    pytest.importorskip("pynvml")  # nvidia-ml-py, in the dev extra
    if GPU_VISIBLE:
        pytest.skip("a GPU is visible to the children")
    record, _, _ = ok_record(runs, "smoke")  # a CPU run: no GPU visible, --device auto
    assert record["status"] == "ok"
    assert any("NVML saw no GPU" in note for note in record["notes"])
