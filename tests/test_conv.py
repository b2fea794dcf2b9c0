"""Streaming causal Conv1d / ConvTranspose1d: against a numpy reference, Kyutai's modules, and
streaming == batch for every variant (stride, dilation, groups, replicate padding, bias)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moshax.kernels.attention import compiling_for_tpu
from moshax.layers.block_conv import block_conv, block_conv_applies
from moshax.layers.conv import Conv1d, ConvTranspose1d

from requirements import REFERENCE, require_module

# (C_in, C_out, K, stride, dilation, groups, bias, pad_mode)
CONV_CASES = [
    (3, 5, 1, 1, 1, 1, True, "constant"),
    (3, 5, 7, 1, 1, 1, True, "constant"),
    (4, 6, 3, 1, 2, 1, True, "constant"),
    (4, 6, 8, 4, 1, 1, True, "constant"),
    (6, 6, 4, 2, 1, 2, False, "replicate"),
    (4, 4, 4, 2, 1, 4, False, "replicate"),
    (4, 8, 6, 3, 1, 1, False, "replicate"),
    (4, 4, 3, 2, 2, 2, True, "constant"),
    (2, 4, 2, 2, 1, 1, True, "constant"),  # kernel == stride: no streaming state
    # enough channels for the CPU's block matmuls (layers/block_conv.py): strided, 1x1, stride 1
    (16, 8, 8, 4, 1, 1, True, "constant"),
    (8, 12, 6, 3, 1, 1, False, "replicate"),
    (16, 24, 3, 1, 1, 1, True, "constant"),
    (16, 8, 1, 1, 1, 1, True, "constant"),
]
# (C_in, C_out, K, stride, groups, bias)
CONVTR_CASES = [
    (5, 3, 1, 1, 1, True),
    (5, 3, 4, 1, 1, True),
    (6, 4, 8, 4, 1, True),
    (6, 6, 4, 2, 6, False),
    (4, 6, 10, 5, 2, True),
    (4, 2, 3, 3, 1, True),  # kernel == stride: no overlap
    (4, 6, 7, 3, 2, True),  # kernel not a multiple of the stride
]


def _np_conv(x, w, b, stride, dilation, groups, pad_mode):
    """Naive causal conv: x [B, T, Ci], w [K, Ci/g, Co] -> [B, T/stride, Co]."""
    bsz, t, ci = x.shape
    k, cig, co = w.shape
    pad = (k - 1) * dilation + 1 - stride
    fill = np.repeat(x[:, :1], pad, axis=1) if pad_mode == "replicate" else np.zeros((bsz, pad, ci))
    xp = np.concatenate([fill, x], axis=1)
    cog = co // groups
    out = np.zeros((bsz, t // stride, co))
    for n in range(t // stride):
        for o in range(co):
            g = o // cog
            for kk in range(k):
                out[:, n, o] += xp[:, n * stride + kk * dilation, g * cig:(g + 1) * cig] @ w[kk, :, o]
    return out + (b if b is not None else 0)


def _np_convtr(x, w, b, stride, groups):
    """Naive causal transposed conv: x [B, T, Ci], w [Ci, K, Co/g] -> [B, T*stride, Co]."""
    bsz, t, ci = x.shape
    _, k, cog = w.shape
    cig = ci // groups
    out = np.zeros((bsz, (t - 1) * stride + k, cog * groups))
    for n in range(t):
        for i in range(ci):
            g = i // cig
            for kk in range(k):
                out[:, n * stride + kk, g * cog:(g + 1) * cog] += x[:, n, i:i + 1] * w[i, kk][None]
    out = out[:, : t * stride]
    return out + (b if b is not None else 0)


def _stream(module, x, chunk):
    state = module.init_state(x.shape[0])
    step = nnx.jit(lambda m, xc, s: m.step(xc, s))
    ys = []
    for i in range(0, x.shape[1], chunk):
        y, state = step(module, x[:, i:i + chunk], state)
        ys.append(y)
    return jnp.concatenate(ys, axis=1)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv1d_matches_numpy_and_streams(case):
    ci, co, k, s, d, g, bias, pad_mode = case
    conv = Conv1d(ci, co, k, stride=s, dilation=d, groups=g, bias=bias, pad_mode=pad_mode, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).standard_normal((2, 12 * s, ci)).astype(np.float32)
    y = np.asarray(conv(jnp.asarray(x)))
    ref = _np_conv(x.astype(np.float64), np.asarray(conv.weight[...], np.float64),
                   None if conv.bias is None else np.asarray(conv.bias[...], np.float64), s, d, g, pad_mode)
    assert y.shape == (2, 12, co)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    for chunk_steps in (1, 3, 4):
        ys = np.asarray(_stream(conv, jnp.asarray(x), chunk_steps * s))
        np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CONVTR_CASES)
def test_convtr1d_matches_numpy_and_streams(case):
    ci, co, k, s, g, bias = case
    convtr = ConvTranspose1d(ci, co, k, stride=s, groups=g, bias=bias, rngs=nnx.Rngs(0))
    x = np.random.default_rng(2).standard_normal((2, 10, ci)).astype(np.float32)
    y = np.asarray(convtr(jnp.asarray(x)))
    ref = _np_convtr(x.astype(np.float64), np.asarray(convtr.weight[...], np.float64),
                     None if convtr.bias is None else np.asarray(convtr.bias[...], np.float64), s, g)
    assert y.shape == (2, 10 * s, co)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    for chunk in (1, 2, 5):
        ys = np.asarray(_stream(convtr, jnp.asarray(x), chunk))
        np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-6)


def test_replicate_state_is_per_batch_item():
    """A fresh state replicates each item's own first sample, even when chunks are single strides."""
    conv = Conv1d(2, 3, 4, stride=2, bias=False, pad_mode="replicate", rngs=nnx.Rngs(3))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 8, 2)).astype(np.float32) + 5.0)
    np.testing.assert_allclose(np.asarray(_stream(conv, x, 2)), np.asarray(conv(x)), rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise():
    conv = Conv1d(2, 3, 4, stride=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiple of the stride"):
        conv(jnp.zeros((1, 5, 2)))
    with pytest.raises(ValueError, match="expects"):
        conv(jnp.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match="pad_mode"):
        Conv1d(2, 3, 4, pad_mode="reflect", rngs=nnx.Rngs(0))


def test_param_axes():
    conv = Conv1d(4, 6, 3, groups=2, rngs=nnx.Rngs(0))
    convtr = ConvTranspose1d(4, 6, 4, stride=2, groups=2, rngs=nnx.Rngs(0))
    assert conv.weight.shape == (3, 2, 6) and conv.weight.get_metadata()["axes"] == ("conv_k", "conv_in", "conv_out")
    assert convtr.weight.shape == (4, 4, 3) and convtr.weight.get_metadata()["axes"] == ("conv_in", "conv_k", "conv_out")
    assert convtr.bias.get_metadata()["axes"] == ("conv_out",)


def test_against_kyutai_streaming_convs():
    """Batch and streaming outputs equal moshi's StreamingConv1d / StreamingConvTranspose1d."""
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    torch = require_module("torch", REFERENCE)
    require_module("moshi", REFERENCE)
    from moshi.modules.conv import StreamingConv1d, StreamingConvTranspose1d

    torch.manual_seed(0)
    rng = np.random.default_rng(4)
    for ci, co, k, s, d, g, bias, pad_mode in CONV_CASES:
        ref = StreamingConv1d(ci, co, k, s, dilation=d, groups=g, bias=bias, causal=True, pad_mode=pad_mode)
        conv = Conv1d(ci, co, k, stride=s, dilation=d, groups=g, bias=bias, pad_mode=pad_mode, rngs=nnx.Rngs(0))
        conv.weight[...] = jnp.asarray(ref.conv.conv.weight.detach().numpy().transpose(2, 1, 0))
        if bias:
            conv.bias[...] = jnp.asarray(ref.conv.conv.bias.detach().numpy())
        x = rng.standard_normal((2, ci, 8 * s)).astype(np.float32)
        with torch.no_grad():
            want = ref(torch.from_numpy(x)).numpy().transpose(0, 2, 1)
            with ref.streaming(2):
                want_s = torch.cat([ref(torch.from_numpy(x[..., i:i + s])) for i in range(0, 8 * s, s)], -1)
        got = np.asarray(conv(jnp.asarray(x.transpose(0, 2, 1))))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(_stream(conv, jnp.asarray(x.transpose(0, 2, 1)), s)),
                                   want_s.numpy().transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
    for ci, co, k, s, g, bias in CONVTR_CASES:
        ref = StreamingConvTranspose1d(ci, co, k, s, groups=g, bias=bias, causal=True)
        convtr = ConvTranspose1d(ci, co, k, stride=s, groups=g, bias=bias, rngs=nnx.Rngs(0))
        convtr.weight[...] = jnp.asarray(ref.convtr.convtr.weight.detach().numpy().transpose(0, 2, 1))
        if bias:
            convtr.bias[...] = jnp.asarray(ref.convtr.convtr.bias.detach().numpy())
        x = rng.standard_normal((2, ci, 7)).astype(np.float32)
        with torch.no_grad():
            want = ref(torch.from_numpy(x)).numpy().transpose(0, 2, 1)
        got = np.asarray(convtr(jnp.asarray(x.transpose(0, 2, 1))))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _value_and_grads(conv, x):
    """Loss, d/dx and d/dweight of a nonlinear function of the conv's output, jitted."""
    def loss(m, x):
        y = m(x)
        return jnp.sum(jnp.tanh(y) * jnp.arange(1, y.shape[1] + 1)[None, :, None])
    return nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(conv, x)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if block_conv_applies(c[2], c[3], c[4], c[5], c[0])]
                         + [(16, 32, 10, 5, 1, 1, True, "constant")])
def test_block_conv_equals_xla_conv_with_gradients(case):
    """On a CPU the convolutions block_conv_applies to differentiate as block matmuls
    (layers/block_conv.py): value, input gradient and weight gradient equal XLA's convolution
    (what a TPU trace uses)."""
    ci, co, k, s, d, g, bias, pad_mode = case
    conv = Conv1d(ci, co, k, stride=s, dilation=d, groups=g, bias=bias, pad_mode=pad_mode, rngs=nnx.Rngs(5))
    x = jnp.asarray(np.random.default_rng(6).standard_normal((3, 10 * s, ci)).astype(np.float32))
    assert conv._blocks()
    loss, (dm, dx) = _value_and_grads(conv, x)
    with compiling_for_tpu():
        assert not conv._blocks()
        loss_x, (dm_x, dx_x) = _value_and_grads(conv, x)
    np.testing.assert_allclose(float(loss), float(loss_x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dm.weight[...]), np.asarray(dm_x.weight[...]), rtol=1e-4, atol=1e-4)
    if bias:
        np.testing.assert_allclose(np.asarray(dm.bias[...]), np.asarray(dm_x.bias[...]), rtol=1e-4, atol=1e-4)


def test_block_conv_backward_has_no_convolution():
    """What the block path is for: on a CPU the strided convolution's backward is two GEMMs, no
    convolution (XLA's weight-gradient convolution transposes the activations to put the batch
    innermost): one convolution (the forward) in the gradient's HLO; a TPU trace keeps XLA's three."""
    conv = Conv1d(8, 16, 8, stride=4, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 32, 8))
    assert not block_conv_applies(7, 1, 1, 1, 1)  # Mimi's first 1 -> 64 convolution keeps XLA's

    graph, params = nnx.split(conv)

    def loss(params, x):
        return jnp.sum(nnx.merge(graph, params)(x) ** 2)

    def hlo():
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()

    assert hlo().count("stablehlo.convolution") == 1
    with compiling_for_tpu():
        assert hlo().count("stablehlo.convolution") == 3


def test_block_conv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="block_conv"):
        block_conv(jnp.zeros((1, 6, 2)), jnp.zeros((8, 2, 3)), 4, 0)  # length not a multiple of the stride
    with pytest.raises(ValueError, match="block_conv"):
        block_conv(jnp.zeros((1, 8, 2)), jnp.zeros((8, 2, 3)), 4, 2)  # front beyond m - 1


@pytest.mark.parametrize("case", [(16, 8, 8, 4, True), (4, 6, 10, 5, False), (32, 16, 4, 2, True)])
def test_convtr_blocks_conv_equals_taps_with_gradients(case):
    """A long enough input runs the transposed convolution as a stride-1 convolution over output
    blocks (``_blocks_conv``): value, input and weight gradients equal the per-step matmul and
    overlap-add (``_full``, what streaming and short inputs use), and the numpy reference."""
    ci, co, k, s, bias = case
    convtr = ConvTranspose1d(ci, co, k, stride=s, bias=bias, rngs=nnx.Rngs(3))
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 40, ci)).astype(np.float32))
    assert convtr._as_conv(x) and not convtr._as_conv(x[:, :2])
    ref = _np_convtr(np.asarray(x, np.float64), np.asarray(convtr.weight[...], np.float64),
                     None if convtr.bias is None else np.asarray(convtr.bias[...], np.float64), s, 1)
    np.testing.assert_allclose(np.asarray(convtr(x)), ref, rtol=1e-5, atol=1e-5)

    def value_and_grads(call):
        def loss(m, x):
            y = call(m, x)
            return jnp.sum(jnp.tanh(y) * jnp.arange(1, y.shape[1] + 1)[None, :, None])
        return nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(convtr, x)

    loss_b, (dm_b, dx_b) = value_and_grads(lambda m, x: m(x))
    loss_t, (dm_t, dx_t) = value_and_grads(lambda m, x: m._bias(m._taps(x)))
    np.testing.assert_allclose(float(loss_b), float(loss_t), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dx_b), np.asarray(dx_t), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dm_b.weight[...]), np.asarray(dm_t.weight[...]), rtol=1e-4, atol=1e-4)
    for chunk in (1, 3):
        np.testing.assert_allclose(np.asarray(_stream(convtr, x, chunk)), np.asarray(convtr(x)), rtol=1e-5, atol=1e-5)
