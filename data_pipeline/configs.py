"""The ``data:`` section of a run config, one dataclass per kind of data (no heavy imports).

The model kind picks the class (:mod:`moshax.registry`): Helium reads text
(:class:`TextDataConfig`), the Moshi LM multi-stream token shards (:class:`MultistreamDataConfig`),
Mimi audio crops (:class:`AudioDataConfig`).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.errors import DataError


def _missing_sources(key: str, sources: list[str]) -> list[str]:
    """One message per local source (file, dir or glob) that names nothing on disk."""
    out = []
    for src in sources:
        if src.startswith(("tfds:", "gs://")) or Path(src).exists() or glob.glob(src):
            continue
        out.append(f"{key}: nothing found at {src}")
    return out


def _missing_shards(key: str, shards: str) -> list[str]:
    if not shards or shards.startswith("gs://") or (Path(shards) / "manifest.json").is_file():
        return []
    return [f"{key}: no token shards at {shards} (no manifest.json there)"]


@dataclass
class TextDataConfig:
    """Text sources, tokenizer and packing for LM pretraining."""

    train_sources: list[str] = field(default_factory=list)  # .txt/.jsonl paths or globs, tfds:NAME[/CONFIG][:SPLIT]
    eval_sources: list[str] = field(default_factory=list)
    tokenizer: str = ""  # sentencepiece .model file
    train_shards: str = ""  # token-shard dir (`moshax data tokenize`): elastic loader, used instead of sources
    eval_shards: str = ""
    seq_len: int = 128
    jsonl_field: str = "text"
    tfds_data_dir: str | None = None
    num_workers: int = 0  # Grain worker processes (0 = in-process)
    add_bos: bool = True
    add_eos: bool = True

    def missing_paths(self, where: str = "data") -> list[str]:
        """Files the section names that are not there (checked before any heavy import)."""
        if self.train_shards:
            return _missing_shards(f"{where}.train_shards", self.train_shards) + \
                _missing_shards(f"{where}.eval_shards", self.eval_shards)
        out = _missing_sources(f"{where}.train_sources", self.train_sources) + \
            _missing_sources(f"{where}.eval_sources", self.eval_sources)
        if self.tokenizer and not Path(self.tokenizer).is_file():
            from data_pipeline.tokenizer import HOW_TO_GET

            out.append(f"tokenizer file not found: {self.tokenizer} (set {where}.tokenizer to a sentencepiece "
                       f".model: {HOW_TO_GET})")
        return out

    def validate(self, where: str = "data") -> None:
        if self.seq_len <= 0:
            raise DataError(f"{where}.seq_len={self.seq_len}: must be > 0")
        if self.num_workers < 0:
            raise DataError(f"{where}.num_workers={self.num_workers}: must be >= 0")


@dataclass
class MultistreamDataConfig:
    """Multi-stream token shards (``[num_streams, frames]`` records) for the Moshi LM."""

    train_shards: str = ""  # shard dir (manifest.json + ArrayRecord files)
    eval_shards: str = ""
    frames: int = 125  # time steps (12.5 Hz frames) per example
    num_workers: int = 0  # Grain worker processes (0 = in-process)

    def missing_paths(self, where: str = "data") -> list[str]:
        return _missing_shards(f"{where}.train_shards", self.train_shards) + \
            _missing_shards(f"{where}.eval_shards", self.eval_shards)

    def validate(self, where: str = "data") -> None:
        if self.frames <= 0:
            raise DataError(f"{where}.frames={self.frames}: must be > 0")
        if self.num_workers < 0:
            raise DataError(f"{where}.num_workers={self.num_workers}: must be >= 0")


@dataclass
class AudioDataConfig:
    """Audio crops for codec training (Mimi): the ``data:`` section of a ``model.kind: mimi`` config."""

    train_sources: list[str] = field(default_factory=list)  # dirs, globs, files or .jsonl manifests
    eval_sources: list[str] = field(default_factory=list)
    crop_seconds: float = 2.0  # length of each training example
    num_workers: int = 0  # Grain worker processes (0 = in-process)
    num_threads: int = 2  # reader threads per process (decoding + resampling)
    eval_crops_per_file: int = 1  # eval reads crops from the start of each file

    def missing_paths(self, where: str = "data") -> list[str]:
        return _missing_sources(f"{where}.train_sources", self.train_sources) + \
            _missing_sources(f"{where}.eval_sources", self.eval_sources)

    def validate(self, where: str = "data") -> None:
        if not self.crop_seconds > 0:
            raise DataError(f"{where}.crop_seconds={self.crop_seconds}: must be > 0")
        if self.num_workers < 0 or self.num_threads < 1:
            raise DataError(f"{where}: num_workers must be >= 0 and num_threads >= 1")
        if self.eval_crops_per_file < 1:
            raise DataError(f"{where}.eval_crops_per_file={self.eval_crops_per_file}: must be >= 1")
