"""Codec evaluation and whole-file encode/decode with a Mimi.

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

from moshax.inference.codec import CodecRunner


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


__all__ = ["evaluate_codec", "bitrate", "format_report", "si_sdr_np", "mel_distance_np"]


def evaluate_codec_checkpoint(ckpt, model_cfg, folder: str, mesh_cfg=None, progress: bool = False) -> dict:
    """:func:`evaluate_codec` of a Mimi checkpoint (``model_cfg`` None: the checkpoint's own)."""
    from pathlib import Path

    import jax

    from moshax.checkpoint.model import build_model_from_checkpoint
    from moshax.config import ConfigError, MeshConfig
    from moshax.parallel.mesh import build_mesh

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--audio folder not found: {folder}")
    if ckpt.model_kind != "mimi":
        raise ConfigError(f"{ckpt.step_dir} holds a {ckpt.model_kind} model; --audio evaluates a Mimi codec "
                          "(use --shards DIR for an LM)")
    mesh = build_mesh(mesh_cfg or MeshConfig(), jax.devices())
    with jax.set_mesh(mesh):
        mimi, _ = build_model_from_checkpoint(ckpt, model_cfg, mesh)
    result = dict(evaluate_codec(mimi, folder, progress=progress))
    return {"checkpoint": str(ckpt.step_dir), "kind": "mimi", "audio": str(folder), **result}
