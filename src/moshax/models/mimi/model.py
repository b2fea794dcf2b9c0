"""Mimi: SEANet encoder -> encoder transformer -> downsample -> split RVQ, and back.

Audio is channels-first at the API, ``[B, channels, T]`` like Kyutai's (24 kHz mono: ``[B, 1, T]``);
codes are ``[B, K, frames]`` int32 (12.5 Hz frames of 1920 samples). Inside, activations are
channels-last ``[B, T, C]``.

Batch: ``encode(audio)`` pads the audio on the right with zeros to a whole number of frames (as
the reference does), ``decode(codes)`` gives ``frames * frame_size`` samples.

Streaming (pure functions of an explicit state pytree, jit-able, e.g. with ``nnx.jit``)::

    state = mimi.init_state(batch)
    codes, state = mimi.encode_step(audio_chunk, state)   # [B, 1, n * 1920] -> [B, K, n]
    audio, state = mimi.decode_step(codes, state)         # [B, K, n] -> [B, 1, n * 1920]

Chunk by chunk, the outputs equal the batch ones (the KV caches are ring buffers of ``context``
steps with absolute positions; the mask is the batch mask). Encoder and decoder states are
independent parts of one :class:`MimiState`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moshax.layers.attention import KVCache
from moshax.layers.conv import Conv1d, ConvState, ConvTranspose1d, ConvTrState
from moshax.layers.params import dtype_of
from moshax.layers.transformer import Transformer
from moshax.models.mimi.config import MimiConfig
from moshax.models.mimi.quantizer import SplitResidualVQ
from moshax.models.mimi.seanet import SEANetDecoder, SEANetEncoder


class MimiState(NamedTuple):
    """Streaming state (a pytree). ``*_offset`` [B] int32 count transformer steps (25 Hz)."""

    encoder: Any
    encoder_cache: KVCache
    encoder_offset: jax.Array
    downsample: ConvState | None
    upsample: ConvTrState | None
    decoder_cache: KVCache
    decoder_offset: jax.Array
    decoder: Any


class MimiTrainOutput(NamedTuple):
    audio: jax.Array  # [B, C, T] decoded
    codes: jax.Array  # [B, n_q, frames]
    penalty: jax.Array  # commitment loss (scalar)
    metrics: dict  # quantizer metrics (scalars)
    semantic: jax.Array  # [B, frames, D] rvq_first's projected output (distillation target)
    latent: jax.Array  # [B, frames, D] unquantized


class Mimi(nnx.Module):
    def __init__(self, cfg: MimiConfig, *, rngs: nnx.Rngs):
        cfg.validate("model")
        self.cfg = cfg
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.dtype = dtype
        dim = cfg.seanet.dimension
        stride = cfg.downsample_stride
        kw = dict(dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.encoder = SEANetEncoder(cfg.seanet, **kw)
        self.encoder_transformer = Transformer(cfg.transformer, **kw)
        downsample = upsample = None
        if stride > 1:  # learnt causal conv (replicate padding) and depthwise transposed conv, no bias
            downsample = Conv1d(dim, dim, 2 * stride, stride=stride, bias=False, pad_mode="replicate", **kw)
            upsample = ConvTranspose1d(dim, dim, 2 * stride, stride=stride, groups=dim, bias=False, **kw)
        self.downsample = downsample
        self.quantizer = SplitResidualVQ(dim, cfg.quantizer, **kw)
        self.upsample = upsample
        self.decoder_transformer = Transformer(cfg.transformer, **kw)
        self.decoder = SEANetDecoder(cfg.seanet, **kw)

    @property
    def frame_size(self) -> int:
        return self.cfg.frame_size

    # ---------------------------------------------------------------- batch

    def _audio_in(self, audio, pad: bool):
        if audio.ndim != 3 or audio.shape[1] != self.cfg.seanet.channels:
            raise ValueError(f"Mimi expects audio [B, {self.cfg.seanet.channels}, T], got {audio.shape}")
        t = audio.shape[-1]
        if pad:
            audio = jnp.pad(audio, ((0, 0), (0, 0), (0, (-t) % self.frame_size)))
        elif t == 0 or t % self.frame_size:
            raise ValueError(f"streaming audio chunk of {t} samples: must be a positive multiple of "
                             f"the frame size {self.frame_size}")
        return audio.transpose(0, 2, 1).astype(self.dtype)

    @staticmethod
    def _positions(batch: int, length: int, offset=None):
        pos = jnp.arange(length, dtype=jnp.int32)[None, :]
        if offset is not None:
            pos = pos + offset[:, None]
        return jnp.broadcast_to(pos, (batch, length))

    def encode_latent(self, audio):
        """Audio [B, C, T] -> unquantized latent [B, frames, D] (frames = ceil(T / frame_size))."""
        x = self.encoder(self._audio_in(audio, pad=True))
        x, _ = self.encoder_transformer(x, self._positions(x.shape[0], x.shape[1]))
        if self.downsample is not None:
            x = self.downsample(x)
        return x

    def encode(self, audio, num_codebooks: int | None = None):
        """Audio [B, C, T] -> codes [B, K, ceil(T / frame_size)] int32."""
        return self.quantizer.encode(self.encode_latent(audio), num_codebooks)

    def decode_latent(self, latent):
        """Quantized latent [B, frames, D] -> audio [B, C, frames * frame_size]."""
        x = latent.astype(self.dtype)
        if self.upsample is not None:
            x = self.upsample(x)
        x, _ = self.decoder_transformer(x, self._positions(x.shape[0], x.shape[1]))
        return self.decoder(x).transpose(0, 2, 1)

    def decode(self, codes):
        """Codes [B, K, frames] -> audio [B, C, frames * frame_size]."""
        return self.decode_latent(self.quantizer.decode(codes))

    # ---------------------------------------------------------------- training

    def train_forward(self, audio, key, *, step=0, quantize_rate: float = 1.0,
                      update_stats: bool = True, dropout: bool = False) -> "MimiTrainOutput":
        """Training forward of audio [B, C, T] (T a multiple of the frame size): encoder, split
        RVQ in train mode (EMA codebook updates written in place when ``update_stats``; k-means
        init, dead codes), decoder.

        With ``quantize_rate < 1`` each example is quantized with that probability and otherwise
        decoded from the unquantized latent (Moshi paper: 0.5). ``dropout=True`` turns quantizer
        dropout on (a random number of acoustic levels; training only). Returns a :class:`MimiTrainOutput`.
        """
        b, _, t = audio.shape
        if t % self.frame_size:
            raise ValueError(f"training audio of {t} samples: must be a multiple of the frame size {self.frame_size}")
        k_q, k_mask = jax.random.split(key)
        latent = self.encode_latent(audio)
        q = self.quantizer.train_forward_parts(latent, k_q, step=step, update_stats=update_stats, dropout=dropout)
        emb = q.quantized
        if quantize_rate < 1.0:
            keep = jax.random.bernoulli(k_mask, quantize_rate, (b, 1, 1))
            emb = jnp.where(keep, emb, latent.astype(emb.dtype))
        out = self.decode_latent(emb)
        return MimiTrainOutput(out, q.codes, q.penalty, q.metrics, q.semantic, latent)

    # ---------------------------------------------------------------- streaming

    def init_state(self, batch: int) -> MimiState:
        """A fresh streaming state; every leaf is its own buffer, so a step may donate it. The
        transformers' KV rings hold context + steps per frame - 1 entries: one frame's steps are
        written in place before attending (see :func:`moshax.layers.attention.attend`)."""
        capacity = self.cfg.transformer.context + max(self.cfg.downsample_stride, 1) - 1
        return MimiState(
            encoder=self.encoder.init_state(batch),
            encoder_cache=self.encoder_transformer.init_state(batch, capacity),
            encoder_offset=jnp.zeros((batch,), jnp.int32),
            downsample=None if self.downsample is None else self.downsample.init_state(batch),
            upsample=None if self.upsample is None else self.upsample.init_state(batch),
            decoder_cache=self.decoder_transformer.init_state(batch, capacity),
            decoder_offset=jnp.zeros((batch,), jnp.int32),
            decoder=self.decoder.init_state(batch),
        )

    def encode_latent_step(self, audio, state: MimiState):
        x, enc = self.encoder.step(self._audio_in(audio, pad=False), state.encoder)
        b, t = x.shape[:2]
        x, cache = self.encoder_transformer(x, self._positions(b, t, state.encoder_offset), state.encoder_cache)
        down = state.downsample
        if self.downsample is not None:
            x, down = self.downsample.step(x, down)
        return x, state._replace(encoder=enc, encoder_cache=cache, encoder_offset=state.encoder_offset + t,
                                 downsample=down)

    def encode_step(self, audio, state: MimiState, num_codebooks: int | None = None):
        """Audio chunk [B, C, n * frame_size] -> (codes [B, K, n], state)."""
        latent, state = self.encode_latent_step(audio, state)
        return self.quantizer.encode(latent, num_codebooks), state

    def decode_latent_step(self, latent, state: MimiState):
        x = latent.astype(self.dtype)
        up = state.upsample
        if self.upsample is not None:
            x, up = self.upsample.step(x, up)
        b, t = x.shape[:2]
        x, cache = self.decoder_transformer(x, self._positions(b, t, state.decoder_offset), state.decoder_cache)
        y, dec = self.decoder.step(x, state.decoder)
        return y.transpose(0, 2, 1), state._replace(upsample=up, decoder_cache=cache,
                                                    decoder_offset=state.decoder_offset + t, decoder=dec)

    def decode_step(self, codes, state: MimiState):
        """Codes [B, K, n] -> (audio [B, C, n * frame_size], state)."""
        return self.decode_latent_step(self.quantizer.decode(codes), state)
