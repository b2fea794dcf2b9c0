"""``moshax data prepare`` and ``moshax data inspect``: the commands around
:mod:`data_pipeline.prepare` (which holds the pipeline; this module builds the Mimi codec and the
analysis models from flags and config, so the data package stays free of model code).

    moshax data prepare --input DIR --output DIR --mimi-checkpoint CKPT [--tokenizer SPM.model]
        [--asr none|pocketsphinx|whisper:DIR | --transcripts DIR] [--stereo-split]
        [--num-workers N] [--worker-index I --num-worker-hosts M] [--retry-errors]
        [--config configs/data/prepare.yaml] [key=value ...]
    moshax data inspect DIR [--decode N --output DIR --mimi-checkpoint CKPT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


class MimiTokenizer:
    """The prepare job's codec: a Mimi checkpoint behind ``encode_batch`` / ``decode``."""

    def __init__(self, checkpoint: str, num_codebooks: int, chunk_seconds: float = 10.0, devices=None):
        from moshax.checkpoint.model import load_codec
        from moshax.config import to_dict
        from moshax.inference.codec import CodecRunner

        mimi = load_codec(checkpoint)
        q = mimi.cfg.quantizer
        self.checkpoint = str(Path(checkpoint).resolve())
        self.runner = CodecRunner(mimi, num_codebooks=max(num_codebooks, q.n_q_semantic),
                                  chunk_frames=max(1, int(round(chunk_seconds * mimi.cfg.frame_rate))),
                                  devices=devices)
        self.sample_rate = mimi.cfg.sample_rate
        self.frame_rate = mimi.cfg.frame_rate
        self.num_codebooks = self.runner.num_codebooks
        self.card = q.bins
        cfg_json = json.dumps(to_dict(mimi.cfg), sort_keys=True)
        self._identity = {"name": "mimi", "checkpoint": self.checkpoint, "num_codebooks": self.num_codebooks,
                          "card": self.card, "sample_rate": self.sample_rate, "frame_rate": self.frame_rate,
                          "config_sha256": hashlib.sha256(cfg_json.encode()).hexdigest()}

    def encode_batch(self, audios, batch_size: int = 4):
        return self.runner.encode_batch(audios, batch_size=batch_size)

    def decode(self, codes):
        return self.runner.decode(codes)

    def identity(self) -> dict:
        return dict(self._identity)


def load_prepare_config(args: argparse.Namespace):
    """YAML (``--config``) < flags < ``key=value`` overrides, as a typed :class:`PrepareConfig`."""
    import yaml

    from data_pipeline.prepare_config import PrepareConfig
    from moshax.config import ConfigError, _build, _set_dotted, parse_overrides

    data: dict = {}
    if args.config:
        try:
            data = yaml.safe_load(Path(args.config).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {args.config}") from None
    flag = lambda name: getattr(args, name, None)  # noqa: E731 - `data beam` has a subset of the flags
    flags = {"inputs": flag("input"), "output": flag("output"), "mimi_checkpoint": flag("mimi_checkpoint"),
             "tokenizer": flag("tokenizer"), "num_workers": flag("num_workers"),
             "worker_index": flag("worker_index"), "num_worker_hosts": flag("num_worker_hosts"),
             "files_per_shard": flag("files_per_shard")}
    for key, value in flags.items():
        if value is not None:
            data[key] = value
    if flag("stereo_split"):
        data["stereo_split"] = True
    if flag("retry_errors"):
        data["retry_errors"] = True
    if flag("asr") is not None:
        data.setdefault("asr", {})["engine"] = args.asr
    if flag("transcripts") is not None:
        data.setdefault("asr", {})["transcripts"] = args.transcripts
    for key, value in parse_overrides(args.overrides):
        _set_dotted(data, key, value)
    cfg = _build(PrepareConfig, data, "")
    for flag, value in (("tokenizer", cfg.tokenizer), ("transcripts", cfg.asr.transcripts),
                        ("mimi-checkpoint", cfg.mimi_checkpoint)):
        if value and not Path(value).exists():
            raise ConfigError(f"{flag}: not found: {value}")
    return cfg


def add_stage_arguments(p: argparse.ArgumentParser, *, output_help: str, retry_help: str) -> None:
    """The flags of the CPU stages' settings, shared by ``data prepare`` and ``data beam``."""
    p.add_argument("--config", help="YAML with PrepareConfig keys (e.g. configs/data/prepare.yaml)")
    p.add_argument("--input", action="append", help="dir, glob, file or .jsonl manifest (repeatable)")
    p.add_argument("--output", help=output_help)
    p.add_argument("--tokenizer", help="sentencepiece .model for the text stream")
    p.add_argument("--asr", help="none | pocketsphinx | whisper:DIR (transcribe the main stream)")
    p.add_argument("--transcripts", help="sidecar dir: STEM.json word times or STEM.txt plain text")
    p.add_argument("--stereo-split", action="store_true", help="stereo input: left = main speaker, right = other")
    p.add_argument("--files-per-shard", type=int)
    p.add_argument("--retry-errors", action="store_true", help=retry_help)


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    add_stage_arguments(p, output_help="shard directory (created; a rerun resumes it)",
                        retry_help="redo finished shards that recorded failed files")
    p.add_argument("--mimi-checkpoint", help="Mimi: moshax checkpoint or Kyutai .safetensors")
    p.add_argument("--num-workers", type=int, help="Grain worker processes for the CPU stages")
    p.add_argument("--worker-index", type=int, help="this host's index (multi-host preparation)")
    p.add_argument("--num-worker-hosts", type=int, help="hosts sharing the job (each writes disjoint shards)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value (e.g. record_seconds=60 vad.threshold=0.6)")


def prepare_command(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import run_prepare
    from data_pipeline.stage_models import StageModels

    cfg = load_prepare_config(args)
    cfg.validate()
    components = StageModels.from_config(cfg)
    codec = MimiTokenizer(cfg.mimi_checkpoint, cfg.num_codebooks, cfg.codec_chunk_seconds)
    summary = run_prepare(cfg, codec, components, progress=not args.no_progress)
    return 0 if summary["manifest"] or cfg.num_worker_hosts > 1 else 1


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", help="a token-shard directory (manifest.json)")
    p.add_argument("--decode", type=int, default=0, metavar="N", help="write N records back to audio + text")
    p.add_argument("--output", help="where --decode writes record-XXXXX.wav/.txt")
    p.add_argument("--mimi-checkpoint", help="codec for --decode (default: the one the manifest names)")
    p.add_argument("--tokenizer", help="sentencepiece model for the text (default: the manifest's)")


def inspect_command(args: argparse.Namespace) -> int:
    from data_pipeline.errors import DataError
    from data_pipeline.inspect_shards import decode_records, report
    from data_pipeline.token_shards import read_manifest

    for line in report(args.shards):
        print(line)
    if args.decode <= 0:
        return 0
    if not args.output:
        raise DataError("--decode needs --output DIR")
    manifest = read_manifest(args.shards)
    ckpt = args.mimi_checkpoint or (manifest.get("codec") or {}).get("checkpoint")
    if not ckpt or not Path(ckpt).exists():
        raise DataError(f"--decode needs the codec: --mimi-checkpoint (the manifest names {ckpt!r})")
    spm_path = args.tokenizer or (manifest.get("tokenizer") or {}).get("path")
    tokenizer = None
    if spm_path and Path(spm_path).is_file():
        from data_pipeline.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(spm_path)
    spec = manifest.get("multistream") or {}
    codec = MimiTokenizer(ckpt, spec.get("dep_q", 8))
    written = decode_records(args.shards, args.decode, args.output, codec, tokenizer)
    print(f"wrote {len(written)} records to {args.output} (stereo wav: left = Moshi's stream, right = the user's; "
          "text beside each)")
    return 0
