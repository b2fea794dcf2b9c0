"""Masked multi-head attention with absolute positions: the implementations and their dispatch.

``reference_attention`` (:mod:`moshax.kernels.reference`, re-exported here) materializes the
[B, H, Tq, Tk] scores: simplest, exact, and what the tests compare everything against. ``chunked_attention`` runs it over blocks of queries under
``jax.checkpoint``, so a training step holds one block's scores at a time (a 7B step at 4096
tokens otherwise needs ~100 GiB per chip for scores and probabilities). ``attention`` picks,
including the Pallas kernels (:mod:`moshax.kernels.flash`, :mod:`moshax.kernels.decode`).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from moshax.kernels.decode import decode_attention, reference_decode_attention
from moshax.kernels.flash import flash_attention
from moshax.kernels.reference import attention_mask, reference_attention

__all__ = ["attention", "attention_mask", "chunked_attention", "compiling_for_tpu", "pallas_attention",
           "reference_attention", "target_platform"]

IMPLS = ("auto", "xla", "chunked", "pallas")
# At most this many queries (and more keys than queries): the decode kernel; else flash.
DECODE_MAX_Q = 16
# ``auto`` uses the kernels from this many keys (below, a 128-row tile would be mostly padding:
# Moshi's depth transformer attends over 8-17 steps).
PALLAS_MIN_KEYS = 128
# Mesh axes the Pallas kernels are split over (under ``shard_map``): batch, then heads.
BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("tensor",)

# Above this many score entries per (batch, head), the query-chunked path is used.
CHUNK_THRESHOLD = 1024 * 1024
BLOCK_Q = 512


def chunked_attention(q, k, v, q_pos, k_pos, *, context: int | None, causal: bool, block_q: int = BLOCK_Q):
    """Same result as :func:`reference_attention`, computed per block of ``block_q`` queries with
    rematerialization (memory O(block_q * Tk) per head instead of O(Tq * Tk))."""
    b, t, h, d = q.shape
    if t % block_q:
        return reference_attention(q, k, v, q_pos, k_pos, context=context, causal=causal)
    nb = t // block_q
    qb = q.reshape(b, nb, block_q, h, d).swapaxes(0, 1)
    pb = q_pos.reshape(b, nb, block_q).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        qi, pi = args
        return reference_attention(qi, k, v, pi, k_pos, context=context, causal=causal)

    out = jax.lax.map(one, (qb, pb))  # [nb, B, block_q, H, D]
    return out.swapaxes(0, 1).reshape(b, t, h, d)


def attention(q, k, v, q_pos, k_pos, *, context: int | None, causal: bool, impl: str = "auto"):
    """Dispatch: ``xla`` (reference), ``chunked``, ``pallas`` (flash kernel; the decode kernel for
    at most ``DECODE_MAX_Q`` queries), or ``auto``: Pallas on TPU (from ``PALLAS_MIN_KEYS`` keys),
    otherwise chunked for long sequences and the reference for short ones. On a CPU ``pallas`` runs the kernels in interpret
    mode (slow; for tests)."""
    if impl == "auto":
        if _on_tpu() and k.shape[1] >= PALLAS_MIN_KEYS:
            impl = "pallas"
        else:
            impl = "chunked" if q.shape[1] * k.shape[1] > CHUNK_THRESHOLD and q.shape[1] % BLOCK_Q == 0 else "xla"
    if impl == "chunked":
        return chunked_attention(q, k, v, q_pos, k_pos, context=context, causal=causal)
    if impl == "xla":
        return reference_attention(q, k, v, q_pos, k_pos, context=context, causal=causal)
    if impl == "pallas":
        return pallas_attention(q, k, v, q_pos, k_pos, context=context, causal=causal)
    raise ValueError(f"unknown attention implementation {impl!r} (one of {', '.join(IMPLS)})")


_TPU_TARGET = [False]


@contextlib.contextmanager
def compiling_for_tpu():
    """Trace as for a TPU while the default backend is the CPU (AOT compiles through libtpu):
    ``auto`` picks the Pallas kernels and they lower through Mosaic instead of interpret mode."""
    _TPU_TARGET.append(True)
    try:
        yield
    finally:
        _TPU_TARGET.pop()


def target_platform() -> str:
    """The platform being traced for: ``tpu`` under :func:`compiling_for_tpu`, else the context
    mesh's devices (``jax.set_mesh``: an AOT compile for a TPU topology from a CPU host says
    ``tpu``), else the default backend."""
    if _TPU_TARGET[-1]:
        return "tpu"
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _on_tpu() -> bool:
    """Whether ``auto`` picks the Pallas kernels: on a TPU backend or under
    :func:`compiling_for_tpu` (an AOT compile for a topology keeps XLA's chunked attention)."""
    return _TPU_TARGET[-1] or jax.default_backend() == "tpu"


def pallas_attention(q, k, v, q_pos, k_pos, *, context: int | None, causal: bool, interpret: bool | None = None):
    """The Pallas kernels, split over the context mesh (``jax.set_mesh``) with ``shard_map``: batch
    over ``data``/``fsdp`` and heads over ``tensor`` where they divide, replicated otherwise (a
    ``pallas_call`` is not partitioned by XLA)."""
    if interpret is None:
        interpret = not _on_tpu()
    if q.shape[1] <= DECODE_MAX_Q and k.shape[1] > q.shape[1]:
        fn = functools.partial(_decode_with_grad, context=context, causal=causal, interpret=interpret)
    else:
        fn = functools.partial(flash_attention, context=context, causal=causal, interpret=interpret)
    return _over_mesh(fn, q, k, v, q_pos, k_pos)


def _over_mesh(fn, q, k, v, q_pos, k_pos):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, q_pos, k_pos)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch, n = [], 1
    for a in BATCH_AXES:
        if sizes.get(a, 1) > 1 and q.shape[0] % (n * sizes[a]) == 0:
            batch.append(a)
            n *= sizes[a]
    heads, n = [], 1
    for a in HEAD_AXES:
        if sizes.get(a, 1) > 1 and k.shape[2] % (n * sizes[a]) == 0:
            heads.append(a)
            n *= sizes[a]
    bspec = tuple(batch) or None
    hspec = tuple(heads) or None
    P = jax.sharding.PartitionSpec
    x = P(bspec, None, hspec, None)
    p = P(bspec, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(x, x, x, p, p), out_specs=x, check_vma=False)(q, k, v, q_pos, k_pos)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _decode_with_grad(q, k, v, q_pos, k_pos, context, causal, interpret):
    """The decode kernel; its gradient (rarely needed: a few queries) comes from the reference."""
    return decode_attention(q, k, v, q_pos, k_pos, context=context, causal=causal, interpret=interpret)


def _decode_fwd(q, k, v, q_pos, k_pos, context, causal, interpret):
    return _decode_with_grad(q, k, v, q_pos, k_pos, context, causal, interpret), (q, k, v, q_pos, k_pos)


def _decode_bwd(context, causal, interpret, res, g):
    q, k, v, q_pos, k_pos = res
    _, vjp = jax.vjp(lambda q, k, v: reference_decode_attention(q, k, v, q_pos, k_pos, context=context, causal=causal),
                     q, k, v)
    return (*vjp(g), None, None)


_decode_with_grad.defvjp(_decode_fwd, _decode_bwd)
