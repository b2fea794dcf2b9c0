"""``moshax eval``: evaluate a checkpoint on held-out data (the library:
:func:`moshax.training.evaluate.evaluate_shards`, :func:`moshax.evaluation.codec.evaluate_codec_checkpoint`).

    moshax eval --checkpoint CKPT --shards DIR [--config CFG] [--batch-size 8] [--json OUT]   (LM)
    moshax eval --checkpoint CKPT --audio DIR  [--config CFG] [--json OUT]                   (codec)

``CKPT`` is any moshax checkpoint (a trainer workdir, its ``checkpoints/`` dir, a step dir, or a
``moshax convert`` output; see :mod:`moshax.checkpoint.model`). The model config comes from the
checkpoint unless ``--config`` names a run config (its ``model`` and ``mesh`` are used; the
checkpoint must fit that model).

* An LM on token shards: one pass over every record, in order (the last batch is padded with -1,
  which carries no loss), through the task's ``eval_metrics`` — the same numbers ``moshax train``'s
  eval reports. Moshi: per stream, cross-entropy and perplexity of the text stream (all targets,
  and non-padding targets), of each predicted audio codebook (1 = semantic), the acoustic mean,
  and the training objective over the whole set. Helium: token CE / perplexity.
* Mimi + ``--audio``: :func:`moshax.evaluation.codec.evaluate_codec` (``(mimi, folder) -> dict``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(args):
    from moshax.checkpoint.model import open_checkpoint
    from moshax.config import ConfigError

    ckpt = open_checkpoint(args.checkpoint)
    run_cfg = None
    if args.config:
        from moshax.config import load_config

        run_cfg = load_config(args.config, args.overrides)
        if run_cfg.model.kind != ckpt.model_kind:
            raise ConfigError(f"--config {args.config} is a {run_cfg.model.kind} config but {ckpt.step_dir} holds "
                              f"a {ckpt.model_kind} model")
    return ckpt, run_cfg


def format_lm_report(rep: dict) -> str:
    lines = [f"eval {rep['kind']} {rep['checkpoint']} on {rep['shards']} ({rep['records']} records)", "",
             "| stream | tokens | cross-entropy | perplexity |", "|---|---|---|---|"]
    for r in rep["streams"]:
        lines.append(f"| {r['stream']} | {r['tokens']} | {r['cross_entropy']:.4f} | {r['perplexity']:.2f} |")
    if "objective" in rep:
        lines += ["", f"objective (text mean + audio mean, as training): {rep['objective']:.4f}  "
                      f"(text {rep['text_loss']:.4f}, audio {rep['audio_loss']:.4f}; PAD/EPAD x0.5, semantic x100)"]
    return "\n".join(lines)


def format_codec_report(rep: dict) -> str:
    lines = [f"eval mimi {rep['checkpoint']} on {rep['audio']}", "", "| metric | value |", "|---|---|"]
    for k, v in rep.items():
        if k in ("checkpoint", "kind", "audio") or isinstance(v, (list, dict)) or v is None:
            continue  # per-file rows stay in --json
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from moshax.config import ConfigError

    if bool(args.shards) == bool(args.audio):
        raise ConfigError("moshax eval needs exactly one of --shards DIR (LM) or --audio DIR (codec)")
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size={args.batch_size}: must be > 0")
    ckpt, run_cfg = _load(args)
    if args.shards:
        from moshax.training.evaluate import evaluate_shards

        rep = evaluate_shards(ckpt, run_cfg, args.shards, args.batch_size, args.max_batches, progress=not args.quiet)
        print(format_lm_report(rep))
    else:
        from moshax.evaluation.codec import evaluate_codec_checkpoint

        rep = evaluate_codec_checkpoint(ckpt, run_cfg.model if run_cfg else None, args.audio,
                                        run_cfg.mesh if run_cfg else None, progress=not args.quiet)
        print(format_codec_report(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2, default=float))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint: LM per-stream losses (--shards) or a codec (--audio)")
    p.add_argument("--checkpoint", required=True, help="trainer workdir, checkpoints/ dir or `moshax convert` output")
    src = p.add_argument_group("data (one of)")
    src.add_argument("--shards", help="token shards: multi-stream for a Moshi LM, text for Helium")
    src.add_argument("--audio", help="folder of audio files (codec eval)")
    p.add_argument("--config", help="run config whose model/mesh to use (default: the checkpoint's model config)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="dotted overrides for --config")
    p.set_defaults(fn=cmd_eval)
