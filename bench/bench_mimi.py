"""Full released Mimi on this CPU, moshax (JAX, jitted) vs the PyTorch reference (moshi 0.2.13,
2 threads), same weights and the same input, in one run.

    NO_TORCH_COMPILE=1 .venv/bin/python bench/bench_mimi.py [--repeats 5] [--frames 100]

1. batch encode / decode of 10 s of 24 kHz mono (B=1): seconds of audio per wall second, ratio;
2. streaming, one 80 ms frame (1920 samples) at a time, B=1: encode / decode / encode+decode
   latency p50 / p99 against the 80 ms real-time budget.

The reference side is /work/shared/bench-ref/common.py (random weights, codebooks filled from
synthetic audio); its state dict is loaded into moshax with moshax.interop.mimi_weights, and the
codes of both sides are compared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
REF = Path(os.environ.get("MOSHAX_BENCH_REF", "/work/shared/bench-ref"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, median  # noqa: E402


def ref_common():
    """The reference's bench-ref/common.py (torch, 2 threads), loaded by path (bench/common.py
    has the same module name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_ref_common", REF / "common.py")
    rc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rc)
    return rc


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--warmup-frames", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()

    header("Mimi (full released architecture, random weights, 8 codebooks): moshax vs PyTorch reference")
    rc = ref_common()
    import torch

    from moshax.interop.mimi_weights import mimi_from_kyutai_state_dict
    from moshax.models.mimi.config import MimiConfig

    print(f"reference: torch {torch.__version__}, threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    ref, _ = rc.build_full_mimi()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    cfg = MimiConfig()
    model = mimi_from_kyutai_state_dict(sd, cfg)
    print(f"built both in {time.perf_counter() - t0:.1f}s; params {rc.fmt_m(rc.nparams(ref))}")

    wav = rc.synth_audio(args.seconds, seed=7)  # [1, 1, 240000]
    x = jnp.asarray(wav.numpy())
    encode = nnx.jit(lambda m, a: m.encode(a, 8))
    decode = nnx.jit(lambda m, c: m.decode(c))
    t0 = time.perf_counter()
    codes = encode(model, x).block_until_ready()
    c_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode(model, codes).block_until_ready()
    c_dec = time.perf_counter() - t0
    print(f"moshax compile+first call: encode {c_enc:.1f}s, decode {c_dec:.1f}s")

    def timeit(fn):
        fn()
        out = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    results = {}
    with torch.no_grad():
        ref_codes = ref.encode(wav)
        # interleave the two sides so load changes on this shared machine hit both alike
        for name, ours, theirs in (
                ("encode", lambda: encode(model, x).block_until_ready(), lambda: ref.encode(wav)),
                ("decode", lambda: decode(model, codes).block_until_ready(), lambda: ref.decode(ref_codes))):
            a, b = [], []
            for _ in range(2):
                a += timeit(ours)
                b += timeit(theirs)
            results[name] = (median(a), median(b))
    equal = float(np.mean(np.asarray(codes) == ref_codes.numpy()))

    print()
    print(f"| batch op (B=1, {args.seconds:.0f} s audio) | moshax median s | moshax audio s/s | reference median s "
          f"| reference audio s/s | moshax / reference |")
    print("|---|---|---|---|---|---|")
    for name, (ours, theirs) in results.items():
        print(f"| {name} | {ours:.3f} | {args.seconds / ours:.2f} | {theirs:.3f} | {args.seconds / theirs:.2f} | "
              f"{theirs / ours:.2f}x |")
    print(f"codes equal to the reference's: {100 * equal:.2f}%")

    # streaming, one frame at a time
    frame = cfg.frame_size
    n_total = args.warmup_frames + args.frames
    swav = rc.synth_audio(n_total * frame / cfg.sample_rate, seed=8)
    sx = np.asarray(swav.numpy())
    enc_step = nnx.jit(lambda m, a, s: m.encode_step(a, s, 8))
    dec_step = nnx.jit(lambda m, c, s: m.decode_step(c, s))
    state = model.init_state(1)
    ours_enc, ours_dec, s_codes = [], [], []
    for i in range(n_total):
        chunk = jnp.asarray(sx[:, :, i * frame:(i + 1) * frame])
        t0 = time.perf_counter()
        c, state = enc_step(model, chunk, state)
        c.block_until_ready()
        t1 = time.perf_counter()
        a, state = dec_step(model, c, state)
        a.block_until_ready()
        t2 = time.perf_counter()
        s_codes.append(np.asarray(c))
        if i >= args.warmup_frames:
            ours_enc.append(1e3 * (t1 - t0))
            ours_dec.append(1e3 * (t2 - t1))
    batch_codes = np.asarray(encode(model, jnp.asarray(sx)))
    s_codes = np.concatenate(s_codes, -1)
    match = float(np.mean(s_codes == batch_codes[..., :s_codes.shape[-1]]))
    ref_enc, ref_dec = [], []
    with torch.no_grad(), ref.streaming(1):
        for i in range(n_total):
            chunk = swav[:, :, i * frame:(i + 1) * frame]
            t0 = time.perf_counter()
            c = ref.encode(chunk)
            t1 = time.perf_counter()
            ref.decode(c)
            t2 = time.perf_counter()
            if i >= args.warmup_frames:
                ref_enc.append(1e3 * (t1 - t0))
                ref_dec.append(1e3 * (t2 - t1))

    print()
    print(f"| streaming (B=1, 1 frame = {frame} samples = 80 ms) | moshax p50 ms | moshax p99 ms | reference p50 ms "
          f"| reference p99 ms | moshax / reference (p50) |")
    print("|---|---|---|---|---|---|")
    for name, ours, theirs in (("encode frame", ours_enc, ref_enc), ("decode frame", ours_dec, ref_dec),
                               ("encode+decode", [a + b for a, b in zip(ours_enc, ours_dec)],
                                [a + b for a, b in zip(ref_enc, ref_dec)])):
        print(f"| {name} | {pct(ours, 50):.2f} | {pct(ours, 99):.2f} | {pct(theirs, 50):.2f} | {pct(theirs, 99):.2f} | "
              f"{pct(theirs, 50) / pct(ours, 50):.2f}x |")
    both = [a + b for a, b in zip(ours_enc, ours_dec)]
    print(f"\n{args.frames} frames timed after {args.warmup_frames} warm-up frames; budget 80 ms/frame: moshax p50 "
          f"{pct(both, 50):.1f} ms ({'within' if pct(both, 50) <= 80 else 'over'} budget, target <= 40 ms); "
          f"streaming codes == batch codes on {100 * match:.2f}% of entries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
