"""Tokenize text sources once into packed ArrayRecord token shards (rows of seq_len + 1 tokens).

Same packing as the streaming text loader (documents with BOS/EOS concatenated, cut into
fixed-length rows; a final partial row is dropped), but written to disk so training can read it
with the elastic, index-addressable shard loader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.text_loader import Tokenize
from data_pipeline.text_sources import open_text_sources
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.token_shards import ShardWriter, sha256_file


def tokenize_to_shards(cfg, out_dir: str | Path, *, split: str = "train", records_per_shard: int = 4096,
                       progress: bool = True, config_dict: dict | None = None) -> dict:
    """Write ``cfg`` (a TextDataConfig)'s ``split`` sources as packed token shards; returns the manifest."""
    sp = load_tokenizer(cfg.tokenizer, key="data.tokenizer")  # first: one line naming the key to set
    sources = cfg.train_sources if split == "train" else cfg.eval_sources
    docs = open_text_sources(sources, jsonl_field=cfg.jsonl_field, tfds_data_dir=cfg.tfds_data_dir, split=split)
    tokenize = Tokenize(cfg.tokenizer, add_bos=cfg.add_bos, add_eos=cfg.add_eos)
    row = cfg.seq_len + 1
    meta = {
        "tokenizer": {"path": str(cfg.tokenizer), "sha256": sha256_file(cfg.tokenizer), "vocab_size": sp.vocab_size(),
                      "bos": sp.bos_id(), "eos": sp.eos_id()},
        "config": {"split": split, "sources": list(sources), "seq_len": cfg.seq_len, "add_bos": cfg.add_bos,
                   "add_eos": cfg.add_eos, **(config_dict or {})},
    }
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(docs), desc=f"tokenize {split}", unit="doc", dynamic_ncols=True)
    buffer: list[np.ndarray] = []
    buffered = 0
    n_tokens = 0
    with ShardWriter(out_dir, records_per_shard=records_per_shard, kind="text", metadata=meta) as writer:
        for i in range(len(docs)):
            ids = tokenize(docs[i])["tokens"]
            n_tokens += len(ids)
            buffer.append(ids)
            buffered += len(ids)
            if buffered >= row:
                flat = np.concatenate(buffer)
                full = len(flat) // row
                for r in range(full):
                    writer.write(flat[r * row:(r + 1) * row])
                rest = flat[full * row:]
                buffer, buffered = [rest], len(rest)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        manifest = writer.close(stats={"documents": len(docs), "tokens": n_tokens, "dropped_tail_tokens": buffered})
    return manifest
