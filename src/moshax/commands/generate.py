"""``moshax generate``: stream a conversation through Moshi, or sample text from Helium.

    moshax generate --checkpoint LM_CKPT --mimi-checkpoint MIMI_CKPT --input USER.wav --output MOSHI.wav \
        [--text-output TEXT.txt] [--tokens-output TOKENS.npy] [--tokenizer SPM.model] \
        [--temperature 0.8] [--top-k 250] [--text-temperature 0.7] [--text-top-k 25] [--seed 0] [--batch-size 1]
    moshax generate --checkpoint HELIUM_CKPT (--prompt-ids 1,2,3 | --prompt TEXT --tokenizer SPM) [--max-tokens 64]

Moshi: the user's audio (any format and rate; resampled to 24 kHz mono) is cut into 80 ms frames
and streamed frame by frame: Mimi encode -> LM step -> Mimi decode of Moshi's codes
(:class:`moshax.inference.moshi_stream.DuplexLoop`). ``max_delay`` frames of silence follow the
input so that every input frame gets Moshi's answer for it. Writes Moshi's audio (as long as the
input), its text (sentencepiece pieces without PAD/EPAD with ``--tokenizer``, else all text ids)
and the raw tokens int32 ``[1 + dep_q, frames]`` (delays undone). ``--batch-size B`` runs B
samples of the same input (slot i seeded ``fold_in(seed, i)``); sample i > 0 goes to
``NAME-i.EXT``. Prints the per-frame latency p50/p99 (first, compiling frame excluded) and the
real-time factor (processing time / audio time).

Temperature 0 is greedy. A checkpoint of the wrong kind, a Mimi that does not fit the LM, an
empty wav: one line, exit 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from moshax.config import ConfigError


def _suffixed(path: str, i: int) -> Path:
    p = Path(path)
    return p if i == 0 else p.with_name(f"{p.stem}-{i}{p.suffix}")


def _sampling(args):
    from moshax.inference.sampling import Sampling

    try:
        return Sampling(args.temperature, args.top_k, args.text_temperature, args.text_top_k).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_lm_and_codec(ckpt, mimi_checkpoint: str):
    """(LM, its config, Mimi) from an opened LM checkpoint and a Mimi path, checked to fit each other
    (card, codebooks) in one line."""
    from moshax.checkpoint.model import build_model_from_checkpoint, load_codec
    from moshax.inference.moshi_stream import check_pair

    lm, cfg = build_model_from_checkpoint(ckpt)
    mimi = load_codec(mimi_checkpoint)
    try:
        check_pair(cfg, mimi.cfg)
    except ValueError as e:
        raise ConfigError(f"--mimi-checkpoint {mimi_checkpoint}: {e}") from None
    return lm, cfg, mimi


def _tokenizer(path):
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def _percentiles(latencies):
    if not latencies:
        return float("nan"), float("nan")
    a = np.asarray(latencies) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def cmd_generate(args: argparse.Namespace) -> int:
    from moshax.checkpoint.model import open_checkpoint

    ckpt = open_checkpoint(args.checkpoint)
    kind = ckpt.model_kind
    if kind == "lm":
        kind = "moshi"
    if kind == "moshi":
        return _generate_moshi(args, ckpt)
    if kind == "helium":
        return _generate_helium(args, ckpt)
    raise ConfigError(f"--checkpoint {args.checkpoint} holds a {kind} model; moshax generate takes a Moshi LM "
                      f"(with --mimi-checkpoint) or a Helium checkpoint")


# ----------------------------------------------------------------------------- Moshi


def _generate_moshi(args, ckpt) -> int:
    for name in ("mimi_checkpoint", "input", "output"):
        if getattr(args, name) is None:
            raise ConfigError(f"a Moshi checkpoint needs --{name.replace('_', '-')}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    sampling = _sampling(args)
    sp = _tokenizer(args.tokenizer)
    from data_pipeline.audio import read_audio, write_wav

    from moshax.inference.moshi_stream import DuplexLoop

    lm, cfg, mimi = load_lm_and_codec(ckpt, args.mimi_checkpoint)
    audio = read_audio(args.input, mimi.cfg.sample_rate)[0]
    if audio.shape[0] == 0:
        raise ConfigError(f"{args.input}: no audio samples")

    import jax
    from tqdm import tqdm

    b = args.batch_size
    loop = DuplexLoop(lm, mimi, batch=b, sampling=sampling, seed=args.seed)
    fs = loop.frame_size
    frames = -(-audio.shape[0] // fs)
    md = max(cfg.delays)
    x = np.zeros((frames + md) * fs, np.float32)
    x[: audio.shape[0]] = audio
    pcm_out, text, tokens, latencies = [], [], [], []
    t_start = time.perf_counter()
    compile_s = 0.0
    for t in tqdm(range(frames + md), desc="generate", unit="frame", leave=False):
        chunk = np.broadcast_to(x[t * fs:(t + 1) * fs][None, None], (b, 1, fs))
        t0 = time.perf_counter()
        pcm, out = loop.step(chunk)
        jax.block_until_ready(pcm)
        dt = time.perf_counter() - t0
        if t == 0:
            compile_s = dt
        else:
            latencies.append(dt)
        valid = np.asarray(out.valid)
        if valid.all():
            pcm_out.append(np.asarray(pcm[:, 0]))
            text.append(np.asarray(out.text))
            tokens.append(np.concatenate([np.asarray(out.text)[:, None], np.asarray(out.audio)], axis=1))
    total = time.perf_counter() - t_start
    wav = np.concatenate(pcm_out, axis=1)[:, : audio.shape[0]]  # [B, samples]
    toks = np.stack(tokens, axis=-1)[:, :, :frames].astype(np.int32)  # [B, 1 + dep_q, frames]
    for i in range(b):
        out_path = _suffixed(args.output, i)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_wav(out_path, wav[i], mimi.cfg.sample_rate)
        if args.tokens_output:
            np.save(_suffixed(args.tokens_output, i), toks[i])
        if args.text_output:
            ids = [int(v) for v in toks[i, 0]]
            _suffixed(args.text_output, i).write_text(_text_of(ids, sp, cfg) + "\n")
    p50, p99 = _percentiles(latencies)
    dur = audio.shape[0] / mimi.cfg.sample_rate
    steady = float(np.sum(latencies)) if latencies else total
    print(f"wrote {args.output}: {dur:.2f} s of Moshi audio ({frames} frames, batch {b})"
          + (f", text {args.text_output}" if args.text_output else "")
          + (f", tokens {args.tokens_output} {list(toks.shape[1:])}" if args.tokens_output else ""))
    print(f"per-frame latency (Mimi encode + LM step + Mimi decode, batch {b}): p50 {p50:.1f} ms, p99 {p99:.1f} ms; "
          f"first frame (compile) {compile_s:.1f} s; real-time factor {steady / max(len(latencies), 1) / 0.08:.3f} "
          f"(< 1: faster than real time); wall {total:.1f} s")
    if sp is not None and args.text_output:
        print("text: " + _text_of([int(v) for v in toks[0, 0]], sp, cfg)[:200])
    return 0


def _text_of(ids, sp, cfg) -> str:
    if sp is None:
        return " ".join(str(i) for i in ids)
    pad = {cfg.existing_text_padding_id, cfg.existing_text_end_padding_id}
    vocab = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in ids if i not in pad and 0 <= i < vocab]
    return "".join(pieces).replace("\u2581", " ").strip()


# ----------------------------------------------------------------------------- Helium


def _generate_helium(args, ckpt) -> int:
    sampling = _sampling(args)
    sp = _tokenizer(args.tokenizer)
    if args.prompt_ids:
        try:
            prompt = [int(v) for v in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise ConfigError(f"--prompt-ids {args.prompt_ids!r}: expected integers like 1,52,7") from None
    elif args.prompt is not None:
        if sp is None:
            raise ConfigError("--prompt needs --tokenizer (or give --prompt-ids)")
        prompt = [sp.bos_id()] + sp.encode(args.prompt) if sp.bos_id() >= 0 else sp.encode(args.prompt)
    else:
        raise ConfigError("a Helium checkpoint needs --prompt-ids or --prompt (with --tokenizer)")
    if not prompt:
        raise ConfigError("the prompt is empty")
    from moshax.checkpoint.model import build_model_from_checkpoint
    from moshax.inference.helium_sample import HeliumSampler

    model, cfg = build_model_from_checkpoint(ckpt)
    vocab = cfg.vocab_size
    if max(prompt) >= vocab or min(prompt) < 0:
        raise ConfigError(f"prompt ids must be in 0..{vocab - 1}")
    sampler = HeliumSampler(model, sampling.text_temperature, sampling.text_top_k, seed=args.seed)
    t0 = time.perf_counter()
    ids, latencies = sampler.generate(prompt, args.max_tokens)
    total = time.perf_counter() - t0
    if args.tokens_output:
        np.save(args.tokens_output, np.asarray(ids, np.int32))
    out_text = sp.decode(ids) if sp is not None else " ".join(str(i) for i in ids)
    if args.text_output:
        Path(args.text_output).write_text(out_text + "\n")
    p50, p99 = _percentiles(latencies)
    print(out_text)
    print(f"{len(ids)} tokens in {total:.2f} s; per-token latency p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream a conversation through Moshi (or sample text from Helium)")
    p.add_argument("--checkpoint", required=True, help="Moshi LM or Helium checkpoint (moshax dir or train workdir)")
    p.add_argument("--mimi-checkpoint", help="Mimi checkpoint dir or Kyutai .safetensors (Moshi)")
    p.add_argument("--input", help="the user's audio (Moshi), any format and rate")
    p.add_argument("--output", help="Moshi's audio, 24 kHz wav")
    p.add_argument("--text-output", help="Moshi's (or Helium's) text")
    p.add_argument("--tokens-output", help=".npy of tokens: int32 [1 + dep_q, frames] (Moshi) or [n] (Helium)")
    p.add_argument("--tokenizer", help="sentencepiece model: text as pieces instead of ids")
    p.add_argument("--temperature", type=float, default=0.8, help="audio temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=250, help="audio top-k (0 = all)")
    p.add_argument("--text-temperature", type=float, default=0.7, help="text temperature (0 = greedy)")
    p.add_argument("--text-top-k", type=int, default=25, help="text top-k (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="samples of the same input, run as one batch")
    p.add_argument("--prompt-ids", help="Helium: prompt token ids, e.g. 1,52,7")
    p.add_argument("--prompt", help="Helium: prompt text (needs --tokenizer)")
    p.add_argument("--max-tokens", type=int, default=64, help="Helium: tokens to sample")
    p.set_defaults(fn=cmd_generate)
