"""Shards of ``moshax data prepare``: written one by one, atomically, and merged into the manifest.

Per planned shard ``tokens-KKKKK`` the job writes, each under a temporary name and renamed when
complete::

    tokens-KKKKK.array_record   the multi-stream records ([num_streams, frames] int32, .npy bytes)
    tokens-KKKKK.meta.jsonl     one line per record: source file, offset, duration, speakers, words source
    tokens-KKKKK.json           the shard's summary (records, sha256, stats, errors): written last,
                                it marks the shard finished

so a job killed at any moment leaves finished shards and temporary files only; the rerun deletes
the temporaries and redoes those shards. The loader reads only the ArrayRecord files (the
metadata sidecar is for people and tools). When every planned shard is finished, ``manifest.json``
is written from the summaries; nothing in it depends on timing or on which host wrote what, so
reruns and multi-host runs give the same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.prepare_plan import ShardPlan
from data_pipeline.records import encode_array
from data_pipeline.token_shards import FORMAT, MANIFEST, sha256_file

SUMMARY_FORMAT = "moshax-prepared-shard/1"
IDENTITY = "prepare.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dumps(obj) -> str:
    """The JSON of summaries, identities and manifests: sorted keys, one byte sequence per value."""
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def summary_path(out_dir: Path, shard: ShardPlan) -> Path:
    return out_dir / f"{shard.name}.json"


def read_summary(out_dir: Path, shard: ShardPlan) -> dict | None:
    """The finished shard's summary, or None if the shard is not finished (or its files are gone)."""
    p = summary_path(out_dir, shard)
    if not p.is_file():
        return None
    try:
        summary = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if summary.get("format") != SUMMARY_FORMAT:
        return None
    for key in ("path", "metadata"):
        if summary.get(key) and not (out_dir / summary[key]).is_file():
            return None
    return summary


def unfinished(out_dir: Path, shards: list[ShardPlan], retry_errors: bool = False) -> list[ShardPlan]:
    """The shards still to write (with ``retry_errors``, also finished ones that recorded failures)."""
    def done(shard):
        s = read_summary(out_dir, shard)
        return s is not None and not (retry_errors and s["errors"])

    return [s for s in shards if not done(s)]


def remove_partial(out_dir: Path, shard: ShardPlan) -> None:
    """Temporaries of an interrupted write and the files of a shard being redone."""
    for suffix in (".array_record", ".meta.jsonl", ".json"):
        for name in (shard.name + suffix, shard.name + suffix + ".tmp"):
            p = out_dir / name
            if p.exists():
                p.unlink()


def write_shard(out_dir: Path, shard: ShardPlan, records: list[tuple[np.ndarray, dict]], errors: list[dict],
                stats: dict) -> dict:
    """Write one shard's records, metadata and summary (in that order, each atomically)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    remove_partial(out_dir, shard)
    summary = {"format": SUMMARY_FORMAT, "shard": shard.index, "files": len(shard.files), "records": len(records),
               "path": None, "metadata": None, "sha256": None, "stats": stats, "errors": errors}
    if records:
        data = out_dir / f"{shard.name}.array_record"
        tmp = data.with_name(data.name + ".tmp")
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        for codes, _ in records:
            writer.write(encode_array(codes))
        writer.close()
        os.replace(tmp, data)
        meta = out_dir / f"{shard.name}.meta.jsonl"
        _atomic_write_text(meta, "".join(json.dumps(m, sort_keys=True, ensure_ascii=False) + "\n"
                                         for _, m in records))
        summary.update(path=data.name, metadata=meta.name, sha256=sha256_file(data))
    _atomic_write_text(summary_path(out_dir, shard), dumps(summary))
    return summary


def _differing(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (one level of nesting spelled out)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            out += _differing(a, b, f"{k}.")
        else:
            out.append(prefix + k)
    return out


def check_identity(out_dir: Path | str, identity: dict, *, made: str = "was prepared") -> None:
    """The first run writes what makes the shards (inputs' plan, settings, models); a rerun into the
    same directory with other settings would mix two datasets: refuse it in one line. ``out_dir``
    may be any :mod:`data_pipeline.storage` path (the fleet job's segments)."""
    from data_pipeline import storage

    root = str(out_dir)
    storage.makedirs(root)
    p = storage.join(root, IDENTITY)
    text = dumps(identity)
    if storage.exists(p):
        try:
            old = json.loads(storage.read_text(p))
        except json.JSONDecodeError:
            old = None
        if old == json.loads(text):
            return
        diff = _differing(old or {}, json.loads(text))
        raise DataError(f"{root} {made} with other settings (differing: {', '.join(diff) or 'all'}); "
                        "use a new --output, or delete it to start over")
    storage.write_text(p, text)


def _sum_stats(summaries: list[dict]) -> dict:
    keys = sorted({k for s in summaries for k in s["stats"]})
    return {k: sum(s["stats"].get(k, 0) for s in summaries) for k in keys}


def write_manifest(out_dir: Path, plan: list[ShardPlan], *, spec: dict, identity: dict) -> dict | None:
    """``manifest.json`` from every shard's summary; None (nothing written) while shards are missing."""
    summaries = [read_summary(out_dir, s) for s in plan]
    if any(s is None for s in summaries):
        return None
    totals = _sum_stats(summaries)
    frames = totals.get("frames_out", 0)
    text_frames = max(1, totals.get("text_frames", 0))
    stats = {
        "files": sum(s["files"] for s in summaries),
        "files_failed": sum(len(s["errors"]) for s in summaries),
        "records": sum(s["records"] for s in summaries),
        "hours_in": round(totals.get("seconds_in", 0.0) / 3600, 6),
        "hours_out": round(frames / spec["frame_rate"] / 3600, 6),
        "frames": frames,
        "speech_ratio": round(totals.get("speech_seconds", 0.0) / max(totals.get("seconds_in", 0.0), 1e-9), 4),
        "pad_ratio": round(totals.get("pad_frames", 0) / text_frames, 4),
        "epad_ratio": round(totals.get("epad_frames", 0) / text_frames, 4),
        "max_frames": max((s["stats"].get("max_frames", 0) for s in summaries), default=0),
    }
    errors = [e for s in summaries for e in s["errors"]]
    by_stage: dict[str, int] = {}
    for e in errors:
        by_stage[e["stage"]] = by_stage.get(e["stage"], 0) + 1
    stats["failed_by_stage"] = dict(sorted(by_stage.items()))
    manifest = {
        "format": FORMAT,
        "kind": "multistream",
        "shards": [{"path": s["path"], "records": s["records"], "sha256": s["sha256"], "metadata": s["metadata"]}
                   for s in summaries if s["records"]],
        "total_records": stats["records"],
        "record": {"dtype": "int32", "shape": [spec["num_streams"], None]},
        "multistream": spec,
        "stats": stats,
        "errors": errors,
        "failures": [{"item": e["file"], "error": f"{e['stage']}: {e['reason']}"} for e in errors],
        **identity,
    }
    _atomic_write_text(out_dir / MANIFEST, dumps(manifest))
    return manifest
