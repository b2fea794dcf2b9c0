"""Elastic, multi-host Grain loader over ArrayRecord token shards.

Built on ``grain.experimental.ElasticIterator``: the global shuffled example sequence is split
across JAX processes (each reads only its share: examples ``p, p + P, ...`` of every global batch),
and the iterator's position is one global index — the same on every process. Its state therefore
restores onto any number of processes (a checkpoint from 2 hosts resumes on 1, and vice versa).
"""

from __future__ import annotations

from pathlib import Path

import grain

from data_pipeline.errors import DataError
from data_pipeline.records import decode_array
from data_pipeline.token_shards import read_manifest


class DecodeRecord:
    """Picklable ``bytes -> {field: array}``."""

    def __init__(self, field: str = "tokens"):
        self.field = field

    def __call__(self, record: bytes) -> dict:
        return {self.field: decode_array(record)}


class ElasticShardIterator:
    """A Grain iterator whose state is process-count independent (see module docstring).

    ``elastic = True`` tells the checkpointer to store the state once, as JSON, instead of one
    file per process.
    """

    elastic = True

    def __init__(self, iterator):
        self._it = iterator

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)

    def close(self) -> None:
        self._it.close()


def shard_dataset(shard_dir: str | Path, *, field: str = "tokens") -> grain.MapDataset:
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    manifest = read_manifest(shard_dir)
    paths = [str(Path(shard_dir) / s["path"]) for s in manifest["shards"]]
    if not paths or manifest["total_records"] == 0:
        raise DataError(f"token shards at {shard_dir} hold no records")
    return grain.MapDataset.source(ArrayRecordDataSource(paths)).map(DecodeRecord(field))


def make_shard_iterator(shard_dir: str | Path, *, split: str, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                        field: str = "tokens") -> ElasticShardIterator:
    """Batches ``{field: [global_batch_size // process_count, ...]}``; train: shuffled, repeated
    forever (a new order each epoch); eval: one pass in order."""
    if global_batch_size % process_count:
        raise DataError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
    ds = shard_dataset(shard_dir, field=field)
    if split == "train":
        ds = ds.shuffle(seed=seed).repeat()  # a permutation per epoch, reshuffled each epoch
    mp = None
    if num_workers > 0:
        from data_pipeline.text_loader import _mark_absl_flags_parsed

        _mark_absl_flags_parsed()
        mp = grain.MultiprocessingOptions(num_workers=num_workers)
    elastic = grain.experimental.ElasticIterator(
        ds, global_batch_size, grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True),
        multiprocessing_options=mp)
    return ElasticShardIterator(iter(elastic))
