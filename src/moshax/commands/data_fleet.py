"""``moshax data beam`` and ``moshax data tokenize-audio``: ``moshax data prepare`` split in two for
fleet-scale jobs (see docs/data-fleet.md).

    moshax data beam --input DIR|GLOB|gs://... --output SEGMENTS [--tokenizer SPM.model]
        [--asr ... | --transcripts DIR] [--stereo-split] [--files-per-shard N] [--retry-errors]
        [--runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner] [key=value ...]
        [-- RUNNER OPTIONS ...]
    moshax data tokenize-audio --segments SEGMENTS --output SHARDS --mimi-checkpoint CKPT
        [--codec-batch-size N] [--local-devices N] [--retry-errors] [key=value ...]
        [--multihost | --coordinator HOST:PORT --num-processes N --process-id I]

Everything after ``--`` goes to Beam's ``PipelineOptions`` as given (``--project``,
``--region``, ``--temp_location``, ``--setup_file``, ``--direct_num_workers``, ...).
"""

from __future__ import annotations

import argparse

RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner",
           "BundleBasedDirectRunner", "PrismRunner")


def add_beam_arguments(p: argparse.ArgumentParser) -> None:
    from moshax.commands.data_prepare import add_stage_arguments

    add_stage_arguments(p, output_help="segments directory (local or scheme://; a rerun resumes it)",
                        retry_help="analyse again the files that failed before")
    p.add_argument("--runner", default="DirectRunner", help=f"Beam runner: {', '.join(RUNNERS[:4])}, ...")
    p.add_argument("overrides", nargs="*",
                   help="key=value settings (e.g. record_seconds=60), then `--` and Beam pipeline options")


def beam_command(args: argparse.Namespace) -> int:
    import importlib.util

    from moshax.config import ConfigError

    if importlib.util.find_spec("apache_beam") is None:
        raise ConfigError("moshax data beam needs Apache Beam: pip install 'moshax[beam]' (plus the runner's extras, "
                          "e.g. apache-beam[gcp] for Dataflow)")
    from data_pipeline.beam_prepare import run_beam
    from data_pipeline.stage_models import StageModels
    from moshax.commands.data_prepare import load_prepare_config

    if args.runner not in RUNNERS:
        raise ConfigError(f"--runner {args.runner}: one of {', '.join(RUNNERS)}")
    # key=value settings first; from the first option on, everything is Beam's
    first = next((i for i, o in enumerate(args.overrides) if o.startswith("-")), len(args.overrides))
    overrides, beam_args = args.overrides[:first], args.overrides[first:]
    args.overrides = overrides
    cfg = load_prepare_config(args)
    cfg.validate(codec=False)
    run_beam(cfg, StageModels.from_config(cfg), runner=args.runner, beam_args=beam_args)
    return 0


def add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    from moshax.cli import _add_distributed_flags

    p.add_argument("--segments", required=True, help="a finished `moshax data beam` output (local or scheme://)")
    p.add_argument("--output", required=True, help="token-shard directory (created; a rerun resumes it)")
    p.add_argument("--mimi-checkpoint", required=True, help="Mimi: moshax checkpoint or Kyutai .safetensors")
    p.add_argument("--codec-batch-size", type=int, help="records per Mimi call on each local device")
    p.add_argument("--local-devices", type=int, default=0,
                   help="local accelerators to batch over (0: all of this process's devices)")
    p.add_argument("--retry-errors", action="store_true", help="redo finished shards that recorded failed files")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="codec settings: num_codebooks=8 codec_chunk_seconds=10")
    _add_distributed_flags(p)


def tokenize_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from data_pipeline.errors import DataError
    from data_pipeline.segment_records import read_manifest
    from data_pipeline.tokenize_segments import TOKENIZE_KEYS, run_tokenize
    from moshax.cli import _init_distributed
    from moshax.commands.data_prepare import MimiTokenizer
    from moshax.config import parse_overrides

    _init_distributed(args)
    import jax

    settings = dict(parse_overrides(args.overrides))
    bad = [k for k in settings if k not in TOKENIZE_KEYS]
    if bad:
        raise DataError(f"{', '.join(bad)}: fixed by the beam job (tokenize-audio sets {', '.join(TOKENIZE_KEYS)})")
    if not Path(args.mimi_checkpoint).exists():
        raise DataError(f"mimi-checkpoint: not found: {args.mimi_checkpoint}")
    settings["mimi_checkpoint"] = args.mimi_checkpoint
    if args.codec_batch_size is not None:
        settings["codec_batch_size"] = args.codec_batch_size
    if args.retry_errors:
        settings["retry_errors"] = True
    manifest = read_manifest(args.segments)
    num_codebooks = int(settings.get("num_codebooks", manifest["config"]["num_codebooks"]))
    chunk = float(settings.get("codec_chunk_seconds", manifest["config"]["codec_chunk_seconds"]))
    devices = jax.local_devices()
    if args.local_devices:
        if not 0 < args.local_devices <= len(devices):
            raise DataError(f"--local-devices {args.local_devices}: this process has {len(devices)}")
        devices = devices[: args.local_devices]
    codec = MimiTokenizer(args.mimi_checkpoint, num_codebooks, chunk, devices=devices)
    barrier = None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        barrier = multihost_utils.sync_global_devices
    summary = run_tokenize(args.segments, args.output, codec, settings=settings, process_index=jax.process_index(),
                           process_count=jax.process_count(), barrier=barrier, progress=not args.no_progress)
    return 0 if summary["manifest"] or jax.process_index() != 0 else 1
