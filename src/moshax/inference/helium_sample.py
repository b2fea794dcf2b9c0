"""Text sampling from Helium with its KV cache and the Moshi stream's sampler.

The prompt is prefilled in one call (positions 0..P-1), then each new token is one jitted step
against the KV ring buffer (capacity = the context; the window slides past it). Temperature 0 is
greedy; keys are split once per token from ``seed``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from moshax.inference.bound import BoundModel
from moshax.inference.sampling import sample


class HeliumSampler:
    def __init__(self, model, temperature: float = 0.7, top_k: int = 25, seed: int = 0):
        bound = BoundModel(model)
        self.model = bound.model
        self.temperature, self.top_k = float(temperature), int(top_k)
        self.seed = int(seed)
        temp, k = self.temperature, self.top_k

        def run(m, tokens, positions, cache, key):
            logits, cache = m(tokens, positions, cache)
            key, sub = jax.random.split(jax.random.wrap_key_data(key))
            tok = sample(logits[:, -1], sub[None], temp, k)
            return tok, cache, jax.random.key_data(key)

        self._run = bound.jit(run, donate_argnums=(2,))

    def generate(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """Returns (the sampled ids (without the prompt), per-token latencies in seconds, the
        first (prefill + compile) excluded)."""
        cache = self.model.init_state(1)
        key = jax.random.key_data(jax.random.key(self.seed))
        p = len(prompt)
        tok, cache, key = self._run(jnp.asarray([prompt], jnp.int32), jnp.arange(p, dtype=jnp.int32)[None], cache, key)
        out = [int(tok[0])]
        latencies = []
        for i in range(max_tokens - 1):
            t0 = time.perf_counter()
            tok, cache, key = self._run(tok[:, None], jnp.asarray([[p + i]], jnp.int32), cache, key)
            out.append(int(tok[0]))
            latencies.append(time.perf_counter() - t0)
        return out[:max(max_tokens, 0)], latencies


def greedy_reference(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation by re-running the whole sequence each step (no cache): for tests."""
    ids = list(prompt)
    for _ in range(max_tokens):
        logits, _ = model(jnp.asarray([ids], jnp.int32))
        ids.append(int(np.argmax(np.asarray(logits[0, -1]))))
    return ids[len(prompt):]
