"""Where moshax's Moshi LM train step spends its time (config b by default; no reference side).

    .venv/bin/python bench/profile_lm_train.py [--configs b] [--repeats 3] [--trace DIR]
        [--xla-flags '--xla_cpu_...'] [--dump DIR]

1. times the trainer's full step, fwd+bwd alone and the optimizer update alone (as
   bench/bench_lm_train.py, interleaved with 0.5 s pauses, median), under the XLA flags given;
2. ``--trace DIR``: a JAX profiler trace of one full step and one update, then a table of the
   XLA:CPU thunks (HLO fusions, dots, copies, ...) by total time, per jitted module. On 2 cores
   thunks may run two at a time, so their sum can exceed the wall time;
3. ``--dump DIR``: XLA's HLO dumps of every compiled module (``--xla_dump_to``), to read the
   fusions the table names (``DIR/*after_optimizations.txt``).

``--xla-flags`` are appended to ``XLA_FLAGS`` before JAX starts (A/B-testing XLA:CPU flags).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time
from pathlib import Path


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="b", help="comma-separated: tiny, b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trace", default="", help="directory for a profiler trace (+ the op table)")
    ap.add_argument("--top", type=int, default=25, help="rows of the op table")
    ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS")
    ap.add_argument("--dump", default="", help="--xla_dump_to directory (HLO text after optimizations)")
    return ap.parse_args()


def op_table(trace_dir: str, top: int) -> None:
    """Sum the durations of XLA:CPU thunk events (they carry ``hlo_op`` and ``hlo_module``)."""
    path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    by_op = collections.Counter()
    count = collections.Counter()
    by_module = collections.Counter()
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") != "X" or "hlo_op" not in args:
            continue
        key = (args.get("hlo_module", "?"), args["hlo_op"])
        by_op[key] += e.get("dur", 0) / 1e3
        count[key] += 1
        by_module[key[0]] += e.get("dur", 0) / 1e3
    kinds = collections.Counter()
    for (mod, op), t in by_op.items():
        kinds[(mod, re.sub(r"\.\d+$", "", op))] += t
    print(f"\n| module | HLO op kind (name without its number) | total ms | % of module |")
    print("|---|---|---|---|")
    for (mod, kind), t in kinds.most_common(top):
        print(f"| {mod} | {kind} | {t:.1f} | {100 * t / by_module[mod]:.1f} |")
    print(f"\nthunk time by module (ms, summed over threads): "
          + ", ".join(f"{m} {t:.0f}" for m, t in by_module.most_common()))
    print(f"\n| module | HLO op | calls | total ms | % of module |")
    print("|---|---|---|---|---|")
    for (mod, op), t in by_op.most_common(top):
        print(f"| {mod} | {op} | {count[(mod, op)]} | {t:.1f} | {100 * t / by_module[mod]:.1f} |")


def main() -> None:
    args = parse_args()
    flags = os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags
    if args.dump:
        flags += f" --xla_dump_to={args.dump} --xla_dump_hlo_as_text"
    os.environ["XLA_FLAGS"] = flags.strip()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import jax

    import bench_lm_train as blt
    from common import median

    blt.tune_malloc()
    print(f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, mcfg in blt.model_configs(args.configs.split(",")).items():
        fb, st, up, info = blt.moshax_side(mcfg, blt.random_codes(mcfg))
        fb(), st(), up()
        times = {"step": [], "fwd_bwd": [], "update": []}
        for _ in range(args.repeats):
            for side, fn in (("step", st), ("fwd_bwd", fb), ("update", up)):
                time.sleep(blt.PAUSE)
                t0 = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - t0)
        m = {k: median(v) for k, v in times.items()}
        print(f"{name}: step {m['step']:.3f} s, fwd+bwd {m['fwd_bwd']:.3f} s, update {m['update']:.3f} s, "
              f"other {m['step'] - m['fwd_bwd'] - m['update']:.3f} s (medians of {args.repeats}; compile s "
              f"fwd+bwd {info['compile_fwd_bwd']:.1f}, step {info['compile_step']:.1f}, "
              f"update {info['compile_update']:.1f}); all: "
              + json.dumps({k: [round(x, 3) for x in v] for k, v in times.items()}), flush=True)
        if args.trace:
            time.sleep(blt.PAUSE)
            with jax.profiler.trace(args.trace, create_perfetto_trace=True):
                st()
                time.sleep(blt.PAUSE)
                up()
            op_table(args.trace, args.top)
        del fb, st, up
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
