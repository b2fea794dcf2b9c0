"""Helium: decoder-only text LM = text embedding -> transformer stack -> out_norm -> text head."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moshax.config import HeliumConfig
from moshax.layers.attention import KVCache
from moshax.layers.norms import make_norm
from moshax.layers.params import dtype_of, normal, param
from moshax.layers.transformer import Transformer
from moshax.parallel.sharding import constrain


class Helium(nnx.Module):
    def __init__(self, cfg: HeliumConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        tcfg = cfg.transformer
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.dtype = dtype
        self.text_emb = param(rngs, normal(1.0), (cfg.vocab_size, tcfg.dim), ("vocab", "embed"), pdtype)
        self.transformer = Transformer(tcfg, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.transformer.decodes_one_query = True  # its streaming step: one position per call
        self.out_norm = make_norm(tcfg.norm, tcfg.dim, tcfg.norm_eps, rngs=rngs)
        self.text_linear = param(rngs, normal(tcfg.init_std), (tcfg.dim, cfg.vocab_size), ("embed", "vocab"), pdtype)

    def __call__(self, tokens, positions=None, cache: KVCache | None = None):
        """tokens [B, T] int -> (float32 logits [B, T, vocab], cache). ``positions`` default 0..T-1."""
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        # Gather from a vocab-replicated table: a gather from a vocab-sharded one makes XLA
        # replicate the activations instead (an "involuntary full rematerialization").
        table = constrain(self.text_emb[...], (None, None))
        x = jnp.take(table, tokens, axis=0).astype(self.dtype)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        x, cache = self.transformer(x, positions, cache)
        x = self.out_norm(x)
        logits = jnp.einsum("btd,dv->btv", x, self.text_linear[...].astype(self.dtype))
        logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
        return logits.astype(jnp.float32), cache

    def init_state(self, batch: int, capacity: int | None = None) -> KVCache:
        return self.transformer.init_state(batch, capacity)

    def num_params(self, include_embeddings: bool = True) -> int:
        import jax

        state = nnx.state(self, nnx.Param)
        total = sum(x.size for x in jax.tree.leaves(state))
        if not include_embeddings:
            total -= self.text_emb[...].size
        return total
