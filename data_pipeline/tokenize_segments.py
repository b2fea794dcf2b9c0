"""``moshax data tokenize-audio``: the segments of ``moshax data beam`` -> the token shards of
``moshax data prepare`` (same records, same manifest), on one host or a multi-host JAX job.

Each process writes the planned shards ``k`` with ``k % processes == process``; a shard is read
from its index (``shards/shard-KKKKK.json``) and its files' segment records, tokenized in batches by
the injected codec (the command builds Mimi over the host's local accelerators) and written as
``prepare`` writes it (:mod:`data_pipeline.prepared_shards`: atomic, finished shards skipped on a
rerun). The shards' errors are the beam job's ``errors`` side output. With several processes the
manifest is merged by process 0 after a barrier; without one (independent hosts) whoever finishes
last writes it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable

from data_pipeline import segment_records as seg
from data_pipeline.errors import DataError
from data_pipeline.prepare import CODEC_KEYS, encode_shard, multistream_spec, pipeline_settings
from data_pipeline.prepare_config import PrepareConfig
from data_pipeline.prepare_plan import ShardPlan, host_shards
from data_pipeline.prepared_shards import check_identity, unfinished, write_manifest, write_shard

# What a tokenize run may set; everything else was fixed by the beam job.
TOKENIZE_KEYS = CODEC_KEYS + ("codec_batch_size", "retry_errors")


def segments_config(manifest: dict, settings: dict) -> PrepareConfig:
    """The beam job's settings plus the codec's (``settings``: keys of :data:`TOKENIZE_KEYS`, ``output``)."""
    from dataclasses import fields

    fixed = [k for k in settings if k not in TOKENIZE_KEYS + ("output",)]
    if fixed:
        raise DataError(f"{', '.join(sorted(fixed))}: fixed by the beam job that made the segments "
                        f"(tokenize-audio sets only {', '.join(TOKENIZE_KEYS)})")
    base = dict(manifest["config"])
    names = {f.name for f in fields(PrepareConfig)}
    unknown = set(base) - names
    if unknown:
        raise DataError(f"segments made by another moshax (unknown settings {sorted(unknown)})")
    cfg = PrepareConfig()
    for key, value in {**base, **settings}.items():
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = type(current)(**value)
        setattr(cfg, key, value)
    return cfg


def _shard_results(root: str, shard: ShardPlan, errors: dict[str, dict]) -> tuple[list, list[dict]]:
    """The shard's FileResults (segments read back) and its errors, from the side output."""
    index = seg.read_shard_index(root, shard.index)
    results, shard_errors = [], []
    for f in index["files"]:
        summary = seg.read_file_result(root, f["index"])
        if summary is None:
            raise DataError(f"{root}: file {f['index']} ({f['path']}) is indexed but its segments are missing")
        results.append(seg.load_file_result(root, summary))
        if summary["error"]:
            if errors.get(f["path"]) != summary["error"]:
                raise DataError(f"{root}/{seg.MANIFEST}: the error of {f['path']} is missing or differs")
            shard_errors.append(errors[f["path"]])
    return results, shard_errors


def run_tokenize(segments: str, output: str, codec, *, settings: dict | None = None, process_index: int = 0,
                 process_count: int = 1, barrier: Callable[[str], None] | None = None, progress: bool = True,
                 log=None) -> dict:
    """Tokenize this process's share of the planned shards; the manifest once all are written."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    manifest = seg.read_manifest(segments)
    cfg = segments_config(manifest, {**(settings or {}), "output": output})
    if cfg.num_codebooks > codec.num_codebooks:
        raise DataError(f"num_codebooks={cfg.num_codebooks}, but the codec gives {codec.num_codebooks}")
    plan = seg.shard_plans(manifest)
    identity = {"pipeline": pipeline_settings(cfg), "codec": codec.identity(), "tokenizer": manifest["tokenizer"],
                "plan": manifest["plan"], **manifest["stages"]}
    out = Path(output)
    # process 0 writes the identity first; the others then check theirs against it
    if process_index == 0:
        check_identity(out, identity)
    if barrier is not None:
        barrier("moshax_tokenize_identity")
    if process_index != 0:
        check_identity(out, identity)
    spec = multistream_spec(cfg, codec, manifest["text_card"])
    errors = {e["file"]: e for e in manifest["errors"]}  # the beam job's side output
    mine = host_shards(plan, process_index, process_count)
    todo = unfinished(out, mine, cfg.retry_errors)
    log(f"tokenize-audio: {len(plan)} shards; process {process_index}/{process_count} writes {len(mine)}, "
        f"{len(mine) - len(todo)} already finished")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="tokenize + write", unit="shard", file=sys.stderr)
    t0 = time.perf_counter()
    seconds = 0.0
    try:
        for shard in todo:
            results, shard_errors = _shard_results(segments, shard, errors)
            shard = ShardPlan(shard.index, tuple(r.item for r in results))
            records, _, stats = encode_shard(results, codec, cfg)
            write_shard(out, shard, records, shard_errors, stats)
            seconds += stats["frames_out"] / spec["frame_rate"]
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    if barrier is not None:
        barrier("moshax_tokenize_done")
    written = None
    if process_index == 0 or barrier is None:
        written = write_manifest(out, plan, spec=spec, identity=identity)
    log(f"tokenize-audio: process {process_index}: {len(todo)} shards, {seconds / 60:.2f} min of records in "
        f"{elapsed:.1f} s" + ("" if written is not None or process_index != 0 else
                              f"; {out}/manifest.json not written yet: shards missing"))
    return {"shards_written": len(todo), "shards_skipped": len(mine) - len(todo), "record_seconds": seconds,
            "seconds": elapsed, "manifest": written is not None}

