"""Communicate less: DDP (gradients all-reduced every step) beside local SGD (replicas
averaged every H steps), on IID and on label-skewed (Dirichlet) data, per machine: bytes
each rank all-reduced per training image, throughput, time to target, final accuracy and
how far the replicas drifted between averages; and the trade-off in one sentence per
local-SGD configuration, against DDP on the same data. Torch-free.
"""

from __future__ import annotations

import pandas as pd

from labs import fmt
from labs.report.analysis import num

SAME_ACCURACY = 0.02  # final accuracies closer than 2 points: "as accurate"
FASTER = 1.05         # throughput ratio above this: "faster"


def sync_words(r) -> str:
    if r["sync"] == "local-sgd":
        return f"local SGD, averaged every {int(num(r['average_every']) or 0)} steps"
    return "DDP, every step"


def data_words(r) -> str:
    if r["partition"] == "dirichlet":
        return f"Dirichlet α = {num(r['dirichlet_alpha']):g} (label-skewed)"
    return "IID"


def _row(r, reference) -> dict:
    bytes_ = num(r["comm_bytes_per_sample"])
    ref = num(reference["comm_bytes_per_sample"]) if reference is not None else None
    share = f" ({bytes_ / ref:.2f}× DDP's)" if bytes_ is not None and ref and r is not \
        reference else ""
    return {"label": r["label"], "sync": sync_words(r), "data": data_words(r),
            "bytes": (fmt.size(bytes_) + share) if bytes_ is not None else "n/a",
            "throughput": fmt.rate(r["tp_median"]),
            "tta": fmt.seconds(r["time_to_accuracy_s"])
            if not fmt.missing(r["time_to_accuracy_s"]) else
            ("not reached" if r["eval"] else "no evaluation"),
            "accuracy": fmt.pct(r["final_accuracy"], 1) if r["eval"] else "n/a",
            "divergence": fmt.pct(r["divergence"], 2) if not fmt.missing(r["divergence"])
            else "—", "flagged": bool(r["flags"])}


def _reference(r, ddp: pd.DataFrame):
    """DDP every step on the same data, devices and family: what local SGD saves against."""
    same = ddp[(ddp["sync"] != "local-sgd") & (ddp["partition"] == r["partition"])
               & (ddp["n_devices"] == r["n_devices"]) & (ddp["family"] == r["family"])]
    if r["partition"] == "dirichlet":
        same = same[same["dirichlet_alpha"] == r["dirichlet_alpha"]]
    return same.iloc[0] if not same.empty else None


def trade_off(r, reference) -> str:
    """Local SGD against DDP on the same data, in words, from the numbers."""
    bytes_, ref_bytes = num(r["comm_bytes_per_sample"]), num(reference["comm_bytes_per_sample"])
    speed = r["tp_median"] / reference["tp_median"] \
        if reference["tp_median"] and r["tp_median"] else None
    parts = [f"{sync_words(r)[0].upper()}{sync_words(r)[1:]} on {data_words(r)} data"]
    if bytes_ is not None and ref_bytes:
        parts.append(f"all-reduces {bytes_ / ref_bytes:.2f}× DDP's bytes per image")
    if speed is not None:
        parts.append(f"runs at {fmt.times(speed)} its throughput")
    accurate = None
    if r["eval"] and reference["eval"] and not fmt.missing(r["final_accuracy"]) \
            and not fmt.missing(reference["final_accuracy"]):
        gap = r["final_accuracy"] - reference["final_accuracy"]
        accurate = bool(gap >= -SAME_ACCURACY)
        parts.append(f"ends at {fmt.pct(r['final_accuracy'], 1)} top-1 against "
                     f"{fmt.pct(reference['final_accuracy'], 1)} ({100 * gap:+.1f} points)")
    faster = speed is not None and speed > FASTER
    verdict = ("faster and as accurate" if faster and accurate else
               "faster but less accurate" if faster and accurate is False else
               "no faster, and as accurate" if accurate else
               "neither faster nor as accurate" if accurate is False else
               "faster" if faster else "no faster")
    if r["flags"] or reference["flags"]:
        verdict += " (one of the two is flagged unreliable: see the main table)"
    return "; ".join(parts) + f": {verdict} here."


def skew_sentence(ddp: pd.DataFrame) -> str | None:
    """What label skew costs each way of syncing, where both partitions ran."""
    lines = []
    for local in (False, True):
        rows = ddp[(ddp["sync"] == "local-sgd") == local]
        iid, skew = rows[rows["partition"] != "dirichlet"], rows[rows["partition"] == "dirichlet"]
        if iid.empty or skew.empty or not iid.iloc[0]["eval"] or not skew.iloc[0]["eval"]:
            continue
        gap = skew.iloc[0]["final_accuracy"] - iid.iloc[0]["final_accuracy"]
        if fmt.missing(gap):
            continue
        lines.append(f"{sync_words(skew.iloc[0])}: {100 * gap:+.1f} points from IID to "
                     f"{data_words(skew.iloc[0])}")
    if not lines:
        return None
    return ("Label skew: " + "; ".join(lines) + ". Averaging every step keeps every update "
            "a mix of all ranks' classes; averaging every H steps lets each replica drift "
            "toward its own classes in between (the drift column).")


def analyse(rows: pd.DataFrame) -> dict | None:
    """The 'communicate less' block of one machine, or None where every DDP run synced
    every step on IID data (nothing to compare)."""
    if "sync" not in rows.columns:
        return None
    ddp = rows[rows["strategy"] == "ddp"]
    special = ddp[(ddp["sync"] == "local-sgd") | (ddp["partition"] == "dirichlet")]
    if special.empty:
        return None
    ddp = ddp.sort_values(["partition", "sync", "average_every"], key=lambda c: c.astype(str),
                          kind="stable")
    table = [_row(r, _reference(r, ddp) if r["sync"] == "local-sgd" else r)
             for _, r in ddp.iterrows()]
    sentences = [trade_off(r, ref) for _, r in ddp.iterrows()
                 if r["sync"] == "local-sgd" and (ref := _reference(r, ddp)) is not None]
    skew = skew_sentence(ddp)
    points = [{"label": r["label"], "bytes": num(r["comm_bytes_per_sample"]),
               "accuracy": num(r["final_accuracy"]) if r["eval"] else None,
               "local": r["sync"] == "local-sgd", "skewed": r["partition"] == "dirichlet"}
              for _, r in ddp.iterrows()]
    return {"rows": table, "sentences": sentences + ([skew] if skew else []),
            "points": [p for p in points if p["bytes"] and p["accuracy"] is not None]}
