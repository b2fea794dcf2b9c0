"""Pallas attention kernels vs XLA: decode step over a KV cache, flash forward and forward+backward.

    .venv/bin/python bench/bench_attention.py [--quick]

On a TPU the kernels run compiled (Mosaic) and the table gives the decode kernel's effective HBM
bandwidth (bytes of K and V read per step / time). Anywhere else the kernels run in Pallas
interpret mode, which emulates the grid step by step on the host: those numbers say nothing about
the kernels' speed (they only show the script works); the XLA column is the real XLA path.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, median, timed  # noqa: E402

from moshax.kernels.attention import chunked_attention, reference_attention  # noqa: E402
from moshax.kernels.decode import decode_attention, reference_decode_attention  # noqa: E402
from moshax.kernels.flash import flash_attention  # noqa: E402


def run(fn, *args):
    return lambda: jax.block_until_ready(fn(*args))


def decode_rows(on_tpu: bool, quick: bool):
    b_list = (1, 8) if on_tpu else (1,)
    cap, heads, d = (3000, 32, 128) if on_tpu else ((3000, 4, 128) if not quick else (512, 2, 64))
    dtype = jnp.bfloat16 if on_tpu else jnp.float32
    rows = []
    for b in b_list:
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.normal(size=(b, 1, heads, d)), dtype)
        k = jnp.asarray(rng.normal(size=(b, cap, heads, d)), dtype)
        v = jnp.asarray(rng.normal(size=(b, cap, heads, d)), dtype)
        end = cap + 500  # a wrapped ring
        kp = np.full((b, cap), -1, np.int32)
        for p in range(end - cap, end):
            kp[:, p % cap] = p
        kp = jnp.asarray(kp)
        qp = jnp.full((b, 1), end, jnp.int32)
        kern = jax.jit(functools.partial(decode_attention, context=cap, interpret=not on_tpu))
        xla = jax.jit(functools.partial(reference_decode_attention, context=cap))
        reps = 20 if on_tpu else 3
        tk = median(timed(run(kern, q, k, v, qp, kp), reps))
        tx = median(timed(run(xla, q, k, v, qp, kp), reps))
        err = float(jnp.max(jnp.abs(kern(q, k, v, qp, kp).astype(jnp.float32) - xla(q, k, v, qp, kp).astype(jnp.float32))))
        gbytes = 2 * k.size * k.dtype.itemsize / 1e9
        rows.append((f"decode B={b} H={heads} D={d} cache={cap} {jnp.dtype(dtype).name}", tk, tx, err,
                     f"{gbytes / tk:.1f} GB/s" if on_tpu else "-"))
    return rows


def flash_rows(on_tpu: bool, quick: bool):
    t, heads, d = (4096, 32, 128) if on_tpu else ((512, 2, 64) if not quick else (256, 2, 64))
    dtype = jnp.bfloat16 if on_tpu else jnp.float32
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, t, heads, d)), dtype) for _ in range(3))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
    rows = []
    for ctx in (None, t // 4):
        kw = dict(context=ctx, causal=True)
        kern = jax.jit(lambda q, k, v: flash_attention(q, k, v, pos, pos, interpret=not on_tpu, **kw))
        xla = jax.jit(lambda q, k, v: chunked_attention(q, k, v, pos, pos, **kw) if t % 512 == 0
                      else reference_attention(q, k, v, pos, pos, **kw))
        reps = 10 if on_tpu else 2
        loss = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
        name = f"flash T={t} H={heads} D={d} window={ctx}"
        tk = median(timed(run(kern, q, k, v), reps))
        tx = median(timed(run(xla, q, k, v), reps))
        err = float(jnp.max(jnp.abs(kern(q, k, v).astype(jnp.float32) - xla(q, k, v).astype(jnp.float32))))
        rows.append((name + " fwd", tk, tx, err, "-"))
        gk, gx = loss(kern), loss(xla)
        tk = median(timed(run(gk, q, k, v), reps))
        tx = median(timed(run(gx, q, k, v), reps))
        err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                  for a, b in zip(gk(q, k, v), gx(q, k, v)))
        rows.append((name + " fwd+bwd", tk, tx, err, "-"))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller CPU shapes")
    args = ap.parse_args()
    on_tpu = jax.default_backend() == "tpu"
    header("attention kernels: Pallas vs XLA")
    if not on_tpu:
        print("NOTE: not a TPU: the Pallas kernels run in interpret mode (a host emulation); their times are "
              "not kernel speed.")
    rows = decode_rows(on_tpu, args.quick) + flash_rows(on_tpu, args.quick)
    print(f"{'case':<52} {'pallas s':>10} {'xla s':>10} {'max |diff|':>11}  bandwidth")
    for name, tk, tx, err, bw in rows:
        print(f"{name:<52} {tk:>10.4f} {tx:>10.4f} {err:>11.2e}  {bw}")


if __name__ == "__main__":
    main()
