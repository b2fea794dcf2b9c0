"""Pallas flash attention for training and prefill: causal, optional sliding window, absolute
positions, GQA, forward and backward kernels under one ``jax.custom_vjp``.

Layout: the wrapper takes the model's [B, T, H, D] and runs the kernels head major
([B, H, T, D]: one [block, D] tile per grid step, D on the lanes). The mask is computed in the
kernel from the positions (``k_pos >= 0``, causal, ``q_pos - k_pos < context``: the same rule as
:func:`moshax.kernels.attention.attention_mask`), so any absolute positions work (packed rows,
streaming offsets, padding = -1). Per-block position bounds go to SMEM (scalar prefetch) and a
(q block, k block) pair that the mask empties entirely is skipped: causal training does about half
the work, a window of W does about ``T * W`` instead of ``T^2 / 2``. The index maps clamp the
streamed blocks to each row's live range, so skipped steps outside it fetch nothing either.

Forward: online softmax over k blocks, writes out and the row log-sum-exp. Backward: two kernels
(FlashAttention-2): dK/dV per k block looping over q blocks, dQ per q block looping over k blocks,
both recomputing P from the saved log-sum-exp. GQA: the kernels index the kv head ``h // group``;
dK/dV come out per q head and are summed over each group in JAX.

Sequence lengths are padded to the block size (Moshi's 3000 -> 3072): padded keys get position -1
(masked), padded queries repeat the last position and are sliced away.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moshax.kernels.decode import NEG, _round_up, block_mask, reference_decode_attention

BLOCK_Q = 512
BLOCK_K = 512
BLOCK_Q_BWD = 256
BLOCK_K_BWD = 512
BIG = 2**30  # "no valid position" sentinel for block bounds

NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _block_bounds(pos, block: int, valid_only: bool):
    """Per-block (min, max) of positions [B, T] -> two [B, T // block] int32 arrays. With
    ``valid_only`` (keys), empty slots (pos < 0) are ignored; a block with none gets (BIG, -BIG)."""
    b, t = pos.shape
    p = pos.reshape(b, t // block, block)
    if valid_only:
        lo = jnp.min(jnp.where(p >= 0, p, BIG), axis=-1)
        hi = jnp.max(jnp.where(p >= 0, p, -BIG), axis=-1)
    else:
        lo, hi = jnp.min(p, axis=-1), jnp.max(p, axis=-1)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _block_live(qlo, qhi, klo, khi, context, causal):
    """Scalar test: can any (q, k) pair of these blocks be visible?"""
    live = klo <= khi  # some valid key
    if causal:
        live = jnp.logical_and(live, klo <= qhi)
    if context is not None:
        live = jnp.logical_and(live, qlo - khi < context)
        if not causal:
            live = jnp.logical_and(live, klo - qhi < context)
    return live


def _live_ranges(qlo, qhi, klo, khi, context, causal):
    """From block bounds: for each q block the first/last k block that may be live (jlo, jhi
    [B, nq]) and for each k block the first/last live q block (ilo, ihi [B, nk]); 0 when none."""
    live = _block_live(qlo[:, :, None], qhi[:, :, None], klo[:, None, :], khi[:, None, :], context, causal)
    live = jnp.broadcast_to(live, qlo.shape + klo.shape[1:])  # [B, nq, nk] even when q bounds do not matter

    def first_last(x, axis):
        n = x.shape[axis]
        anyv = jnp.any(x, axis=axis)
        lo = jnp.argmax(x, axis=axis)
        hi = n - 1 - jnp.argmax(jnp.flip(x, axis=axis), axis=axis)
        return jnp.where(anyv, lo, 0).astype(jnp.int32), jnp.where(anyv, hi, 0).astype(jnp.int32)

    return (*first_last(live, 2), *first_last(live, 1))


def _kj(bi, i, j, tables):
    """k block fetched at step (i, j): j clamped to the live range of q block i, so steps outside
    it repeat the previous block index and the pipeline issues no copy."""
    jlo, jhi = tables[4], tables[5]
    return jnp.minimum(jnp.maximum(j, jlo[bi, i]), jhi[bi, i])


def _qi(bi, i, j, tables):
    """q block fetched at step (j, i) of the dK/dV kernel: i clamped to k block j's live range."""
    ilo, ihi = tables[6], tables[7]
    return jnp.minimum(jnp.maximum(i, ilo[bi, j]), ihi[bi, j])


# ----------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(qlo_ref, qhi_ref, klo_ref, khi_ref, _jlo, _jhi, _ilo, _ihi, q_ref, qp_ref, k_ref, v_ref, kp_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, context, causal):
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    live = _block_live(qlo_ref[bi, i], qhi_ref[bi, i], klo_ref[bi, j], khi_ref[bi, j], context, causal)

    @pl.when(live)
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
        mask = block_mask(qp_ref[...], kp_ref[...], context, causal)
        s = jnp.where(mask, s, NEG)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _done():
        l = l_sc[...]
        ok = l > 0
        safe = jnp.where(ok, l, 1.0)
        o_ref[...] = jnp.where(ok, acc_sc[...] / safe, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(ok, m_sc[...] + jnp.log(safe), 0.0)


def _prefetch_spec(grid, in_specs, out_specs, scratch):
    return pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=8, grid=grid, in_specs=in_specs,
                                        out_specs=out_specs, scratch_shapes=scratch)


def _fwd(q, k, v, qp, kp, bounds, *, context, causal, bq, bk, interpret):
    """Head-major padded inputs: q [B, Hq, T, D], k/v [B, Hkv, S, D], qp [B, T, 1], kp [B, 1, S]."""
    b, hq, t, d = q.shape
    hkv, s_len = k.shape[1], k.shape[2]
    g = hq // hkv
    grid = (b, hq, t // bq, s_len // bk)
    qspec = pl.BlockSpec((None, None, bq, d), lambda bi, h, i, j, *_: (bi, h, i, 0))
    kspec = pl.BlockSpec((None, None, bk, d), lambda bi, h, i, j, *t: (bi, h // g, _kj(bi, i, j, t), 0))
    in_specs = [
        qspec,
        pl.BlockSpec((None, bq, 1), lambda bi, h, i, j, *_: (bi, i, 0)),
        kspec,
        kspec,
        pl.BlockSpec((None, 1, bk), lambda bi, h, i, j, *t: (bi, 0, _kj(bi, i, j, t))),
    ]
    out_specs = [qspec, pl.BlockSpec((None, None, bq, 1), lambda bi, h, i, j, *_: (bi, h, i, 0))]
    scratch = [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, d), jnp.float32)]
    kernel = functools.partial(_fwd_kernel, scale=d ** -0.5, context=context, causal=causal)
    return pl.pallas_call(
        kernel,
        grid_spec=_prefetch_spec(grid, in_specs, out_specs, scratch),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, t, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="moshax_flash_fwd",
    )(*bounds, q, qp, k, v, kp)


# ----------------------------------------------------------------------------------------------
# backward


def _recompute_p(q, k, qp, kp, lse, scale, context, causal):
    s = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
    mask = block_mask(qp, kp, context, causal)
    return jnp.where(mask, jnp.exp(s - lse), 0.0)


def _dkv_kernel(qlo_ref, qhi_ref, klo_ref, khi_ref, _jlo, _jhi, _ilo, _ihi, q_ref, qp_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, kp_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, scale, context, causal):
    bi, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    live = _block_live(qlo_ref[bi, i], qhi_ref[bi, i], klo_ref[bi, j], khi_ref[bi, j], context, causal)

    @pl.when(live)
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p = _recompute_p(q, k, qp_ref[...], kp_ref[...], lse_ref[...], scale, context, causal)  # [bq, bk]
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, TN, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, TN, preferred_element_type=jnp.float32)

    @pl.when(i == pl.num_programs(3) - 1)
    def _done():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(qlo_ref, qhi_ref, klo_ref, khi_ref, _jlo, _jhi, _ilo, _ihi, q_ref, qp_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, kp_ref,
               dq_ref, dq_sc, *, scale, context, causal):
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    live = _block_live(qlo_ref[bi, i], qhi_ref[bi, i], klo_ref[bi, j], khi_ref[bi, j], context, causal)

    @pl.when(live)
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p = _recompute_p(q, k, qp_ref[...], kp_ref[...], lse_ref[...], scale, context, causal)
        dp = jax.lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _done():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _bwd(q, k, v, qp, kp, o, lse, do, bounds, *, context, causal, bq, bk, interpret):
    b, hq, t, d = q.shape
    hkv, s_len = k.shape[1], k.shape[2]
    g = hq // hkv
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)  # [B, Hq, T, 1]
    scale = d ** -0.5
    args = (*bounds, q, qp, do, lse, delta, k, v, kp)

    # dK, dV: grid over k blocks (parallel), q blocks innermost (arbitrary); per q head.
    qrow = lambda shape: pl.BlockSpec((None, None, bq, shape), lambda bi, h, j, i, *t: (bi, h, _qi(bi, i, j, t), 0))
    kblk = pl.BlockSpec((None, None, bk, d), lambda bi, h, j, i, *_: (bi, h // g, j, 0))
    in_specs = [qrow(d), pl.BlockSpec((None, bq, 1), lambda bi, h, j, i, *t: (bi, _qi(bi, i, j, t), 0)), qrow(d),
                qrow(1), qrow(1),
                kblk, kblk, pl.BlockSpec((None, 1, bk), lambda bi, h, j, i, *_: (bi, 0, j))]
    out_kv = pl.BlockSpec((None, None, bk, d), lambda bi, h, j, i, *_: (bi, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, context=context, causal=causal),
        grid_spec=_prefetch_spec((b, hq, s_len // bk, t // bq), in_specs, [out_kv, out_kv],
                                 [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, hq, s_len, d), jnp.float32)] * 2,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="moshax_flash_bwd_dkv",
    )(*args)

    # dQ: grid over q blocks (parallel), k blocks innermost (arbitrary).
    qrow = lambda shape: pl.BlockSpec((None, None, bq, shape), lambda bi, h, i, j, *_: (bi, h, i, 0))
    kblk = pl.BlockSpec((None, None, bk, d), lambda bi, h, i, j, *t: (bi, h // g, _kj(bi, i, j, t), 0))
    in_specs = [qrow(d), pl.BlockSpec((None, bq, 1), lambda bi, h, i, j, *_: (bi, i, 0)), qrow(d), qrow(1), qrow(1),
                kblk, kblk, pl.BlockSpec((None, 1, bk), lambda bi, h, i, j, *t: (bi, 0, _kj(bi, i, j, t)))]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, context=context, causal=causal),
        grid_spec=_prefetch_spec((b, hq, t // bq, s_len // bk), in_specs, [qrow(d)], [pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="moshax_flash_bwd_dq",
    )(*args)[0]
    if g > 1:
        dk = dk.reshape(b, hkv, g, s_len, d).sum(axis=2)
        dv = dv.reshape(b, hkv, g, s_len, d).sum(axis=2)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


# ----------------------------------------------------------------------------------------------
# the differentiable entry point


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, qp, kp, cfg):
    return _flash_fwd(q, k, v, qp, kp, cfg)[0]


def _bounds(qp, kp, cfg, fwd: bool):
    bq, bk = (cfg["bq"], cfg["bk"]) if fwd else (cfg["bq_bwd"], cfg["bk_bwd"])
    qlo, qhi = _block_bounds(qp[:, :, 0], bq, valid_only=False)
    klo, khi = _block_bounds(kp[:, 0, :], bk, valid_only=True)
    ranges = _live_ranges(qlo, qhi, klo, khi, cfg["context"], cfg["causal"])
    return (qlo, qhi, klo, khi, *ranges), bq, bk


def _flash_fwd(q, k, v, qp, kp, cfg):
    bounds, bq, bk = _bounds(qp, kp, cfg, True)
    o, lse = _fwd(q, k, v, qp, kp, bounds, context=cfg["context"], causal=cfg["causal"], bq=bq, bk=bk,
                  interpret=cfg["interpret"])
    return o, (q, k, v, qp, kp, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, qp, kp, o, lse = res
    bounds, bq, bk = _bounds(qp, kp, cfg, False)
    dq, dk, dv = _bwd(q, k, v, qp, kp, o, lse, do, bounds, context=cfg["context"], causal=cfg["causal"], bq=bq,
                      bk=bk, interpret=cfg["interpret"])
    return dq, dk, dv, None, None


def _flash_fwd_rule(q, k, v, qp, kp, cfg):
    return _flash_fwd(q, k, v, qp, kp, cfg)


_flash.defvjp(_flash_fwd_rule, _flash_bwd)


class _Cfg(dict):
    """Hashable static config for ``nondiff_argnums``."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


def _blocks(t: int, want: int, align: int) -> int:
    return min(want, _round_up(t, align))


def flash_attention(q, k, v, q_pos, k_pos, *, context: int | None, causal: bool = True,
                    block_q: int = BLOCK_Q, block_k: int = BLOCK_K, block_q_bwd: int = BLOCK_Q_BWD,
                    block_k_bwd: int = BLOCK_K_BWD, interpret: bool = False):
    """q [B, T, Hq, D], k/v [B, S, Hkv, D], q_pos [B, T], k_pos [B, S] -> [B, T, Hq, D].

    Differentiable (Pallas backward kernels). Blocks shrink to the (128-aligned) sequence length
    when it is shorter; T and S are padded to a multiple of all blocks of their axis."""
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    align = 8 if interpret else 128
    bq, bqb = _blocks(t, block_q, align), _blocks(t, block_q_bwd, align)
    bk, bkb = _blocks(s_len, block_k, align), _blocks(s_len, block_k_bwd, align)
    t_pad = _round_up(t, _lcm(bq, bqb))
    s_pad = _round_up(s_len, _lcm(bk, bkb))
    qp = q_pos.astype(jnp.int32)
    kp = k_pos.astype(jnp.int32)
    qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    if t_pad != t:
        qh = jnp.pad(qh, ((0, 0), (0, 0), (0, t_pad - t), (0, 0)))
        qp = jnp.pad(qp, ((0, 0), (0, t_pad - t)), mode="edge")
    if s_pad != s_len:
        kh = jnp.pad(kh, ((0, 0), (0, 0), (0, s_pad - s_len), (0, 0)))
        vh = jnp.pad(vh, ((0, 0), (0, 0), (0, s_pad - s_len), (0, 0)))
        kp = jnp.pad(kp, ((0, 0), (0, s_pad - s_len)), constant_values=-1)
    cfg = _Cfg(context=context, causal=causal, bq=bq, bk=bk, bq_bwd=bqb, bk_bwd=bkb, interpret=interpret)
    out = _flash(qh, kh, vh, qp[:, :, None], kp[:, None, :], cfg)
    return jnp.swapaxes(out[:, :, :t], 1, 2)


def _lcm(a: int, b: int) -> int:
    import math

    return a * b // math.gcd(a, b)


def reference_flash_attention(q, k, v, q_pos, k_pos, *, context: int | None, causal: bool = True):
    """Plain-jnp reference (``reference_attention``, kv heads repeated for GQA)."""
    return reference_decode_attention(q, k, v, q_pos, k_pos, context=context, causal=causal)
