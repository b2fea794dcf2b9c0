"""Pallas decode attention: a few new query steps against a (ring-buffer) KV cache.

The cache is the layer's ``KVCache`` layout: k, v [B, S, Hkv, D] with absolute positions
pos [B, S] (-1 = empty slot, in any order: the ring buffer wraps). A key is visible to a query
when ``pos_k >= 0``, ``0 <= q_pos - k_pos`` (causal) and ``q_pos - k_pos < context``, exactly as
:func:`moshax.kernels.attention.attention_mask`.

Flash-decoding: the cache axis is cut into ``block_k`` blocks, padded to a multiple of
``block_k * num_splits`` with empty slots (Moshi's 3000-step cache -> 3072). Blocks are split into
``num_splits`` independent ranges (a parallel grid axis: both TensorCores of a v5p chip get work
even at batch 1); each range runs an online softmax over its blocks and writes an unnormalized
partial (acc, max, sum); the partials are merged in plain JAX. GQA: q heads are grouped per kv
head (``Hq = Hkv * group``) and a group's ``group * Tq`` query rows share each loaded K/V block.

The kernel reads K/V head major ([B, Hkv, S, D], one [block_k, D] tile per step); the wrapper
transposes the cache to that layout (see docs/kernels.md: a head-major cache would let the kernel
read the ring buffer in place).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moshax.kernels.reference import reference_attention

BLOCK_K = 512
NEG = -1e30  # finite "minus infinity": fully masked blocks never make NaNs


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def block_mask(qp, kp, context: int | None, causal: bool):
    """In-kernel mask: qp [R, 1], kp [1, K] int32 -> [R, K] bool (as ``attention_mask``)."""
    delta = qp - kp
    mask = kp >= 0
    if causal:
        mask = mask & (delta >= 0)
    if context is not None:
        mask = mask & ((delta < context) if causal else (jnp.abs(delta) < context))
    return mask


def _decode_kernel(q_ref, qp_ref, kp_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, scale, context, causal):
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    q = q_ref[...]  # [R, D]
    k = k_ref[...]  # [bk, D]
    v = v_ref[...]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    mask = block_mask(qp_ref[...], kp_ref[...], context, causal)  # [R, bk]
    s = jnp.where(mask, s, NEG)
    m_prev = m_ref[...]  # [R, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    m_ref[...] = m_new


@functools.partial(jax.jit, static_argnames=("context", "causal", "block_k", "num_splits", "interpret"))
def decode_attention(q, k, v, q_pos, k_pos, *, context: int | None, causal: bool = True,
                     block_k: int = BLOCK_K, num_splits: int = 1, interpret: bool = False):
    """q [B, Tq, Hq, D] (Tq small: 1 for a decode step), k/v [B, S, Hkv, D], q_pos [B, Tq],
    k_pos [B, S] (absolute, -1 = empty) -> [B, Tq, Hq, D] in q's dtype.

    ``Hq`` must be a multiple of ``Hkv`` (GQA); rows with no visible key give zeros."""
    b, tq, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    g = hq // hkv
    r = g * tq
    bk = min(block_k, _round_up(s_len, 128 if not interpret else 8))
    s_pad = _round_up(s_len, bk * num_splits)
    nblk = s_pad // bk // num_splits

    # q [B, Tq, Hkv, g, D] -> [B, Hkv, g*Tq, D]; each row's position repeats per group head.
    qg = q.reshape(b, tq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, r, d)
    qp = jnp.broadcast_to(q_pos.astype(jnp.int32)[:, None, :], (b, g, tq)).reshape(b, r, 1)
    kt = jnp.swapaxes(k, 1, 2)  # [B, Hkv, S, D]
    vt = jnp.swapaxes(v, 1, 2)
    kp = k_pos.astype(jnp.int32)
    if s_pad != s_len:
        pad = s_pad - s_len
        kt = jnp.pad(kt, ((0, 0), (0, 0), (0, pad), (0, 0)))
        vt = jnp.pad(vt, ((0, 0), (0, 0), (0, pad), (0, 0)))
        kp = jnp.pad(kp, ((0, 0), (0, pad)), constant_values=-1)
    kp = kp.reshape(b, 1, s_pad)

    kernel = functools.partial(_decode_kernel, scale=d ** -0.5, context=context, causal=causal)
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda bi, h, sp, j: (bi, h, sp * nblk + j, 0))
    part = lambda *shape: pl.BlockSpec((None, None, None) + shape, lambda bi, h, sp, j: (bi, h, sp, 0, 0))
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits, nblk),
        in_specs=[
            pl.BlockSpec((None, None, r, d), lambda bi, h, sp, j: (bi, h, 0, 0)),
            pl.BlockSpec((None, r, 1), lambda bi, h, sp, j: (bi, 0, 0)),
            pl.BlockSpec((None, 1, bk), lambda bi, h, sp, j: (bi, 0, sp * nblk + j)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[part(r, d), part(r, 1), part(r, 1)],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, num_splits, r, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, num_splits, r, 1), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, num_splits, r, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="moshax_decode_attention",
    )(qg, qp, kp, kt, vt)
    out = combine_partials(acc, m, l)  # [B, Hkv, r, D]
    out = out.reshape(b, hkv, g, tq, d).transpose(0, 3, 1, 2, 4).reshape(b, tq, hq, d)
    return out.astype(q.dtype)


def combine_partials(acc, m, l):
    """Merge per-split online-softmax partials acc [..., S, R, D], m/l [..., S, R, 1] over S."""
    m_all = jnp.max(m, axis=-3, keepdims=True)
    w = jnp.exp(m - m_all)
    num = jnp.sum(acc * w, axis=-3)
    den = jnp.sum(l * w, axis=-3)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def reference_decode_attention(q, k, v, q_pos, k_pos, *, context: int | None, causal: bool = True):
    """Plain-jnp reference for :func:`decode_attention` (GQA by repeating kv heads)."""
    g = q.shape[2] // k.shape[2]
    if g > 1:
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    return reference_attention(q, k, v, q_pos, k_pos, context=context, causal=causal)
