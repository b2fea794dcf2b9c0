"""The plain-XLA masked attention every kernel is checked against (and its mask rule)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    probs = masked_softmax(scores, mask[:, None])
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def masked_softmax(scores, mask):
    """Softmax over the last axis of the keys ``mask`` allows; rows with no valid key give zeros, not NaN."""
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.where(mask, probs, 0.0)
