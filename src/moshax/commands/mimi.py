"""``moshax mimi``: audio <-> Mimi codes for data people.

    moshax mimi encode --checkpoint CKPT --input AUDIO --output CODES.npy [--num-codebooks 8]
    moshax mimi decode --checkpoint CKPT --input CODES.npy --output OUT.wav

``CKPT`` is a moshax checkpoint directory — the output of ``moshax convert from-kyutai --model
mimi``, a ``moshax train`` workdir (its newest checkpoint; the codec's ``state["params"]`` /
``state["rest"]``, the discriminator is ignored), its ``checkpoints/`` dir or one step dir — or a
Kyutai ``.safetensors`` file (the released Mimi architecture).

Encode reads any format ``sphn`` decodes (wav, flac, mp3, ogg), any sample rate and channel
count: channels are averaged to mono and the signal is resampled to 24 kHz (polyphase). Its
length is then zero-padded at the end to a whole number of 1920-sample frames (80 ms), so
``frames = ceil(samples / 1920)``. ``CODES.npy`` holds int32 ``[num_codebooks, frames]``
(semantic codebook first); a sidecar ``CODES.json`` records the original length, rate and
source. Decode writes 16-bit mono wav at 24 kHz of ``frames * 1920`` samples, trimmed to the
original length when the sidecar is there. Unreadable, empty or corrupt input fails with one
line naming the file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _load(checkpoint: str):
    from moshax.models.mimi.model import load_codec

    return load_codec(checkpoint)


def _sidecar(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def encode_file(mimi, input_path: str, output_path: str, num_codebooks: int | None = None) -> dict:
    from data_pipeline.audio import read_audio
    from moshax.evaluation.codec import CodecRunner

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
    from moshax.config import ConfigError

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
    from moshax.evaluation.codec import CodecRunner

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


def cmd_encode(args: argparse.Namespace) -> int:
    mimi = _load(args.checkpoint)
    info = encode_file(mimi, args.input, args.output, args.num_codebooks)
    dur = info["num_samples"] / info["sample_rate"]
    print(f"wrote {args.output}: {info['num_codebooks']} x {info['frames']} codes for {dur:.2f} s of audio "
          f"({dur / max(info['seconds'], 1e-9):.1f}x real time)")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    mimi = _load(args.checkpoint)
    info = decode_file(mimi, args.input, args.output)
    dur = info["num_samples"] / info["sample_rate"]
    print(f"wrote {args.output}: {dur:.2f} s at {info['sample_rate']} Hz from {info['num_codebooks']} x "
          f"{info['frames']} codes")
    return 0


def add_parser(subparsers) -> None:
    mimi = subparsers.add_parser("mimi", help="encode audio to Mimi codes and decode them back")
    sub = mimi.add_subparsers(dest="action", required=True)
    p = sub.add_parser("encode", help="audio file -> codes .npy [num_codebooks, frames]")
    p.add_argument("--checkpoint", required=True, help="moshax checkpoint dir, train workdir or Kyutai .safetensors")
    p.add_argument("--input", required=True, help="audio file (any rate and channel count)")
    p.add_argument("--output", required=True, help="codes .npy to write (+ a .json sidecar)")
    p.add_argument("--num-codebooks", type=int, default=None, help="codebooks to keep (default: the config's, 8)")
    p.set_defaults(fn=cmd_encode)
    p = sub.add_parser("decode", help="codes .npy -> 24 kHz mono wav")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="codes .npy [num_codebooks, frames]")
    p.add_argument("--output", required=True, help="wav file to write")
    p.set_defaults(fn=cmd_decode)
