"""A random-weight Mimi that still gives many distinct codes: for tests, demos and data-pipeline
dry runs (``moshax mimi init``) when no trained codec is at hand.

Fresh codebooks are all zeros (an uninitialised quantizer maps everything to code 0); here each
level's entries are drawn from the residuals that reach it for some calibration audio, plus noise,
the way k-means would start."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx


def calibration_tone(seconds: float, sample_rate: int = 24000, seed: int = 0) -> np.ndarray:
    """A voiced-like signal (gliding pitch, syllable-rate envelope, a little noise) ``[1, T]``."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    x = 0.3 * np.sin(2 * np.pi * (180 + 40 * np.sin(3 * t)) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    return (x + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)[None]


def draw_codebooks(model, audio, rng: np.random.Generator):
    """Draw ``model``'s codebooks at the scale of the latents of ``audio`` ``[B, 1, T]`` (each level
    picks residuals reaching it, plus noise); marks every level initialised; returns the model."""
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


def random_mimi(cfg, seed: int = 0, calibration: np.ndarray | None = None):
    """Random weights + drawn codebooks (calibrated on ``calibration`` ``[B, 1, T]`` or a tone)."""
    from moshax.models.mimi.model import Mimi

    model = Mimi(cfg, rngs=nnx.Rngs(seed))
    audio = calibration if calibration is not None else calibration_tone(1.6, cfg.sample_rate, seed)[None]
    return draw_codebooks(model, audio, np.random.default_rng(seed))
