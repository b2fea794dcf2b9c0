"""Streaming Moshi generation: per-frame latency of the LM step and of the full duplex loop,
moshax beside the PyTorch reference in the same run.

    .venv/bin/python bench/bench_generate.py [--frames 100] [--warmup 10] [--batch 1] [--no-reference]
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

The reference side (batch 1 only; ``--no-reference`` skips it) is Kyutai's installed ``moshi``
package in a child process (2 torch threads; the two runtimes' thread pools slow each other down in
one process), built by this file and bench/reference.py exactly as ``bench-ref/bench_lmgen.py``
does: ``LMGen(use_sampling=False)`` on config (b), and the loop Mimi streaming encode ->
``LMGen.step`` -> Mimi streaming decode with the full released Mimi. Both sides run ``--rounds``
alternated rounds of ``frames / rounds`` frames each (reference LM, moshax LM, reference loop,
moshax loop, ...) so that a change in the machine's load hits both alike; the load average is
printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LineWorker, add_json_option, header, load_average, write_figures  # noqa: E402

from moshax.interop.lm_config import moshi_config_from_kyutai  # noqa: E402

LM_B = dict(dim=768, num_layers=12, num_heads=12, text_card=32000, card=2048, context=3000, depformer_dim=512,
            depformer_dim_feedforward=int(4.125 * 512), depformer_num_heads=8, depformer_num_layers=4)


PAUSE = 0.5  # s of idle before each round: the other side's spinning worker threads go to sleep


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def fast_forward(state, position: int):
    """An LM stream state as if ``position`` frames had been taken: the offsets at ``position`` and
    every temporal ring holding its last ``capacity`` positions (wrapped). For timing only (the
    keys and values are the stream's own): a one-query step reads only the filled prefix of a
    ring (moshax.layers.attention.rows_attention_filled), so a conversation's first 4 minutes step
    faster than the rest; the "rings full" rows time the rest."""
    from moshax.layers.attention import KV_CACHES

    def ring(c):
        cap = c.pos.shape[-1]
        newest = (position - 1) - ((position - 1 - np.arange(cap)) % cap)  # each slot's newest position
        return c._replace(pos=jnp.asarray(np.broadcast_to(newest, c.pos.shape), jnp.int32))

    cache = jax.tree.map(ring, state.cache, is_leaf=lambda c: isinstance(c, KV_CACHES))
    return state._replace(cache=cache, offset=jnp.full_like(state.offset, position))


def reference_worker(frames_total: int) -> None:
    """Child process: Kyutai's LMGen (greedy) on config (b) and the full loop with the full Mimi,
    random weights (bench/reference.py builds Mimi). Each stdin line "lm N" / "loop N" runs N more
    frames of the same stream and prints their per-frame seconds as one JSON line."""
    import torch
    from bench_mimi import ref_common
    from moshi.models import LMGen, loaders

    rc = ref_common()
    mimi, _ = rc.build_full_mimi()
    torch.manual_seed(4321)
    lm = loaders.get_moshi_lm(None, dict(loaders._lm_kwargs, **LM_B), device="cpu", dtype=torch.float32)
    lm.eval()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, LM_B["card"], (frames_total, 1, lm.dep_q, 1), generator=g)
    wav = rc.synth_audio(frames_total * rc.FRAME / rc.SR, seed=11)
    # One LMGen stream carries both rows (the LM's streaming state lives in its modules, so two
    # generators cannot share it); its positions stay far inside the 3000-frame context.
    gen = LMGen(lm, use_sampling=False)
    gen.streaming_forever(1)
    mimi.streaming_forever(1)
    at = {"lm": 0, "loop": 0}

    def lm_frame(i):
        gen.step(codes[i])

    def loop_frame(i):
        out = gen.step(mimi.encode(wav[:, :, i * rc.FRAME:(i + 1) * rc.FRAME]))
        if out is not None:  # the first frame: LMGen holds its output back by the delays
            mimi.decode(out[:, 1:])

    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "params": sum(p.numel() for p in lm.parameters())}), flush=True)
    for line in sys.stdin:
        what, n = line.split()
        frame = lm_frame if what == "lm" else loop_frame
        seconds = []
        with torch.no_grad():
            for _ in range(int(n)):
                t0 = time.perf_counter()
                frame(at[what])
                seconds.append(time.perf_counter() - t0)
                at[what] += 1
        print(json.dumps({"seconds": seconds}), flush=True)


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
    ap.add_argument("--no-reference", action="store_true", help="skip the PyTorch side")
    ap.add_argument("--rounds", type=int, default=4, help="alternated rounds of frames/rounds frames per side")
    ap.add_argument("--reference-worker", type=int, help=argparse.SUPPRESS)
    add_json_option(ap)
    args = ap.parse_args()
    load_start = os.getloadavg()
    if args.reference_worker:
        reference_worker(args.reference_worker)
        return 0
    if args.batches:
        if args.json:
            ap.error("--json writes the batch-1 rows' figures; it does not go with --batches")
        return batched(args)
    if args.frames < args.rounds or args.warmup < 1:
        ap.error("--frames must be at least --rounds, and --warmup at least 1")
    from flax import nnx

    from moshax.inference.moshi_stream import DuplexLoop, MoshiStream
    from moshax.inference.sampling import Sampling
    from moshax.models.mimi.config import MimiConfig
    from moshax.models.mimi.model import Mimi
    from moshax.models.moshi_lm import MoshiLM

    header(f"Moshi streaming generation, config (b), fp32, batch {args.batch}")
    n = args.warmup + args.frames
    ref = None
    if args.no_reference or args.batch != 1:
        print("reference side: skipped" + ("" if args.no_reference else " (it runs at batch 1 only)"))
    else:
        ref = LineWorker([sys.executable, __file__, "--reference-worker", str(n)], "default")
        print(f"reference side: torch {ref.info['torch']}, {ref.info['threads']} threads, child process, "
              f"{ref.info['params'] / 1e6:.2f}M params")
    print(f"load average at the start {load_average()}")
    cfg = moshi_config_from_kyutai(LM_B)
    lm = MoshiLM(cfg, rngs=nnx.Rngs(0))
    print(f"config (b): {lm.num_params() / 1e6:.2f}M params, context {cfg.transformer.context}, "
          f"delays {cfg.delays}")
    g = np.random.default_rng(0)
    codes = g.integers(0, cfg.card, (n, args.batch, cfg.n_q - cfg.dep_q, 1)).astype(np.int32)
    # name -> (per-frame call, its inputs, reference request or None)
    sides = {}
    greedy, sampled = MoshiStream(lm, args.batch, Sampling.greedy()), MoshiStream(lm, args.batch, Sampling())
    sides["LM step, greedy"] = (lambda c: greedy.step(c).audio, codes, "lm")
    sides["LM step, sampled (defaults)"] = (lambda c: sampled.step(c).audio, codes, None)
    if not args.skip_loop:
        mimi = Mimi(MimiConfig(), rngs=nnx.Rngs(1))
        loop = DuplexLoop(lm, mimi, args.batch, Sampling.greedy())
        wav = (0.1 * g.standard_normal((n, args.batch, 1, loop.frame_size))).astype(np.float32)
        sides["full loop (Mimi encode + LM step + Mimi decode)"] = (lambda x: loop.step(x)[0], wav, "loop")
    at = dict.fromkeys(sides, 0)

    def frames(name, count):
        fn, inputs, _ = sides[name]
        ms = run(fn, inputs[at[name]:at[name] + count], 0)
        at[name] += count
        return ms

    for name in sides:
        t0 = time.perf_counter()
        frames(name, 1)
        print(f"{name}: first frame (compile) {time.perf_counter() - t0:.1f} s")
        frames(name, args.warmup - 1)
        if ref is not None and sides[name][2]:
            ref.request(f"{sides[name][2]} {args.warmup}")
    ours = {name: [] for name in sides}
    theirs = {name: [] for name in sides if ref is not None and sides[name][2]}
    per_round = [args.frames // args.rounds + (r < args.frames % args.rounds) for r in range(args.rounds)]
    for count in per_round:  # alternated rounds: a change of load hits both sides alike
        for name in sides:
            if name in theirs:
                time.sleep(PAUSE)
                theirs[name] += ref.request(f"{sides[name][2]} {count}")["seconds"]
            time.sleep(PAUSE)
            ours[name] += frames(name, count)
    if ref is not None:
        ref.close()
    # the same streams with every ring full (a conversation past its first 4 minutes)
    full_at = cfg.transformer.context + n
    greedy.state = fast_forward(greedy.state, full_at)
    if not args.skip_loop:
        loop.lm_state = fast_forward(loop.lm_state, full_at)
    for name, (fn, inputs, kind) in list(sides.items()):
        if kind is not None:  # the greedy LM step and the loop
            time.sleep(PAUSE)
            ours[f"{name}, rings full (frame {full_at})"] = run(fn, inputs[-args.frames:], 0)
    print()
    print(f"| per frame (batch {args.batch}) | p50 ms | p99 ms | mean ms | real-time factor (p50 / 80 ms) "
          "| reference p50 ms | reference p99 ms | moshax vs reference (p50) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ms in ours.items():
        row = f"| {name} | {pct(ms, 50):.1f} | {pct(ms, 99):.1f} | {1e3 * np.mean(ms):.1f} | {pct(ms, 50) / 80:.2f} |"
        if name in theirs:
            t = theirs[name]
            row += f" {pct(t, 50):.1f} | {pct(t, 99):.1f} | {pct(t, 50) / pct(ms, 50):.2f}x |"
        else:
            row += " | | |"
        print(row)
    print(f"{args.frames} frames timed in {args.rounds} alternated rounds after {args.warmup} warm-up frames; "
          f"random weights and inputs; load average at the end {load_average()}")
    print("targets (2-core CPU): LM step p50 <= 50 ms; full loop p50 <= 80 ms. The reference reads its whole ring "
          "every step; moshax the filled part: the 'rings full' rows (no reference beside) are its steady state")
    short = {"LM step, greedy": "lm_step", "LM step, sampled (defaults)": "lm_step_sampled",
             "full loop (Mimi encode + LM step + Mimi decode)": "loop"}
    figures = {}
    for name, ms in ours.items():
        base = name.split(", rings full")[0]
        key = short[base] + ("_rings_full" if base != name else "")
        figures[f"{key}_p50_ms"] = pct(ms, 50)
        if name in theirs:
            figures[f"{key}_reference_p50_ms"] = pct(theirs[name], 50)
    write_figures(args.json, figures, load_start)
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
