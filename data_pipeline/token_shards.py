"""ArrayRecord token shards + ``manifest.json``: the format training reads at scale.

A shard directory holds ``tokens-00000.array_record, ...`` (one numpy record per example, stored
as ``.npy`` bytes, see :mod:`data_pipeline.records`) and a ``manifest.json``::

    {"format": "moshax-token-shards/1", "kind": "text" | "multistream",
     "shards": [{"path": "tokens-00000.array_record", "records": 4096, "sha256": "..."}],
     "total_records": ..., "record": {"dtype": "int32", "shape": [129]},
     "tokenizer": {...}, "codec": {...}, "config": {...}, "stats": {...}, "failures": [...]}

Examples are index-addressable (a Grain ``MapDataset``), so the loader can be *elastic*: its
position is one global index, valid for any number of hosts.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.records import decode_array, encode_array

FORMAT = "moshax-token-shards/1"
MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Writes examples into ArrayRecord shards of ``records_per_shard`` and, on ``close``, the
    manifest (with a sha256 per shard). Use as a context manager."""

    def __init__(self, out_dir: str | Path, *, records_per_shard: int = 4096, kind: str = "text",
                 metadata: dict[str, Any] | None = None):
        from array_record.python.array_record_module import ArrayRecordWriter

        self._writer_cls = ArrayRecordWriter
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / MANIFEST).exists():
            raise DataError(f"{self.out_dir} already holds token shards ({MANIFEST}); choose another --output")
        self.records_per_shard = records_per_shard
        self.kind = kind
        self.metadata = dict(metadata or {})
        self.shards: list[dict] = []
        self.failures: list[dict] = []
        self._writer = None
        self._count = 0
        self._record_spec: dict | None = None
        self.manifest: dict | None = None  # set by close()

    def _open_next(self) -> None:
        name = f"tokens-{len(self.shards):05d}.array_record"
        self._writer = self._writer_cls(str(self.out_dir / name), "group_size:1")
        self.shards.append({"path": name, "records": 0})

    def write(self, example: np.ndarray) -> None:
        example = np.asarray(example)
        spec = {"dtype": str(example.dtype), "shape": list(example.shape)}
        if self._record_spec is None:
            self._record_spec = spec
        elif self.kind == "text" and spec != self._record_spec:
            raise DataError(f"record {self._count}: {spec} differs from the first record's {self._record_spec}")
        if self._writer is None or self.shards[-1]["records"] >= self.records_per_shard:
            self._finish_shard()
            self._open_next()
        self._writer.write(encode_array(example))
        self.shards[-1]["records"] += 1
        self._count += 1

    def record_failure(self, item: str, error: str) -> None:
        """Per-input failures are kept in the manifest; the job goes on."""
        self.failures.append({"item": item, "error": error})

    def _finish_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            last = self.shards[-1]
            last["sha256"] = sha256_file(self.out_dir / last["path"])

    def close(self, stats: dict | None = None) -> dict:
        if self.manifest is not None:  # already closed (e.g. close() inside a `with` block)
            return self.manifest
        self._finish_shard()
        manifest = {
            "format": FORMAT,
            "kind": self.kind,
            "shards": self.shards,
            "total_records": self._count,
            "record": self._record_spec,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stats": stats or {},
            "failures": self.failures,
            **self.metadata,
        }
        tmp = self.out_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.rename(self.out_dir / MANIFEST)  # the manifest appears only once everything is written
        self.manifest = manifest
        return manifest

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._finish_shard()


def read_manifest(shard_dir: str | Path, *, verify: bool = False) -> dict:
    """Load and check a shard directory's manifest; ``verify`` re-hashes every shard."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"no token shards at {shard_dir} ({MANIFEST} missing; was the job finished?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    for shard in manifest["shards"]:
        p = shard_dir / shard["path"]
        if not p.is_file():
            raise DataError(f"{shard_dir}: shard {shard['path']} listed in the manifest is missing")
        if verify and sha256_file(p) != shard.get("sha256"):
            raise DataError(f"{p}: sha256 does not match the manifest (corrupt or changed shard)")
    return manifest


def shard_paths(shard_dir: str | Path) -> list[str]:
    manifest = read_manifest(shard_dir)
    return [str(Path(shard_dir) / s["path"]) for s in manifest["shards"]]


def iter_records(shard_dir: str | Path) -> Iterable[np.ndarray]:
    """All examples in order (for tools and tests; training uses the Grain loader)."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    src = ArrayRecordDataSource(shard_paths(shard_dir))
    for i in range(len(src)):
        yield decode_array(src[i])
