"""``moshax eval``: evaluate a checkpoint on held-out data.

    moshax eval --checkpoint CKPT --shards DIR [--config CFG] [--batch-size 8] [--json OUT]   (LM)
    moshax eval --checkpoint CKPT --audio DIR  [--config CFG] [--json OUT]                   (codec)

``CKPT`` is any moshax checkpoint (a trainer workdir, its ``checkpoints/`` dir, a step dir, or a
``moshax convert`` output; see :mod:`moshax.commands.convert`). The model config comes from the
checkpoint unless ``--config`` names a run config (its ``model`` and ``mesh`` are used; the
checkpoint must fit that model).

* Moshi LM + multi-stream shards: one pass over every record, in order (the last batch is padded
  with -1 frames, which carry no loss). Per stream: cross-entropy and perplexity of the text
  stream (all targets, and non-padding targets), of each predicted audio codebook (1 = semantic),
  the acoustic mean, and the training objective (weighted text mean + weighted audio mean, as
  moshi-finetune, here over the whole set, so no number depends on the batch size; the batch is
  rounded up to a multiple of the mesh's batch axes). A Helium checkpoint on text token shards gives its token CE / perplexity.
* Mimi + ``--audio``: :func:`moshax.evaluation.codec.evaluate_codec` (``(mimi, folder) -> dict``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def _config_error(msg: str):
    from moshax.config import ConfigError

    return ConfigError(msg)


def _load(args):
    from moshax.commands.convert import open_checkpoint

    ckpt = open_checkpoint(args.checkpoint)
    run_cfg = None
    if args.config:
        from moshax.config import load_config

        run_cfg = load_config(args.config, args.overrides)
        if run_cfg.model.kind != ckpt.model_kind:
            raise _config_error(f"--config {args.config} is a {run_cfg.model.kind} config but {ckpt.step_dir} holds "
                                f"a {ckpt.model_kind} model")
    return ckpt, run_cfg


def _mesh(run_cfg):
    import jax

    from moshax.config import MeshConfig
    from moshax.parallel.mesh import build_mesh

    return build_mesh(run_cfg.mesh if run_cfg is not None else MeshConfig(), jax.devices())


# ---------------------------------------------------------------------------------------------
# LM
# ---------------------------------------------------------------------------------------------


def _moshi_sums(model, codes):
    """Per-stream (sum, count) of cross-entropies for one batch (jit-friendly)."""
    import jax
    import jax.numpy as jnp

    cfg = model.cfg
    out = model.forward_train(codes)
    losses = model.loss(out, codes)

    def nll(logits, targets, mask):
        logits = jnp.where(mask[..., None], logits, 0.0)
        targets = jnp.where(mask, targets, 0)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]

    text_t = codes[:, :1]
    tmask = out["text_mask"]
    tn = nll(out["text_logits"], text_t, tmask)
    is_pad = (text_t == cfg.existing_text_padding_id) | (text_t == cfg.existing_text_end_padding_id)
    audio_t = codes[:, 1: 1 + cfg.dep_q]
    amask = out["mask"]
    an = nll(out["logits"], audio_t, amask)  # [B, dep_q, T]
    f = lambda m: m.astype(jnp.float32)  # noqa: E731
    return {
        "text": (jnp.sum(tn * f(tmask)), jnp.sum(f(tmask))),
        "text_nonpad": (jnp.sum(tn * f(tmask & ~is_pad)), jnp.sum(f(tmask & ~is_pad))),
        "codebooks": (jnp.sum(an * f(amask), axis=(0, 2)), jnp.sum(f(amask), axis=(0, 2))),
        "text_weighted": losses["text"],
        "audio_weighted": losses["audio"],
    }


def _batches(shards: str, batch: int, shape: list[int], pad_value: int):
    from data_pipeline.token_shards import iter_records

    rows = []
    for rec in iter_records(shards):
        rows.append(rec)
        if len(rows) == batch:
            yield np.stack(rows), batch
            rows = []
    if rows:
        n = len(rows)
        rows += [np.full(shape, pad_value, np.int32)] * (batch - n)
        yield np.stack(rows), n


def evaluate_lm(ckpt, run_cfg, shards: str, batch_size: int = 8, max_batches: int | None = None,
                progress: bool = True) -> dict:
    """Per-stream losses of a Moshi LM (multi-stream shards) or Helium (text shards) checkpoint."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from data_pipeline.errors import DataError
    from data_pipeline.token_shards import read_manifest
    from moshax.commands.convert import build_model_from_checkpoint
    from moshax.parallel.mesh import batch_axis_size
    from moshax.parallel.sharding import logical_to_spec

    model_cfg = run_cfg.model if run_cfg is not None else ckpt.model_config()
    kind = model_cfg.kind
    manifest = read_manifest(shards)
    shape = manifest["record"]["shape"] if manifest.get("record") else None
    if kind == "moshi":
        if manifest.get("kind") != "multistream":
            raise DataError(f"{shards}: a Moshi LM needs multi-stream shards, these are {manifest.get('kind')!r}")
        if shape[0] != model_cfg.num_codebooks:
            raise DataError(f"{shards}: records have {shape[0]} streams, the model needs {model_cfg.num_codebooks}")
    elif kind == "helium":
        if manifest.get("kind") != "text":
            raise DataError(f"{shards}: a Helium LM needs text token shards, these are {manifest.get('kind')!r}")
    else:
        raise _config_error(f"{ckpt.step_dir} holds a {kind} model: use --audio DIR for a codec")
    mesh = _mesh(run_cfg)
    per = batch_axis_size(mesh)
    batch_size = -(-batch_size // per) * per  # a multiple of the mesh's batch axes
    with jax.set_mesh(mesh):
        model, _ = build_model_from_checkpoint(ckpt, model_cfg, mesh)
    spec = logical_to_spec(("act_batch",) + (None,) * len(shape), mesh.axis_names)
    sharding = NamedSharding(mesh, spec)

    if kind == "moshi":
        fn = nnx.jit(_moshi_sums)
        pad = -1
    else:
        from moshax.training.losses import cross_entropy_sums

        def helium_sums(m, tokens):
            valid = tokens[:, 1:] >= 0
            logits, _ = m(jnp.maximum(tokens[:, :-1], 0))
            return {"text": cross_entropy_sums(logits, jnp.maximum(tokens[:, 1:], 0), valid.astype(jnp.float32))}

        fn = nnx.jit(helium_sums)
        pad = -1
    totals: dict = {}
    records = 0
    total_batches = math.ceil(manifest["total_records"] / batch_size)
    if max_batches:
        total_batches = min(total_batches, max_batches)
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total_batches, desc="eval", unit="batch", dynamic_ncols=True)
    for i, (rows, n) in enumerate(_batches(shards, batch_size, shape, pad)):
        if max_batches and i >= max_batches:
            break
        x = jax.device_put(jnp.asarray(rows, jnp.int32), sharding)
        with jax.set_mesh(mesh):
            out = jax.device_get(fn(model, x))
        for name, (s, w) in out.items():
            acc = totals.setdefault(name, [0.0, 0.0])
            acc[0] = acc[0] + np.asarray(s, np.float64)
            acc[1] = acc[1] + np.asarray(w, np.float64)
        records += n
        if pbar is not None:
            pbar.update(1)
    if pbar is not None:
        pbar.close()
    if not totals:
        raise DataError(f"{shards}: no records to evaluate")
    return _lm_report(kind, totals, records, model_cfg, ckpt, shards)


def _lm_report(kind, totals, records, model_cfg, ckpt, shards) -> dict:
    def mean(name):
        s, w = totals[name]
        return float(s / w) if w > 0 else float("nan")

    rows = []

    def row(stream, s, w):
        ce = float(s / w) if w > 0 else float("nan")
        rows.append({"stream": stream, "tokens": int(round(float(w))), "cross_entropy": ce,
                     "perplexity": float(math.exp(min(ce, 50.0))) if w > 0 else float("nan")})

    row("text", *totals["text"])
    out = {"checkpoint": str(ckpt.step_dir), "kind": kind, "shards": str(shards), "records": records}
    if kind == "moshi":
        row("text (non-padding)", *totals["text_nonpad"])
        s, w = totals["codebooks"]
        for k in range(len(s)):
            row(f"audio codebook {k + 1}" + (" (semantic)" if k == 0 else ""), s[k], w[k])
        row("acoustic (codebooks 2+)", float(np.sum(s[1:])), float(np.sum(w[1:])))
        out["text_loss"] = mean("text_weighted")
        out["audio_loss"] = mean("audio_weighted")
        out["objective"] = out["text_loss"] + out["audio_loss"]
        out["semantic_loss"] = float(s[0] / w[0]) if w[0] > 0 else float("nan")
        out["acoustic_loss"] = rows[-1]["cross_entropy"]
    out["streams"] = rows
    return out


def format_lm_report(rep: dict) -> str:
    lines = [f"eval {rep['kind']} {rep['checkpoint']} on {rep['shards']} ({rep['records']} records)", "",
             "| stream | tokens | cross-entropy | perplexity |", "|---|---|---|---|"]
    for r in rep["streams"]:
        lines.append(f"| {r['stream']} | {r['tokens']} | {r['cross_entropy']:.4f} | {r['perplexity']:.2f} |")
    if rep["kind"] == "moshi":
        lines += ["", f"objective (text mean + audio mean, as training): {rep['objective']:.4f}  "
                      f"(text {rep['text_loss']:.4f}, audio {rep['audio_loss']:.4f}; PAD/EPAD x0.5, semantic x100)"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------------------------


def evaluate_codec_checkpoint(ckpt, run_cfg, folder: str) -> dict:
    try:
        from moshax.evaluation.codec import evaluate_codec
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("moshax.evaluation"):
            raise _config_error("codec evaluation (--audio) is not available in this build: "
                                "moshax.evaluation.codec is missing") from None
        raise
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--audio folder not found: {folder}")
    if ckpt.model_kind != "mimi":
        raise _config_error(f"{ckpt.step_dir} holds a {ckpt.model_kind} model; --audio evaluates a Mimi codec "
                            "(use --shards DIR for an LM)")
    import jax

    from moshax.commands.convert import build_model_from_checkpoint

    mesh = _mesh(run_cfg)
    with jax.set_mesh(mesh):
        mimi, _ = build_model_from_checkpoint(ckpt, run_cfg.model if run_cfg is not None else None, mesh)
    result = dict(evaluate_codec(mimi, folder))
    return {"checkpoint": str(ckpt.step_dir), "kind": "mimi", "audio": str(folder), **result}


def format_codec_report(rep: dict) -> str:
    lines = [f"eval mimi {rep['checkpoint']} on {rep['audio']}", "", "| metric | value |", "|---|---|"]
    for k, v in rep.items():
        if k in ("checkpoint", "kind", "audio") or isinstance(v, (list, dict)) or v is None:
            continue  # per-file rows stay in --json
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    if bool(args.shards) == bool(args.audio):
        raise _config_error("moshax eval needs exactly one of --shards DIR (LM) or --audio DIR (codec)")
    if args.batch_size <= 0:
        raise _config_error(f"--batch-size={args.batch_size}: must be > 0")
    ckpt, run_cfg = _load(args)
    if args.shards:
        rep = evaluate_lm(ckpt, run_cfg, args.shards, args.batch_size, args.max_batches, progress=not args.quiet)
        print(format_lm_report(rep))
    else:
        rep = evaluate_codec_checkpoint(ckpt, run_cfg, args.audio)
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
