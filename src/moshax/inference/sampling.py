"""Temperature + top-k sampling, with per-sequence keys (reproducible and batch-independent).

``sample(logits [B, V], keys [B] (typed PRNG keys), temperature, top_k)`` draws one token per
row: temperature 0 is greedy (argmax, the keys are ignored), ``top_k`` <= 0 or >= V samples from
the whole vocabulary. The distribution is Kyutai's ``sample_token`` (softmax(logits / T)
restricted to the k largest, renormalized); each row uses its own key, so a sequence's tokens do
not depend on the other rows of the batch.

``temperature`` and ``top_k`` are Python numbers: static under ``jit`` (``lax.top_k`` needs a
static k), so a change recompiles the step once.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of a Moshi stream (Kyutai's ``LMGen`` defaults). Hashable: a jit static."""

    temperature: float = 0.8  # audio codebooks
    top_k: int = 250
    text_temperature: float = 0.7
    text_top_k: int = 25

    @staticmethod
    def greedy() -> "Sampling":
        return Sampling(0.0, 0, 0.0, 0)

    def validate(self) -> "Sampling":
        for name in ("temperature", "text_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = greedy), got {getattr(self, name)}")
        for name in ("top_k", "text_top_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = the whole vocabulary), got {getattr(self, name)}")
        return self


def sample(logits, keys, temperature: float, top_k: int):
    """logits [B, V] -> tokens [B] int32; ``keys`` [B] typed PRNG keys (one per row)."""
    logits = logits.astype(jnp.float32)
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    v = logits.shape[-1]
    scaled = logits / temperature
    if 0 < top_k < v:
        vals, idx = jax.lax.top_k(scaled, top_k)
        pick = jax.vmap(jax.random.categorical)(keys, vals)
        return jnp.take_along_axis(idx, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def slot_keys(seed: int, batch: int, first_slot: int = 0):
    """Raw key data [batch, 2] uint32 of slots ``first_slot..``: ``fold_in(key(seed), slot)``,
    so slot i of a batch draws what a lone stream seeded for slot i draws."""
    base = jax.random.key(int(seed))
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(first_slot, first_slot + batch))
    return jax.random.key_data(keys)
