"""``moshax mimi``: audio <-> Mimi codes for data people (the library: :mod:`moshax.inference.codec`).

    moshax mimi encode --checkpoint CKPT --input AUDIO --output CODES.npy [--num-codebooks 8]
    moshax mimi decode --checkpoint CKPT --input CODES.npy --output OUT.wav

``CKPT`` is a moshax checkpoint directory — the output of ``moshax convert from-kyutai --model
mimi``, a ``moshax train`` workdir (its newest checkpoint; the codec's ``state["params"]`` /
``state["rest"]``, the discriminator is ignored), its ``checkpoints/`` dir or one step dir — or a
Kyutai ``X.safetensors`` file: its architecture is the Kyutai config ``X.json`` beside it when
present (``moshax convert to-kyutai`` writes it), else the released Mimi.

Encode reads any format ``sphn`` decodes (wav, flac, mp3, ogg), any sample rate and channel
count: channels are averaged to mono and the signal is resampled to 24 kHz (polyphase). Its
length is then zero-padded at the end to a whole number of 1920-sample frames (80 ms), so
``frames = ceil(samples / 1920)``. ``CODES.npy`` holds int32 ``[num_codebooks, frames]``
(semantic codebook first); a sidecar ``CODES.json`` records the original length, rate and
source. Decode writes 16-bit mono wav at 24 kHz of ``frames * 1920`` samples, trimmed to the
original length when the sidecar is there. Unreadable, empty, truncated (checked against the
file's header) or corrupt input fails with one line naming the file, exit 2, nothing written.
"""

from __future__ import annotations

import argparse


def _load(checkpoint: str):
    from moshax.checkpoint.model import load_codec

    return load_codec(checkpoint)


def cmd_encode(args: argparse.Namespace) -> int:
    mimi = _load(args.checkpoint)
    from moshax.inference.codec import encode_file

    info = encode_file(mimi, args.input, args.output, args.num_codebooks)
    dur = info["num_samples"] / info["sample_rate"]
    print(f"wrote {args.output}: {info['num_codebooks']} x {info['frames']} codes for {dur:.2f} s of audio "
          f"({dur / max(info['seconds'], 1e-9):.1f}x real time)")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    mimi = _load(args.checkpoint)
    from moshax.inference.codec import decode_file

    info = decode_file(mimi, args.input, args.output)
    dur = info["num_samples"] / info["sample_rate"]
    print(f"wrote {args.output}: {dur:.2f} s at {info['sample_rate']} Hz from {info['num_codebooks']} x "
          f"{info['frames']} codes")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """A random-weight Mimi checkpoint (codebooks drawn from calibration audio): a stand-in codec
    for data-pipeline dry runs and tests, never for real data."""
    import jax
    import numpy as np
    from flax import nnx

    from moshax.checkpoint.model import save_model_checkpoint
    from moshax.config import ConfigError, load_config, to_dict
    from moshax.models.mimi.random_init import random_mimi

    cfg = load_config(args.config, args.overrides)
    if getattr(cfg.model, "kind", "mimi") != "mimi":
        raise ConfigError(f"{args.config}: model.kind is {cfg.model.kind}, not mimi")
    calibration = None
    if args.calibrate:
        from data_pipeline.audio import read_audio

        calibration = read_audio(args.calibrate, cfg.model.sample_rate)[None]
    model = random_mimi(cfg.model, seed=args.seed, calibration=calibration)
    _, p, r = nnx.split(model, nnx.Param, ...)
    to_np = lambda t: jax.tree.map(np.asarray, nnx.to_pure_dict(t))  # noqa: E731
    save_model_checkpoint(args.output, to_np(p), to_np(r), config=to_dict(cfg.model), kind="mimi",
                          source=f"random init (seed {args.seed})")
    print(f"wrote a random-weight Mimi ({args.config}, seed {args.seed}) to {args.output}")
    return 0


def add_parser(subparsers) -> None:
    mimi = subparsers.add_parser("mimi", help="encode audio to Mimi codes and decode them back")
    sub = mimi.add_subparsers(dest="action", required=True)
    p = sub.add_parser("encode", help="audio file -> codes .npy [num_codebooks, frames]")
    p.add_argument("--checkpoint", required=True,
                   help="moshax checkpoint dir, train workdir or Kyutai X.safetensors (+ X.json beside it, if not "
                        "the released architecture)")
    p.add_argument("--input", required=True, help="audio file (any rate and channel count)")
    p.add_argument("--output", required=True, help="codes .npy to write (+ a .json sidecar)")
    p.add_argument("--num-codebooks", type=int, default=None, help="codebooks to keep (default: the config's, 8)")
    p.set_defaults(fn=cmd_encode)
    p = sub.add_parser("decode", help="codes .npy -> 24 kHz mono wav")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="codes .npy [num_codebooks, frames]")
    p.add_argument("--output", required=True, help="wav file to write")
    p.set_defaults(fn=cmd_decode)
    p = sub.add_parser("init", help="a random-weight Mimi checkpoint (for pipeline dry runs and tests)")
    p.add_argument("--config", required=True, help="a model.kind: mimi config, e.g. configs/mimi_tiny.yaml")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibrate", help="audio file whose latents the codebooks are drawn from (default: a tone)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_init)
