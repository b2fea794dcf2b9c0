"""Grain pipeline of random audio crops for codec training (Mimi), per-process sharded, checkpointable.

::

    files = list_audio_files(sources)           # dirs (recursive), globs, files, .jsonl manifests
    index: one entry per ~crop of audio         # a file of d seconds appears max(1, d // crop) times
    MapDataset.source(index)
      [process_index::process_count]            # each JAX process reads its own share
      .shuffle(seed).repeat()                   # train: reshuffled every epoch; eval: one pass, in order
      .random_map(RandomCrop)                   # train: a random start (per-element RNG from seed + index)
      .batch(global_batch_size // process_count, drop_remainder=True)
      .to_iter_dataset(ReadOptions(num_threads))
      .mp_prefetch(num_workers)                 # when num_workers > 0

Each element: ``{"audio": float32 [local_B, 1, crop_samples]}`` (mono, resampled to the model's
rate; files shorter than a crop are zero-padded at the end), plus ``"teacher": float32
[local_B, crop_frames, dim]`` when precomputed teacher features are used: a ``.npy`` next to
each audio file (``clip.wav`` -> ``clip`` + ``features_suffix``, default ``clip.npy``) holding
``[frames, dim]`` at ``features_rate`` Hz from the file's first sample. Crops then start on a
multiple of ``sample_rate / features_rate`` samples so audio and features stay aligned; a feature
file a frame or two shorter than the audio (teacher models trim the edges) is padded by repeating
its last frame.

Every audio file is probed (duration) and every feature file checked (shape, dim, length) when the
pipeline is built, in the main process: a bad file fails there with :class:`DataError` naming it.
The iterator is a Grain ``DatasetIterator``: ``get_state()`` / ``set_state()`` resume it exactly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import grain
import numpy as np

from data_pipeline.audio import durations, list_audio_files, read_audio
from data_pipeline.configs import AudioDataConfig
from data_pipeline.errors import DataError

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Features:
    """Precomputed teacher features next to the audio files."""

    suffix: str = ".npy"
    rate: float = 50.0  # frames per second
    dim: int = 0  # 0: any (taken from the first file)


def features_path(audio_path: str, suffix: str) -> str:
    p = Path(audio_path)
    return str(p.with_name(p.stem + suffix))


def crop_samples(crop_seconds: float, sample_rate: int, frame_size: int) -> int:
    """Crop length in samples, rounded up to whole codec frames."""
    n = int(round(crop_seconds * sample_rate))
    return max(frame_size, -(-n // frame_size) * frame_size)


class _Index:
    """The files of a split, their durations and (optionally) their feature files, checked."""

    def __init__(self, files: list[str], durs: list[float], feats: list[str] | None, dim: int):
        self.files = files
        self.durations = durs
        self.features = feats
        self.dim = dim


def build_index(sources: list[str], *, features: Features | None = None) -> _Index:
    files = list_audio_files(sources)
    durs = durations(files)  # raises naming the first unreadable / empty file
    feats, dim = None, 0
    if features is not None:
        feats, dim = [], features.dim
        for f, d in zip(files, durs):
            fp = features_path(f, features.suffix)
            if not os.path.isfile(fp):
                raise DataError(f"{fp}: teacher feature file missing for {f} (expected [frames, dim] at "
                                f"{features.rate} Hz)")
            try:
                arr = np.load(fp, mmap_mode="r")
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{fp}: cannot read teacher features ({str(e).splitlines()[0]})") from None
            if arr.ndim != 2 or arr.shape[0] == 0:
                raise DataError(f"{fp}: teacher features must be [frames, dim], got shape {arr.shape}")
            if dim and arr.shape[1] != dim:
                raise DataError(f"{fp}: teacher features have dim {arr.shape[1]}, expected {dim}")
            dim = arr.shape[1]
            expected = d * features.rate
            if abs(arr.shape[0] - expected) > 2 + 0.02 * expected:
                raise DataError(f"{fp}: {arr.shape[0]} teacher frames for {d:.2f} s of audio; expected about "
                                f"{expected:.0f} at {features.rate} Hz")
            feats.append(fp)
    return _Index(files, durs, feats, dim)


class RandomCrop(grain.transforms.RandomMap):
    """``entry -> {"audio": [1, n]} (+ "teacher": [n_f, dim])``; picklable (only paths and numbers).
    ``entry`` is ``(file_index, start)`` with ``start < 0`` for a random start."""

    def __init__(self, index: _Index, *, sample_rate: int, num_samples: int, align: int, features_rate: float = 0.0):
        self.files = list(index.files)
        self.durations = list(index.durations)
        self.features = None if index.features is None else list(index.features)
        self.dim = index.dim
        self.sample_rate = int(sample_rate)
        self.num_samples = int(num_samples)
        self.align = max(1, int(align))
        self.features_rate = float(features_rate)

    def random_map(self, entry, rng: np.random.Generator):
        i, start = int(entry[0]), int(entry[1])
        if start < 0:
            total = int(math.floor(self.durations[i] * self.sample_rate))
            slots = max(0, total - self.num_samples) // self.align
            start = int(rng.integers(0, slots + 1)) * self.align
        return self.crop(i, start)

    def map(self, entry):
        return self.crop(int(entry[0]), max(0, int(entry[1])))

    def crop(self, i: int, start: int) -> dict:
        path = self.files[i]
        audio = read_audio(path, self.sample_rate, start_sec=start / self.sample_rate,
                           duration_sec=self.num_samples / self.sample_rate, num_samples=self.num_samples)
        out = {"audio": audio.astype(np.float32)}
        if self.features is not None:
            hop = self.sample_rate / self.features_rate
            first = int(round(start / hop))
            n = int(round(self.num_samples / hop))
            arr = np.load(self.features[i], mmap_mode="r")
            rows = np.asarray(arr[first:first + n], np.float32)
            if rows.shape[0] < n:  # short feature file or a padded crop: repeat the last frame
                last = arr[min(first, arr.shape[0]) - 1:] if rows.shape[0] == 0 else rows[-1:]
                rows = np.concatenate([rows, np.repeat(np.asarray(last[-1:], np.float32), n - rows.shape[0], 0)])
            out["teacher"] = rows
        return out


class _FixedCrop(grain.transforms.Map):
    def __init__(self, crop: RandomCrop):
        self.crop = crop

    def map(self, entry):
        return self.crop.map(entry)


def _entries(index: _Index, crop_seconds: float, split: str, eval_crops: int, num_samples: int,
             sample_rate: int) -> np.ndarray:
    rows = []
    for i, d in enumerate(index.durations):
        if split == "train":
            rows.extend([(i, -1)] * max(1, int(d // crop_seconds)))
        else:
            total = int(math.floor(d * sample_rate))
            n = max(1, min(eval_crops, total // num_samples))
            rows.extend((i, k * num_samples) for k in range(n))
    return np.asarray(rows, np.int64).reshape(-1, 2)


def build_audio_dataset(cfg: AudioDataConfig, *, split: str, global_batch_size: int, seed: int, sample_rate: int,
                        frame_size: int, process_index: int = 0, process_count: int = 1,
                        features: Features | None = None) -> grain.IterDataset | None:
    """The crop pipeline of one process (see the module docstring); None if the split has no sources."""
    if split not in SPLITS:
        raise DataError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    cfg.validate()
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} out of range for process_count={process_count}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(f"global batch size {global_batch_size} is not a positive multiple of the "
                        f"{process_count} processes")
    sources = cfg.train_sources if split == "train" else cfg.eval_sources
    if not sources:
        return None
    n = crop_samples(cfg.crop_seconds, sample_rate, frame_size)
    align = 1
    if features is not None:
        hop = sample_rate / features.rate
        if abs(hop - round(hop)) > 1e-9 or abs(n / hop - round(n / hop)) > 1e-9:
            raise DataError(f"teacher features at {features.rate} Hz do not tile {sample_rate} Hz audio crops of "
                            f"{n} samples: use a rate that divides {sample_rate} and the crop length")
        align = int(round(hop))
    index = build_index(sources, features=features)
    entries = _entries(index, cfg.crop_seconds, split, cfg.eval_crops_per_file, n, sample_rate)
    if len(entries) < process_count:
        raise DataError(f"{split} audio has {len(entries)} crops, fewer than the {process_count} processes reading it")
    crop = RandomCrop(index, sample_rate=sample_rate, num_samples=n, align=align,
                      features_rate=features.rate if features is not None else 0.0)
    ds = grain.MapDataset.source(entries)[process_index::process_count]
    local = global_batch_size // process_count
    if split == "train":
        ds = ds.shuffle(seed=int(seed) % 2**32).repeat().random_map(crop, seed=(int(seed) + 1) % 2**32)
    else:
        ds = ds.map(_FixedCrop(crop))
    ds = ds.batch(local, drop_remainder=True)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=2 * local))
    if cfg.num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return it_ds


def make_audio_iterator(cfg: AudioDataConfig, **kwargs) -> grain.DatasetIterator | None:
    """``iter(build_audio_dataset(...))``: checkpointable (``get_state`` / ``set_state``)."""
    ds = build_audio_dataset(cfg, **kwargs)
    if ds is None:
        return None
    if cfg.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    return iter(ds)
