"""Pluggable semantic-distillation teachers for Mimi training (see ``TeacherConfig``).

A teacher is any object with ``dim`` (feature size), ``frame_rate`` (Hz) and
``__call__(audio [B, 1, T] float32) -> [B, frames, dim]`` (``frames = T * frame_rate / sample_rate``),
JAX-traceable. Built-ins:

* :class:`MelTeacher` — log-mel frames (cheap; for tests and smoke runs);
* :class:`MimiTeacher` — a frozen Mimi (e.g. Kyutai's released codec, whose first codebook was
  distilled from WavLM): its ``rvq_first`` embedding of the audio, at the codec frame rate;
* ``python`` — ``module:factory`` returning your own (e.g. a JAX WavLM/HuBERT loaded from a checkpoint).

Precomputed features (``kind: npy``) need no teacher object: the audio loader reads them.
:func:`write_features` turns any teacher into that form (``clip.npy`` next to ``clip.wav``).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moshax.config import ConfigError
from moshax.models.mimi.config import TeacherConfig


class MelTeacher:
    """log10 mel magnitudes at ``frame_rate`` Hz: a causal STFT with hop ``sample_rate / frame_rate``
    and window ``2 * hop`` (left-padded so ``T / hop`` frames come out), ``n_mels`` HTK bands;
    with ``normalize``, mean- and variance-normalized per band over the input (the cosine distance
    then ignores the offset all log-mel vectors share: a harder target)."""

    def __init__(self, sample_rate: int, frame_rate: float = 50.0, n_mels: int = 64, normalize: bool = False):
        hop = sample_rate / frame_rate
        if abs(hop - round(hop)) > 1e-9:
            raise ConfigError(f"mel teacher: frame_rate {frame_rate} Hz does not divide {sample_rate} Hz")
        self.sample_rate, self.frame_rate, self.dim = int(sample_rate), float(frame_rate), int(n_mels)
        self.hop = int(round(hop))
        self.n_fft = 2 * self.hop
        self.normalize = normalize

    def __call__(self, audio):
        from moshax.models.mimi.losses import log_mel

        x = jnp.asarray(audio, jnp.float32)[:, 0]
        x = jnp.pad(x, ((0, 0), (self.n_fft - self.hop, 0)))
        m = log_mel(x, self.sample_rate, self.n_fft, self.dim, hop=self.hop)  # [B, frames, n_mels]
        if not self.normalize:
            return m
        m = m - jnp.mean(m, axis=1, keepdims=True)
        return m / (jnp.std(m, axis=1, keepdims=True) + 1e-3)


class MimiTeacher:
    """A frozen Mimi: features = ``rvq_first`` embedding (quantized, projected) of the audio."""

    def __init__(self, mimi):
        from flax import nnx

        self.mimi = mimi
        self.dim = mimi.cfg.seanet.dimension
        self.frame_rate = float(mimi.cfg.frame_rate)
        self._fn = nnx.jit(lambda m, a: _mimi_semantic(m, a))

    def __call__(self, audio):
        return jax.lax.stop_gradient(_mimi_semantic(self.mimi, audio))

    def host(self, audio: np.ndarray) -> np.ndarray:
        return np.asarray(self._fn(self.mimi, jnp.asarray(audio)))


def _mimi_semantic(mimi, audio):
    q = mimi.quantizer.rvq_first
    latent = mimi.encode_latent(audio)
    return q.decode(q.encode(latent))


def build_teacher(cfg: TeacherConfig, sample_rate: int):
    """The online teacher for ``cfg`` (None for ``none`` and ``npy``)."""
    if cfg.kind in ("none", "npy"):
        return None
    if cfg.kind == "mel":
        return MelTeacher(sample_rate, cfg.frame_rate, cfg.n_mels, cfg.normalize)
    if cfg.kind == "mimi":
        from moshax.checkpoint.model import load_codec

        mimi = load_codec(cfg.path)
        if mimi.cfg.sample_rate != sample_rate:
            raise ConfigError(f"teacher {cfg.path} runs at {mimi.cfg.sample_rate} Hz, the codec at {sample_rate} Hz")
        return MimiTeacher(mimi)
    module, _, name = cfg.path.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"teacher path {cfg.path!r}: cannot import ({e})") from None
    teacher = factory(cfg, sample_rate)
    for attr in ("dim", "frame_rate"):
        if not hasattr(teacher, attr):
            raise ConfigError(f"teacher {cfg.path!r} has no {attr!r} attribute")
    return teacher


def teacher_frames(num_samples: int, sample_rate: int, frame_rate: float) -> int:
    n = num_samples * frame_rate / sample_rate
    if abs(n - round(n)) > 1e-6:
        raise ConfigError(f"{num_samples} samples at {sample_rate} Hz are not a whole number of teacher frames "
                          f"at {frame_rate} Hz")
    return int(round(n))


def fix_length(feats, frames: int):
    """Trim or pad (repeating the last frame) features [B, n, D] to ``frames``."""
    n = feats.shape[1]
    if n >= frames:
        return feats[:, :frames]
    return jnp.concatenate([feats, jnp.repeat(feats[:, -1:], frames - n, axis=1)], axis=1)


def pool_to_rate(feats, teacher_rate: float, frame_rate: float):
    """Average teacher frames [B, n, D] down to the codec frame rate (an integer ratio)."""
    k = teacher_rate / frame_rate
    if abs(k - round(k)) > 1e-9 or round(k) < 1:
        raise ConfigError(f"teacher frame rate {teacher_rate} Hz is not a multiple of the codec frame rate "
                          f"{frame_rate} Hz")
    k = int(round(k))
    if k == 1:
        return feats
    b, n, d = feats.shape
    return feats[:, : n // k * k].reshape(b, n // k, k, d).mean(axis=2)


class TeacherIterator:
    """Wraps a checkpointable batch iterator: adds ``batch["teacher"]`` computed by an online
    teacher (jitted, on this process's first device) from ``batch["audio"]``. Its state is the
    wrapped iterator's (JSON bytes, as Orbax's Grain handler takes from non-Grain iterators)."""

    def __init__(self, iterator, teacher, frames: int):
        self.iterator = iterator
        self.teacher = teacher
        self.frames = frames
        if hasattr(teacher, "host"):
            self._fn = teacher.host
        else:
            jitted = jax.jit(lambda a: teacher(a))
            self._fn = lambda a: np.asarray(jitted(jnp.asarray(a)))

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.iterator))
        feats = self._fn(batch["audio"])
        batch["teacher"] = np.asarray(fix_length(jnp.asarray(feats), self.frames), np.float32)
        return batch

    def get_state(self) -> bytes:
        import json

        return json.dumps(self.iterator.get_state()).encode()

    def set_state(self, state) -> None:
        import json

        self.iterator.set_state(json.loads(state.decode() if isinstance(state, (bytes, bytearray)) else state)
                                if isinstance(state, (bytes, bytearray, str)) else state)

    def start_prefetch(self) -> None:
        fn = getattr(self.iterator, "start_prefetch", None)
        if fn is not None:
            fn()

    def close(self) -> None:
        fn = getattr(self.iterator, "close", None)
        if fn is not None:
            fn()


def write_features(teacher, files: list[str], sample_rate: int, *, suffix: str = ".npy",
                   overwrite: bool = False, progress: bool = False) -> list[str]:
    """Run ``teacher`` over whole files and save ``[frames, dim]`` float32 next to each
    (``clip.wav`` -> ``clip`` + ``suffix``), for ``teacher.kind: npy`` training."""
    from data_pipeline.audio import read_audio

    fn = teacher.host if hasattr(teacher, "host") else jax.jit(lambda a: teacher(a))
    hop = sample_rate / teacher.frame_rate
    out = []
    it = files
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(files, desc="teacher features", unit="file")
    for f in it:
        target = str(Path(f).with_name(Path(f).stem + suffix))
        out.append(target)
        if os.path.exists(target) and not overwrite:
            continue
        audio = read_audio(f, sample_rate)
        n = audio.shape[-1]
        pad = int(-(-n // hop) * hop) - n  # whole teacher frames
        frame_pad = (-(n + pad)) % teacher.mimi.frame_size if hasattr(teacher, "mimi") else 0  # whole codec frames
        x = np.pad(audio, ((0, 0), (0, pad + frame_pad)))[None]
        feats = np.asarray(fn(x))[0][: int(round((n + pad) / hop))]
        np.save(target, feats.astype(np.float32))
    return out
