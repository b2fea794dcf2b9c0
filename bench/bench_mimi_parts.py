"""Where the Mimi train step's time goes, part by part, moshax vs the reference (figures, not a test).

    .venv/bin/python bench/bench_mimi_parts.py [--repeats 7] [--malloc default]

Full released Mimi, same weights on both sides, B=4 x 2 s (bench_mimi_train.py's shapes). Each part
is timed alone, forward + backward of ``mean(part(x)**2)`` (gradients of its weights, and of its
input for the parts that get one in the step), median of ``--repeats`` after two warm-ups:

* SEANet encoder (audio in: no input gradient), encoder transformer, downsample, upsample, decoder
  transformer, SEANet decoder; moshax also times its split RVQ in train mode.

The two sides run one after the other in their own processes (their thread pools slow each other
down in one). The parts' sum is not the whole step: the step adds glue, and XLA overlaps some of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, load_average, median  # noqa: E402

B, SAMPLES = 4, 48000
PARTS = ["encoder", "encoder_transformer", "downsample", "upsample", "decoder_transformer", "decoder"]


def median_seconds(fn, repeats: int) -> float:
    """Median of ``repeats`` calls after two warm-ups, each after a short pause (as the other benches)."""
    fn()
    fn()
    ts = []
    for _ in range(repeats):
        time.sleep(0.3)
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return median(ts)


def torch_side(weights: str, repeats: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from bench_mimi import ref_common

    ref, _ = ref_common().build_full_mimi()
    ref.load_state_dict(load_file(weights))
    ref.train()
    x = torch.from_numpy(audio())
    with torch.no_grad():
        lat = ref.encoder(x)  # [B, 512, 50]
        inputs = {"encoder": x, "encoder_transformer": lat, "downsample": lat, "decoder_transformer": lat,
                  "decoder": lat, "upsample": ref.downsample(lat)}

    def step(mod, inp, wants_grad):
        def run():
            mod.zero_grad(set_to_none=True)
            i = inp.clone().requires_grad_(wants_grad)
            y = mod(i)
            y = y[0] if isinstance(y, (tuple, list)) else y
            y.square().mean().backward()
        return run

    return {p: median_seconds(step(getattr(ref, p), inputs[p], p != "encoder"), repeats) for p in PARTS}


def jax_side(weights: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from safetensors.numpy import load_file

    from moshax.interop.mimi_weights import mimi_from_kyutai_state_dict
    from moshax.models.mimi.config import MimiConfig

    cfg = MimiConfig()
    cfg.quantizer.num_codebooks = 8
    m = mimi_from_kyutai_state_dict(load_file(weights), cfg)
    x = jnp.asarray(audio()).transpose(0, 2, 1)  # [B, T, 1]: moshax's SEANet layout
    lat = m.encoder(x)  # [B, 50, 512]
    pos = jnp.broadcast_to(jnp.arange(lat.shape[1])[None], lat.shape[:2])
    calls = {p: (lambda mod, i: mod(i)) for p in PARTS}
    calls["encoder_transformer"] = calls["decoder_transformer"] = lambda mod, i: mod(i, pos)[0]
    inputs = {"encoder": x, "encoder_transformer": lat, "downsample": lat, "decoder_transformer": lat,
              "decoder": lat, "upsample": m.downsample(lat)}

    def step(part):
        graph, state = nnx.split(getattr(m, part))
        argnums = (0,) if part == "encoder" else (0, 1)

        def loss(state, inp):
            return jnp.mean(jnp.square(calls[part](nnx.merge(graph, state), inp)))

        grad = jax.jit(jax.grad(loss, argnums=argnums))
        return lambda: jax.block_until_ready(grad(state, inputs[part]))

    out = {p: median_seconds(step(p), repeats) for p in PARTS}
    graph, state = nnx.split(m.quantizer)
    key = jax.random.key(0)

    def rvq_loss(state, lat):
        o = nnx.merge(graph, state).train_forward_parts(lat, key, step=5, update_stats=False)
        return jnp.mean(jnp.square(o.quantized)) + o.penalty

    rvq = jax.jit(jax.grad(rvq_loss, argnums=(1,)))
    out["quantizer (train mode)"] = median_seconds(lambda: jax.block_until_ready(rvq(state, lat)), repeats)
    return out


def audio():
    import numpy as np

    return (np.random.default_rng(0).standard_normal((B, 1, SAMPLES)) * 0.1).astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned")
    ap.add_argument("--side", nargs=3, help=argparse.SUPPRESS)  # child: SIDE WEIGHTS OUT
    args = ap.parse_args()
    if args.side:
        side, weights, out = args.side
        if args.malloc == "tuned":
            from bench_lm_train import tune_malloc

            tune_malloc()
        res = (torch_side if side == "reference" else jax_side)(weights, args.repeats)
        Path(out).write_text(json.dumps(res))
        return 0

    from bench_mimi import ref_common

    header(f"Mimi train step by part (fwd+bwd of each part alone), B={B} x {SAMPLES / 24000:.0f} s")
    print(f"load average {load_average()}")
    from safetensors.torch import save_file

    ref, _ = ref_common().build_full_mimi()
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.detach().contiguous() for k, v in ref.state_dict().items()}, f"{tmp}/w.safetensors")
        res = {}
        for side in ("reference", "moshax"):
            out = f"{tmp}/{side}.json"
            subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--malloc", args.malloc,
                            "--side", side, f"{tmp}/w.safetensors", out], check=True)
            res[side] = json.loads(Path(out).read_text())
    print("\n| part, fwd+bwd | reference s | moshax s | moshax vs reference |")
    print("|---|---|---|---|")
    for part in [*PARTS, "quantizer (train mode)"]:
        r, mo = res["reference"].get(part), res["moshax"][part]
        print(f"| {part} | {r:.3f} | {mo:.3f} | {r / mo:.2f}x |" if r else f"| {part} | - | {mo:.3f} | - |")
    tr, tm = sum(res["reference"].values()), sum(res["moshax"].values())
    print(f"| sum | {tr:.3f} | {tm:.3f} | {tr / tm:.2f}x |")
    print(f"medians of {args.repeats} after 2 warm-ups; malloc {args.malloc}; "
          f"load average at the end {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
