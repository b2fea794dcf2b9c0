"""Multi-scale STFT discriminator (MS-STFTD), as EnCodec's / audiocraft's, used to train Mimi.

Each scale takes the complex STFT of the waveform (Hann window, ``center=False``, normalized by
``sqrt(sum(window**2))`` as ``torchaudio.Spectrogram(normalized=True)``), stacks real and imaginary
parts as channels, and runs 2-d convolutions over (time, frequency), channels-last
``[B, frames, freq, C]``:

    conv (3 x 9) -> [conv (3 x 9), stride (1, 2), time dilation d] for d in dilations
    -> conv (3 x 3) -> LeakyReLU(0.2) after each, every activation is a feature map
    -> conv_post (3 x 3) -> 1 logit channel

Channels grow as ``min(filters_scale ** (i + 1) * filters, max_filters)``; every conv is
weight-normalized (``w = g * v / ||v||``, ``g`` initialised to ``||v||``) when ``weight_norm``.
``__call__(audio [B, C, T])`` returns ``(logits, feature_maps)``: a list with one logit map per
scale and a list (per scale) of lists (per layer) of feature maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moshax.layers.params import param
from moshax.models.mimi.config import DiscriminatorConfig

_DN = ("NHWC", "HWIO", "NHWC")


def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window (``torch.hann_window(n)``)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def stft(x, n_fft: int, hop: int, win: int, *, normalized: bool = True):
    """Complex STFT of x [..., T] (no centering): [..., frames, n_fft // 2 + 1]."""
    window = np.zeros(n_fft, np.float32)
    off = (n_fft - win) // 2
    window[off:off + win] = hann_window(win)
    t = x.shape[-1]
    if t < n_fft:
        raise ValueError(f"STFT of {t} samples with n_fft={n_fft}: the signal is too short")
    frames = (t - n_fft) // hop + 1
    x = x.astype(jnp.float32)
    if n_fft % hop == 0:  # frames from r shifted reshapes: slices only (cheap gradients)
        r = n_fft // hop
        parts = [x[..., j * hop: (j + frames) * hop].reshape(*x.shape[:-1], frames, hop) for j in range(r)]
        seg = jnp.concatenate(parts, axis=-1) * window
    else:
        idx = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
        seg = jnp.take(x, jnp.asarray(idx), axis=-1) * window  # [..., frames, n_fft]
    spec = jnp.fft.rfft(seg, axis=-1)
    if normalized:
        spec = spec / np.sqrt(np.sum(window ** 2))
    return spec


def _pad2d(kernel, dilation=(1, 1)):
    return [((k - 1) * d // 2, (k - 1) * d // 2) for k, d in zip(kernel, dilation)]


class Conv2d(nnx.Module):
    """Channels-last 2-d conv ``[B, H, W, C]`` (H = time, W = freq), optional weight norm."""

    def __init__(self, cin: int, cout: int, kernel, *, stride=(1, 1), dilation=(1, 1), weight_norm: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kernel, stride, dilation = tuple(kernel), tuple(stride), tuple(dilation)
        self.stride, self.dilation, self.padding = stride, dilation, _pad2d(kernel, dilation)
        self.dtype = dtype
        self.weight_norm = weight_norm
        bound = (cin * kernel[0] * kernel[1]) ** -0.5  # PyTorch's default conv init

        def uniform(key, shape, dt):
            return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dt)

        axes = ("conv_kh", "conv_kw", "conv_in", "conv_out")
        self.weight = param(rngs, uniform, (*kernel, cin, cout), axes, param_dtype)
        if weight_norm:
            v = self.weight[...].astype(jnp.float32)
            self.scale = nnx.Param(jnp.sqrt(jnp.sum(v * v, axis=(0, 1, 2))).astype(param_dtype), axes=("conv_out",))
        else:
            self.scale = None
        self.bias = param(rngs, uniform, (cout,), ("conv_out",), param_dtype)

    def kernel(self):
        w = self.weight[...].astype(jnp.float32)
        if self.scale is not None:
            norm = jnp.sqrt(jnp.sum(w * w, axis=(0, 1, 2)) + 1e-12)
            w = w * (self.scale[...].astype(jnp.float32) / norm)
        return w.astype(self.dtype)

    def __call__(self, x):
        x, w = x.astype(self.dtype), self.kernel()
        if self.stride[0] == 1 and self.stride[1] > 1:
            y = conv_freq_strided(x, w, self.stride[1], self.padding, self.dilation[0])
        else:
            y = jax.lax.conv_general_dilated(x, w, window_strides=self.stride, padding=self.padding,
                                             rhs_dilation=self.dilation, dimension_numbers=_DN)
        return y + self.bias[...].astype(self.dtype)


def conv_freq_strided(x, w, stride: int, padding, dilation_h: int = 1):
    """``conv(x, w)`` with stride ``(1, stride)`` as a stride-1 conv on a space-to-depth view of
    the frequency axis (same result; its input gradient avoids XLA:CPU's slow dilated-input path).
    x [B, H, W, C], w [kh, kw, C, O], padding [(top, bottom), (left, right)]."""
    b, h, width, c = x.shape
    kh, kw, _, o = w.shape
    (pt, pb), (pl, pr) = padding
    out_w = (width + pl + pr - kw) // stride + 1
    kw2 = -(-kw // stride)
    need = (out_w - 1 + kw2) * stride
    x = jnp.pad(x, ((0, 0), (0, 0), (pl, max(0, need - width - pl)), (0, 0)))[:, :, :need]
    x = x.reshape(b, h, need // stride, stride * c)
    w = jnp.pad(w, ((0, 0), (0, kw2 * stride - kw), (0, 0), (0, 0))).reshape(kh, kw2, stride * c, o)
    return jax.lax.conv_general_dilated(x, w, window_strides=(1, 1), padding=[(pt, pb), (0, 0)],
                                        rhs_dilation=(dilation_h, 1), dimension_numbers=_DN)


class STFTDiscriminator(nnx.Module):
    """One scale of the MS-STFT discriminator."""

    def __init__(self, cfg: DiscriminatorConfig, n_fft: int, hop: int, win: int, *, in_channels: int = 1,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.n_fft, self.hop, self.win = n_fft, hop, win
        self.slope = cfg.negative_slope
        k = tuple(cfg.kernel_size)
        kw = dict(weight_norm=cfg.weight_norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        convs = [Conv2d(2 * in_channels, cfg.filters, k, **kw)]
        cin = min(cfg.filters_scale * cfg.filters, cfg.max_filters)
        for i, d in enumerate(cfg.dilations):
            cout = min(cfg.filters_scale ** (i + 1) * cfg.filters, cfg.max_filters)
            convs.append(Conv2d(cin, cout, k, stride=tuple(cfg.stride), dilation=(d, 1), **kw))
            cin = cout
        cout = min(cfg.filters_scale ** (len(cfg.dilations) + 1) * cfg.filters, cfg.max_filters)
        convs.append(Conv2d(cin, cout, (k[0], k[0]), **kw))
        self.convs = nnx.List(convs)
        self.conv_post = Conv2d(cout, 1, (k[0], k[0]), **kw)

    def __call__(self, audio):
        """audio [B, C, T] -> (logits [B, frames, freq', 1], [feature maps])."""
        spec = stft(audio, self.n_fft, self.hop, self.win)  # [B, C, frames, F]
        z = jnp.concatenate([spec.real, spec.imag], axis=1)  # [B, 2C, frames, F]
        z = z.transpose(0, 2, 3, 1)
        fmaps = []
        for conv in self.convs:
            z = jax.nn.leaky_relu(conv(z), self.slope)
            fmaps.append(z)
        return self.conv_post(z), fmaps


class MultiScaleSTFTDiscriminator(nnx.Module):
    def __init__(self, cfg: DiscriminatorConfig, *, in_channels: int = 1, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate("discriminator")
        self.cfg = cfg
        self.discriminators = nnx.List([
            STFTDiscriminator(cfg, n, hop, win, in_channels=in_channels, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
            for n, hop, win in cfg.scales()])

    def __call__(self, audio):
        """audio [B, C, T] -> (logits per scale, feature maps per scale)."""
        logits, fmaps = [], []
        for d in self.discriminators:
            lg, fm = d(audio)
            logits.append(lg)
            fmaps.append(fm)
        return logits, fmaps
