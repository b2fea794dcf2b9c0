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

from moshax.kernels.attention import attention
from moshax.layers.linear import STEP_AXIS, Selector, project, shared
from moshax.layers.params import normal, param
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


def attend(q, k, v, positions, cache: KVCache | None, *, context: int | None, causal: bool, impl: str = "auto"):
    """Attention of this chunk's queries over the cached keys/values (if any) and its own;
    returns (out [B, T, H, D], the cache with this chunk written, or None)."""
    if cache is None:
        return attention(q, k, v, positions, positions, context=context, causal=causal, impl=impl), None
    if causal and context is not None and cache.k.shape[1] >= context + k.shape[1] - 1:
        # A decode step of T positions, the ring at least context + T - 1 long: write first, then
        # attend over the ring alone (as Kyutai's RingKVCache). The slots it overwrites held
        # positions p - capacity, outside the window of every query of the chunk (the causal mask
        # hides the chunk's later keys from its earlier queries); this avoids copying the whole
        # cache into a concatenation (and XLA the cache itself) every step. Mimi's 2-step frames
        # get a ring of context + 1 for this (Mimi.init_state).
        cache = cache.write(k, v, positions)
        return attention(q, cache.k.astype(k.dtype), cache.v.astype(v.dtype), positions, cache.pos,
                         context=context, causal=causal, impl=impl), cache
    keys = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
    k_pos = jnp.concatenate([cache.pos, positions], axis=1)
    out = attention(q, keys, values, positions, k_pos, context=context, causal=causal, impl=impl)
    return out, cache.write(k, v, positions)


class MultiHeadAttention(nnx.Module):
    """Fused qkv projection [embed, 3, heads, head_dim] (q, k, v blocks, heads contiguous) and
    ``out_proj`` [heads, head_dim, embed]; with ``num_weights`` both get a leading ``depth_steps``
    axis of that size, and each call picks the weights through its ``select`` (see
    :mod:`moshax.layers.linear`)."""

    def __init__(self, dim: int, num_heads: int, *, context: int | None, causal: bool, rope: bool,
                 max_period: float, init_std: float, num_weights: int | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention: str = "auto", rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.attention = attention  # kernels.attention impl: auto | xla | chunked | pallas
        self.head_dim = dim // num_heads
        self.context = context
        self.causal = causal
        self.rope = rope
        self.max_period = max_period
        self.dtype = dtype
        steps = () if num_weights is None else (num_weights,)
        step_axis = () if num_weights is None else (STEP_AXIS,)
        self.in_proj = param(rngs, normal(init_std), steps + (dim, 3, num_heads, self.head_dim),
                             step_axis + ("embed", None, "heads", "kv"), param_dtype)
        self.out_proj = param(rngs, normal(init_std), steps + (num_heads, self.head_dim, dim),
                              step_axis + ("heads", "kv", "embed"), param_dtype)

    def __call__(self, x, positions, cache: KVCache | None = None, *, select: Selector = shared,
                 position_major: bool = False):
        """x [B, T, dim] ([T, B, dim] when ``position_major``), positions [B, T] absolute;
        returns (y in the layout of x, updated cache or None). The projections may come flattened
        to 2-D matmuls (``in_proj`` [.., embed, 3*heads*head_dim], ``out_proj`` [.., heads*head_dim,
        embed], see :func:`moshax.layers.transformer.flatten_projections`)."""
        dt, h, hd = self.dtype, self.num_heads, self.head_dim
        x = x.astype(dt)
        w, per = select(self.in_proj[...])
        qkv = project(x, w.astype(dt), 1, per_position=per, position_major=position_major)
        qkv = qkv.reshape(qkv.shape[:2] + (3, h, hd))  # a no-op unless flattened
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if position_major:  # attention runs batch major (as the cache)
            q, k, v = (jnp.swapaxes(a, 0, 1) for a in (q, k, v))
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        if self.rope:
            q = apply_rope(q, positions, self.max_period)
            k = apply_rope(k, positions, self.max_period)
        out, new_cache = attend(q, k, v, positions, cache, context=self.context, causal=self.causal,
                                impl=self.attention)
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        w, per = select(self.out_proj[...])
        if position_major:  # merge the heads (heads major: sharding-safe) for one matmul per position
            out = jnp.swapaxes(out, 0, 1)
            out = out.reshape(out.shape[:2] + (h * hd,))
            w = w.reshape(w.shape[:per] + (h * hd, w.shape[-1]))
        elif w.ndim - per == 2:  # flattened
            out = out.reshape(out.shape[:2] + (h * hd,))
        y = project(out, w.astype(dt), out.ndim - 2, per_position=per, position_major=position_major)
        return y, new_cache
