"""Codec losses and metrics (JAX): adversarial hinge, relative feature matching, semantic
distillation, optional reconstruction (L1, multi-scale mel), SI-SDR, and a gradient balancer.

Conventions (EnCodec / audiocraft): with K discriminator scales,

* generator adversarial loss ``1/K sum_k mean(relu(1 - D_k(x_hat)))``;
* discriminator loss ``1/K sum_k mean(relu(1 - D_k(x))) + mean(relu(1 + D_k(x_hat)))``;
* relative feature matching ``1/(K L) sum_k sum_l mean|D_k^l(x) - D_k^l(x_hat)| / mean|D_k^l(x)|``
  (the real feature maps are constants);
* distillation ``mean_t (1 - cos(proj(semantic_t), teacher_t))``.

Every loss here is a per-example mean (shape ``[B]``) unless said, so the task can sum over the
batch and let the trainer divide by the global batch size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moshax.models.mimi.discriminator import hann_window, stft


def _per_example_mean(x):
    return jnp.mean(x.reshape(x.shape[0], -1).astype(jnp.float32), axis=-1)


def hinge_generator_loss(logits_fake: list) -> jax.Array:
    """[B]: mean over scales of mean(relu(1 - D(x_hat)))."""
    return sum(_per_example_mean(jax.nn.relu(1.0 - lg)) for lg in logits_fake) / len(logits_fake)


def hinge_discriminator_loss(logits_real: list, logits_fake: list) -> jax.Array:
    """[B]: mean over scales of mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))."""
    total = 0.0
    for r, f in zip(logits_real, logits_fake):
        total = total + _per_example_mean(jax.nn.relu(1.0 - r)) + _per_example_mean(jax.nn.relu(1.0 + f))
    return total / len(logits_real)


def feature_matching_loss(fmaps_real: list, fmaps_fake: list, eps: float = 1e-8) -> jax.Array:
    """[B]: relative L1 between feature maps, averaged over scales and layers; the real maps are
    constants (stop_gradient)."""
    total, n = 0.0, 0
    for scale_r, scale_f in zip(fmaps_real, fmaps_fake):
        for r, f in zip(scale_r, scale_f):
            r = jax.lax.stop_gradient(r).astype(jnp.float32)
            total = total + _per_example_mean(jnp.abs(r - f)) / (_per_example_mean(jnp.abs(r)) + eps)
            n += 1
    return total / n


def l1_loss(x, y) -> jax.Array:
    return _per_example_mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def cosine_distance(a, b, eps: float = 1e-8) -> jax.Array:
    """[B]: mean over frames of 1 - cos(a_t, b_t); a, b [B, T, D]."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + eps)
    return jnp.mean(1.0 - cos, axis=-1)


# --------------------------------------------------------------------------------------------- mel


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=32)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None):
    """HTK-scale triangular filters, [n_fft // 2 + 1, n_mels] float32 (unnormalised)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    pts = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    lower, center, upper = pts[:-2], pts[1:-1], pts[2:]
    up = (freqs[:, None] - lower[None]) / np.maximum(center - lower, 1e-9)[None]
    down = (upper[None] - freqs[:, None]) / np.maximum(upper - center, 1e-9)[None]
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


MEL_SCALES = ((512, 64), (1024, 80), (2048, 128))  # (n_fft, n_mels); hop n_fft // 4


def log_mel(audio, sample_rate: int, n_fft: int, n_mels: int, hop: int | None = None, floor: float = 1e-5):
    """log10 mel magnitude spectrogram of audio [..., T] (Hann, no centering, power 1): [..., frames, n_mels].
    Signals shorter than ``n_fft`` are zero-padded to it."""
    hop = n_fft // 4 if hop is None else hop
    if audio.shape[-1] < n_fft:
        audio = jnp.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, n_fft - audio.shape[-1])])
    mag = jnp.abs(stft(audio, n_fft, hop, n_fft, normalized=False))
    mel = mag @ jnp.asarray(mel_filterbank(sample_rate, n_fft, n_mels))
    return jnp.log10(jnp.maximum(mel, floor))


def mel_loss(x, y, sample_rate: int, scales=MEL_SCALES) -> jax.Array:
    """[B]: multi-scale log-mel L1 (the ``mel distance`` of evaluation), x, y [B, C, T]."""
    total = 0.0
    for n_fft, n_mels in scales:
        total = total + _per_example_mean(jnp.abs(log_mel(x, sample_rate, n_fft, n_mels)
                                                  - log_mel(y, sample_rate, n_fft, n_mels)))
    return total / len(scales)


def si_sdr(reference, estimate, eps: float = 1e-8) -> jax.Array:
    """Scale-invariant SDR in dB per example, [B]; inputs [B, ..., T] (zero-mean first)."""
    r = reference.reshape(reference.shape[0], -1).astype(jnp.float32)
    e = estimate.reshape(estimate.shape[0], -1).astype(jnp.float32)
    r = r - r.mean(-1, keepdims=True)
    e = e - e.mean(-1, keepdims=True)
    alpha = jnp.sum(e * r, -1, keepdims=True) / (jnp.sum(r * r, -1, keepdims=True) + eps)
    target = alpha * r
    noise = e - target
    return 10.0 * jnp.log10((jnp.sum(target ** 2, -1) + eps) / (jnp.sum(noise ** 2, -1) + eps))


# ----------------------------------------------------------------------------------------- balancer


def balanced_surrogate(losses: dict, weights: dict, x, *, total_norm: float = 1.0, eps: float = 1e-12):
    """audiocraft's loss balancer, as a surrogate objective.

    ``losses`` maps names to functions ``f(x) -> scalar``. Each loss's gradient w.r.t. the shared
    output ``x`` (e.g. the decoded audio) is rescaled to norm ``total_norm * w / sum(w)`` (norms
    averaged over the batch, as audiocraft's per-example ``per_batch_item``), and the
    surrogate ``sum(stop_gradient(g) * x)`` back-propagates their sum through whatever made ``x``.
    Returns ``(surrogate, {name: loss value}, {name: gradient norm})``.
    """
    total_w = sum(weights[k] for k in losses) or 1.0
    g_sum = jnp.zeros_like(x, dtype=jnp.float32)
    values, norms = {}, {}
    xs = jax.lax.stop_gradient(x)
    for name, f in losses.items():
        val, g = jax.value_and_grad(f)(xs)
        g = g.astype(jnp.float32)
        norm = jnp.mean(jnp.sqrt(jnp.sum(g.reshape(g.shape[0], -1) ** 2, -1)))
        g_sum = g_sum + g * (total_norm * weights[name] / total_w / (norm + eps))
        values[name], norms[name] = val, norm
    return jnp.sum(jax.lax.stop_gradient(g_sum) * x.astype(jnp.float32)), values, norms


__all__ = ["hinge_generator_loss", "hinge_discriminator_loss", "feature_matching_loss", "l1_loss", "cosine_distance",
           "mel_filterbank", "log_mel", "mel_loss", "si_sdr", "balanced_surrogate", "hann_window"]
