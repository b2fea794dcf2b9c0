"""Grain pipeline for LM pretraining: documents -> tokens -> packed fixed-length rows -> batches.

::

    MapDataset.source(documents)           # open_text_sources(cfg.{train,eval}_sources)
      [process_index::process_count]       # each JAX process reads only its share of documents
      .shuffle(seed).repeat()              # train only (reshuffled every epoch); eval: one pass
      .map(Tokenize)                       # sentencepiece, + BOS/EOS per config, int32
      .to_iter_dataset()
    ConcatThenSplitIterDataset             # concatenate documents, cut rows of seq_len + 1 tokens
      .filter(full rows)                   # only the last row of a finite pass can be partial
      .map(keep "tokens")
      .batch(global_batch_size // process_count, drop_remainder=True)
      .mp_prefetch(num_workers)            # when cfg.num_workers > 0

Each element is ``{"tokens": int32 [local_batch, seq_len + 1]}`` (inputs ``[:, :-1]``, targets
``[:, 1:]``). Rows run across document boundaries (documents are separated by EOS/BOS).
The iterator from :func:`make_text_iterator` is a Grain ``DatasetIterator``: ``get_state()`` /
``set_state()`` resume it exactly (``grain.checkpoint.CheckpointSave/Restore`` with Orbax).
"""

from __future__ import annotations

import threading
from typing import Any

import grain
import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.text_sources import open_text_sources
from data_pipeline.tokenizer import load_tokenizer

SPLITS = ("train", "eval")


class Tokenize:
    """Picklable ``str -> {"tokens": int32[n]}``; the SentencePiece model is loaded on first use in
    each process (it is never part of the pickled state sent to Grain workers)."""

    def __init__(self, model_path: str, *, add_bos: bool = True, add_eos: bool = True):
        self.model_path = str(model_path)
        self.add_bos = add_bos
        self.add_eos = add_eos
        self._sp = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sp"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def sp(self):
        if self._sp is None:
            with self._lock:
                if self._sp is None:
                    self._sp = load_tokenizer(self.model_path)
        return self._sp

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        sp = self.sp
        ids = sp.EncodeAsIds(text)
        if self.add_bos:
            ids = [sp.bos_id(), *ids]
        if self.add_eos:
            ids = [*ids, sp.eos_id()]
        return {"tokens": np.asarray(ids, dtype=np.int32)}


def _is_full_row(row: dict[str, np.ndarray]) -> bool:
    # Segment ids are 0 only in the zero padding of a partially filled (last) row.
    return bool(row["tokens_segment_ids"][-1] != 0)


def _tokens_only(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"tokens": row["tokens"]}


def _sources_for(cfg, split: str) -> list[str]:
    if split not in SPLITS:
        raise DataError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    sources = cfg.train_sources if split == "train" else cfg.eval_sources
    if not sources:
        raise DataError(f"data.{split}_sources is empty: give at least one .txt/.jsonl path, glob or tfds:NAME")
    return list(sources)


def _check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} out of range for process_count={process_count}")


def document_dataset(
    cfg,
    *,
    split: str,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """The documents (``str``) this process reads, in reading order: its shard, shuffled and
    repeated forever for ``train``, one pass in file order for ``eval``."""
    _check_process(process_index, process_count)
    specs = _sources_for(cfg, split)
    docs = open_text_sources(specs, jsonl_field=cfg.jsonl_field, tfds_data_dir=cfg.tfds_data_dir, split=split)
    if len(docs) == 0:
        raise DataError(f"data.{split}_sources has no documents: {', '.join(specs)}")
    if len(docs) < process_count:
        raise DataError(
            f"data.{split}_sources has {len(docs)} documents, fewer than the {process_count} processes reading them"
        )
    ds = grain.MapDataset.source(docs)
    ds = ds[process_index::process_count]
    if split == "train":
        ds = ds.shuffle(seed=int(seed) % 2**32).repeat()
    return ds


def build_text_dataset(
    cfg,
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """The packed, batched token pipeline for one JAX process (see the module docstring).

    ``cfg`` is a :class:`moshax.config.TextDataConfig`. Each element is
    ``{"tokens": int32 [global_batch_size // process_count, cfg.seq_len + 1]}``. ``train`` never
    ends; ``eval`` ends after one pass over this process's documents (the last partial row and
    partial batch are dropped, so processes may yield different numbers of eval batches).
    Raises :class:`DataError` for a bad source, tokenizer or batch size.
    """
    _check_process(process_index, process_count)
    if global_batch_size < 1:
        raise DataError(f"global_batch_size={global_batch_size}: must be > 0")
    if global_batch_size % process_count:
        raise DataError(
            f"global batch size {global_batch_size} is not divisible by the process count {process_count}"
        )
    if cfg.seq_len < 1:
        raise DataError(f"data.seq_len={cfg.seq_len}: must be > 0")
    if not cfg.tokenizer:
        raise DataError("data.tokenizer is empty: give the path of a sentencepiece .model file")
    sp = load_tokenizer(cfg.tokenizer)  # fail early, in the main process, with a clear message
    if cfg.add_bos and sp.bos_id() < 0:
        raise DataError(f"data.add_bos=true but the tokenizer has no BOS piece: {cfg.tokenizer}")
    if cfg.add_eos and sp.eos_id() < 0:
        raise DataError(f"data.add_eos=true but the tokenizer has no EOS piece: {cfg.tokenizer}")

    docs = document_dataset(cfg, split=split, seed=seed, process_index=process_index, process_count=process_count)
    ds = docs.map(Tokenize(cfg.tokenizer, add_bos=cfg.add_bos, add_eos=cfg.add_eos)).to_iter_dataset()
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": cfg.seq_len + 1})
    ds = ds.filter(_is_full_row).map(_tokens_only)
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
    if cfg.num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return ds


def make_text_iterator(
    cfg,
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """``iter(build_text_dataset(...))``: a checkpointable Grain iterator (``get_state`` /
    ``set_state``). With ``cfg.num_workers > 0`` close it with ``it.close()`` when done."""
    ds = build_text_dataset(
        cfg,
        split=split,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    if cfg.num_workers > 0:
        _mark_absl_flags_parsed()
    return iter(ds)


def _mark_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app they were never parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
