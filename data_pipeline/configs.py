"""The ``data:`` section of a run config, one dataclass per kind of data (no heavy imports).

The model kind picks the class (:mod:`moshax.registry`): Helium reads text
(:class:`TextDataConfig`), the Moshi LM multi-stream token shards (:class:`MultistreamDataConfig`),
Mimi audio crops (:class:`AudioDataConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.errors import DataError


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

    def validate(self, where: str = "data") -> None:
        if not self.crop_seconds > 0:
            raise DataError(f"{where}.crop_seconds={self.crop_seconds}: must be > 0")
        if self.num_workers < 0 or self.num_threads < 1:
            raise DataError(f"{where}: num_workers must be >= 0 and num_threads >= 1")
        if self.eval_crops_per_file < 1:
            raise DataError(f"{where}.eval_crops_per_file={self.eval_crops_per_file}: must be >= 1")
