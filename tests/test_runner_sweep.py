"""Issue 22: the scaling sweep of `python -m labs run` (--world-sizes, --scaling), and the
--scaling label of steps 03 and 04, recorded as config.scaling. Plans only: nothing trains."""

from __future__ import annotations

import shlex

import pytest

from conftest import REPO, run_script
from labs import cli, runner
from labs.errors import UsageError
from test_runner import lab_run


def plan_for(*argv: str, gpu_count: int):
    """The plan `python -m labs run ARGV` would run on a machine with this many GPUs."""
    return runner.build_plan(runner.parse_args(list(argv)), gpu_count)


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def runs_of(plan, step: str) -> list:
    return [c for c in plan.commands if c.step == step]


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)


# --- the CPU ---------------------------------------------------------------------------------

def test_the_default_cpu_plan_is_unchanged_by_the_sweep(two_cores):
    """The whole-lab test's run time rests on it: 04 once, with 2 processes, unlabelled."""
    def script(name: str) -> str:
        return shlex.quote(str(REPO / name))

    plan = plan_for(gpu_count=0)
    smoke = "--data shapes --results-dir results --preset smoke"
    assert [c.display() for c in plan.commands] == [
        f"python {script('01_environment_check.py')} --results-dir results",
        f"python {script('02_baseline_single_gpu.py')} --device cpu {smoke}",
        f"python {script('03_dataparallel_training.py')} {smoke}",
        f"python {script('04_ddp_training.py')} --nproc 2 --device cpu {smoke}",
        f"python {script('05_performance_comparison.py')} --results-dir results "
        f"--generate-plots --output-report comparison_report.html"]
    assert not any("sweep" in note or "DataParallel" in note for note in plan.notes)
    assert any("04 uses 2 processes over gloo" in note for note in plan.notes)


def test_a_cpu_sweep_runs_04_at_each_size_in_both_modes(two_cores):
    plan = plan_for("--world-sizes", "2,1", "--scaling", "both", gpu_count=0)
    ddp = [(option(c.argv, "--nproc"), option(c.argv, "--scaling"),
            option(c.argv, "--batch-size")) for c in runs_of(plan, "04")]
    # one process: weak and strong are one run; strong splits smoke's 32 over 2 ranks
    assert ddp == [("1", "weak", None), ("2", "weak", None), ("2", "strong", "16")]
    (dp,) = runs_of(plan, "03")  # DataParallel needs GPUs: no sweep for it on the CPU
    assert "--scaling" not in dp.argv and "--gpus" not in dp.argv
    assert any(note.startswith("DataParallel needs GPUs") for note in plan.notes)
    assert "Scaling sweep: world sizes 1 and 2 in weak and strong scaling (3 runs of 04)." \
        in plan.notes


@pytest.mark.parametrize("preset, split", [("smoke", "16"), ("cpu", "16"), ("full", "32")])
def test_cpu_strong_scaling_splits_the_batch_the_preset_gives_shapes(two_cores, preset,
                                                                     split):
    plan = plan_for("--preset", preset, "--scaling", "strong", gpu_count=0)
    (ddp,) = runs_of(plan, "04")
    assert option(ddp.argv, "--batch-size") == split
    assert option(ddp.argv, "--scaling") == "strong"  # not the default: said
    (baseline,) = runs_of(plan, "02")
    assert "--batch-size" not in baseline.argv  # 02 keeps the preset's batch: the global one


def test_preset_value_resolves_as_the_steps_do():
    assert cli.preset_value("batch_size", "smoke", "shapes") == 32
    assert cli.preset_value("batch_size", "smoke", None) == 8
    assert cli.preset_value("batch_size", None, None) == cli.DEFAULTS["batch_size"]
    for preset in cli.PRESETS:
        args = cli.parse_args("04_ddp", argv=["--preset", preset, "--data", "shapes"],
                              torch_checks=False)
        for name in cli.DEFAULTS:
            assert getattr(args, name) == cli.preset_value(name, preset, "shapes"), name


# --- GPUs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("gpus, sizes", [(0, [2]), (1, [1]), (2, [1, 2]), (4, [1, 2, 4]),
                                         (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8])])
def test_default_world_sizes(gpus, sizes):
    assert runner.default_world_sizes(gpus) == sizes


def test_four_gpus_sweep_weak_scaling_by_default():
    plan = plan_for(gpu_count=4)
    steps = [c.step for c in plan.commands]
    assert steps == ["01", "02", "02", "03", "03", "03", "04", "04", "04", "05"]
    dp = [(option(c.argv, "--gpus"), option(c.argv, "--batch-size"),
           option(c.argv, "--scaling")) for c in runs_of(plan, "03")]
    assert dp == [("0", "64", "weak"), ("0,1", "128", "weak"), ("0,1,2,3", "256", "weak")]
    ddp = runs_of(plan, "04")
    assert [c.argv[c.argv.index("torch.distributed.run") + 2] for c in ddp] == \
        ["--nproc_per_node=1", "--nproc_per_node=2", "--nproc_per_node=4"]
    assert {option(c.argv, "--batch-size") for c in ddp} == {"64"}
    assert all(option(c.argv, "--scaling") == "weak" and option(c.argv, "--amp") == "auto"
               for c in ddp)
    # torchrun's ranks take the visible GPUs in order: smaller sizes see only theirs
    assert [c.env for c in ddp] == [{"CUDA_VISIBLE_DEVICES": "0"},
                                    {"CUDA_VISIBLE_DEVICES": "0,1"}, {}]
    assert "Scaling sweep: world sizes 1, 2 and 4 in weak scaling (3 runs each of 03 and 04)." \
        in plan.notes


def test_eight_gpus_in_both_modes_keep_or_split_the_batch_of_64():
    plan = plan_for("--scaling", "both", gpu_count=8)
    dp = [(option(c.argv, "--gpus").count(",") + 1, option(c.argv, "--scaling"),
           option(c.argv, "--batch-size")) for c in runs_of(plan, "03")]  # a global batch
    assert dp == [(1, "weak", "64"), (2, "weak", "128"), (2, "strong", "64"),
                  (4, "weak", "256"), (4, "strong", "64"), (8, "weak", "512"),
                  (8, "strong", "64")]
    ddp = [(option(c.argv, "--scaling"), option(c.argv, "--batch-size"))
           for c in runs_of(plan, "04")]  # per process
    assert ddp == [("weak", "64"), ("weak", "64"), ("strong", "32"), ("weak", "64"),
                   ("strong", "16"), ("weak", "64"), ("strong", "8")]
    assert [c.env.get("CUDA_VISIBLE_DEVICES") for c in runs_of(plan, "04")][-2:] == \
        [None, None]  # all eight: nothing to pin
    # the baselines are the one-device point of both curves: unlabelled, as before
    assert all("--scaling" not in c.argv for c in runs_of(plan, "02"))


def test_a_subset_of_gpus_is_swept_on_its_first_gpus():
    plan = plan_for("--gpus", "2,3", "--world-sizes", "1,2", gpu_count=4)
    assert [option(c.argv, "--gpus") for c in runs_of(plan, "03")] == ["2", "2,3"]
    assert [c.env for c in runs_of(plan, "04")] == [{"CUDA_VISIBLE_DEVICES": "2"},
                                                    {"CUDA_VISIBLE_DEVICES": "2,3"}]


def test_one_gpu_and_a_single_weak_run_keep_todays_commands():
    for plan in (plan_for(gpu_count=1), plan_for("--world-sizes", "4", gpu_count=4)):
        assert not any("--scaling" in c.argv for c in plan.commands)
        assert not any("sweep" in note for note in plan.notes)


def test_from_a_step_still_skips_the_earlier_ones():
    plan = plan_for("--from", "04", "--world-sizes", "1,2", gpu_count=4)
    assert [c.step for c in plan.commands] == ["04", "04", "05"]


# --- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, gpu_count, says", [
    (["--world-sizes", "1,8"], 4, "--world-sizes 1,8: 8 devices but 4 GPU(s) on this machine"),
    (["--gpus", "0,1", "--world-sizes", "4"], 4, "4 devices but 2 GPU(s) selected with --gpus"),
    (["--world-sizes", "1,4"], 0, "--world-sizes 1,4: 4 ranks but this machine has 2 CPU "
                                  "cores; each rank needs one"),
    (["--world-sizes", "3", "--scaling", "strong"], 4, "--scaling strong: the global batch 64 "
     "does not split evenly over 3 devices; use world sizes that divide it, e.g. "
     "--world-sizes 1,2,4"),
    (["--scaling", "both"], 6, "does not split evenly over 6 devices"),
])
def test_world_sizes_the_hardware_or_the_batch_cannot_take_are_refused(two_cores, argv,
                                                                       gpu_count, says):
    with pytest.raises(UsageError) as refusal:
        plan_for(*argv, gpu_count=gpu_count)
    assert says in str(refusal.value) and "\n" not in str(refusal.value)


def test_weak_scaling_takes_any_size_the_hardware_holds():
    plan = plan_for("--world-sizes", "3", gpu_count=4)
    assert [option(c.argv, "--batch-size") for c in runs_of(plan, "03")] == ["192"]


@pytest.mark.parametrize("argv, says", [
    (["--world-sizes", "0"], "--world-sizes 0: expected distinct positive numbers"),
    (["--world-sizes", "a"], "--world-sizes a: expected distinct positive numbers"),
    (["--world-sizes", "1,1"], "--world-sizes 1,1: expected distinct positive numbers"),
    (["--world-sizes", "4096"], "--world-sizes 4096: 4096 "),  # no machine has that many
    (["--scaling", "sideways"], "invalid choice: 'sideways'"),
    (["--profile-steps", "21"], "--profile-steps: at most 20 steps, got 21"),
])
def test_bad_sweep_options_are_one_line_and_exit_2(tmp_path, argv, says):
    proc = lab_run(*argv, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-500:] + proc.stderr[-1000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("python -m labs run: error: ") and says in line
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


# --- the label on 03 and 04 ----------------------------------------------------------------

@pytest.mark.parametrize("lab", ["03_dataparallel", "04_ddp"])
def test_03_and_04_take_a_scaling_label_weak_by_default(lab):
    def scaling(*argv: str) -> str:
        return cli.parse_args(lab, argv=["--preset", "smoke", *argv], torch_checks=False).scaling

    assert scaling() == "weak"
    assert scaling("--scaling", "strong") == "strong"
    assert scaling("--preset", "cpu", "--scaling", "strong", "--batch-size", "7") == "strong"
    with pytest.raises(UsageError, match="--scaling: invalid choice"):
        scaling("--scaling", "both")  # the runner's word; one run is one or the other


def test_02_has_no_scaling_option():
    with pytest.raises(UsageError, match="unrecognized arguments: --scaling"):
        cli.parse_args("02_baseline", argv=["--scaling", "weak"], torch_checks=False)


def test_a_bad_scaling_label_is_one_line_and_exit_2():
    proc = run_script("03_dataparallel_training.py", "--scaling", "sideways")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "--scaling: invalid choice: 'sideways'" in line


def test_the_result_config_records_the_label_and_null_for_02():
    from labs import results  # torch: only for this test

    def config(lab: str, *argv: str) -> dict:
        args = cli.parse_args(lab, argv=["--preset", "smoke", *argv], torch_checks=False)
        return results.config_from_args(args, per_device_batch_size=8, global_batch_size=8,
                                        steps_per_epoch=5, amp="off", lr=0.1, num_workers=0)

    assert config("02_baseline")["scaling"] is None  # the one-device point of both curves
    assert config("03_dataparallel")["scaling"] == "weak"
    assert config("04_ddp", "--scaling", "strong")["scaling"] == "strong"


def test_profile_steps_reach_every_04_run_and_nothing_else(two_cores):
    plan = plan_for("--world-sizes", "1,2", "--scaling", "both", "--profile-steps", "3",
                    gpu_count=0)
    assert [option(c.argv, "--profile-steps") for c in runs_of(plan, "04")] == ["3"] * 3
    assert all("--profile-steps" not in c.argv for c in plan.commands if c.step != "04")
    plain = plan_for(gpu_count=8)
    assert all("--profile-steps" not in c.argv for c in plain.commands)
    assert option(runs_of(plan_for("--profile-steps", "2", gpu_count=8), "04")[-1].argv,
                  "--profile-steps") == "2"
