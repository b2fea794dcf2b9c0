"""Losses returned as (sum, weight) pairs so gradient accumulation and data sharding stay exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits, targets, weights=None):
    """Weighted token cross-entropy. logits [..., V] (any float dtype, computed in fp32),
    targets [...] int; returns (sum of weighted losses, sum of weights)."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = logz - picked
    if weights is None:
        weights = jnp.ones_like(nll)
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)
