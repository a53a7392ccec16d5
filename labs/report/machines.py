"""The machines of a results folder: which configurations ran where, and which step-01
file describes each machine.

A machine is a host, a device model, on CPUs the CPU model, and a torch version
(``analysis.machine_key``): two hosts with the same GPUs are two machines, and so is one
host's CPU beside its GPUs, two computers that share a host name, or one host under two
torch versions. Every explanation of a machine uses that machine's own step-01 file (same
host, device model and, where both record them, CPU model and torch), never another's: a
bus bandwidth measured on a PCIe workstation says nothing about an NVLink server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd

from labs import fmt
from labs.report.analysis import dicts, dig, machine_key, short_hardware


@dataclass
class Machine:
    key: str                  # analysis.machine_key, the table's ``machine`` column
    slug: str                 # [a-z0-9_]+: figure names and the section's anchor
    host: str
    hardware: str             # the device model ("CPU" on the CPU)
    cpu: bool
    rows: pd.DataFrame        # its configurations: a slice of analysis.compare's table
    cpu_model: str | None = None
    torch: str | None = None
    device_count: int | None = None
    step01: list[dict] = field(default_factory=list)   # its environment files
    step01_files: list[str] = field(default_factory=list)
    unfinished: list[dict] = field(default_factory=list)
    # what tells it from a machine of the same host and device: CPU model, torch
    distinct: list[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "CPU" if self.cpu else short_hardware(self.hardware)

    @property
    def short(self) -> str:
        """How a sentence names it: "dgx-h100 (H100 80GB HBM3)", "ci (CPU, torch 2.4.0)"."""
        return f"{self.host} ({', '.join([self.device, *self.distinct])})"

    @property
    def unit(self) -> str:
        return "process" if self.cpu else "GPU"

    @property
    def title(self) -> str:
        """The section heading: host and devices, and what tells it from its twins."""
        if self.cpu:
            return " · ".join([f"{self.host} · CPU processes", *self.distinct])
        count = f"{self.device_count} × " if self.device_count else ""
        return " · ".join([f"{self.host} · {count}{self.device}", *self.distinct])

    @property
    def facts(self) -> str:
        """The rest of what makes the machine: CPU model and torch."""
        parts = [f"CPU {self.cpu_model}" if self.cpu_model else None,
                 f"torch {self.torch}" if self.torch else None]
        return " · ".join(p for p in parts if p)


def slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "machine"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def _known(values) -> str | None:
    values = [str(v) for v in values if not fmt.missing(v) and v not in ("", "None")]
    return values[0] if values else None


def group(table: pd.DataFrame, environments: list[dict], file_of,
          unfinished: list[dict] = ()) -> list[Machine]:
    """One Machine per host and device model in ``table``, in the table's order, each
    with its step-01 files and its unfinished runs."""
    machines: list[Machine] = []
    taken: set[str] = set()
    for key, rows in (table.groupby("machine", sort=False) if not table.empty else []):
        first = rows.iloc[0]
        m = Machine(key=key, slug="", host=str(first["host"]), hardware=str(first["hardware"]),
                    cpu=bool(first["cpu"]), rows=rows, cpu_model=_known(rows["cpu_model"]),
                    torch=_known(rows["torch"]))
        m.slug = slug(f"{m.host}_{m.device}", taken)
        m.step01 = [e for e in environments if describes(e, m)]
        m.step01_files = [file_of(e) for e in m.step01]
        m.device_count = _device_count(m)
        machines.append(m)
    _tell_apart(machines)
    for record in unfinished:  # a run that did not finish: under its machine, if any
        home = next((m for m in machines if m.key == machine_key(record)), None)
        if home is not None:
            home.unfinished.append(record)
    return machines


def _tell_apart(machines: list[Machine]) -> None:
    """Give machines of one host and device model, which differ in CPU model or torch, a
    title that says how: "ci-runner · CPU processes · AMD EPYC 7763", "· torch 2.4.0"."""
    for m in machines:
        twins = [o for o in machines if (o.host, o.device) == (m.host, m.device)]
        if len(twins) > 1:
            parts = [m.cpu_model or "CPU model not recorded"
                     if len({o.cpu_model for o in twins}) > 1 else None,
                     f"torch {m.torch or 'not recorded'}"
                     if len({o.torch for o in twins}) > 1 else None]
            m.distinct = [p for p in parts if p]


def orphans(machines: list[Machine], unfinished: list[dict]) -> list[dict]:
    """Unfinished runs of machines with no completed run."""
    placed = {id(r) for m in machines for r in m.unfinished}
    return [r for r in unfinished if id(r) not in placed]


def _gpu_names(record: dict) -> list[str]:
    return [str(g.get("name")) for g in (dicts(dig(record, "environment", "gpus"))
                                         or dicts(record.get("gpus"))) if g.get("name")]


def describes(record: dict, m: Machine) -> bool:
    """Whether step-01 file ``record`` was written on machine ``m``: the same host, for GPU
    runs a GPU of the same model, and the same CPU model (CPU runs) and torch where both
    the file and the runs record them."""
    if str(dig(record, "environment", "host") or "") != m.host:
        return False
    for name, mine in (("cpu_model", m.cpu_model if m.cpu else None), ("torch", m.torch)):
        theirs = dig(record, "environment", name)
        if mine and theirs and str(theirs) != mine:
            return False
    return m.cpu or m.hardware in _gpu_names(record)


def _device_count(m: Machine) -> int | None:
    if m.cpu:
        return None
    for record in m.step01:
        names = _gpu_names(record)
        if names:
            return sum(name == m.hardware for name in names)
    return int(pd.to_numeric(m.rows["n_devices"], errors="coerce").max())


# --- step 01's all-reduce sweep of this machine -------------------------------------------

def sweep_for(m: Machine, sweeps: list[dict], world: int, cpu: bool) -> tuple[dict | None, str]:
    """Step 01's all-reduce sweep of machine ``m`` for ``world`` ranks, and how it was
    chosen, or None and why there is none. ``sweeps``: analysis.allreduce_sweeps."""
    if not m.step01_files:
        return None, (f"no step-01 file from {m.host} is in the folder, so nothing predicts "
                      f"the all-reduce there (run 01_environment_check.py on {m.host})")
    mine = [s for s in sweeps if s["file"] in m.step01_files and s["cpu"] == cpu]
    if not mine:
        where = "CPU processes" if cpu else "GPUs"
        return None, f"step 01 on {m.host} measured no all-reduce between {where}"
    correct = [s for s in mine if s["all_correct"]]
    if not correct:
        return None, f"step 01's all-reduce on {m.host} returned wrong sums"
    same = [s for s in correct if s["world_size"] == world]
    if same:
        return same[0], f"step 01 measured on {m.host} for {world} ranks"
    near = min(correct, key=lambda s: abs(s["world_size"] - world))
    return near, (f"step 01 measured on {m.host} for {near['world_size']} ranks, not "
                  f"{world} (the nearest it measured)")


# --- how the GPUs connect: step 01's peer access and nvidia-smi topo -m --------------------

LINKS = {"NV": "NVLink", "PIX": "PCIe (one switch)", "PXB": "PCIe (several switches)",
         "PHB": "PCIe (through the CPU's host bridge)",
         "NODE": "PCIe (across host bridges of one CPU)",
         "SYS": "PCIe and the link between CPU sockets"}


def topology_links(text) -> list[str]:
    """The link kind of every GPU pair in an ``nvidia-smi topo -m`` matrix ("NV18",
    "PHB", ...), each pair once."""
    if not isinstance(text, str):
        return []
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = [c for c in lines[0] if re.fullmatch(r"GPU\d+", c)]
    links = []
    for row in lines[1:]:
        if not row or not re.fullmatch(r"GPU\d+", row[0]):
            continue
        i = int(row[0][3:])
        for j, cell in enumerate(row[1:1 + len(header)]):
            if j > i:
                links.append(cell)
    return links


def _kind(link: str) -> str:
    return "NV" if link.startswith("NV") else link


def interconnect(m: Machine) -> str | None:
    """How this machine's GPUs connect, from its step-01 file: peer access and the
    topology's link kinds, in one sentence; None when step 01 did not record them."""
    for record in m.step01:
        gpus = [g for g in dicts(record.get("gpus")) if g.get("name") == m.hardware]
        indices = [g.get("index") for g in gpus if isinstance(g.get("index"), int)]
        if len(indices) < 2:
            continue
        pairs = [(a, b) for a in indices for b in indices if a < b]
        access = {g["index"]: set(g.get("peer_access") or []) for g in gpus
                  if isinstance(g.get("index"), int)}
        with_p2p = sum(b in access.get(a, set()) for a, b in pairs)
        if with_p2p == len(pairs):
            p2p = "every pair of GPUs has peer-to-peer access"
        elif with_p2p == 0:
            p2p = ("no pair of GPUs has peer-to-peer access, so every GPU-to-GPU copy "
                   "goes through host memory")
        else:
            p2p = f"{with_p2p} of {len(pairs)} GPU pairs have peer-to-peer access"
        links = topology_links(record.get("topology"))
        order = list(LINKS)
        kinds = sorted({_kind(link) for link in links},
                       key=lambda k: order.index(k) if k in order else len(order))
        if not links:
            how = "nvidia-smi topo -m was not recorded"
        elif kinds == ["NV"]:
            widths = sorted(set(links))
            how = f"NVLink joins every pair ({', '.join(widths)})"
        elif "NV" not in kinds:
            how = "the GPUs connect over " + " / ".join(LINKS.get(k, k) for k in kinds) + \
                  ", no NVLink"
        else:
            nv = sum(_kind(link) == "NV" for link in links)
            how = f"NVLink joins {nv} of {len(links)} GPU pairs, PCIe the rest"
        return f"step 01 on {m.host}: {p2p}; {how}"
    return None


def gradient_bytes_of(model: str, num_classes, table: pd.DataFrame) -> float | None:
    """The fp32 parameter bytes of ``model``, from the run files: a DDP run records its
    gradient bytes (one per parameter), the same on every machine for the same model and
    number of classes; None when no run recorded them."""
    same = table[(table["model"] == model) & table["gradient_bytes"].notna()]
    if "num_classes" in table.columns and not fmt.missing(num_classes):
        same = same[same["num_classes"].map(str) == str(num_classes)]
    return None if same.empty else float(same["gradient_bytes"].iloc[0])
