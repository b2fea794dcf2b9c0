"""Helium text-LM pretraining task: model, next-token loss, text data, FLOPs."""

from __future__ import annotations

from flax import nnx

from moshax.config import Config
from moshax.models.helium import Helium
from moshax.training.losses import cross_entropy_sums
from moshax.training.metrics import transformer_flops_per_token


class LMTask:
    """What the generic trainer needs to pretrain a Helium LM on packed text."""

    name = "helium"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.seq_len = cfg.data.seq_len

    def build_model(self, rngs: nnx.Rngs) -> Helium:
        return Helium(self.cfg.model, rngs=rngs)

    def batch_axes(self) -> dict:
        return {"tokens": ("act_batch", None)}

    def loss(self, model: Helium, batch: dict, rng):
        """Next-token CE over ``tokens[:, :-1] -> tokens[:, 1:]``, as (sum, weight, aux)."""
        del rng
        tokens = batch["tokens"]
        logits, _ = model(tokens[:, :-1])
        loss_sum, weight = cross_entropy_sums(logits, tokens[:, 1:])
        return loss_sum, weight, {}

    def data_iterator(self, split: str, *, global_batch_size: int, process_index: int, process_count: int):
        """A checkpointable Grain iterator, or None when the split has no sources."""
        from data_pipeline.text_loader import make_text_iterator

        sources = self.cfg.data.train_sources if split == "train" else self.cfg.data.eval_sources
        if not sources:
            return None
        return make_text_iterator(self.cfg.data, split=split, global_batch_size=global_batch_size,
                                  seed=self.cfg.seed, process_index=process_index, process_count=process_count)

    def check_inputs(self) -> None:
        """Fail early, in one line, on inputs the user named but that are missing."""
        from data_pipeline.tokenizer import load_tokenizer

        tok = load_tokenizer(self.cfg.data.tokenizer)
        if tok.vocab_size() > self.cfg.model.vocab_size:
            from moshax.config import ConfigError

            raise ConfigError(
                f"data.tokenizer {self.cfg.data.tokenizer} has {tok.vocab_size()} pieces but "
                f"model.vocab_size={self.cfg.model.vocab_size}"
            )
        if not self.cfg.data.train_sources:
            from moshax.config import ConfigError

            raise ConfigError("data.train_sources is empty: name at least one .txt/.jsonl file or tfds:NAME")

    def flops_per_example(self, num_params: int, num_embedding_params: int) -> float:
        t = self.cfg.model.transformer
        per_token = transformer_flops_per_token(num_params - num_embedding_params, t.num_layers, t.dim, self.seq_len)
        return per_token * self.seq_len

    def tokens_per_example(self) -> int:
        return self.seq_len

    def embedding_params(self) -> int:
        return self.cfg.model.vocab_size * self.cfg.model.transformer.dim
