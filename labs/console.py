"""What a step prints: the one-screen summary at the end of a run."""

from __future__ import annotations

import os
import sys

from labs.fmt import gib


def print_summary(record: dict, path, stream=sys.stdout) -> None:
    """The run's summary, from what was written to ``path`` (None: this process wrote
    nothing, as DDP's ranks other than 0, and prints nothing)."""
    if path is None:
        return
    cfg, metrics, world = record["config"], record["metrics"], record["world"]
    devices = ", ".join(sorted({d["name"] for d in world["devices"]})) or "?"
    lines = [
        "",
        f"== {record['lab']} ({cfg['strategy']}) · {record['status']} ==",
        f"model        {cfg['model']} at {cfg['img_size']}px, {cfg['data']} data, "
        f"amp {cfg['amp']}{', channels_last' if cfg['channels_last'] else ''}"
        f"{', compiled' if cfg['compile'] else ''}",
        f"world        {world['world_size']} process(es) on {world['nnodes']} node(s), "
        f"{len(world['devices'])} device(s): {devices}",
        f"batch        {cfg['per_device_batch_size']} per device, "
        f"{cfg['global_batch_size']} global",
    ]
    tp = metrics.get("throughput_img_s")
    if tp:
        st = metrics["step_time_s"]
        lines += [
            f"throughput   {tp['median']:,.1f} img/s median "
            f"(p10 {tp['p10']:,.1f} – p90 {tp['p90']:,.1f}; mean {tp['mean']:,.1f})",
            f"step time    {st['median'] * 1e3:,.1f} ms median over "
            f"{metrics['steps_measured']} steps ({metrics['warmup_steps']} warmup excluded)",
            f"data wait    {100 * (metrics['data_wait_fraction'] or 0):.1f} % of step time",
        ]
    compute_only = metrics.get("compute_only_step_time_s")
    exposed = metrics.get("exposed_comm_s")
    if tp and compute_only and exposed:
        lines.append(f"no sync      {compute_only['median'] * 1e3:,.1f} ms a step without "
                     f"all-reduce: {exposed['median'] * 1e3:,.1f} ms of communication "
                     f"not hidden behind backward")
    epochs = metrics.get("epoch_time_s") or []
    if epochs:
        lines.append("epoch time   " + ", ".join(f"{t:.1f} s" for t in epochs))
    for dev in metrics.get("per_device", []):
        if dev.get("peak_allocated_bytes") is not None:
            lines.append(f"peak memory  {dev['device']} ({dev.get('name')}): "
                         f"{gib(dev['peak_allocated_bytes'])} allocated, "
                         f"{gib(dev['peak_reserved_bytes'])} reserved")
    lines.append(f"host RSS     {gib(metrics.get('host_peak_rss_bytes'))} peak")
    if metrics.get("final_loss") is not None:
        lines.append(f"final loss   {metrics['final_loss']:.4f}")
    lines += _accuracy_lines(cfg, metrics)
    for note in record.get("notes", []):
        lines.append(f"note         {note}")
    lines.append(f"result       {path}")
    print("\n".join(lines), file=stream, flush=True)


def _accuracy_lines(cfg: dict, metrics: dict) -> list[str]:
    """Validation accuracy per epoch and the training time to the target, when evaluated."""
    evals = [e for e in metrics.get("eval") or [] if e.get("accuracy") is not None]
    if not evals:
        return []
    last = evals[-1]
    lines = ["accuracy     " + ", ".join(f"{100 * e['accuracy']:.1f}%" for e in evals)
             + f" top-1 by epoch ({last['samples']} validation images; evaluation took "
               f"{sum(e['eval_time_s'] for e in evals):.1f} s, outside every training time)"]
    target, reached = cfg.get("target_accuracy"), metrics.get("time_to_accuracy_s")
    if target is not None:
        label = f"to {100 * target:g}%"
        lines.append(f"{label:<13}" + (f"{reached:.1f} s of training to reach it"
                                       if reached is not None else "not reached"))
    return lines


def warn_if_slow_on_cpu(device, preset: str | None) -> None:
    """A full ResNet-50 run on a CPU takes hours: say so before it starts (04: rank 0
    only), and that a CPU device is one thread (``train.configure_backends``)."""
    if os.environ.get("RANK", "0") != "0":
        return  # one warning per job, not one per rank
    if device.type == "cpu" and preset is None:
        print("warning: no GPU in use: a full ResNet-50 run on the CPU takes hours; "
              "try --preset smoke (seconds) or --preset cpu (a minute)", file=sys.stderr)
        if not os.environ.get("OMP_NUM_THREADS", "").strip():
            print("note: on the CPU each process runs one thread (OMP_NUM_THREADS "
                  "overrides), so 02 and 04's ranks compare like with like", file=sys.stderr)
