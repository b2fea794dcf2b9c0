"""Pallas attention kernels (src/moshax/kernels/): numerics against the plain-jnp references in
interpret mode on the CPU, gradients of the flash kernel, the dispatch and config switch, and TPU
compiles through libtpu at the 7B shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from requirements import require_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moshax.kernels.attention import attention, compiling_for_tpu, reference_attention
from moshax.kernels.decode import decode_attention, reference_decode_attention
from moshax.kernels.flash import flash_attention, reference_flash_attention

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
HYP = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.normal(size=shape).astype(np.float32).astype(dtype))  # no eager JAX ops (compiles)


def _maxerr(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)), initial=0.0))


def ring_positions(batch: int, capacity: int, end: int, empty: int, rng) -> np.ndarray:
    """Slot positions of a ring buffer of ``capacity`` after writing steps [0, end): slot = pos % cap;
    ``empty`` random slots of each row set to -1 (and rows that have not filled up yet stay -1)."""
    pos = np.full((batch, capacity), -1, np.int64)
    for p in range(max(0, end - capacity), end):
        pos[:, p % capacity] = p
    for b in range(batch):
        pos[b, rng.choice(capacity, size=min(empty, capacity), replace=False)] = -1
    return pos.astype(np.int32)


def check_decode(b, tq, hkv, group, d, cap, end, empty, context, dtype, block_k, splits, seed):
    rng = np.random.default_rng(seed)
    hq = hkv * group
    q = _normal(rng, (b, tq, hq, d), dtype)
    k = _normal(rng, (b, cap, hkv, d), dtype)
    v = _normal(rng, (b, cap, hkv, d), dtype)
    kp = jnp.asarray(ring_positions(b, cap, end, empty, rng))
    qp = jnp.asarray(np.broadcast_to(np.arange(end - tq, end), (b, tq)).astype(np.int32))
    out = decode_attention(q, k, v, qp, kp, context=context, block_k=block_k, num_splits=splits, interpret=True)
    ref = jax.jit(functools.partial(reference_decode_attention, context=context))(q, k, v, qp, kp)
    assert out.shape == ref.shape and out.dtype == q.dtype
    err = _maxerr(out, ref)
    assert err < TOL[dtype], err
    return err


def test_decode_ring_wraparound_gqa_bf16_and_padding():
    # cache of 40 that wrapped (positions 50..89 in slots 10..39, 0..9), 7 empty slots, window 30,
    # 2 kv heads x 2 q heads each, capacity padded 40 -> 48 (block 8 x 2 splits x 3)
    check_decode(2, 1, 2, 2, 16, 40, 90, 7, 30, jnp.float32, 8, 2, 0)
    check_decode(1, 3, 1, 4, 32, 24, 100, 0, None, jnp.bfloat16, 16, 1, 1)  # 3 query steps, no window


@settings(max_examples=2, **HYP)
@given(b=st.integers(1, 2), tq=st.integers(1, 3), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([8, 16]), cap=st.integers(8, 40), end=st.integers(1, 120), empty=st.integers(0, 5),
       context=st.one_of(st.none(), st.integers(1, 40)), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       block_k=st.sampled_from([8, 16]), splits=st.integers(1, 2), seed=st.integers(0, 99))
def test_decode_matches_reference_hypothesis(**kw):
    check_decode(**kw)


@pytest.mark.slow
@settings(max_examples=40, **HYP)
@given(b=st.integers(1, 3), tq=st.integers(1, 4), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([8, 16, 64]), cap=st.integers(1, 100), end=st.integers(1, 300), empty=st.integers(0, 9),
       context=st.one_of(st.none(), st.integers(1, 120)), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       block_k=st.sampled_from([8, 16, 32]), splits=st.integers(1, 3), seed=st.integers(0, 999))
def test_decode_matches_reference_many(**kw):
    check_decode(**kw)


def check_flash(b, t, s, hkv, group, d, context, causal, dtype, blocks, seed, packed=False, grads=True):
    """Self-attention style (s == t: same positions) or keys with a prefix of earlier steps plus
    empty slots (s > t)."""
    rng = np.random.default_rng(seed)
    hq = hkv * group
    q = _normal(rng, (b, t, hq, d), dtype)
    k = _normal(rng, (b, s, hkv, d), dtype)
    v = _normal(rng, (b, s, hkv, d), dtype)
    start = 7
    qp = np.broadcast_to(np.arange(start, start + t), (b, t)).astype(np.int32).copy()
    if packed:  # two documents packed in a row restart their positions (masking follows positions)
        qp[:, t // 2:] = np.arange(t - t // 2)
    if s == t:
        kp = qp.copy()
    else:
        kp = np.concatenate([np.arange(start - (s - t), start)[None].repeat(b, 0), qp], axis=1).astype(np.int32)
        kp[:, rng.choice(s - t, size=min(3, s - t), replace=False)] = -1
    qp, kp = jnp.asarray(qp), jnp.asarray(kp)
    bq, bk, bqb, bkb = blocks
    kw = dict(context=context, causal=causal)
    f = jax.jit(lambda q, k, v: flash_attention(q, k, v, qp, kp, block_q=bq, block_k=bk, block_q_bwd=bqb,
                                                block_k_bwd=bkb, interpret=True, **kw))
    r = jax.jit(lambda q, k, v: reference_flash_attention(q, k, v, qp, kp, **kw))
    out, ref = f(q, k, v), r(q, k, v)
    assert out.shape == ref.shape and out.dtype == q.dtype
    tol = TOL[dtype]
    errs = [_maxerr(out, ref)]
    assert errs[0] < tol, errs
    if grads:
        w = _normal(rng, out.shape, jnp.float32)
        loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w)
        gf = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
        gr = jax.jit(jax.grad(loss(r), argnums=(0, 1, 2)))(q, k, v)
        for a, bb in zip(gf, gr):
            scale = float(np.max(np.abs(np.asarray(bb, np.float32)))) + 1.0
            errs.append(_maxerr(a, bb))
            assert errs[-1] < tol * scale, errs
    return errs


def test_flash_causal_gqa_fwd_and_grads():
    # T=37 padded to 48, 3x3 forward blocks of 16 (some skipped: causal), backward blocks 16 x 8
    check_flash(1, 37, 37, 2, 2, 16, None, True, jnp.float32, (16, 16, 16, 8), 0)


def test_flash_window_prefix_and_empty_keys_fwd_and_grads():
    # sliding window 9 (most blocks skipped), 11 cached keys in front (3 of them empty)
    check_flash(2, 24, 35, 1, 1, 16, 9, True, jnp.float32, (8, 16, 16, 8), 1)


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    dict(b=1, t=40, s=40, hkv=1, group=3, d=32, context=None, causal=False, dtype=jnp.float32),
    dict(b=1, t=40, s=40, hkv=2, group=1, d=16, context=12, causal=False, dtype=jnp.float32),
    dict(b=2, t=33, s=33, hkv=1, group=2, d=16, context=None, causal=True, dtype=jnp.bfloat16),
    dict(b=1, t=48, s=48, hkv=2, group=2, d=32, context=20, causal=True, dtype=jnp.bfloat16, packed=True),
    dict(b=1, t=32, s=32, hkv=1, group=1, d=16, context=5, causal=True, dtype=jnp.float32, packed=True),
])
def test_flash_more_cases(case):
    check_flash(blocks=(16, 16, 8, 16), seed=3, **case)


@pytest.mark.slow
@settings(max_examples=12, **HYP)
@given(b=st.integers(1, 2), t=st.integers(1, 50), extra=st.integers(0, 20), hkv=st.integers(1, 2),
       group=st.sampled_from([1, 2]), d=st.sampled_from([8, 16]), context=st.one_of(st.none(), st.integers(1, 60)),
       causal=st.booleans(), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       blocks=st.sampled_from([(8, 8, 8, 8), (16, 8, 8, 16), (32, 32, 16, 16)]), seed=st.integers(0, 99),
       packed=st.booleans())
def test_flash_matches_reference_hypothesis(b, t, extra, **kw):
    check_flash(b, t, t + extra, grads=not extra or kw["causal"], **kw)


# ----------------------------------------------------------------------------------------------
# dispatch and the config switch


def test_attention_pallas_impl_matches_xla_on_cpu():
    rng = np.random.default_rng(5)
    q, k, v = (_normal(rng, (1, 20, 2, 16), jnp.float32) for _ in range(3))
    pos = jnp.asarray(np.arange(20)[None], jnp.int32)
    kw = dict(context=6, causal=True)
    ref = jax.jit(functools.partial(attention, impl="xla", **kw))(q, k, v, pos, pos)
    pallas = jax.jit(functools.partial(attention, impl="pallas", **kw))
    np.testing.assert_allclose(pallas(q, k, v, pos, pos), ref, atol=2e-5)  # flash
    out = pallas(q[:, -1:], k, v, pos[:, -1:], pos)  # decode kernel
    np.testing.assert_allclose(out, ref[:, -1:], atol=2e-5)
    g = jax.jit(jax.grad(lambda q: pallas(q, k, v, pos[:, -1:], pos).sum()))(q[:, -1:])
    g_ref = jax.jit(jax.grad(lambda q: reference_attention(q, k, v, pos[:, -1:], pos, **kw).sum()))(q[:, -1:])
    np.testing.assert_allclose(g, g_ref, atol=2e-5)
    with pytest.raises(ValueError, match="unknown attention"):
        attention(q, k, v, pos, pos, impl="triton", **kw)


def test_auto_picks_pallas_only_for_tpu_and_enough_keys():
    q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    pos = jnp.zeros((1, 256), jnp.int32)
    trace = lambda n: str(jax.make_jaxpr(functools.partial(attention, context=None, causal=True))(
        q[:, :n], q[:, :n], q[:, :n], pos[:, :n], pos[:, :n]))
    assert "pallas_call" not in trace(256)  # the CPU: XLA
    with compiling_for_tpu():
        assert "pallas_call" in trace(256)
        assert "pallas_call" not in trace(16)  # Moshi's depth transformer: too few keys for a tile


def test_config_attention_field_is_validated():
    from moshax.config import ConfigError, TransformerConfig

    assert TransformerConfig().attention == "auto"
    for ok in ("auto", "xla", "chunked", "pallas"):
        TransformerConfig(attention=ok).validate("model.transformer")
    with pytest.raises(ConfigError, match="attention"):
        TransformerConfig(attention="flash").validate("model.transformer")


def test_layer_decodes_through_the_pallas_kernel_with_a_wrapped_cache():
    """MultiHeadAttention(attention='pallas') == 'xla': a prefill, then steps past the ring's capacity."""
    from flax import nnx

    from moshax.layers.attention import KVCache, MultiHeadAttention

    def make(impl):
        return MultiHeadAttention(32, 2, context=8, causal=True, rope=True, max_period=10000.0, init_std=0.2,
                                  attention=impl, rngs=nnx.Rngs(0))

    layers = {impl: make(impl) for impl in ("xla", "pallas")}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 14, 32)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(14, dtype=jnp.int32), (2, 14))
    call = nnx.jit(lambda layer, x, p, c: layer(x, p, c))
    outs = {impl: [] for impl in layers}
    for impl, layer in layers.items():
        y, cache = call(layer, x[:, :4], pos[:, :4], KVCache.empty(2, 8, 2, 16))  # prefill 4
        outs[impl].append(y)
        for t in range(4, 14):  # wraps the 8-slot ring
            y, cache = call(layer, x[:, t:t + 1], pos[:, t:t + 1], cache)
            outs[impl].append(y)
    for a, b in zip(outs["pallas"], outs["xla"]):
        np.testing.assert_allclose(a, b, atol=3e-5)
    full, _ = nnx.jit(lambda layer, x, p: layer(x, p))(layers["pallas"], x, pos)  # training path: flash kernel, same window
    np.testing.assert_allclose(full, jnp.concatenate(outs["xla"], axis=1), atol=3e-5)


# ----------------------------------------------------------------------------------------------
# TPU compiles (libtpu, no TPU needed): the 7B shapes


def _tpu_mesh(topology, names=("x",)):
    require_module("libtpu", "TPU compile checks need the tpu extra (libtpu)")
    from jax.sharding import Mesh

    from moshax.training.aot import topology_devices

    devs = np.array(topology_devices(topology))
    shape = (devs.size,) if len(names) == 1 else (1, 1, devs.size)
    return Mesh(devs.reshape(shape), names)


def _heads_sharded(mesh, fn, n_pos):
    from jax.sharding import PartitionSpec as P

    h = P(None, None, "x")
    return jax.shard_map(fn, mesh=mesh, in_specs=(h, h, h) + (P(),) * n_pos, out_specs=h, check_vma=False)


def compiled_decode_hlo(topology, batch, cap=3000, heads=32, head_dim=128) -> str:
    """The compiled TPU HLO of the decode kernel over a heads-sharded mesh."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _tpu_mesh(topology)
    fn = _heads_sharded(mesh, functools.partial(decode_attention, context=cap), 2)
    h = NamedSharding(mesh, P(None, None, "x"))
    rep = NamedSharding(mesh, P())
    args = [jax.ShapeDtypeStruct((batch, 1, heads, head_dim), jnp.bfloat16, sharding=h),
            jax.ShapeDtypeStruct((batch, cap, heads, head_dim), jnp.bfloat16, sharding=h),
            jax.ShapeDtypeStruct((batch, cap, heads, head_dim), jnp.bfloat16, sharding=h),
            jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((batch, cap), jnp.int32, sharding=rep)]
    return jax.jit(fn).lower(*args).compile().as_text()


def compiled_flash_train_hlo(topology, t, heads=32, head_dim=128, batch=1, kv_heads=None, context=None,
                             causal=True) -> str:
    """The compiled TPU HLO of the flash kernel's forward + backward over a heads-sharded mesh."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _tpu_mesh(topology)
    context = t if context is None else context
    fn = _heads_sharded(mesh, lambda q, k, v, p: flash_attention(q, k, v, p, p, context=context, causal=causal), 1)
    step = jax.grad(lambda q, k, v, p: jnp.sum(fn(q, k, v, p).astype(jnp.float32)), argnums=(0, 1, 2))
    h = NamedSharding(mesh, P(None, None, "x"))
    a = jax.ShapeDtypeStruct((batch, t, heads, head_dim), jnp.bfloat16, sharding=h)
    kv = jax.ShapeDtypeStruct((batch, t, kv_heads or heads, head_dim), jnp.bfloat16, sharding=h)
    p = jax.ShapeDtypeStruct((batch, t), jnp.int32, sharding=NamedSharding(mesh, P()))
    return jax.jit(step).lower(a, kv, kv, p).compile().as_text()


def test_decode_compiles_for_tpu_v5e():
    assert "tpu_custom_call" in compiled_decode_hlo("v5e:2x2", 1)


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
@pytest.mark.parametrize("batch", [1, 2, 8])
def test_decode_compiles_for_tpu_7b(topology, batch):
    assert "tpu_custom_call" in compiled_decode_hlo(topology, batch)


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
@pytest.mark.parametrize("t", [4096, 3000])  # Helium; Moshi (padded to 3072)
def test_flash_fwd_bwd_compiles_for_tpu_7b(topology, t):
    assert compiled_flash_train_hlo(topology, t).count("tpu_custom_call") >= 3  # forward + two backward kernels


@pytest.mark.slow
def test_flash_gqa_noncausal_window_compiles_for_tpu():
    text = compiled_flash_train_hlo("v5e:2x2", 1000, heads=32, kv_heads=8, context=256, causal=False, batch=2)
    assert text.count("tpu_custom_call") >= 3  # forward + two backward kernels


@pytest.mark.slow
def test_dispatch_shards_the_kernel_over_the_mesh_for_tpu():
    """attention(impl='pallas') under jax.set_mesh on a (data, fsdp, tensor) TPU mesh: shard_map
    splits batch and heads, so no device gathers the whole batch."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _tpu_mesh("v5p:2x2x1", ("data", "fsdp", "tensor"))
    mesh = jax.sharding.Mesh(mesh.devices.reshape(1, 2, 2), ("data", "fsdp", "tensor"))
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    a = jax.ShapeDtypeStruct((4, 1024, 8, 128), jnp.bfloat16, sharding=spec)
    p = jax.ShapeDtypeStruct((4, 1024), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))

    def step(q, k, v, pos):
        return jax.grad(lambda q: jnp.sum(attention(q, k, v, pos, pos, context=512, causal=True,
                                                    impl="pallas").astype(jnp.float32)))(q)

    with jax.set_mesh(mesh), compiling_for_tpu():
        compiled = jax.jit(step).lower(a, a, a, p).compile()
    text = compiled.as_text()
    assert "tpu_custom_call" in text and "all-gather" not in text


@pytest.mark.slow
def test_helium_7b_layers_train_and_decode_steps_compile_with_the_kernels():
    """The real train and decode steps (Helium 7B widths, 2 layers, v5p:2x2x1, FSDP over 4 chips):
    under ``compiling_for_tpu`` the ``auto`` attention is the Pallas kernels (scan, remat,
    custom_vjp, shard_map over the mesh) and both steps compile and fit."""
    require_module("libtpu", "TPU compile checks need the tpu extra (libtpu)")
    from moshax.config import load_config
    from moshax.training import aot
    from moshax.training.task import make_task

    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "helium_7b.yaml", ["model.transformer.num_layers=2", "train.batch_size=8",
                                                 "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"])
    with compiling_for_tpu():
        train = aot.compile_train_step(cfg, make_task(cfg), "v5p:2x2x1")
        decode = aot.compile_decode_step(cfg, "v5p:2x2x1", batch=4)
    assert train.fits and decode.fits


def test_config_attention_reaches_the_layers():
    """`model.transformer.attention` picks the implementation every attention layer uses."""
    from flax import nnx

    from moshax.config import from_dict
    from moshax.models.helium import Helium

    cfg = from_dict({"model": {"kind": "helium", "vocab_size": 32, "transformer": {
        "dim": 32, "num_heads": 2, "num_layers": 1, "hidden_dim": 48, "context": 16, "attention": "pallas"}}}).model
    model = nnx.eval_shape(lambda: Helium(cfg, rngs=nnx.Rngs(0)))
    assert model.transformer.layers.self_attn.attention == "pallas"
