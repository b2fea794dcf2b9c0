"""Codec evaluation and whole-file encode/decode with a Mimi.

* :class:`CodecRunner` encodes / decodes audio of any length in fixed chunks (default 10 s)
  through Mimi's streaming API, so memory stays bounded and each chunk shape compiles once; the
  result equals one batch ``encode`` / ``decode`` of the whole signal (the model is causal).
  The signal is zero-padded at the end to whole frames (1920 samples at 24 kHz); decoding gives
  ``frames * 1920`` samples (:meth:`CodecRunner.roundtrip` trims back to the input length).
* :func:`evaluate_codec` round-trips every audio file of a folder and reports SI-SDR (dB, mean
  over files), mel distance (multi-scale log10-mel L1, :func:`moshax.models.mimi.losses.mel_loss`:
  n_fft 512/1024/2048 with 64/80/128 HTK mel bands, hop n_fft / 4, magnitude floor 1e-5; mean over
  files) and the bitrate (``num_codebooks * log2(bins) * frame_rate`` bits per second).
"""

from __future__ import annotations

import math
import time

import jax.numpy as jnp
import numpy as np

from moshax.inference.bound import BoundModel


class CodecRunner:
    """Chunked, jitted whole-signal encode/decode for one Mimi (batch of one, mono)."""

    def __init__(self, mimi, num_codebooks: int | None = None, chunk_frames: int = 125):
        q = mimi.cfg.quantizer
        k = q.num_codebooks if num_codebooks is None else int(num_codebooks)
        if not q.n_q_semantic <= k <= q.n_q:
            from moshax.config import ConfigError

            raise ConfigError(f"--num-codebooks {k}: this Mimi has {q.n_q} codebooks "
                              f"(use {q.n_q_semantic}..{q.n_q})")
        bound = BoundModel(mimi)  # weights bound once, transformers in the inference layout
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


def si_sdr_np(reference: np.ndarray, estimate: np.ndarray, eps: float = 1e-8) -> float:
    from moshax.models.mimi.losses import si_sdr

    return float(si_sdr(jnp.asarray(reference)[None], jnp.asarray(estimate)[None], eps)[0])


def mel_distance_np(reference: np.ndarray, estimate: np.ndarray, sample_rate: int) -> float:
    from moshax.models.mimi.losses import mel_loss

    return float(mel_loss(jnp.asarray(estimate)[None, None], jnp.asarray(reference)[None, None], sample_rate)[0])


def bitrate(num_codebooks: int, bins: int, frame_rate: float) -> float:
    """Bits per second of the codes."""
    return num_codebooks * math.log2(bins) * frame_rate


def evaluate_codec(mimi, folder, *, num_codebooks: int | None = None, max_files: int | None = None,
                   max_seconds: float | None = None, progress: bool = False) -> dict:
    """Round-trip every audio file under ``folder`` (dirs, globs, files or .jsonl manifests work
    too) through ``mimi`` and report::

        {"files", "seconds", "num_codebooks", "bitrate_bps", "bitrate_kbps",
         "si_sdr_db", "mel_distance", "per_file": [{"path", "seconds", "si_sdr_db", "mel_distance"}],
         "realtime_factor"}   # audio seconds per wall second (encode + decode, after compiling)

    Files are read with :func:`data_pipeline.audio.read_audio` (mono, resampled to the codec rate;
    a bad file raises a one-line error naming it); ``max_seconds`` cuts each file.
    """
    from data_pipeline.audio import list_audio_files, read_audio

    files = list_audio_files(folder if isinstance(folder, (list, tuple)) else [str(folder)])
    if max_files:
        files = files[:max_files]
    runner = CodecRunner(mimi, num_codebooks)
    sr = runner.sample_rate
    rows = []
    wall = 0.0
    it = files
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(files, desc="eval codec", unit="file")
    for i, path in enumerate(it):
        x = read_audio(path, sr)[0]
        if max_seconds:
            x = x[: int(round(max_seconds * sr))]
        t0 = time.perf_counter()
        _, y = runner.roundtrip(x)
        if i > 0:  # the first file pays the compiles
            wall += time.perf_counter() - t0
        rows.append({"path": str(path), "seconds": x.shape[0] / sr, "si_sdr_db": si_sdr_np(x, y),
                     "mel_distance": mel_distance_np(x, y, sr)})
    q = mimi.cfg.quantizer
    bps = bitrate(runner.num_codebooks, q.bins, mimi.cfg.frame_rate)
    timed = sum(r["seconds"] for r in rows[1:])
    return {
        "files": len(rows),
        "seconds": float(sum(r["seconds"] for r in rows)),
        "num_codebooks": runner.num_codebooks,
        "bitrate_bps": bps,
        "bitrate_kbps": bps / 1000.0,
        "si_sdr_db": float(np.mean([r["si_sdr_db"] for r in rows])),
        "mel_distance": float(np.mean([r["mel_distance"] for r in rows])),
        "realtime_factor": timed / wall if wall > 0 else None,
        "per_file": rows,
    }


def format_report(report: dict) -> str:
    rtf = report.get("realtime_factor")
    return (f"{report['files']} files, {report['seconds']:.1f} s of audio, {report['num_codebooks']} codebooks "
            f"({report['bitrate_kbps']:.3f} kbps): SI-SDR {report['si_sdr_db']:.2f} dB, mel distance "
            f"{report['mel_distance']:.4f}" + (f", {rtf:.1f}x real time" if rtf else ""))


__all__ = ["CodecRunner", "evaluate_codec", "bitrate", "format_report", "si_sdr_np", "mel_distance_np"]
