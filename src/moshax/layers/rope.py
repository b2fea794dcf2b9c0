"""Rotary position embedding with interleaved pairs (adjacent dims are real/imag), as Kyutai's."""

from __future__ import annotations

import jax.numpy as jnp


def apply_rope(x, positions, max_period: float = 10000.0):
    """Rotate ``x`` [B, T, H, D] by absolute ``positions`` [B, T] (or [T]).

    Pair i = (x[..., 2i], x[..., 2i+1]) turns by angle pos * max_period ** (-2i / D). Computed in
    float32 and cast back.
    """
    d = x.shape[-1]
    half = d // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-jnp.log(max_period) * 2.0 / d))
    positions = jnp.asarray(positions, jnp.float32)
    if positions.ndim == 1:
        positions = positions[None, :]
    angles = positions[:, :, None, None] * freqs  # [B, T, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], half, 2)
    re, im = xf[..., 0], xf[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
