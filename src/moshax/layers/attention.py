"""Multi-head self-attention with fused qkv, a causal context window and a KV ring buffer.

The ring buffer keeps the absolute position of every slot (-1 = empty), so the mask is simply
``k_pos >= 0 and 0 <= q_pos - k_pos < context``: RoPE and masking use absolute streaming positions
and the same code serves training (no cache) and step-by-step decoding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moshax.layers.params import normal, param
from moshax.kernels.attention import attention
from moshax.layers.rope import apply_rope
from moshax.parallel.sharding import constrain


class KVCache(NamedTuple):
    """Ring buffer of keys/values: k, v [B, capacity, H, D]; pos [B, capacity] absolute, -1 = empty."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array

    @staticmethod
    def empty(batch: int, capacity: int, heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, capacity, heads, head_dim)  # k and v their own buffers (a step may donate them)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, capacity), -1, jnp.int32))

    def write(self, k, v, positions) -> "KVCache":
        """Store a chunk k, v [B, T, H, D] at slots ``positions % capacity``."""
        cap = self.k.shape[1]
        if k.shape[1] > cap:  # only the newest `cap` entries survive
            k, v, positions = k[:, -cap:], v[:, -cap:], positions[:, -cap:]
        slots = positions % cap
        b = jnp.arange(k.shape[0])[:, None]
        return KVCache(
            self.k.at[b, slots].set(k.astype(self.k.dtype)),
            self.v.at[b, slots].set(v.astype(self.v.dtype)),
            self.pos.at[b, slots].set(positions.astype(jnp.int32)),
        )


def attend(q, k, v, positions, cache: KVCache | None, *, context: int | None, causal: bool):
    """Attention of this chunk's queries over the cached keys/values (if any) and its own;
    returns (out [B, T, H, D], the cache with this chunk written, or None)."""
    if cache is None:
        return attention(q, k, v, positions, positions, context=context, causal=causal), None
    keys = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
    k_pos = jnp.concatenate([cache.pos, positions], axis=1)
    out = attention(q, keys, values, positions, k_pos, context=context, causal=causal)
    return out, cache.write(k, v, positions)


class MultiHeadAttention(nnx.Module):
    """Fused qkv projection [embed, 3, heads, head_dim] (q, k, v blocks, heads contiguous)."""

    def __init__(self, dim: int, num_heads: int, *, context: int | None, causal: bool, rope: bool,
                 max_period: float, init_std: float, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.context = context
        self.causal = causal
        self.rope = rope
        self.max_period = max_period
        self.dtype = dtype
        self.in_proj = param(rngs, normal(init_std), (dim, 3, num_heads, self.head_dim),
                             ("embed", None, "heads", "kv"), param_dtype)
        self.out_proj = param(rngs, normal(init_std), (num_heads, self.head_dim, dim),
                              ("heads", "kv", "embed"), param_dtype)

    def __call__(self, x, positions, cache: KVCache | None = None):
        """x [B, T, dim], positions [B, T] absolute; returns (y, updated cache or None)."""
        x = x.astype(self.dtype)
        qkv = jnp.einsum("btd,dshk->btshk", x, self.in_proj[...].astype(self.dtype))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        if self.rope:
            q = apply_rope(q, positions, self.max_period)
            k = apply_rope(k, positions, self.max_period)
        out, new_cache = attend(q, k, v, positions, cache, context=self.context, causal=self.causal)
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        y = jnp.einsum("bthk,hkd->btd", out, self.out_proj[...].astype(self.dtype))
        return y, new_cache
