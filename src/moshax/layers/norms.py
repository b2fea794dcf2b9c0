"""RMSNorm (fp32 compute, weight ``alpha`` like Kyutai's) and LayerNorm."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moshax.layers.params import constant, param


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * alpha, computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.eps = eps
        self.alpha = param(rngs, constant(1.0), (dim,), ("norm",))

    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps
        y = x32 * jnp.reciprocal(jnp.sqrt(var)) * self.alpha[...].astype(jnp.float32)
        return y.astype(dtype)


class LayerNorm(nnx.Module):
    """Standard LayerNorm with weight and bias (Mimi's transformers), computed in float32."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, constant(1.0), (dim,), ("norm",))
        self.bias = param(rngs, constant(0.0), (dim,), ("norm",))

    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) / jnp.sqrt(var + self.eps) * self.weight[...] + self.bias[...]
        return y.astype(dtype)


def make_norm(kind: str, dim: int, eps: float, *, rngs: nnx.Rngs) -> nnx.Module:
    if kind == "rms_norm":
        return RMSNorm(dim, eps, rngs=rngs)
    if kind == "layer_norm":
        return LayerNorm(dim, eps, rngs=rngs)
    raise ValueError(f"unknown norm {kind!r}")
