"""Overlap, exposed communication, idle time and waiting, read from profiler traces
(labs/trace_analysis.py) built by hand, whose answers are known; and the recorder that
writes them (labs/profiling.py), when the profiler works and when it fails."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys

import pytest
import torch

from labs import profiling, trace_analysis as ta

MAIN, GLOO, GLOO2 = 1, 2, 3  # thread ids: the training thread, two gloo workers


def op(name: str, ts: float, dur: float, tid: int = MAIN, cat: str = "cpu_op") -> dict:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid, "cat": cat}


def cpu_step(start: float, *, forward: float, backward: float, reduces, after: float = 0.0,
             gap: float = 0.0) -> list[dict]:
    """One step as a CPU trace shows it (microseconds): forward, backward (two autograd
    nodes), ``reduces`` as (start, duration) from the step's start on gloo threads, then,
    after a ``gap`` in which the thread waits and records nothing, ``after`` (optimizer)."""
    b0 = start + forward
    events = [op("DistributedDataParallel.forward", start, forward),
              op(f"{ta.BACKWARD}: ConvolutionBackward0", b0, backward / 2),
              op(f"{ta.BACKWARD}: AddmmBackward0", b0 + backward / 2, backward / 2)]
    end = b0 + backward
    for k, (s, d) in enumerate(reduces):
        events.append(op("gloo:all_reduce", start + s, d, tid=(GLOO, GLOO2)[k % 2],
                         cat="user_annotation"))
    if after:
        events.append(op("Optimizer.step#SGD.step", end + gap, after))
        end += gap + after
    else:
        end = max([end, *(start + s + d for s, d in reduces)])
    events.append(op(ta.STEP_MARK, start, end - start, cat="user_annotation"))
    return events


def only(trace_events: list[dict]) -> dict:
    steps = ta.steps_of({"traceEvents": trace_events})
    assert len(steps) == 1
    return steps[0]


def test_no_overlap_every_microsecond_of_the_all_reduce_is_exposed():
    # backward ends at 300; the all-reduce runs 300-400 while the thread waits; then 50
    step = only(cpu_step(0, forward=100, backward=200, reduces=[(300, 100)], gap=100,
                         after=50))
    assert step["comm_s"] == pytest.approx(100e-6)
    assert step["overlap_pct"] == 0.0
    assert step["exposed_comm_s"] == pytest.approx(100e-6)
    assert step["idle_s"] == pytest.approx(0.0)
    assert step["backward_s"] == pytest.approx(200e-6)
    assert step["ready_s"] == pytest.approx(300e-6)


def test_full_overlap_backward_hides_all_of_it():
    step = only(cpu_step(0, forward=100, backward=200, reduces=[(150, 50), (220, 60)],
                         after=40))
    assert step["overlap_pct"] == pytest.approx(100.0)
    assert step["exposed_comm_s"] == pytest.approx(0.0)
    assert [b["start_ms"] for b in step["buckets"]] == pytest.approx([0.05, 0.12])
    assert [b["end_ms"] for b in step["buckets"]] == pytest.approx([0.1, 0.18])


def test_partial_overlap_and_idle_time():
    # all-reduce 250-350: 50 under backward (to 300), 50 alone; then 30 idle (gap 80,
    # of which the all-reduce covers 50), optimizer 20
    step = only(cpu_step(0, forward=100, backward=200, reduces=[(250, 100)], gap=80,
                         after=20))
    assert step["overlap_pct"] == pytest.approx(50.0)
    assert step["exposed_comm_s"] == pytest.approx(50e-6)
    assert step["idle_s"] == pytest.approx(30e-6)
    assert step["step_s"] == pytest.approx(400e-6)


def test_two_buckets_at_once_count_their_time_once():
    step = only(cpu_step(0, forward=100, backward=200, reduces=[(300, 100), (320, 100)],
                         gap=120, after=10))
    assert step["comm_s"] == pytest.approx(120e-6)  # 300-420, not 200
    assert step["exposed_comm_s"] == pytest.approx(120e-6)


def test_a_straggler_makes_the_others_wait():
    fast = ta.summarise({"traceEvents": cpu_step(0, forward=100, backward=200,
                                                 reduces=[(300, 400)], gap=400, after=10)})
    slow = ta.summarise({"traceEvents": cpu_step(0, forward=100, backward=500,
                                                 reduces=[(600, 100)], gap=100, after=10)})
    ranks = ta.add_waits([{"rank": 0, **fast}, {"rank": 1, **slow}])
    assert ranks[0]["wait_s"] == pytest.approx(300e-6)  # rank 1's gradients came 300 later
    assert ranks[1]["wait_s"] == 0.0
    # the fast rank's all-reduce sat exposed while it waited; the slow one's was short
    assert fast["exposed_comm_s"] == pytest.approx(400e-6)
    assert slow["exposed_comm_s"] == pytest.approx(100e-6)


def test_on_a_gpu_trace_kernels_decide_not_the_cpu_thread():
    """GPU traces: compute and communication are kernels (NCCL's on their own stream)."""
    events = [op("aten::conv2d", 0, 50),  # the launch on the CPU: not compute time here
              op(f"{ta.BACKWARD}: ConvolutionBackward0", 60, 20),
              op("sm80_xmma_gemm", 100, 300, tid=20, cat="kernel"),
              op("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 350, 100, tid=21, cat="kernel"),
              op(ta.STEP_MARK, 0, 500, cat="user_annotation")]
    step = only(events)
    assert step["compute_s"] == pytest.approx(300e-6)
    assert step["comm_s"] == pytest.approx(100e-6)
    assert step["overlap_pct"] == pytest.approx(50.0)
    assert len(step["buckets"]) == 1


def test_the_summary_takes_medians_and_a_bounded_timeline():
    events = []
    for i, backward in enumerate((200, 260, 230)):  # three steps, 1 ms apart
        events += cpu_step(i * 1000, forward=100, backward=backward,
                           reduces=[(100 + backward - 50, 100)], gap=50, after=10)
    summary = ta.summarise({"traceEvents": events})
    assert summary["steps"] == 3 and summary["communication_events"] == 3
    assert summary["backward_s"] == pytest.approx(230e-6)
    assert summary["overlap_pct"] == pytest.approx(50.0)
    many = [op("aten::add", k * 10, 5) for k in range(500)] + \
        [op(ta.STEP_MARK, 0, 5000, cat="user_annotation")]
    lanes = ta.timeline(ta.steps_of({"traceEvents": many})[0])
    assert 0 < len(lanes["compute"]) <= ta.TIMELINE_INTERVALS
    assert lanes["compute"][0][0] == 0.0 and lanes["compute"][-1][1] == pytest.approx(4.995)


def test_a_trace_without_a_profiled_step_gives_nothing():
    assert ta.summarise({"traceEvents": [op("aten::add", 0, 5)]}) is None
    assert ta.summarise({}) is None


def test_the_recorder_writes_a_trace_the_analysis_reads(tmp_path):
    model = torch.nn.Linear(8, 8)
    path = tmp_path / "traces" / "run_rank0.json"
    with profiling.Recorder(path, torch.device("cpu")) as recorder:
        for _ in range(2):
            with recorder.step():
                model(torch.randn(4, 8)).sum().backward()
    assert recorder.note is None and recorder.summary["steps"] == 2
    assert recorder.summary["trace_bytes"] == path.stat().st_size
    assert "traceEvents" in json.loads(path.read_text())
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no .part left


def test_a_profiler_that_fails_costs_the_trace_not_the_steps(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with profiling.Recorder(blocked / "traces" / "t.json", torch.device("cpu")) as recorder:
        ran = 0
        with recorder.step():
            ran += 1
    assert ran == 1 and recorder.summary is None
    assert recorder.note.startswith("The profiler could not start")

    def broken(self, path):
        open(path, "w").write("{half a trace")
        raise OSError("disk full")

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", broken)
    path = tmp_path / "traces" / "t.json"
    with profiling.Recorder(path, torch.device("cpu")) as recorder:
        with recorder.step():
            torch.ones(3).sum()
    assert recorder.summary is None and "disk full" in recorder.note
    assert list(path.parent.iterdir()) == []  # neither the trace nor its half


def test_a_result_with_a_malformed_trace_block_still_renders(tmp_path, real_run):
    """metrics.trace is free-form to the report: odd values cost a figure, never 05."""
    from test_report import make_run, write

    folder = tmp_path / "r"
    folder.mkdir()
    write(folder, "02.json", make_run(real_run, strategy="single", n=1, throughput=100.0))
    ddp = make_run(real_run, strategy="ddp", n=2, throughput=180.0)
    ddp["metrics"]["trace"] = [
        {"rank": 0, "overlap_pct": "most", "exposed_comm_s": None, "buckets": "two",
         "timeline": {"step_ms": "long", "compute": [["a", 1]], "comm": 5}},
        {"rank": "one", "overlap_pct": 40.0, "exposed_comm_s": 0.01, "timeline": None},
        "not an entry"]
    write(folder, "04.json", ddp)
    report = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, "05_performance_comparison.py", "--results-dir",
                           str(folder), "--output-report", str(report)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    page = report.read_text()
    assert "what the profiler saw" in page and "could not be drawn" in page
    assert "rank 0 n/a" in html.unescape(re.sub(r"<[^>]+>", " ", page)).replace("  ", " ")


def test_ddps_own_reducer_work_is_compute_and_counted_apart():
    # all-reduce 250-350, backward to 300, then the reducer 350-370, optimizer 380-420
    events = cpu_step(0, forward=100, backward=200, reduces=[(250, 100)], gap=80, after=40)
    events.append(op("torch::distributed::reducer::mul_out", 350, 20))
    step = only(events)
    assert step["reducer_s"] == pytest.approx(20e-6)
    assert step["exposed_comm_s"] == pytest.approx(50e-6)  # 300-350: the mul_out is after
    assert step["idle_s"] == pytest.approx(10e-6)  # 370-380: nothing ran
