"""A causal 1-d convolution as one matmul over blocks of ``stride`` samples (the CPU path of
:class:`moshax.layers.conv.Conv1d`'s backward pass, wherever :func:`block_conv_applies`).

Why: XLA:CPU differentiates a convolution's weights as a convolution whose "batch" is the input
channels and whose features are the batch, so it first transposes the activations
``[B, T, C] -> [C, T, B]`` (B innermost: ~0.3 GB/s); and it computes the input gradient of a
strided convolution as an input-dilated convolution that spends ``stride`` times the FLOPs. For
a kernel that is a whole number of strides (``K = m * stride``, Mimi's downsamplers use
``K = 2 * stride``) both go away: with ``xb = x.reshape(B, T / s, s * C)`` (free) and the kernel's
``m`` blocks side by side, ``wcat [s * C, m * C_out]``,

    z = xb @ wcat                    # [B, T/s, m, C_out]: one GEMM, every tap of every block
    y[t] = sum_j z[t + j - front, j]  # a shifted sum over the (small) outputs

The forward pass stays XLA's convolution (as fast, and it does not write ``z``); the backward
pass is the transpose of those two lines: it builds ``dz`` (the output gradient shifted once per
block, small) and runs two GEMMs, ``dx = dz @ wcat.T`` and ``dwcat = xb.T @ dz`` contracting
batch and time together (a transposed GEMM: no copy of the activations). ``front`` is the number of zero blocks the
causal padding puts before the signal, so the padding is never written out either. A stride-1
kernel is the same with one-sample blocks (``m = K`` taps side by side).

On a TPU XLA's own convolutions are the right choice and :class:`Conv1d` keeps them there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Below this many input channels per block the GEMMs are too thin (Mimi's first 1 -> 64 convolution:
# 99 ms with XLA's convolution, 275 ms as blocks, fwd+bwd at B = 4 x 2 s)
MIN_BLOCK_CHANNELS = 16


def block_conv_applies(kernel_size: int, stride: int, dilation: int, groups: int, in_channels: int) -> bool:
    """Whether :func:`block_conv` computes this convolution on a CPU: ungrouped, undilated, a
    kernel of a whole number of strides, blocks of at least :data:`MIN_BLOCK_CHANNELS` inputs."""
    return (groups == 1 and dilation == 1 and kernel_size % stride == 0
            and in_channels * stride >= MIN_BLOCK_CHANNELS)


def block_conv(x, w, stride: int, front: int):
    """``y[b, t] = sum_j xb[b, t + j - front] @ w_j`` over blocks of ``stride`` samples.

    x ``[B, T, C]`` (``T`` a multiple of ``stride``), w ``[K, C, C_out]`` (``K = m * stride``),
    ``0 <= front <= m - 1`` zero blocks before ``x`` (``m - 1``: Conv1d's causal zero padding;
    0: ``x`` is already padded). Returns ``[B, T / stride + front - m + 1, C_out]``."""
    k = w.shape[0]
    if x.shape[1] % stride or k % stride or not 0 <= front < k // stride:
        raise ValueError(f"block_conv: length {x.shape[1]}, kernel {k}, stride {stride}, front {front}")
    return _block_conv(x, w, stride, front)


def _blocks(x, w, stride):
    b, t, c = x.shape
    k, _, c_out = w.shape
    m = k // stride
    xb = x.reshape(b, t // stride, stride * c)
    wcat = w.reshape(m, stride * c, c_out).transpose(1, 0, 2).reshape(stride * c, m * c_out)
    return xb, wcat, m


def _shifted_stack(dy, m, front):
    """dz[t', j] = dy[t' + front - j] (zero outside) -> [B, n, m, C]: the gradient of the block
    taps ``z`` when ``y[t] = sum_j z[t + j - front, j]``."""
    full = jnp.stack([jnp.pad(dy, ((0, 0), (j, m - 1 - j), (0, 0))) for j in range(m)], axis=2)
    return full[:, front:]


def xla_conv(x, w, stride: int, pad_left: int, dilation: int = 1, groups: int = 1):
    """XLA's causal convolution, channels-last, ``pad_left`` zeros before ``x`` (not written out)."""
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(stride,), padding=((pad_left, 0),), rhs_dilation=(dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _block_conv(x, w, stride, front):
    return _forward(x, w, stride, front)[0]


def _forward(x, w, stride, front):
    """XLA's convolution: the blocks' forward (GEMM + shifted sum) made bench_mimi.py's batch
    encode of 10 s 0.74 s instead of 0.48 s, and streaming encode 41 ms a frame instead of 22."""
    return xla_conv(x, w, stride, front * stride), (x, w)


def _backward(stride, front, res, dy):
    x, w = res
    xb, wcat, m = _blocks(x, w, stride)
    b, n, _ = xb.shape
    dz = _shifted_stack(dy.astype(x.dtype), m, front).reshape(b * n, -1)
    dx = (dz @ wcat.T).reshape(x.shape)
    dwcat = jax.lax.dot_general(xb.reshape(b * n, -1), dz, (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
    c_out = w.shape[2]
    dw = dwcat.reshape(stride * w.shape[1], m, c_out).transpose(1, 0, 2).reshape(w.shape)
    return dx, dw.astype(w.dtype)


_block_conv.defvjp(_forward, _backward)
