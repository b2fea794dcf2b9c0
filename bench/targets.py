"""The training and inference speed targets of ``../shared/targets.md`` in one run: the benches one
after another, then one table of each figure beside its target. (The data preparation targets are
``bench_prepare.py``'s, ``bench_beam.py``'s and ``bench_loader.py``'s, which need prepared data.)

    .venv/bin/python bench/targets.py [--only mimi,generate,...] [--quick] [--out DIR]
    make bench-targets

Runs ``bench_mimi.py``, ``bench_generate.py``, ``bench_lm_train.py``, ``bench_mimi_train.py`` and
``bench_helium_train.py`` (each with the reference beside it where it has one) as child processes,
one at a time, each writing its headline figures with ``--json``. Each bench's full output goes to
``DIR/<bench>.log`` (default ``runs/bench-targets/<time>``); ``DIR/summary.json`` holds the table.
The load average is printed before and after each bench: these figures mean something only on a
quiet machine, and the ratios to the reference (both sides in the same run) are the steadier ones.
``--quick`` runs fewer frames and steps (a smoke run: its figures are noisier).

Exit status: 0 when every bench ran (met or not: the table says), 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import cpu_model, load_average  # noqa: E402


@dataclass(frozen=True)
class Bench:
    name: str  # what --only selects
    script: str
    quick_args: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    label: str
    bench: str  # Bench.name
    figure: str  # key of the bench's --json figures
    op: str  # ">=" or "<="
    bound: float
    unit: str  # "x", "ms", "s"
    reference: str | None = None  # figure holding the reference side's value, where there is one


BENCHES = [
    Bench("mimi", "bench_mimi.py", ("--repeats", "3", "--frames", "30", "--warmup-frames", "5")),
    Bench("generate", "bench_generate.py", ("--frames", "24", "--warmup", "4")),
    Bench("lm_train", "bench_lm_train.py", ("--quick",)),
    Bench("mimi_train", "bench_mimi_train.py", ("--repeats", "3")),
    Bench("compile", "bench_helium_train.py", ("--quick",)),
]

TARGETS = [
    Target("full Mimi batch encode (10 s), vs the reference", "mimi", "batch_encode_ratio", ">=", 1.5, "x"),
    Target("streaming Mimi encode + decode per frame, p50", "mimi", "stream_p50_ms", "<=", 40, "ms",
           "stream_reference_p50_ms"),
    Target("LM generation step, config (b), batch 1, p50", "generate", "lm_step_p50_ms", "<=", 50, "ms",
           "lm_step_reference_p50_ms"),
    Target("full duplex loop per frame, p50", "generate", "loop_p50_ms", "<=", 80, "ms", "loop_reference_p50_ms"),
    Target("LM train step (b), full step vs the reference's", "lm_train", "b_full_step_ratio", ">=", 1.1, "x"),
    Target("LM train step (b), fwd+bwd vs the reference's", "lm_train", "b_fwd_bwd_ratio", ">=", 1.0, "x"),
    Target("optimizer update alone, 299M params", "lm_train", "b_update_s", "<=", 0.4, "s"),
    Target("Mimi train step (4 x 2 s), full step vs the reference's", "mimi_train", "full_step_ratio", ">=", 1.2, "x"),
    Target("train-step compile, 32 vs 4 layers (scan)", "compile", "compile_32_vs_4_layers_scan", "<=", 1.5, "x"),
]

OPS = {">=": operator.ge, "<=": operator.le}


def evaluate(results: dict[str, dict]) -> list[dict]:
    """One row per target from the benches' JSON (bench name -> its ``--json`` object, absent where
    it failed or was not run): the value, the reference's, the load average around the run, met."""
    rows = []
    for t in TARGETS:
        res = results.get(t.bench)
        figures = res["figures"] if res else {}
        value = figures.get(t.figure)
        rows.append({"target": t.label, "bench": t.bench, "value": value, "unit": t.unit,
                     "reference": figures.get(t.reference) if t.reference else None,
                     "bound": f"{t.op} {t.bound:g}{' ' + t.unit if t.unit != 'x' else 'x'}",
                     "met": None if value is None else bool(OPS[t.op](value, t.bound)),
                     "load": None if not res else f"{res['load_start']:.2f} -> {res['load_end']:.2f}"})
    return rows


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if unit == "x" else f"{value:.{1 if unit == 'ms' else 3}f} {unit}"


def table(rows: list[dict]) -> str:
    lines = ["| target | moshax | reference | target | met | load (1 min) |", "|---|---|---|---|---|---|"]
    for r in rows:
        met = "not run" if r["met"] is None else ("**yes**" if r["met"] else "no")
        lines.append(f"| {r['target']} | {fmt(r['value'], r['unit'])} | {fmt(r['reference'], r['unit'])} "
                     f"| {r['bound']} | {met} | {r['load'] or '-'} |")
    return "\n".join(lines)


def run_bench(bench: Bench, out: Path, quick: bool, scripts: Path) -> dict | None:
    """Run one bench as a child process, its output into ``out/<name>.log``; its figures, or None
    when it failed (the log's tail is printed)."""
    fig_path, log_path = out / f"{bench.name}.json", out / f"{bench.name}.log"
    argv = [sys.executable, str(scripts / bench.script), *(bench.quick_args if quick else ()), "--json", str(fig_path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH")) if p)
    with open(log_path, "w") as log:
        rc = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc == 0 and fig_path.exists():
        return json.loads(fig_path.read_text())
    tail = log_path.read_text().splitlines()[-15:]
    print(f"  {bench.script} failed (exit {rc}); the end of {log_path}:\n    " + "\n    ".join(tail), flush=True)
    return None


def main(argv: list[str] | None = None) -> int:
    names = [b.name for b in BENCHES]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help=f"comma-separated, from: {','.join(names)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="fewer frames and steps (a smoke run; noisier figures)")
    ap.add_argument("--out", type=Path, help="where the logs and summary.json go (default runs/bench-targets/<time>)")
    ap.add_argument("--scripts", type=Path, default=HERE, help=argparse.SUPPRESS)  # the tests' stand-in benches
    args = ap.parse_args(argv)
    only = names if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown or not only:
        ap.error(f"--only: unknown bench {', '.join(unknown) or '(none given)'}; choose from {', '.join(names)}")
    out = args.out or ROOT / "runs" / "bench-targets" / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        ap.error(f"--out {out} is a file; give a directory for the logs and summary.json")
    out.mkdir(parents=True, exist_ok=True)
    print(f"benches: {', '.join(only)}; logs in {out}\n{cpu_model()}, cpus {os.cpu_count()}; load average at the "
          f"start {load_average()}", flush=True)
    results, failed = {}, []
    selected = [b for b in BENCHES if b.name in only]
    for i, bench in enumerate(selected, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(selected)}] {bench.script} ...", flush=True)
        try:
            res = run_bench(bench, out, args.quick, args.scripts)
        except KeyboardInterrupt:
            print(f"\ninterrupted during {bench.script}; the logs and figures of the benches so far are in {out}",
                  file=sys.stderr)
            return 130
        if res is None:
            failed.append(bench.script)
        else:
            results[bench.name] = res
            print(f"  done in {time.perf_counter() - t0:.0f} s, load {res['load_start']:.2f} -> {res['load_end']:.2f}",
                  flush=True)
    rows = [r for r in evaluate(results) if r["bench"] in only]
    print()
    print(table(rows))
    met = sum(r["met"] is True for r in rows)
    print(f"\n{met} of {len(rows)} targets met{' (quick run)' if args.quick else ''}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    (out / "summary.json").write_text(json.dumps({"quick": args.quick, "cpu": cpu_model(), "rows": rows, "failed": failed,
                                                  "benches": results}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
