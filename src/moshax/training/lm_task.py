"""Helium text-LM pretraining task: model, next-token loss, text data, FLOPs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from moshax.config import Config
from moshax.layers.losses import cross_entropy_sums
from moshax.models.helium import Helium
from moshax.training.metrics import stack_matmul_params, training_flops_per_token
from moshax.training.task import Task


class LMTask(Task):
    """What the generic trainer needs to pretrain a Helium LM on packed text."""

    token_losses = True
    shard_kind = "text"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.seq_len = cfg.data.seq_len

    def example_spec(self) -> dict:
        """Shape and dtype of one example, per batch field."""
        return {"tokens": ((self.seq_len + 1,), np.int32)}

    def batch_axes(self) -> dict:
        return {"tokens": ("act_batch", None)}

    def loss(self, model: Helium, batch: dict, rng):
        """Next-token CE over ``tokens[:, :-1] -> tokens[:, 1:]``, as (sum, weight, aux); targets
        below 0 (the padding of ``moshax eval``'s last batch) carry no loss."""
        del rng
        tokens = batch["tokens"]
        targets = tokens[:, 1:]
        logits, _ = model(jnp.maximum(tokens[:, :-1], 0))
        loss_sum, weight = cross_entropy_sums(logits, jnp.maximum(targets, 0), (targets >= 0).astype(jnp.float32))
        return loss_sum, weight, {}

    def eval_report(self, totals: dict) -> dict:
        out = super().eval_report(totals)
        s, w = totals["loss"]
        out["streams"] = [{"stream": "text", "tokens": int(round(float(w))), "cross_entropy": out["loss"],
                           "perplexity": out["perplexity"]}]
        return out

    def data_iterator(self, split: str, *, global_batch_size: int, process_index: int, process_count: int):
        """A checkpointable Grain iterator, or None when the split has no sources."""
        from data_pipeline.text_loader import make_text_iterator

        data = self.cfg.data
        shards = data.train_shards if split == "train" else data.eval_shards
        if shards:
            from data_pipeline.shard_loader import make_shard_iterator
            from data_pipeline.token_shards import read_manifest

            shape = read_manifest(shards)["record"]["shape"]
            if shape != [self.seq_len + 1]:
                from data_pipeline.errors import DataError

                raise DataError(f"token shards {shards} hold rows of {shape[-1]} tokens, but data.seq_len + 1 = "
                                f"{self.seq_len + 1}")
            return make_shard_iterator(shards, split=split, global_batch_size=global_batch_size, seed=self.cfg.seed,
                                       process_index=process_index, process_count=process_count,
                                       num_workers=data.num_workers)
        sources = data.train_sources if split == "train" else data.eval_sources
        if not sources:
            return None
        return make_text_iterator(self.cfg.data, split=split, global_batch_size=global_batch_size,
                                  seed=self.cfg.seed, process_index=process_index, process_count=process_count)

    def check_inputs(self) -> None:
        """Fail early, in one line, on inputs the user named but that are missing."""
        from moshax.config import ConfigError

        data = self.cfg.data
        if data.train_shards:
            from data_pipeline.token_shards import read_manifest

            vocab = read_manifest(data.train_shards).get("tokenizer", {}).get("vocab_size", 0)
            where = f"token shards {data.train_shards}"
        else:
            from data_pipeline.tokenizer import load_tokenizer

            if not data.train_sources:
                raise ConfigError("data.train_sources is empty: name .txt/.jsonl files, tfds:NAME, or data.train_shards")
            vocab = load_tokenizer(data.tokenizer, key="data.tokenizer").vocab_size()
            where = f"data.tokenizer {data.tokenizer}"
        if vocab > self.cfg.model.vocab_size:
            raise ConfigError(f"{where} has {vocab} pieces but model.vocab_size={self.cfg.model.vocab_size}")

    def flops_per_example(self) -> float:
        """6 x (transformer + text head) per token + attention over the sequence."""
        t = self.cfg.model.transformer
        matmul = stack_matmul_params(t) + t.dim * self.cfg.model.vocab_size
        return training_flops_per_token(matmul, ((t.num_layers, t.dim, self.seq_len),)) * self.seq_len

    def tokens_per_example(self) -> int:
        return self.seq_len
