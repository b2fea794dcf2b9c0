"""Elastic, multi-host Grain loader over ArrayRecord token shards.

Built on ``grain.experimental.ElasticIterator``: the global shuffled example sequence is split
across JAX processes (each reads only its share: examples ``p, p + P, ...`` of every global batch),
and the iterator's position is one global index — the same on every process. Its state therefore
restores onto any number of processes (a checkpoint from 2 hosts resumes on 1, and vice versa).
"""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.records import decode_array
from data_pipeline.token_shards import read_manifest


class DecodeRecord:
    """Picklable ``bytes -> {field: array}``."""

    def __init__(self, field: str = "tokens"):
        self.field = field

    def __call__(self, record: bytes) -> dict:
        return {self.field: decode_array(record)}


class RandomCrop:
    """Picklable random crop of ``frames`` time steps from ``[..., T]`` records (the last axis);
    shorter records are padded with ``pad`` (-1: no input, no loss). Grain seeds the generator from
    the pipeline seed and the element's index, so crops are deterministic and resume exactly."""

    def __init__(self, field: str, frames: int, pad: int = -1):
        self.field, self.frames, self.pad = field, int(frames), pad

    def __call__(self, element: dict, rng: np.random.Generator) -> dict:
        x = element[self.field]
        extra = x.shape[-1] - self.frames
        start = int(rng.integers(0, extra + 1)) if extra > 0 else 0
        return {**element, self.field: fit_frames(x[..., start:start + self.frames], self.frames, self.pad)}


class CropStart:
    """The first ``frames`` time steps (eval: the same window every pass), padded with ``pad``."""

    def __init__(self, field: str, frames: int, pad: int = -1):
        self.field, self.frames, self.pad = field, int(frames), pad

    def __call__(self, element: dict) -> dict:
        return {**element, self.field: fit_frames(element[self.field][..., : self.frames], self.frames, self.pad)}


def fit_frames(x: np.ndarray, frames: int, pad: int = -1) -> np.ndarray:
    if x.shape[-1] >= frames:
        return x[..., :frames]
    widths = [(0, 0)] * (x.ndim - 1) + [(0, frames - x.shape[-1])]
    return np.pad(x, widths, constant_values=pad)


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
                        field: str = "tokens", crop_frames: int | None = None) -> ElasticShardIterator:
    """Batches ``{field: [global_batch_size // process_count, ...]}``; train: shuffled, repeated
    forever (a new order each epoch); eval: one pass in order. ``crop_frames``: records of other
    lengths (``moshax data prepare`` writes whole recordings) become windows of that many time
    steps: a random one per visit in training, the first one in eval; shorter ones padded with -1."""
    if global_batch_size % process_count:
        raise DataError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
    ds = shard_dataset(shard_dir, field=field)
    if split == "train":
        ds = ds.shuffle(seed=seed).repeat()  # a permutation per epoch, reshuffled each epoch
        if crop_frames:
            ds = ds.random_map(RandomCrop(field, crop_frames), seed=seed)
    elif crop_frames:
        ds = ds.map(CropStart(field, crop_frames))
    mp = None
    if num_workers > 0:
        from data_pipeline.text_loader import _mark_absl_flags_parsed

        _mark_absl_flags_parsed()
        mp = grain.MultiprocessingOptions(num_workers=num_workers)
    elastic = grain.experimental.ElasticIterator(
        ds, global_batch_size, grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True),
        multiprocessing_options=mp)
    return ElasticShardIterator(iter(elastic))
