"""Helium train-step throughput and train-step compile time vs depth (scan keeps it flat).

    .venv/bin/python bench/bench_helium_train.py [--quick]

Prints a table of tokens/s for helium_tiny and a ~50M-parameter config (fp32, this machine's
devices), and the compile time of the same train step with 4 vs 32 layers: with the layer scan
(``layer_loop=scan``, what a TPU or GPU runs; the target is about this one) and unrolled (what
``layer_loop=auto`` picks on a CPU for layers of 4M+ weights, where it makes the step faster and the
compile grow with depth; this config's 3.2M-weight layers keep the scan under ``auto``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_json_option, header, median, timed, write_figures  # noqa: E402

from moshax.config import from_dict, load_config  # noqa: E402
from moshax.training.lm_task import LMTask  # noqa: E402
from moshax.training.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

M50 = {"vocab_size": 32000, "transformer": {"dim": 512, "num_heads": 8, "num_layers": 8, "hidden_dim": 1408,
                                            "context": 256}}


def make_trainer(model: dict, seq_len: int, batch: int, tmp: str) -> Trainer:
    cfg = from_dict({"model": model, "data": {"seq_len": seq_len}, "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
                     "train": {"batch_size": batch, "steps": 100, "progress": False}})
    return Trainer(cfg, LMTask(cfg), workdir=tmp)


def throughput(name: str, trainer: Trainer, repeats: int) -> dict:
    cfg = trainer.cfg
    rows, seq = cfg.train.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (rows, seq + 1)).astype(np.int32)
    batch = trainer.to_global({"tokens": tokens}, 1)
    state = {"s": trainer.init_state()}
    t0 = time.perf_counter()
    trainer.train_step(state["s"], batch)[1]["loss"].block_until_ready()  # compile + 1 step
    first = time.perf_counter() - t0
    state["s"] = trainer.init_state()

    def step():
        state["s"], m = trainer.train_step(state["s"], batch)
        m["loss"].block_until_ready()

    times = timed(step, repeats)
    med = median(times)
    return {"config": name, "params": trainer.handle.num_params(), "batch": f"{rows} x {seq}",
            "step_s": med, "tokens_s": rows * seq / med, "compile_s": trainer.times.compile_seconds,
            "first_s": first}


def compile_time(layers: int, tmp: str, loop: str) -> float:
    model = {**M50, "transformer": {**M50["transformer"], "num_layers": layers, "layer_loop": loop}}
    trainer = make_trainer(model, 256, 8, tmp)
    abstract = {"tokens": jax.ShapeDtypeStruct((1, 8, 257), np.int32, sharding=trainer.batch_sharding("tokens", 3, True))}
    trainer.compile_train_step(abstract)
    return trainer.times.compile_seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    add_json_option(ap)
    args = ap.parse_args()
    load_start = os.getloadavg()
    reps = 3 if args.quick else 8
    header("Helium train step (fwd + bwd + AdamW), fp32")
    tiny_cfg = load_config(ROOT / "configs/helium_tiny.yaml")
    tiny = make_trainer(vars(tiny_cfg.model) | {"transformer": vars(tiny_cfg.model.transformer)}, tiny_cfg.data.seq_len,
                        tiny_cfg.train.batch_size, "/tmp/moshax-bench")
    rows = [throughput("helium_tiny", tiny, reps * 3), throughput("~50M", make_trainer(M50, 256, 8, "/tmp/moshax-bench"), reps)]
    print("\n| config | params | batch (seqs x len) | step median s | tokens/s | compile s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['step_s']:.3f} | {r['tokens_s']:.0f} | {r['compile_s']:.1f} |")
    print("\n| train-step compile (~50M config width) | 4 layers | 32 layers | ratio (target <= 1.5x for the scan) |")
    print("|---|---|---|---|")
    figures = {f"{r['config'].removeprefix('~')}_tokens_per_s": r["tokens_s"] for r in rows}
    for loop in ("scan", "unrolled"):
        c4, c32 = compile_time(4, "/tmp/moshax-bench", loop), compile_time(32, "/tmp/moshax-bench", loop)
        print(f"| seconds, layer_loop={loop} | {c4:.2f} | {c32:.2f} | {c32 / c4:.2f}x |")
        figures[f"compile_32_vs_4_layers_{loop}"] = c32 / c4
    write_figures(args.json, figures, load_start)


if __name__ == "__main__":
    main()
