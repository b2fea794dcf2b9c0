"""Streaming Moshi generation: per-frame latency of the LM step and of the full duplex loop.

    .venv/bin/python bench/bench_generate.py [--frames 100] [--warmup 10] [--batch 1]
    .venv/bin/python bench/bench_generate.py --batches 1,8,32 --frames 20 --warmup 3   # frames/s per batch

Config (b) of /work/shared/bench-ref/common.py ``LM_B`` (dim 768, 12 layers, depformer 512 x 4,
full vocabularies, context 3000: 299M params), random weights, fp32, and the full released Mimi
architecture (random weights) for the loop. Rows:

* LM step, greedy: :class:`moshax.inference.moshi_stream.MoshiStream` with temperature 0 (the
  reference's ``bench_lmgen.py`` uses ``LMGen(use_sampling=False)``);
* LM step, sampled: the default sampling (text 0.7 / top-25, audio 0.8 / top-250);
* full loop: :class:`~moshax.inference.moshi_stream.DuplexLoop`, one jitted call per 80 ms
  frame: Mimi encode of the user's frame -> LM step (greedy) -> Mimi decode of Moshi's codes.

p50/p99 over ``--frames`` frames after ``--warmup`` frames (the first compiles), each frame timed
to ``block_until_ready``. The real-time budget is 80 ms per frame. ``--batches``: the greedy LM
step and the full loop at each batch size, as frames/s over all streams (batch / p50) and the
number of real-time conversations that throughput carries (frames/s / 12.5).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header  # noqa: E402

from moshax.interop.lm_config import moshi_config_from_kyutai  # noqa: E402

LM_B = dict(dim=768, num_layers=12, num_heads=12, text_card=32000, card=2048, context=3000, depformer_dim=512,
            depformer_dim_feedforward=int(4.125 * 512), depformer_num_heads=8, depformer_num_layers=4)


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def run(fn, inputs, warmup):
    ms = []
    for i, x in enumerate(inputs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        if i >= warmup:
            ms.append(time.perf_counter() - t0)
    return ms


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--skip-loop", action="store_true")
    ap.add_argument("--batches", help="comma-separated batch sizes: frames/s of the LM step and the loop at each")
    args = ap.parse_args()
    if args.batches:
        return batched(args)
    from flax import nnx

    from moshax.inference.moshi_stream import DuplexLoop, MoshiStream
    from moshax.inference.sampling import Sampling
    from moshax.models.mimi.config import MimiConfig
    from moshax.models.mimi.model import Mimi
    from moshax.models.moshi_lm import MoshiLM

    header(f"Moshi streaming generation, config (b), fp32, batch {args.batch}")
    cfg = moshi_config_from_kyutai(LM_B)
    lm = MoshiLM(cfg, rngs=nnx.Rngs(0))
    print(f"config (b): {lm.num_params() / 1e6:.2f}M params, context {cfg.transformer.context}, "
          f"delays {cfg.delays}")
    n = args.warmup + args.frames
    g = np.random.default_rng(0)
    codes = g.integers(0, cfg.card, (n, args.batch, cfg.n_q - cfg.dep_q, 1)).astype(np.int32)
    rows = {}
    for name, sampling in (("LM step, greedy", Sampling.greedy()), ("LM step, sampled (defaults)", Sampling())):
        gen = MoshiStream(lm, args.batch, sampling)
        t0 = time.perf_counter()
        gen.step(codes[0])
        jax.block_until_ready(gen.state)
        print(f"{name}: first step (compile) {time.perf_counter() - t0:.1f} s")
        rows[name] = run(lambda c: gen.step(c).audio, codes[1:], args.warmup - 1)
        del gen
    if not args.skip_loop:
        mimi = Mimi(MimiConfig(), rngs=nnx.Rngs(1))
        loop = DuplexLoop(lm, mimi, args.batch, Sampling.greedy())
        fs = loop.frame_size
        wav = (0.1 * g.standard_normal((n, args.batch, 1, fs))).astype(np.float32)
        t0 = time.perf_counter()
        jax.block_until_ready(loop.step(wav[0])[0])
        print(f"full loop: first frame (compile) {time.perf_counter() - t0:.1f} s")
        rows["full loop (Mimi encode + LM step + Mimi decode)"] = run(lambda x: loop.step(x)[0], wav[1:],
                                                                       args.warmup - 1)
    print()
    print(f"| per frame (batch {args.batch}) | p50 ms | p99 ms | mean ms | real-time factor (p50 / 80 ms) |")
    print("|---|---|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {pct(ms, 50):.1f} | {pct(ms, 99):.1f} | {1e3 * np.mean(ms):.1f} | {pct(ms, 50) / 80:.2f} |")
    print(f"{args.frames} frames timed after {args.warmup} warm-up frames; random weights and inputs")
    return 0


def batched(args) -> int:
    from flax import nnx

    from moshax.inference.moshi_stream import DuplexLoop, MoshiStream
    from moshax.inference.sampling import Sampling
    from moshax.models.mimi.config import MimiConfig
    from moshax.models.mimi.model import Mimi
    from moshax.models.moshi_lm import MoshiLM

    header("Moshi streaming generation, config (b), fp32: throughput per batch size")
    cfg = moshi_config_from_kyutai(LM_B)
    lm = MoshiLM(cfg, rngs=nnx.Rngs(0))
    mimi = None if args.skip_loop else Mimi(MimiConfig(), rngs=nnx.Rngs(1))
    n = args.warmup + args.frames
    g = np.random.default_rng(0)
    print("| batch | what | p50 ms / frame | frames/s (all streams) | real-time conversations |")
    print("|---|---|---|---|---|")
    for b in [int(x) for x in args.batches.split(",")]:
        codes = g.integers(0, cfg.card, (n, b, cfg.n_q - cfg.dep_q, 1)).astype(np.int32)
        gen = MoshiStream(lm, b, Sampling.greedy())
        ms = run(lambda c: gen.step(c).audio, codes, args.warmup)
        del gen
        rows = [("LM step", ms)]
        if mimi is not None:
            loop = DuplexLoop(lm, mimi, b, Sampling.greedy())
            wav = (0.1 * g.standard_normal((n, b, 1, loop.frame_size))).astype(np.float32)
            rows.append(("full loop", run(lambda x: loop.step(x)[0], wav, args.warmup)))
            del loop
        for name, t in rows:
            fps = b * 1e3 / pct(t, 50)
            print(f"| {b} | {name} | {pct(t, 50):.1f} | {fps:.1f} | {fps / 12.5:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
