"""Masked multi-head attention with absolute positions, in XLA.

``reference_attention`` materializes the [B, H, Tq, Tk] scores: simplest, exact, and what the
tests compare everything against. ``chunked_attention`` runs it over blocks of queries under
``jax.checkpoint``, so a training step holds one block's scores at a time (a 7B step at 4096
tokens otherwise needs ~100 GiB per chip for scores and probabilities). ``attention`` picks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Above this many score entries per (batch, head), the query-chunked path is used.
CHUNK_THRESHOLD = 1024 * 1024
BLOCK_Q = 512


def attention_mask(q_pos, k_pos, context: int | None, causal: bool):
    """[B, Tq, Tk] boolean: key valid (pos >= 0), causal and within the context window."""
    delta = q_pos[:, :, None] - k_pos[:, None, :]
    mask = k_pos[:, None, :] >= 0
    if causal:
        mask &= delta >= 0
    if context is not None:
        mask &= delta < context if causal else jnp.abs(delta) < context
    return mask


def reference_attention(q, k, v, q_pos, k_pos, *, context: int | None, causal: bool):
    """q [B, Tq, H, D], k/v [B, Tk, H, D], positions [B, T]; softmax in fp32."""
    mask = attention_mask(q_pos, k_pos, context, causal)
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None], probs, 0.0)  # rows with no valid key give zeros, not NaN
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


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
    """Dispatch: ``xla`` (reference), ``chunked``, or ``auto`` (chunked for long sequences)."""
    if impl == "auto":
        impl = "chunked" if q.shape[1] * k.shape[1] > CHUNK_THRESHOLD and q.shape[1] % BLOCK_Q == 0 else "xla"
    if impl == "chunked":
        return chunked_attention(q, k, v, q_pos, k_pos, context=context, causal=causal)
    if impl == "xla":
        return reference_attention(q, k, v, q_pos, k_pos, context=context, causal=causal)
    raise ValueError(f"unknown attention implementation {impl!r}")
