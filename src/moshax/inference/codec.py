"""Whole-signal Mimi encode / decode: chunked streaming calls and the codes files of ``moshax mimi``.

* :class:`CodecRunner` encodes / decodes audio of any length in fixed chunks (default 10 s)
  through Mimi's streaming API, so memory stays bounded and each chunk shape compiles once; the
  result equals one batch ``encode`` / ``decode`` of the whole signal (the model is causal).
  The signal is zero-padded at the end to whole frames (1920 samples at 24 kHz); decoding gives
  ``frames * 1920`` samples (:meth:`CodecRunner.roundtrip` trims back to the input length).
* :func:`encode_file` / :func:`decode_file`: an audio file <-> ``CODES.npy`` (int32
  ``[num_codebooks, frames]``) plus a ``CODES.json`` sidecar with the original length and rate.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moshax.config import ConfigError
from moshax.inference.bound import BoundModel


class CodecRunner:
    """Chunked, jitted whole-signal encode/decode for one Mimi (batch of one, mono)."""

    def __init__(self, mimi, num_codebooks: int | None = None, chunk_frames: int = 125, devices=None):
        q = mimi.cfg.quantizer
        k = q.num_codebooks if num_codebooks is None else int(num_codebooks)
        if not q.n_q_semantic <= k <= q.n_q:
            raise ConfigError(f"--num-codebooks {k}: this Mimi has {q.n_q} codebooks "
                              f"(use {q.n_q_semantic}..{q.n_q})")
        bound = BoundModel(mimi)  # weights bound once, transformers in the inference layout
        # encode_batch over several local devices: rows split across them, weights replicated
        self.devices = list(devices) if devices is not None else []
        self._rows = None
        if len(self.devices) > 1:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            mesh = Mesh(np.array(self.devices), ("rows",))
            self._rows = NamedSharding(mesh, PartitionSpec("rows"))
            bound.place(NamedSharding(mesh, PartitionSpec()))
        self.mimi = bound.model
        self.num_codebooks = k
        self.chunk_frames = int(chunk_frames)
        self.frame_size = mimi.frame_size
        self.sample_rate = mimi.cfg.sample_rate
        self._enc = bound.jit(lambda m, x, s: m.encode_step(x, s, k), donate_argnums=(1,))
        self._dec = bound.jit(lambda m, c, s: m.decode_step(c, s), donate_argnums=(1,))

    def frames_for(self, num_samples: int) -> int:
        return max(1, math.ceil(num_samples / self.frame_size))

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """Mono audio [T] (or [1, T]) at the codec's rate -> codes int32 [K, ceil(T / frame_size)]."""
        x = np.asarray(audio, np.float32).reshape(-1)
        frames = self.frames_for(x.shape[0])
        n = self.chunk_frames * self.frame_size
        total = -(-frames // self.chunk_frames) * n
        x = np.pad(x, (0, total - x.shape[0]))
        state = self.mimi.init_state(1)
        out = []
        for start in range(0, total, n):
            chunk = jnp.asarray(x[start:start + n])[None, None]
            codes, state = self._enc(chunk, state)
            out.append(np.asarray(codes[0]))
        return np.concatenate(out, axis=-1)[:, :frames].astype(np.int32)

    def encode_batch(self, audios: list[np.ndarray], batch_size: int = 4) -> list[np.ndarray]:
        """Many mono signals -> their codes, ``batch_size`` at a time per device: each batch is
        zero-padded to its longest signal (and to full rows, so every call has one shape and
        compiles once); each result is cut to its own ``ceil(T / frame_size)`` frames. Equal to
        :meth:`encode` of each signal alone (the model is causal: padding at the end changes nothing
        before it). With several ``devices`` a call takes ``batch_size`` rows on each."""
        if self._rows is not None:
            batch_size *= len(self.devices)
        xs = [np.asarray(a, np.float32).reshape(-1) for a in audios]
        out: list[np.ndarray] = []
        n = self.chunk_frames * self.frame_size
        for b0 in range(0, len(xs), batch_size):
            group = xs[b0:b0 + batch_size]
            frames = [self.frames_for(x.shape[0]) for x in group]
            total = -(-max(frames) // self.chunk_frames) * n
            batch = np.zeros((batch_size, 1, total), np.float32)
            for i, x in enumerate(group):
                batch[i, 0, : x.shape[0]] = x
            state = self._place_rows(self.mimi.init_state(batch_size), batch_size)
            chunks = []
            for start in range(0, total, n):
                codes, state = self._enc(self._place_rows(batch[:, :, start:start + n], batch_size), state)
                chunks.append(np.asarray(codes))
            codes = np.concatenate(chunks, axis=-1)
            out.extend(codes[i, :, : frames[i]].astype(np.int32) for i in range(len(group)))
        return out

    def _place_rows(self, tree, rows: int):
        """Arrays (a batch, a streaming state) onto the devices: leaves with ``rows`` leading
        rows split across them, the rest replicated (one device: the default one)."""
        if self._rows is None:
            return jax.tree.map(jnp.asarray, tree)
        replicated = jax.sharding.NamedSharding(self._rows.mesh, jax.sharding.PartitionSpec())
        return jax.tree.map(lambda x: jax.device_put(x, self._rows if getattr(x, "ndim", 0) and x.shape[0] == rows
                                                     else replicated), tree)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes [K, frames] -> mono audio float32 [frames * frame_size]."""
        c = np.asarray(codes, np.int32)
        frames = c.shape[-1]
        total = -(-frames // self.chunk_frames) * self.chunk_frames
        c = np.pad(c, ((0, 0), (0, total - frames)))
        state = self.mimi.init_state(1)
        out = []
        for start in range(0, total, self.chunk_frames):
            audio, state = self._dec(jnp.asarray(c[:, start:start + self.chunk_frames])[None], state)
            out.append(np.asarray(audio[0, 0]))
        return np.concatenate(out)[: frames * self.frame_size].astype(np.float32)

    def roundtrip(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes, decoded audio trimmed to the input length)."""
        x = np.asarray(audio, np.float32).reshape(-1)
        codes = self.encode(x)
        return codes, self.decode(codes)[: x.shape[0]]


def _sidecar(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def encode_file(mimi, input_path: str, output_path: str, num_codebooks: int | None = None) -> dict:
    from data_pipeline.audio import read_audio

    runner = CodecRunner(mimi, num_codebooks)
    audio = read_audio(input_path, runner.sample_rate)[0]
    t0 = time.perf_counter()
    codes = runner.encode(audio)
    elapsed = time.perf_counter() - t0
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, codes)
    info = {"num_samples": int(audio.shape[0]), "sample_rate": runner.sample_rate, "frame_rate": mimi.cfg.frame_rate,
            "frame_size": runner.frame_size, "num_codebooks": int(codes.shape[0]), "frames": int(codes.shape[1]),
            "source": str(input_path)}
    _sidecar(out).write_text(json.dumps(info, indent=1))
    return {**info, "seconds": elapsed}


def read_codes(path: str, mimi) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"codes file not found: {p}")
    try:
        codes = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{p}: not a .npy array of codes ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if codes.ndim == 3 and codes.shape[0] == 1:
        codes = codes[0]
    q = mimi.cfg.quantizer
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ConfigError(f"{p}: expected integer codes [num_codebooks, frames], got {codes.dtype} {codes.shape}")
    if not q.n_q_semantic <= codes.shape[0] <= q.n_q:
        raise ConfigError(f"{p}: {codes.shape[0]} codebooks; this Mimi takes {q.n_q_semantic}..{q.n_q}")
    if codes.shape[1] == 0:
        raise ConfigError(f"{p}: no frames")
    if codes.min() < 0 or codes.max() >= q.bins:
        raise ConfigError(f"{p}: code values must be in 0..{q.bins - 1}, found {codes.min()}..{codes.max()}")
    return codes.astype(np.int32)


def decode_file(mimi, input_path: str, output_path: str) -> dict:
    from data_pipeline.audio import write_wav

    codes = read_codes(input_path, mimi)
    runner = CodecRunner(mimi, codes.shape[0])
    t0 = time.perf_counter()
    audio = runner.decode(codes)
    elapsed = time.perf_counter() - t0
    side = _sidecar(input_path)
    if side.is_file():
        try:
            n = int(json.loads(side.read_text()).get("num_samples", 0))
        except (ValueError, TypeError, AttributeError):
            n = 0
        if 0 < n <= audio.shape[0]:
            audio = audio[:n]
    write_wav(output_path, audio, runner.sample_rate)
    return {"num_samples": int(audio.shape[0]), "sample_rate": runner.sample_rate, "frames": int(codes.shape[1]),
            "num_codebooks": int(codes.shape[0]), "seconds": elapsed}
