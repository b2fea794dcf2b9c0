"""Shared layers against plain numpy references."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moshax.config import TransformerConfig
from moshax.layers.attention import (KVCache, MultiHeadAttention, RowsKVCache, filled_prefix_index, filled_prefixes,
                                     rows_attention, rows_attention_filled)
from moshax.layers.mlp import MLP
from moshax.layers.norms import LayerNorm, RMSNorm
from moshax.layers.rope import apply_rope
from moshax.layers.transformer import Transformer


def test_rms_norm_fp32_and_alpha():
    norm = RMSNorm(8, 1e-8, rngs=nnx.Rngs(0))
    norm.alpha[...] = jnp.arange(1, 9, dtype=jnp.float32)
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    ref = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-8) * np.arange(1, 9)
    np.testing.assert_allclose(norm(jnp.asarray(x)), ref, rtol=1e-5)
    y16 = norm(jnp.asarray(x, jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), ref, rtol=2e-2, atol=2e-2)


def test_layer_norm():
    norm = LayerNorm(6, 1e-5, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)[None]
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(norm(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-6)


def test_rope_interleaved_pairs_match_complex_rotation():
    rng = np.random.default_rng(0)
    b, t, h, d = 2, 5, 3, 8
    x = rng.normal(size=(b, t, h, d)).astype(np.float32)
    offset = 7
    pos = np.arange(t) + offset
    y = apply_rope(jnp.asarray(x), jnp.asarray(pos), max_period=10000.0)
    z = x[..., 0::2] + 1j * x[..., 1::2]  # adjacent dims are (re, im)
    freqs = 10000.0 ** (-np.arange(d // 2) * 2.0 / d)
    rot = z * np.exp(1j * pos[None, :, None, None] * freqs)
    ref = np.stack([rot.real, rot.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def _naive_attention(x, w_qkv, w_out, context):
    """numpy reference: fused qkv [d, 3, h, k], RoPE, causal sliding window."""
    b, t, d = x.shape
    qkv = np.einsum("btd,dshk->btshk", x, w_qkv)
    pos = np.arange(t)
    q = np.asarray(apply_rope(jnp.asarray(qkv[:, :, 0]), jnp.asarray(pos)))
    k = np.asarray(apply_rope(jnp.asarray(qkv[:, :, 1]), jnp.asarray(pos)))
    v = qkv[:, :, 2]
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    delta = pos[:, None] - pos[None, :]
    mask = (delta >= 0) & (delta < context)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", p, v)
    return np.einsum("bthk,hkd->btd", o, w_out)


@pytest.mark.parametrize("context", [4, 100])
def test_attention_matches_numpy(context):
    attn = MultiHeadAttention(16, 4, context=context, causal=True, rope=True, max_period=10000.0,
                              init_std=0.3, rngs=nnx.Rngs(0))
    x = np.random.default_rng(2).normal(size=(2, 9, 16)).astype(np.float32)
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    y, _ = attn(jnp.asarray(x), pos)
    ref = _naive_attention(x, np.asarray(attn.in_proj[...]), np.asarray(attn.out_proj[...]), context)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3])
def test_kv_ring_cache_streaming_equals_full(chunk):
    """Context window 5 < sequence 13: the ring buffer (capacity = context) wraps several times."""
    attn = MultiHeadAttention(16, 2, context=5, causal=True, rope=True, max_period=10000.0,
                              init_std=0.3, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 13, 16)).astype(np.float32))
    full, _ = attn(x, jnp.broadcast_to(jnp.arange(13), (2, 13)))
    cache = KVCache.empty(2, 5, 2, 8)
    outs = []
    for s in range(0, 13, chunk):
        e = min(s + chunk, 13)
        pos = jnp.broadcast_to(jnp.arange(s, e), (2, e - s))
        y, cache = attn(x[:, s:e], pos, cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
    # slots hold the most recent 5 absolute positions
    assert sorted(np.asarray(cache.pos[0]).tolist()) == [8, 9, 10, 11, 12]


def _as_rows(ring):
    """A [B, S, H, D] ring as RowsKVCache's [B * H, D, S]."""
    b, s, h, d = ring.shape
    return np.asarray(ring).transpose(0, 2, 3, 1).reshape(b * h, d, s)


@pytest.mark.parametrize("chunk,capacity", [(1, 5), (3, 5), (3, 7), (2, 12)])
def test_rows_kv_cache_decodes_as_the_kv_cache(chunk, capacity):
    """RowsKVCache ([B * H, D, S], the CPU decoding layout) against KVCache through the same
    layer: outputs, slot contents and positions after a stream where the two batch rows sit at
    different positions and the ring wraps; capacity 5 with chunks of 3 takes the concatenation
    path (ring shorter than context + chunk - 1), the others write first and attend the ring."""
    attn = MultiHeadAttention(16, 2, context=5, causal=True, rope=True, max_period=10000.0,
                              init_std=0.3, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 13, 16)).astype(np.float32))
    start = jnp.asarray([[0], [6]])  # row 1 is 6 positions further along its stream
    ring, rows = KVCache.empty(2, capacity, 2, 8), RowsKVCache.empty(2, capacity, 2, 8)
    for s in range(0, 13, chunk):
        e = min(s + chunk, 13)
        pos = start + jnp.arange(s, e)[None]
        y_ring, ring = attn(x[:, s:e], pos, ring)
        y_rows, rows = attn(x[:, s:e], pos, rows)
        assert isinstance(rows, RowsKVCache)
        np.testing.assert_allclose(y_rows, y_ring, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(rows.pos, ring.pos)
    np.testing.assert_array_equal(rows.k, _as_rows(ring.k))
    np.testing.assert_array_equal(rows.v, _as_rows(ring.v))
    assert sorted(np.asarray(rows.pos[1]).tolist())[-1] == 18


@pytest.mark.parametrize("cache_cls", [KVCache, RowsKVCache])
def test_negative_positions_write_nothing(cache_cls):
    """A row written at negative positions (a parked serving slot) keeps its ring as it was,
    contents and positions, while the other row's chunk lands at its slots."""
    g = np.random.default_rng(0)
    cache = cache_cls.empty(2, 6, 2, 4)
    k0, v0 = (jnp.asarray(g.normal(size=(2, 3, 2, 4)).astype(np.float32)) for _ in range(2))
    cache = cache.write(k0, v0, jnp.asarray([[0, 1, 2], [4, 5, 6]]))
    before = jax.tree.map(np.asarray, cache)
    k1, v1 = (jnp.asarray(g.normal(size=(2, 2, 2, 4)).astype(np.float32)) for _ in range(2))
    after = jax.tree.map(np.asarray, cache.write(k1, v1, jnp.asarray([[3, 4], [-(2 ** 30), -(2 ** 30) + 1]])))
    rows = after.k.shape[0] // 2  # 1 for KVCache [B, S, H, D], H for RowsKVCache [B * H, D, S]
    np.testing.assert_array_equal(after.k[rows:], before.k[rows:])
    np.testing.assert_array_equal(after.v[rows:], before.v[rows:])
    np.testing.assert_array_equal(after.pos[1], before.pos[1])
    np.testing.assert_array_equal(after.pos[0], [0, 1, 2, 3, 4, -1])
    k_new = np.asarray(k1[0, 1]) if cache_cls is KVCache else np.asarray(k1[0, 1]).T  # slot 4, [H, D] / [D, H]
    got = after.k[0, 4] if cache_cls is KVCache else after.k[:rows, :, 4].reshape(2, 4).T
    np.testing.assert_array_equal(got, k_new)


def test_filled_prefixes_double_from_256_up_to_the_ring():
    assert filled_prefixes(3000) == [256, 512, 1024, 2048, 3000]
    assert filled_prefixes(1100) == [256, 512, 1024, 1100]
    assert filled_prefixes(512) == [256, 512] and filled_prefixes(256) == [256] and filled_prefixes(8) == [8]


@pytest.mark.parametrize("rows_at,size", [
    ([9, 3], 256),  # both rows early in their streams
    ([255, -1], 256),  # slot 255 is the last of the shortest prefix; row 1 reset (empty)
    ([256, 40], 512),  # slot 256 is past it
    ([700, 1023], 1024),
    ([1024, 2], 1100),
    ([1099, 0], 1100),  # the ring just full
    ([1250, 5], 1100),  # row 0 has wrapped: its newest positions sit in the first slots
])
def test_rows_attention_reads_only_the_filled_prefix(rows_at, size):
    """The one-query step over a 1100-slot ring reads the shortest prefix of 256 / 512 / 1024 /
    1100 slots that holds every stored position and equals the whole-ring attention; each row
    holds its stream's last (up to 1100) positions ending at ``rows_at`` (-1: empty)."""
    g = np.random.default_rng(0)
    cap, h, d = 1100, 2, 8
    cache = RowsKVCache.empty(2, cap, h, d)
    for row, last in enumerate(rows_at):
        if last < 0:
            continue
        pos = np.full((2, last + 1), -1, np.int32)
        pos[row] = np.arange(last + 1)
        k, v = (jnp.asarray(g.normal(size=(2, last + 1, h, d)).astype(np.float32)) for _ in range(2))
        cache = cache.write(k, v, jnp.asarray(pos))
    sizes = filled_prefixes(cap)
    assert sizes[int(filled_prefix_index(cache.pos, sizes))] == size
    q = jnp.asarray(g.normal(size=(2, 1, h, d)).astype(np.float32))
    q_pos = jnp.asarray([[max(last, 0)] for last in rows_at])
    got = jax.jit(lambda q, c: rows_attention_filled(q, c, q_pos, context=cap, causal=True))(q, cache)
    want = rows_attention(q, cache.k, cache.v, q_pos, cache.pos, context=cap, causal=True)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the stored entries are what the attention sees: a prefix one bucket shorter would drop some
    if size > 256:
        shorter = sizes[sizes.index(size) - 1]
        assert int(jnp.max(cache.pos[:, shorter:])) >= 0


def test_rows_kv_cache_reads_growing_prefixes_as_the_kv_cache():
    """Through the layer: chunks of 100 positions into 600-slot rings (window 500), the rows at
    positions 0.. and 150..; the rows layout reads 256 / 512 / 600 slots as the stream grows
    (and wraps past 600) and equals the KVCache layer, which reads its whole ring."""
    attn = MultiHeadAttention(16, 2, context=500, causal=True, rope=True, max_period=10000.0,
                              init_std=0.3, rngs=nnx.Rngs(2))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 800, 16)).astype(np.float32))
    start = jnp.asarray([[0], [150]])
    ring, rows = KVCache.empty(2, 600, 2, 8), RowsKVCache.empty(2, 600, 2, 8)
    step = jax.jit(lambda x, pos, cache: attn(x, pos, cache))
    sizes, read = filled_prefixes(600), []
    for s in range(0, 800, 100):
        pos = start + jnp.arange(s, s + 100)[None]
        y_ring, ring = step(x[:, s:s + 100], pos, ring)
        y_rows, rows = step(x[:, s:s + 100], pos, rows)
        np.testing.assert_allclose(y_rows, y_ring, rtol=2e-5, atol=2e-5)
        read.append(sizes[int(filled_prefix_index(rows.pos, sizes))])
    assert read == [256, 512, 512, 600, 600, 600, 600, 600]
    np.testing.assert_array_equal(rows.pos, ring.pos)


def _ring_copies(cache_cls):
    """Ops in a compiled one-query decode step (12 heads, ring 3000, donated) that copy or transpose a ring."""
    attn = MultiHeadAttention(768, 12, context=3000, causal=True, rope=True, max_period=10000.0,
                              init_std=0.02, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(attn)

    def step(state, x, pos, cache):
        return nnx.merge(graphdef, state)(x, pos, cache)

    cache = cache_cls.empty(1, 3000, 12, 64)
    x, pos = jnp.zeros((1, 1, 768)), jnp.zeros((1, 1), jnp.int32)
    hlo = jax.jit(step, donate_argnums=(3,)).lower(state, x, pos, cache).compile().as_text()
    ring_sizes = {"f32[1,3000,12,64]", "f32[12,64,3000]", "f32[12,3000,64]", "f32[1,12,64,3000]", "f32[3000,12,64]"}
    return [line for line in hlo.splitlines()
            if "=" in line and line.split("=")[1].split()[0].split("{")[0] in ring_sizes
            and (" copy(" in line or " transpose(" in line or "copy_" in line.split("=")[0]
                 or "transpose" in line.split("=")[0])]


def test_rows_kv_cache_step_copies_no_ring():
    """Why the rows layout exists: XLA:CPU transposes a [B, S, H, D] ring for the attention's dots
    every step (the check finds those), and copies nothing ring-sized over a RowsKVCache."""
    assert _ring_copies(KVCache), "the check no longer finds the [B, S, H, D] ring's transposes"
    assert _ring_copies(RowsKVCache) == []


@pytest.mark.parametrize("one_query,attention,rows", [(True, "auto", True), (False, "auto", False),
                                                       (True, "pallas", False)])
def test_inference_layout_picks_rows_rings_for_one_query_stacks(one_query, attention, rows):
    """Only a stack marked ``decodes_one_query`` (Helium, Moshi's temporal transformer), with XLA's
    attention, gets RowsKVCache rings on a CPU; Mimi's (two positions a frame) and the Pallas path
    keep KVCache. Training keeps the stacked KVCache whatever the mark."""
    stack = Transformer(_tiny_cfg(attention=attention), rngs=nnx.Rngs(0))
    stack.decodes_one_query = one_query
    assert isinstance(stack.init_state(2), KVCache)
    stack.unstack_layers()
    caches = stack.init_state(2)
    assert len(caches) == 3 and all(isinstance(c, RowsKVCache if rows else KVCache) for c in caches)
    if rows:
        assert caches[0].k.shape == (2 * 2, 8, 8)  # [B * H, D, context]


def test_gated_mlp_halves_are_gate_then_up():
    mlp = MLP(4, 6, gated=True, activation="silu", init_std=0.5, rngs=nnx.Rngs(0))
    x = np.random.default_rng(4).normal(size=(1, 2, 4)).astype(np.float32)
    w_in, w_out = np.asarray(mlp.linear_in[...]), np.asarray(mlp.linear_out[...])
    gate, up = x @ w_in[:, 0], x @ w_in[:, 1]
    ref = (gate / (1 + np.exp(-gate)) * up) @ w_out
    np.testing.assert_allclose(mlp(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-6)


def _tiny_cfg(**kw):
    base = dict(dim=16, num_heads=2, num_layers=3, hidden_dim=24, context=8, init_std=0.2)
    base.update(kw)
    return TransformerConfig(**base)


@pytest.mark.parametrize("loop", ["scan", "unrolled"])
def test_scanned_stack_equals_layer_by_layer_loop(loop):
    stack = Transformer(_tiny_cfg(layer_scale=0.5, norm="layer_norm", gated=False, activation="gelu",
                                  layer_loop=loop), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 6, 16)).astype(np.float32))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    y, _ = stack(x, pos)
    graphdef, state = nnx.split(stack.layers)
    h = x
    for i in range(3):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
        h, _ = layer(h, pos)
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_layer_loop_equals_scan_with_grads_and_cache(remat):
    """``layer_loop=unrolled`` (``auto``'s pick on a CPU for big layers) is the same function as
    the scan: outputs, weight gradients and the stacked KV caches of a chunked decode; and only the
    scan lowers to a loop."""
    def build(loop):
        return Transformer(_tiny_cfg(layer_loop=loop, remat=remat, context=4), rngs=nnx.Rngs(0))

    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 6, 16)).astype(np.float32))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))

    def loss(model, x):
        return jnp.sum(model(x, pos)[0] ** 2)

    out = {}
    for loop in ("scan", "unrolled"):
        model = build(loop)
        value, grads = nnx.value_and_grad(loss)(model, x)
        cache = model.init_state(2)
        _, cache = model(x[:, :3], pos[:, :3], cache)
        y, cache = model(x[:, 3:], pos[:, 3:], cache)
        hlo = jax.jit(lambda x: model(x, pos)[0]).lower(x).as_text()
        out[loop] = (value, nnx.to_pure_dict(grads), y, cache, "stablehlo.while" in hlo)
    (v0, g0, y0, c0, loop0), (v1, g1, y1, c1, loop1) = out["scan"], out["unrolled"]
    assert loop0 and not loop1
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g0)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), c1, c0)


def test_auto_layer_loop_unrolls_big_layers_for_a_cpu():
    """``auto``: unrolled when tracing for the CPU with big layers, the scan for small layers, for
    a TPU (an AOT compile from this host, or a mesh of TPU devices) and on other backends; a bad
    value is named."""
    from jax.sharding import AbstractDevice, AbstractMesh

    from moshax.kernels.attention import compiling_for_tpu
    from moshax.layers.transformer import UNROLL_MIN_LAYER_PARAMS, unrolls

    assert unrolls("auto") and unrolls("unrolled") and not unrolls("scan")
    assert not unrolls("auto", UNROLL_MIN_LAYER_PARAMS - 1) and unrolls("unrolled", 1)
    with compiling_for_tpu():
        assert not unrolls("auto") and unrolls("unrolled")
    tpu = AbstractMesh((1,), ("data",), abstract_device=AbstractDevice(device_kind="TPU v5", num_cores=1,
                                                                        platform="tpu"))
    with jax.sharding.use_abstract_mesh(tpu):
        assert not unrolls("auto")
    with pytest.raises(ValueError, match="layer_loop 'loop'"):
        unrolls("loop")


def test_unstacked_inference_layout_equals_stacked():
    """unstack_for_inference: per-layer arrays run by a loop give the scanned stack's outputs, in
    one pass and chunk by chunk through per-layer KV caches; the original model is untouched."""
    from moshax.inference.bound import BoundModel

    stack = Transformer(_tiny_cfg(layer_scale=0.5, context=4), rngs=nnx.Rngs(0))
    bound = BoundModel(stack)
    unstacked = bound.model
    assert unstacked.unstacked and not stack.unstacked
    assert isinstance(unstacked.init_state(2), list) and len(unstacked.init_state(2)) == 3
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 9, 16)).astype(np.float32))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    want, _ = stack(x, pos)
    got, _ = bound.jit(lambda m, x, p: m(x, p))(x, pos)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    step = bound.jit(lambda m, x, p, c: m(x, p, c), donate_argnums=(2,))
    ref_step = nnx.jit(lambda m, x, p, c: m(x, p, c))
    cache, ref_cache = unstacked.init_state(2), stack.init_state(2)
    for t0 in range(0, 9, 3):  # the context (4) wraps the ring buffers
        y, cache = step(x[:, t0:t0 + 3], pos[:, t0:t0 + 3], cache)
        y_ref, ref_cache = ref_step(stack, x[:, t0:t0 + 3], pos[:, t0:t0 + 3], ref_cache)
        np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(y, want[:, t0:t0 + 3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_with_no_batch_dims"])
def test_remat_policies_give_same_gradients(policy):
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 6, 16)).astype(np.float32))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))

    def grads(cfg):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        return jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(x, pos)[0] ** 2))(state)

    ref = grads(_tiny_cfg())
    got = grads(_tiny_cfg(remat=policy))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


@pytest.mark.parametrize("context, causal", [(None, True), (40, True), (30, False)])
def test_chunked_attention_equals_reference_values_and_grads(context, causal):
    from moshax.kernels.attention import chunked_attention, reference_attention

    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 64, 2, 8)).astype(np.float32)) for _ in range(3))
    pos = jnp.broadcast_to(jnp.arange(64), (2, 64))

    def run(fn):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, pos, pos, context=context, causal=causal))),
                                  argnums=(0, 1, 2))(q, k, v)

    (ref, ref_g), (got, got_g) = run(reference_attention), run(lambda *a, **kw: chunked_attention(*a, block_q=16, **kw))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for a, b in zip(ref_g, got_g):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weights_per_step, schedule, remat", [
    (True, None, "full"),
    pytest.param(True, [0, 1, 1, 2], "dots", marks=pytest.mark.slow),  # ~1 min each on 2 cores: slow suite
    pytest.param(False, None, "dots_with_no_batch_dims", marks=pytest.mark.slow),
])
def test_depformer_is_the_shared_block_with_step_weights(weights_per_step, schedule, remat):
    """Depformer = the shared TransformerBlock with weight set schedule[s] at depth step s: the
    step-major training path (flattened projections), the batch-major path and a loop of plain
    blocks (one per layer and step, a KV cache across the steps) agree, and so do the gradients of
    the two paths with and without remat."""
    from dataclasses import replace

    from moshax.layers.transformer import TransformerBlock
    from moshax.models.depformer import Depformer

    steps, n = 4, 3
    cfg = _tiny_cfg(layer_scale=0.5, context=2)  # a window narrower than the steps: the depformer has none

    def make(remat="none"):
        return Depformer(replace(cfg, remat=remat), steps, weights_per_step=weights_per_step, schedule=schedule,
                         rngs=nnx.Rngs(3))

    dep = make()
    x = jnp.asarray(np.random.default_rng(7).normal(size=(n, steps, 16)).astype(np.float32))
    y, cache = dep(x)
    assert cache is None
    y_sm, _ = dep(jnp.swapaxes(x, 0, 1), step_major=True)
    np.testing.assert_allclose(jnp.swapaxes(y_sm, 0, 1), y, rtol=1e-5, atol=1e-5)

    sched = schedule or (list(range(steps)) if weights_per_step else [0] * steps)
    pure = nnx.to_pure_dict(nnx.state(dep.layers))
    graphdef, state = nnx.split(TransformerBlock(replace(cfg, context=steps), rngs=nnx.Rngs(0)))
    pos = jnp.broadcast_to(jnp.arange(steps), (n, steps))
    h = x
    for layer in range(cfg.num_layers):
        cache, outs = KVCache.empty(n, steps, cfg.num_heads, cfg.head_dim), []
        for s in range(steps):
            w = jax.tree.map(lambda a: a[layer], pure)
            for mod, names in (("self_attn", ("in_proj", "out_proj")), ("mlp", ("linear_in", "linear_out"))):
                for name in names:
                    w[mod][name] = w[mod][name][sched[s]]
            nnx.replace_by_pure_dict(state, w)
            out, cache = nnx.merge(graphdef, state)(h[:, s:s + 1], pos[:, s:s + 1], cache)
            outs.append(out)
        h = jnp.concatenate(outs, axis=1)
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)

    def grads(model, step_major):
        graphdef, params = nnx.split(model)
        inp = jnp.swapaxes(x, 0, 1) if step_major else x
        return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(inp, step_major=step_major)[0] ** 2))(params)

    ref = grads(dep, False)
    for got in (grads(dep, True), grads(make(remat), True)):
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_elu_equals_jax_nn_elu_with_gradients_and_saves_only_its_output(alpha):
    from moshax.layers.activations import elu

    x = jnp.asarray(np.concatenate([np.random.default_rng(0).standard_normal(500) * 3, [0.0, -0.0, 1e-30, -1e-30]]),
                    jnp.float32)
    c = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
    # exp(x) - 1 instead of expm1 (activations.py): equal to an ulp of 1 on the negative side, exact elsewhere
    ys, want = np.asarray(elu(x, alpha)), np.asarray(jax.nn.elu(x, alpha))
    np.testing.assert_allclose(ys, want, rtol=0, atol=alpha * 2 ** -23)
    np.testing.assert_array_equal(ys[x > 0], want[x > 0])
    assert np.all(ys[x <= 0] <= 0) and np.all(ys >= -alpha)
    ours = jax.grad(lambda x: jnp.sum(c * elu(x, alpha)))(x)
    theirs = jax.grad(lambda x: jnp.sum(c * jax.nn.elu(x, alpha)))(x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    # the backward's one residual is the output: vjp over y alone reproduces the gradient
    y, vjp = jax.vjp(lambda x: elu(x, alpha), x)
    residuals = [leaf for leaf in jax.tree.leaves(vjp) if isinstance(leaf, jax.Array)]
    assert len(residuals) == 1 and np.array_equal(residuals[0], y)
    with pytest.raises(ValueError, match="alpha must be positive"):
        jax.grad(lambda x: jnp.sum(elu(x, 0.0)))(x)


def test_seanet_config_rejects_a_non_positive_elu_alpha():
    from moshax.config import ConfigError
    from moshax.models.mimi.config import SEANetConfig

    with pytest.raises(ConfigError, match="elu_alpha=-1.0"):
        SEANetConfig(elu_alpha=-1.0).validate("model.seanet")


def test_two_row_products_run_one_gemv_per_row_on_a_cpu():
    """A 2-row product (streaming Mimi at batch 1, a batch-2 LM step) is one matrix-vector product
    per row on a CPU, with the plain product's values; other row counts and a TPU trace keep the
    single dot. The transposed convolution's taps take the same path."""
    from moshax.kernels.attention import compiling_for_tpu
    from moshax.layers.conv import ConvTranspose1d
    from moshax.layers.linear import matmul

    r = np.random.default_rng(5)
    w = jnp.asarray(r.standard_normal((64, 96)).astype(np.float32))

    def dots(x):
        hlo = jax.jit(lambda x, w: matmul(x, w)).lower(x, w).as_text()  # a fresh trace every time
        return sorted(re.findall(r"dot_general[^\n]*?: \((tensor<[0-9x]+xf32>)", hlo))

    for rows in (1, 2, 3):
        x = jnp.asarray(r.standard_normal((rows, 64)).astype(np.float32))
        np.testing.assert_allclose(np.asarray(matmul(x, w)), np.asarray(x) @ np.asarray(w), rtol=1e-5, atol=1e-5)
        want = ["tensor<1x64xf32>"] * 2 if rows == 2 else [f"tensor<{rows}x64xf32>"]
        assert dots(x) == want, (rows, dots(x))
    with compiling_for_tpu():
        assert dots(x[:2]) == ["tensor<2x64xf32>"]

    conv = ConvTranspose1d(64, 8, 4, stride=2, rngs=nnx.Rngs(0))
    x = jnp.asarray(r.standard_normal((1, 2, 64)).astype(np.float32))
    hlo = jax.jit(lambda x: conv.step(x, conv.init_state(1))[0]).lower(x).as_text()
    assert len(re.findall(r"dot_general[^\n]*?: \(tensor<1x64xf32>", hlo)) == 2
    y, _ = conv.step(x, conv.init_state(1))
    with compiling_for_tpu():
        y_plain, _ = conv.step(x, conv.init_state(1))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_plain), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape, w_shape, n_in", [((2, 5, 8), (8, 3, 2, 4), 1),  # qkv: [embed, 3, heads, hd]
                                                    ((3, 4, 2, 4), (2, 4, 6), 2),  # out_proj: [heads, hd, embed]
                                                    ((4, 2, 8), (8, 16), 1),  # an MLP matmul
                                                    ((1, 2, 8), (8, 16), 1),  # 2 rows: one GEMV per row
                                                    ((2, 1, 2, 4), (2, 4, 6), 2)])
def test_cpu_projection_equals_einsum_with_gradients(x_shape, w_shape, n_in):
    """On a CPU a shared weight's projection takes a custom VJP (the weight gradient over a
    materialized x^T, behind an optimization barrier): same values and gradients as the plain
    einsum a TPU trace keeps, and only the CPU trace has the barrier."""
    from moshax.kernels.attention import compiling_for_tpu
    from moshax.layers.linear import project

    r = np.random.default_rng(3)
    x = jnp.asarray(r.standard_normal(x_shape).astype(np.float32))
    w = jnp.asarray(r.standard_normal(w_shape).astype(np.float32))
    ct = jnp.asarray(r.standard_normal(x_shape[:2] + w_shape[n_in:]).astype(np.float32))

    def loss(x, w):
        return jnp.sum(project(x, w, n_in) * ct)

    def run():
        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return grad(x, w), grad.lower(x, w).as_text()

    (val, (dx, dw)), hlo = run()
    with compiling_for_tpu():
        (val_t, (dx_t, dw_t)), hlo_t = run()
    assert "optimization_barrier" in hlo and "optimization_barrier" not in hlo_t
    want = np.einsum("bti,iu->btu", np.asarray(x).reshape(x_shape[:2] + (-1,)), np.asarray(w).reshape(
        np.prod(w_shape[:n_in]), -1))
    np.testing.assert_allclose(np.asarray(project(x, w, n_in)).reshape(want.shape), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(project(x, w, n_in, position_major=True)),
                                  np.asarray(project(x, w, n_in)))  # [T, B, ...] in, [T, B, ...] out
    np.testing.assert_allclose(float(val), float(val_t), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_t), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_t), rtol=1e-5, atol=1e-5)
    assert dx.shape == x.shape and dw.shape == w.shape
