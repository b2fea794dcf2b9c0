"""The fleet job's intermediate: analysed audio segments, before the codec.

``moshax data beam`` (the CPU stages) writes them, ``moshax data tokenize-audio`` (the codec, on
accelerator hosts) reads them. Layout of a segments directory::

    plan.jsonl                     the static plan: {"index", "path", "shard"} per input file
    prepare.json                   what makes the segments (settings, models, plan); a rerun with
                                   other settings is refused
    files/file-IIIIIIII.array_record   file I's segments, one record each (see below)
    files/file-IIIIIIII.json       file I's result (duration, speech, error, per-segment metadata):
                                   written last, it marks the file finished
    shards/shard-KKKKK.json        planned shard K: its files' results in input order
    segments.json                  written when every shard is: totals, the stage models'
                                   identities and every failed file's ``{file, stage, reason}``

A record is an ``.npz`` (numpy's zip of ``.npy`` arrays, read with ``allow_pickle=False``):
``main`` (float32 samples at 24 kHz), ``text`` (int32 text-stream row) and, when the file has an
other side, ``other``. Every file is named by its index in the plan and written whole (see
:mod:`data_pipeline.storage`), so a retried or rerun piece of work rewrites the same bytes under
the same name: no duplicate, nothing missing.
"""

from __future__ import annotations

import io
import json

import numpy as np

from data_pipeline import storage
from data_pipeline.analyze import FileResult, Segment
from data_pipeline.errors import DataError
from data_pipeline.prepare_plan import FileItem, ShardPlan
from data_pipeline import prepared_shards
from data_pipeline.prepared_shards import dumps
from data_pipeline.token_shards import sha256_file

FILE_FORMAT = "moshax-segments-file/1"
SHARD_FORMAT = "moshax-segments-shard/1"
FORMAT = "moshax-segments/1"
MANIFEST = "segments.json"
PLAN = "plan.jsonl"


def file_stem(index: int) -> str:
    return f"files/file-{index:08d}"


def shard_index_path(root: str, shard: int) -> str:
    return storage.join(root, "shards", f"shard-{shard:05d}.json")


def encode_segment(seg: Segment) -> bytes:
    arrays = {"main": np.asarray(seg.main, np.float32), "text": np.asarray(seg.text, np.int32)}
    if seg.other is not None:
        arrays["other"] = np.asarray(seg.other, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_segment(record: bytes, meta: dict) -> Segment:
    try:
        with np.load(io.BytesIO(record), allow_pickle=False) as z:
            return Segment(z["main"], z["other"] if "other" in z.files else None, z["text"], meta)
    except (ValueError, OSError, KeyError) as e:
        raise DataError(f"not a segment record: {e}") from None


# ---------------------------------------------------------------------------------------------
# One file's result
# ---------------------------------------------------------------------------------------------


def read_file_result(root: str, index: int) -> dict | None:
    """File ``index``'s summary, or None while it is not finished."""
    path = storage.join(root, file_stem(index) + ".json")
    if not storage.exists(path):
        return None
    try:
        summary = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if summary.get("format") != FILE_FORMAT:
        return None
    if summary["records"] and not storage.exists(storage.join(root, summary["data"])):
        return None
    return summary


def write_file_result(root: str, result: FileResult) -> dict:
    """Segments first (whole), the summary last; returns the summary."""
    from array_record.python.array_record_module import ArrayRecordWriter

    item = result.item
    summary = {"format": FILE_FORMAT, "index": item.index, "path": item.path, "shard": item.shard,
               "duration": result.duration, "speech_seconds": result.speech_seconds, "error": result.error,
               "records": len(result.segments), "data": None, "sha256": None,
               "meta": [s.meta for s in result.segments]}
    if result.segments:
        data = file_stem(item.index) + ".array_record"
        with storage.local_output(storage.join(root, data)) as local:
            writer = ArrayRecordWriter(local, "group_size:1")
            for seg in result.segments:
                writer.write(encode_segment(seg))
            writer.close()
            summary["sha256"] = sha256_file(local)
        summary["data"] = data
    storage.write_text(storage.join(root, file_stem(item.index) + ".json"), dumps(summary))
    return summary


def load_file_result(root: str, summary: dict) -> FileResult:
    """The :class:`FileResult` a summary stands for, its segments read back (hash checked)."""
    from array_record.python.array_record_module import ArrayRecordReader

    item = FileItem(summary["index"], summary["path"], summary["shard"])
    result = FileResult(item, error=summary["error"], duration=summary["duration"],
                        speech_seconds=summary["speech_seconds"])
    if not summary["records"]:
        return result
    with storage.local_copy(storage.join(root, summary["data"])) as local:
        if sha256_file(local) != summary["sha256"]:
            raise DataError(f"{storage.join(root, summary['data'])}: sha256 differs from its summary "
                            "(a damaged segments file: rerun `moshax data beam` into the same directory)")
        reader = ArrayRecordReader(local)
        records = reader.read_all()
        reader.close()
    if len(records) != summary["records"]:
        raise DataError(f"{summary['data']}: {len(records)} records, its summary says {summary['records']}")
    result.segments = [decode_segment(r, m) for r, m in zip(records, summary["meta"])]
    return result


# ---------------------------------------------------------------------------------------------
# Shards and the whole job
# ---------------------------------------------------------------------------------------------


def shard_summary(shard: int, file_summaries: list[dict]) -> dict:
    files = sorted(file_summaries, key=lambda s: s["index"])
    keep = ("index", "path", "records", "error", "duration", "speech_seconds")
    return {"format": SHARD_FORMAT, "shard": shard, "files": [{k: f[k] for k in keep} for f in files]}


def read_shard_index(root: str, shard: int) -> dict:
    path = shard_index_path(root, shard)
    if not storage.exists(path):
        raise DataError(f"{path}: missing (the beam job did not finish this shard)")
    return json.loads(storage.read_text(path))


def read_manifest(root: str) -> dict:
    path = storage.join(root, MANIFEST)
    if not storage.exists(path):
        raise DataError(f"{root}: no {MANIFEST}: not a finished `moshax data beam` output (rerun the beam job "
                        "into it: finished files are kept)")
    manifest = json.loads(storage.read_text(path))
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def shard_plans(manifest: dict) -> list[ShardPlan]:
    """The plan's shards (file lists left empty: the token writer needs only indices)."""
    return [ShardPlan(k, ()) for k in range(manifest["plan"]["shards"])]


def write_plan(root: str, plan: list[ShardPlan]) -> None:
    storage.write_text(storage.join(root, PLAN), "".join(
        json.dumps({"index": f.index, "path": f.path, "shard": f.shard}) + "\n" for s in plan for f in s.files))


def parse_plan_line(line: str) -> FileItem:
    d = json.loads(line)
    return FileItem(int(d["index"]), str(d["path"]), int(d["shard"]))


def check_identity(root: str, identity: dict) -> None:
    """Refuse a rerun into ``root`` with other settings (``prepare``'s rule), then make the layout."""
    prepared_shards.check_identity(root, identity, made="holds segments made")
    storage.makedirs(storage.join(root, "files"))
    storage.makedirs(storage.join(root, "shards"))
