"""Small shared builders for the tests."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moshax.config import from_dict


def draw_codebooks(model, audio, rng: np.random.Generator):
    """A Mimi's codebooks drawn at the scale of the latents of ``audio`` [B, 1, T] (many
    distinct codes, as trained codebooks give): each level picks residuals reaching it, plus
    noise. Marks every level initialized; returns the model."""
    q = model.cfg.quantizer
    latent = nnx.jit(lambda m, a: m.encode_latent(a))(model, jnp.asarray(audio))
    for branch in (model.quantizer.rvq_first, model.quantizer.rvq_rest):
        residual = np.asarray(branch.project_in(latent)).reshape(-1, q.dimension)
        sums = []
        for _ in range(branch.n_levels):
            emb = residual[rng.integers(0, len(residual), q.bins)]
            emb = emb + 0.3 * residual.std(0) * rng.standard_normal(emb.shape)
            sums.append(emb)
            d = (emb ** 2).sum(-1)[None] - 2 * residual @ emb.T
            residual = residual - emb[d.argmin(-1)]
        branch.embedding_sum[...] = jnp.asarray(np.stack(sums), jnp.float32)
        branch.initialized[...] = jnp.ones_like(branch.initialized[...])
    return model


def tiny_lm_config(**sections):
    """A tiny Helium config; pass section dicts to override, e.g. train={"steps": 4}."""
    data = {
        "model": {"kind": "helium", "vocab_size": 64,
                  "transformer": {"dim": 32, "num_heads": 4, "num_layers": 2, "hidden_dim": 48, "context": 16}},
        "data": {"seq_len": 16},
        "train": {"batch_size": 8, "steps": 4, "log_every": 1, "progress": False},
        "optim": {"learning_rate": 1e-2, "warmup_steps": 1},
        "checkpoint": {"every": 2, "async_save": True},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            merged = dict(data.get(name, {}))
            for k, v in values.items():
                if isinstance(v, dict) and isinstance(merged.get(k), dict):
                    merged[k] = {**merged[k], **v}
                else:
                    merged[k] = v
            data[name] = merged
        else:
            data[name] = values
    return from_dict(data)
