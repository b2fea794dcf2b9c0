"""``moshax data prepare``: a folder of recordings -> multi-stream token shards that train Moshi.

A Grain pipeline: a ``MapDataset`` over this host's files (:mod:`data_pipeline.prepare_plan`),
the CPU stages (:class:`data_pipeline.analyze.FileAnalyzer`) as a ``map`` run by worker processes
(``num_workers``), the codec batched in the main process, shards written atomically
(:mod:`data_pipeline.prepared_shards`). Finished shards are skipped on a rerun (with
``retry_errors``, shards that recorded failed files are redone too), so a killed job resumes and
ends with the same bytes as an uninterrupted one.

The codec is injected (any object with ``sample_rate``, ``frame_rate``, ``num_codebooks``,
``card``, ``encode_batch(list of mono float32 arrays) -> list of int32 [K, frames]`` and
``identity()``): ``moshax.commands.data_prepare`` builds it from a Mimi checkpoint, keeping this
package free of model code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

from data_pipeline.analyze import FileAnalyzer, FileResult
from data_pipeline.audio import list_audio_files
from data_pipeline.errors import DataError
from data_pipeline.multistream import LAYOUT, ZERO_TOKEN
from data_pipeline.prepare_config import PrepareConfig
from data_pipeline.prepare_plan import ShardPlan, host_shards, plan_shards
from data_pipeline.prepared_shards import check_identity, read_summary, unfinished, write_manifest, write_shard
from data_pipeline.text_stream import EPAD_ID, FRAME_RATE, PAD_ID
from data_pipeline.token_shards import sha256_file

# Settings that do not change the shards' bytes (left out of the identity and the manifest).
RUN_ONLY = ("output", "num_workers", "worker_index", "num_worker_hosts", "retry_errors", "codec_batch_size")


# Settings only the codec reads (the fleet job's CPU stages are identified without them).
CODEC_KEYS = ("mimi_checkpoint", "num_codebooks", "codec_chunk_seconds")


def pipeline_settings(cfg: PrepareConfig, *, codec: bool = True) -> dict:
    skip = RUN_ONLY + (() if codec else CODEC_KEYS)
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def plan_identity(plan: list[ShardPlan]) -> dict:
    return {"files": sum(len(s.files) for s in plan), "shards": len(plan),
            "files_sha256": hashlib.sha256("\n".join(f.path for s in plan for f in s.files).encode()).hexdigest()}


def tokenizer_identity(cfg: PrepareConfig) -> dict | None:
    if not cfg.tokenizer:
        return None
    return {"path": str(Path(cfg.tokenizer).resolve()), "sha256": sha256_file(cfg.tokenizer)}


def pipeline_identity(cfg: PrepareConfig, codec, components, plan: list[ShardPlan]) -> dict:
    """What made the shards: settings, codec, tokenizer, the plan, the stage models."""
    return {"pipeline": pipeline_settings(cfg), "codec": codec.identity(), "tokenizer": tokenizer_identity(cfg),
            "plan": plan_identity(plan), **components.identity()}


def multistream_spec(cfg: PrepareConfig, codec, text_card: int) -> dict:
    k = cfg.num_codebooks
    return {"num_streams": 1 + 2 * k, "steps": None, "max_steps": int(round(cfg.record_seconds * FRAME_RATE)),
            "text_card": int(text_card), "card": int(codec.card), "dep_q": k, "frame_rate": FRAME_RATE,
            "text_padding_id": PAD_ID, "text_end_padding_id": EPAD_ID, "layout": LAYOUT}


def text_card(cfg: PrepareConfig) -> int:
    if cfg.records_text_card:
        return cfg.records_text_card
    if cfg.tokenizer:
        from data_pipeline.tokenizer import load_tokenizer

        return load_tokenizer(cfg.tokenizer).get_piece_size()
    return PAD_ID + 1


def encode_shard(results: list[FileResult], codec, cfg: PrepareConfig) -> tuple[list, list[dict], dict]:
    """Records (codes + metadata), errors and stats of one shard's analysed files."""
    k = cfg.num_codebooks
    errors = [r.error for r in results if r.error is not None]
    segments = [(r, s) for r in results if r.error is None for s in r.segments]
    audio: list[np.ndarray] = []
    for _, s in segments:
        audio.append(s.main)
        if s.other is not None:
            audio.append(s.other)
    codes = iter(codec.encode_batch(audio, batch_size=cfg.codec_batch_size) if audio else [])
    records = []
    for _, s in segments:
        frames = s.text.shape[0]
        main = next(codes)[:k, :frames]
        other = next(codes)[:k, :frames] if s.other is not None else np.full((k, frames), ZERO_TOKEN, np.int32)
        records.append((np.concatenate([s.text[None], main, other]).astype(np.int32), s.meta))
    stats = {
        "seconds_in": round(sum(r.duration for r in results), 4),
        "speech_seconds": round(sum(r.speech_seconds for r in results if r.error is None), 4),
        "frames_out": sum(c.shape[1] for c, _ in records),
        "text_frames": sum(int((c[0] >= 0).sum()) for c, _ in records),
        "pad_frames": sum(int((c[0] == PAD_ID).sum()) for c, _ in records),
        "epad_frames": sum(int((c[0] == EPAD_ID).sum()) for c, _ in records),
        "max_frames": max((c.shape[1] for c, _ in records), default=0),
    }
    return records, errors, stats


def _analysed(items, analyzer: FileAnalyzer, num_workers: int):
    """FileResults in input order: in process, or from Grain worker processes."""
    import grain

    ds = grain.MapDataset.source(items).map(analyzer)
    if num_workers <= 0:
        return iter(ds)
    from data_pipeline.text_loader import _mark_absl_flags_parsed

    _mark_absl_flags_parsed()
    return iter(ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers)))


def run_prepare(cfg: PrepareConfig, codec, components=None, *, progress: bool = True, log=None) -> dict:
    """Prepare this host's shards; returns a summary (and the manifest once every shard is done)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    cfg.validate()
    if components is None:
        from data_pipeline.stage_models import StageModels

        components = StageModels.from_config(cfg)
    if cfg.num_codebooks > codec.num_codebooks:
        raise DataError(f"num_codebooks={cfg.num_codebooks}, but the codec gives {codec.num_codebooks}")
    files = list_audio_files(cfg.inputs)
    plan = plan_shards(files, cfg.files_per_shard)
    out = Path(cfg.output)
    identity = pipeline_identity(cfg, codec, components, plan)
    check_identity(out, identity)
    spec = multistream_spec(cfg, codec, text_card(cfg))
    mine = host_shards(plan, cfg.worker_index, cfg.num_worker_hosts)
    todo = unfinished(out, mine, cfg.retry_errors)
    log(f"prepare: {len(files)} files in {len(plan)} shards; this host ({cfg.worker_index}/{cfg.num_worker_hosts}) "
        f"writes {len(mine)}, {len(mine) - len(todo)} already finished")
    items = [f for s in todo for f in s.files]
    analyzer = FileAnalyzer(cfg, components)
    t0 = time.perf_counter()
    bar_files = bar_shards = None
    if progress:
        from tqdm.auto import tqdm

        bar_files = tqdm(total=len(items), desc="analyse (decode/vad/diarize/asr)", unit="file", file=sys.stderr)
        bar_shards = tqdm(total=len(todo), desc="tokenize + write", unit="shard", file=sys.stderr)
    stream = _analysed(items, analyzer, cfg.num_workers) if items else iter(())
    written = []
    try:
        for shard in todo:
            results = []
            for _ in shard.files:
                results.append(next(stream))
                if bar_files is not None:
                    bar_files.update(1)
            records, errors, stats = encode_shard(results, codec, cfg)
            written.append(write_shard(out, shard, records, errors, stats))
            if bar_shards is not None:
                bar_shards.update(1)
    finally:
        for bar in (bar_files, bar_shards):
            if bar is not None:
                bar.close()
    manifest = write_manifest(out, plan, spec=spec, identity=identity)
    elapsed = time.perf_counter() - t0
    mine_summaries = [read_summary(out, s) for s in mine]
    seconds_in = sum(s["stats"].get("seconds_in", 0.0) for s in mine_summaries if s)
    frames_out = sum(s["stats"].get("frames_out", 0) for s in mine_summaries if s)
    failed: dict[str, int] = {}
    for s in mine_summaries:
        for e in (s or {}).get("errors", []):
            failed[e["stage"]] = failed.get(e["stage"], 0) + 1
    summary = {"shards_written": len(written), "shards_skipped": len(mine) - len(todo),
               "hours_in": seconds_in / 3600, "hours_out": frames_out / FRAME_RATE / 3600,
               "files_failed": failed, "seconds": elapsed, "manifest": manifest is not None}
    fails = ", ".join(f"{k} {v}" for k, v in sorted(failed.items())) or "none"
    log(f"prepare: {summary['hours_in'] * 60:.2f} min of audio in, {summary['hours_out'] * 60:.2f} min of records "
        f"out; failed files by stage: {fails}; {elapsed:.1f} s")
    if manifest is None:
        log(f"prepare: {out}/manifest.json not written yet: other hosts' shards are not finished")
    return summary
