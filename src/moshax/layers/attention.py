"""Multi-head self-attention with fused qkv, a causal context window and a KV ring buffer.

The ring buffer keeps the absolute position of every slot (-1 = empty), so the mask is simply
``k_pos >= 0 and 0 <= q_pos - k_pos < context``: RoPE and masking use absolute streaming positions
and the same code serves training (no cache) and step-by-step decoding.

Two ring layouts, same contents: :class:`KVCache` ``[B, S, H, D]`` (training-side shapes, the
Pallas decode kernel, sharding rules) and :class:`RowsKVCache` ``[B * H, D, S]``, which a
transformer's inference layout picks on a CPU for one-query decoding (see
:meth:`moshax.layers.transformer.Transformer.unstack_layers`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moshax.kernels.attention import attention, attention_mask
from moshax.kernels.reference import masked_softmax
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
        """Store a chunk k, v [B, T, H, D] at slots ``positions % capacity``; negative positions
        store nothing."""
        cap = self.k.shape[1]
        if k.shape[1] > cap:  # only the newest `cap` entries survive
            k, v, positions = k[:, -cap:], v[:, -cap:], positions[:, -cap:]
        slots = ring_slots(positions, cap)
        b = jnp.arange(k.shape[0])[:, None]
        return KVCache(
            self.k.at[b, slots].set(k.astype(self.k.dtype), mode="drop"),
            self.v.at[b, slots].set(v.astype(self.v.dtype), mode="drop"),
            self.pos.at[b, slots].set(positions.astype(jnp.int32), mode="drop"),
        )


def ring_slots(positions, capacity: int):
    """The ring slot of each position, ``capacity`` (out of range: the write is dropped) for a
    negative one. Why: a server parks a slot for a step by giving it negative positions
    (:data:`moshax.inference.moshi_stream.PARKED`), so its rings need no restoring."""
    return jnp.where(positions >= 0, positions % capacity, capacity)


class RowsKVCache(NamedTuple):
    """The ring of :class:`KVCache` stored as k, v ``[B * H, D, capacity]`` (a batch row's heads
    contiguous, the slot last); pos ``[B, capacity]`` as there.

    Why: XLA:CPU's batched dots want each head's keys and values as a ``[D, S]`` matrix. Over
    ``[B, S, H, D]`` rings it transposes every ring every step (a copy of the whole cache per layer
    per step), and any reshape between a donated ring and its in-place update makes it copy the
    ring instead. Stored as these 3-D arrays and read by single-batch-dimension dots, a one-query
    step has neither: the attention of config (b)'s 12 layers over 3000-step rings, 48-73 ms -> 9-11 ms
    per step on 2 cores (docs/performance.md). Same values to the bit."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array

    @staticmethod
    def empty(batch: int, capacity: int, heads: int, head_dim: int, dtype=jnp.float32) -> "RowsKVCache":
        shape = (batch * heads, head_dim, capacity)
        return RowsKVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, capacity), -1, jnp.int32))

    def write(self, k, v, positions) -> "RowsKVCache":
        """Store a chunk k, v [B, T, H, D] at slots ``positions % capacity`` (rows may differ);
        negative positions store nothing."""
        cap = self.pos.shape[1]
        if k.shape[1] > cap:
            k, v, positions = k[:, -cap:], v[:, -cap:], positions[:, -cap:]
        b, _, h, _ = k.shape
        slots = ring_slots(positions, cap)  # [B, T]
        rows = (jnp.arange(b)[:, None] * h + jnp.arange(h)[None, :])[:, :, None]  # [B, H, 1]
        cols = slots[:, None, :]  # [B, 1, T]; rows[.., :, cols] is [B, H, T, D]
        return RowsKVCache(
            self.k.at[rows, :, cols].set(jnp.swapaxes(k, 1, 2).astype(self.k.dtype), mode="drop"),
            self.v.at[rows, :, cols].set(jnp.swapaxes(v, 1, 2).astype(self.v.dtype), mode="drop"),
            self.pos.at[jnp.arange(b)[:, None], slots].set(positions.astype(jnp.int32), mode="drop"),
        )


KV_CACHES = (KVCache, RowsKVCache)  # ``is_leaf`` for tree maps over streaming states


def rows_attention(q, k_rows, v_rows, q_pos, k_pos, *, context: int | None, causal: bool):
    """:func:`~moshax.kernels.reference.reference_attention` over rows-layout keys/values
    [B * H, D, S]: q [B, T, H, D] -> [B, T, H, D]; softmax in fp32."""
    b, t, h, d = q.shape
    qf = jnp.swapaxes(q, 1, 2).reshape(b * h, t, d)
    scores = jnp.einsum("nqd,ndk->nqk", qf, k_rows, preferred_element_type=jnp.float32) * d ** -0.5
    scores = scores.reshape(b, h, t, -1)
    probs = masked_softmax(scores, attention_mask(q_pos, k_pos, context, causal)[:, None])
    out = jnp.einsum("nqk,ndk->nqd", probs.reshape(b * h, t, -1).astype(v_rows.dtype), v_rows)
    return jnp.swapaxes(out.reshape(b, h, t, d), 1, 2)


FILLED_PREFIX_MIN = 256  # the shortest ring prefix a step reads; the others double up to the ring


def filled_prefixes(capacity: int) -> list[int]:
    """The ring prefix lengths :func:`rows_attention_filled` picks from: 256, 512, ... below the
    capacity, then the whole ring."""
    sizes, n = [], FILLED_PREFIX_MIN
    while n < capacity:
        sizes.append(n)
        n *= 2
    return sizes + [capacity]


def filled_prefix_index(pos, sizes: list[int]):
    """Index into ``sizes`` of the shortest prefix of a ring with slot positions ``pos`` [B, S]
    that holds every stored entry (the last, the whole ring, once a position reaches S)."""
    needed = jnp.max(pos) + 1  # the highest stored position's slot, + 1 (> S once a ring wrapped)
    return jnp.sum(needed > jnp.asarray(sizes[:-1], jnp.int32))


def rows_attention_filled(q, cache: RowsKVCache, q_pos, *, context: int | None, causal: bool):
    """:func:`rows_attention` of q over the ring, reading only its filled prefix.

    Why: a one-query decoding step reads every key and value it attends over, and config (b)'s
    rings (12 layers x 3000 slots) are ~220 MB a step, a fifth of the step's bytes, while a
    conversation fills them over its first 4 minutes. A position p below the capacity sits in
    slot p, so while every stored position is below it the slots past the highest one are empty:
    the step attends over the shortest prefix of :func:`filled_prefixes` that holds them all
    (``lax.switch``: one compiled branch per length), and over the whole ring once a stored
    position reaches the capacity (a ring has wrapped). Dropping empty slots drops masked
    (zero-probability) terms: equal to the whole-ring read up to float summation order."""
    sizes = filled_prefixes(cache.pos.shape[1])

    def prefix(n):  # only the prefix read is cast to the queries' dtype
        return lambda q, k, v, k_pos: rows_attention(q, k[:, :, :n].astype(q.dtype), v[:, :, :n].astype(q.dtype),
                                                     q_pos, k_pos[:, :n], context=context, causal=causal)

    operands = (q, cache.k, cache.v, cache.pos)
    if len(sizes) == 1:
        return prefix(sizes[0])(*operands)
    return jax.lax.switch(filled_prefix_index(cache.pos, sizes), [prefix(n) for n in sizes], *operands)


def _attend_rows(q, k, v, positions, cache: RowsKVCache, *, context: int | None, causal: bool):
    """:func:`attend` over a :class:`RowsKVCache` (the same two cases; the ring alone is read
    through :func:`rows_attention_filled`)."""
    if causal and context is not None and cache.pos.shape[1] >= context + k.shape[1] - 1:
        cache = cache.write(k, v, positions)  # write first, attend over the ring alone (see attend)
        return rows_attention_filled(q, cache, positions, context=context, causal=causal), cache
    b, t, h, d = k.shape
    keys = jnp.concatenate([cache.k.astype(k.dtype), k.transpose(0, 2, 3, 1).reshape(b * h, d, t)], axis=2)
    values = jnp.concatenate([cache.v.astype(v.dtype), v.transpose(0, 2, 3, 1).reshape(b * h, d, t)], axis=2)
    out = rows_attention(q, keys, values, positions, jnp.concatenate([cache.pos, positions], axis=1),
                         context=context, causal=causal)
    return out, cache.write(k, v, positions)


def attend(q, k, v, positions, cache: KVCache | RowsKVCache | None, *, context: int | None, causal: bool,
           impl: str = "auto"):
    """Attention of this chunk's queries over the cached keys/values (if any) and its own;
    returns (out [B, T, H, D], the cache with this chunk written, or None). A
    :class:`RowsKVCache` is read by :func:`rows_attention` whatever ``impl``."""
    if cache is None:
        return attention(q, k, v, positions, positions, context=context, causal=causal, impl=impl), None
    if isinstance(cache, RowsKVCache):
        return _attend_rows(q, k, v, positions, cache, context=context, causal=causal)
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
