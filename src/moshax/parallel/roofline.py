"""A roofline estimate of a compiled step on a TPU: compute at the chip's peak, bytes at its HBM
bandwidth, collective bytes at its ICI bandwidth; the predicted step time is the largest of the
three (each resource is busy at least that long, overlap assumed perfect).

* FLOPs: the analytic model FLOPs per chip (``6N + 12LdT``-style, from the task), or XLA's count
  when that is larger. XLA's cost analysis counts a ``while`` body (the scan over layers) once.
* HBM bytes: XLA's "bytes accessed", scaled by the same loop factor (analytic / XLA FLOPs) when
  XLA's count misses the loop: an estimate, good to a small factor.
* Collectives: read from the optimized HLO: every all-gather, reduce-scatter, all-reduce,
  all-to-all and collective-permute (sync, ``-start`` or inside fusions) with its result shape and
  replica-group size, multiplied by how often its computation runs (``while`` trip counts read
  from the loop conditions, through the call graph). Bytes on the wire per chip: all-gather
  ``out (g-1)/g``, reduce-scatter ``out (g-1)``, all-reduce ``2 x (g-1)/g``, all-to-all
  ``(g-1)/g``, collective-permute the whole buffer.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
COLLECTIVE_OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COMP_HEAD = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVE_OPS) + r")(?:-start)?\(")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{")


def _array_bytes(text: str) -> list[float]:
    out = []
    for dtype, dims in _ARRAY.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append(n * DTYPE_BYTES[dtype])
    return out


def split_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """``{computation name: its lines}`` and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        m = _COMP_HEAD.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def _trip_count(cond_lines: list[str]) -> int:
    """A scan's loop condition compares the counter with a constant: the largest s32 constant."""
    consts = [int(c) for c in re.findall(r"s32\[\][^=]*constant\((\d+)\)", "\n".join(cond_lines))]
    return max(consts) if consts else 1


def run_counts(comps: dict[str, list[str]], entry: str) -> dict[str, float]:
    """How many times each computation runs per step (while bodies x trip count, via the call graph)."""
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, lines in comps.items():
        for line in lines:
            body = re.search(r"\bbody=%([\w.\-]+)", line)
            if body and " while(" in line:
                cond = re.search(r"\bcondition=%([\w.\-]+)", line)
                trips = _trip_count(comps.get(cond.group(1), [])) if cond else 1
                edges[name].append((body.group(1), trips))
            for key in ("calls", "to_apply"):
                for callee in re.findall(rf"\b{key}=%([\w.\-]+)", line):
                    edges[name].append((callee, 1))
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            if branches:
                for callee in re.findall(r"%([\w.\-]+)", branches.group(1)):
                    edges[name].append((callee, 1))
    counts: dict[str, float] = defaultdict(float)

    def visit(name: str, times: float, depth: int = 0) -> None:
        if depth > 64:
            return
        counts[name] += times
        for callee, k in edges.get(name, []):
            visit(callee, times * k, depth + 1)

    visit(entry, 1.0)
    return counts


def _group_size(line: str, num_devices: int) -> int:
    m = _GROUPS_IOTA.search(line)
    if m:
        return int(m.group(2))
    m = _GROUPS_LIST.search(line)
    if m and m.group(1):
        return len(m.group(1).split(","))
    return num_devices


def collective_bytes(hlo: str, num_devices: int) -> dict[str, float]:
    """Bytes each chip sends per step, by collective kind (see the module docstring)."""
    comps, entry = split_computations(hlo)
    counts = run_counts(comps, entry)
    out: dict[str, float] = {op: 0.0 for op in COLLECTIVE_OPS}
    for name, lines in comps.items():
        times = counts.get(name, 0.0)
        if not times:
            continue
        for line in lines:
            m = _OP.search(line)
            if not m:
                continue
            result, op = m.group(1), m.group(2)
            sizes = _array_bytes(result)
            if not sizes:
                continue
            # -start ops return (operand, result, ...): the largest buffer; a tuple of a sync op
            # holds several buffers reduced together: all of them
            size = max(sizes) if f"{op}-start(" in line else sum(sizes)
            g = max(1, _group_size(line, num_devices))
            if op == "all-reduce" and name.startswith("all-reduce-scatter"):
                op = "reduce-scatter"  # TPU's fused reduce-scatter: an all-reduce + slice in the HLO
                size = size / g
            if op == "collective-permute":
                wire = size
            elif g == 1:
                wire = 0.0
            elif op == "all-gather":
                wire = size * (g - 1) / g
            elif op == "reduce-scatter":
                wire = size * (g - 1)
            elif op == "all-reduce":
                wire = 2 * size * (g - 1) / g
            else:
                wire = size * (g - 1) / g
            out[op] += wire * times
    return out


@dataclass
class Roofline:
    """Predicted step time on one chip kind and the bounds it comes from (seconds)."""

    chip: str
    peak_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float | None
    flops: float  # per chip per step
    hbm_bytes: float
    ici_bytes: float
    ici_by_kind: dict = field(default_factory=dict)
    model_flops: float | None = None
    tokens_per_step_per_chip: float | None = None

    @property
    def compute_s(self) -> float:
        return self.flops / self.peak_flops

    @property
    def memory_s(self) -> float:
        return self.hbm_bytes / self.hbm_bandwidth

    @property
    def comm_s(self) -> float:
        return self.ici_bytes / self.ici_bandwidth if self.ici_bandwidth else 0.0

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.memory_s, self.comm_s)

    @property
    def bound(self) -> str:
        return max((("compute", self.compute_s), ("HBM", self.memory_s), ("ICI", self.comm_s)), key=lambda x: x[1])[0]

    @property
    def mfu_bound(self) -> float | None:
        if not self.model_flops or not self.step_s:
            return None
        return self.model_flops / (self.step_s * self.peak_flops)

    def format(self) -> list[str]:
        ici = f"{self.ici_bandwidth / 1e9:.0f} GB/s ICI" if self.ici_bandwidth else "ICI unknown"
        kinds = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.ici_by_kind.items() if v) or "none"
        lines = [f"roofline on {self.chip} ({self.peak_flops / 1e12:.0f} TFLOP/s bf16, "
                 f"{self.hbm_bandwidth / 1e9:.0f} GB/s HBM, {ici} per chip):",
                 f"  compute      {self.compute_s * 1e3:10.2f} ms  ({self.flops:.3e} FLOPs per chip)",
                 f"  HBM          {self.memory_s * 1e3:10.2f} ms  ({self.hbm_bytes / 2**30:.2f} GiB per chip, estimate)",
                 f"  collectives  {self.comm_s * 1e3:10.2f} ms  ({self.ici_bytes / 2**20:.1f} MiB per chip: {kinds})",
                 f"  predicted step time {self.step_s * 1e3:.2f} ms ({self.bound}-bound)"]
        if self.tokens_per_step_per_chip:
            lines.append(f"  -> {self.tokens_per_step_per_chip / self.step_s:,.0f} tokens/s per chip")
        if self.mfu_bound is not None:
            lines.append(f"  -> MFU bound {self.mfu_bound:.1%} (model FLOPs / (predicted time x peak))")
        return lines


def roofline(compiled, family, num_devices: int, model_flops: float | None = None,
             tokens_per_step_per_chip: float | None = None) -> Roofline | None:
    """The estimate for a compiled step on ``family`` (:class:`moshax.parallel.tpu_facts.TpuFamily`)."""
    if family is None:
        return None
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        cost = None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    xla_flops = float((cost or {}).get("flops", 0.0))
    xla_bytes = float((cost or {}).get("bytes accessed", 0.0))
    flops = max(xla_flops, model_flops or 0.0)
    loop_factor = flops / xla_flops if xla_flops else 1.0
    by_kind = collective_bytes(compiled.as_text(), num_devices)
    per = family.devices_per_chip  # a v3 "device" is half a chip: half its bandwidths
    return Roofline(chip=family.name, peak_flops=family.peak_flops_per_device, hbm_bandwidth=family.hbm_bandwidth / per,
                    ici_bandwidth=family.ici_bandwidth / per if family.ici_bandwidth else None, flops=flops, hbm_bytes=xla_bytes * max(1.0, loop_factor),
                    ici_bytes=sum(by_kind.values()), ici_by_kind=by_kind, model_flops=model_flops,
                    tokens_per_step_per_chip=tokens_per_step_per_chip)
