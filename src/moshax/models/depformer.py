"""Moshi's depth transformer ("depformer"): a small causal transformer run across the codebooks
of one time step, with its own attention and MLP weights for every depth step.

Its layers are the shared :class:`~moshax.layers.transformer.TransformerBlock` (one copy of the
block's math for every transformer here), built with a leading ``depth_steps`` axis ``[W, ...]`` on
their projections (W = dep_q with per-step weights, 1 without, or ``max(schedule) + 1`` with a
sharing schedule) and run with :func:`~moshax.layers.transformer.scan_layers`. Per-step weights are
data, not code paths: a :class:`~moshax.layers.linear.StepWeights` selector gives each position
its weight set. The norms (and LayerScales) of a layer are shared by all steps, as in Kyutai's
``StreamingTransformerLayer``.

Two ways to run it, same weights and same numbers:

* training (teacher forcing, all ``dep_q`` steps at once): activations are laid out depth-step
  major ``[S, N, dim]``, so each projection is one batched matmul with a leading step axis (~1.5x
  faster on CPUs than with the step axis in the middle), and the fused projections are flattened
  to 2-D matmuls once, before the layer scan;
* decoding (one depth step at a time): ``steps`` names the depth step(s) of the input, the
  matching weight sets are gathered and a :class:`~moshax.layers.attention.KVCache` of capacity
  ``dep_q`` holds the earlier steps.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moshax.config import TransformerConfig
from moshax.layers.attention import KVCache
from moshax.layers.linear import STEP_AXIS, StepWeights
from moshax.layers.transformer import TransformerBlock, flatten_projections, scan_layers

__all__ = ["STEP_AXIS", "Depformer"]


class Depformer(nnx.Module):
    """``cfg.num_layers`` blocks (stacked weights ``[layers, depth_steps, ...]``) over
    ``depth_steps`` depth steps; ``schedule[s]`` is the weight set of step s (None: set s, or set 0
    when there is a single set). Attention is causal across the steps, without a window: the
    reference drops the depformer's context."""

    def __init__(self, cfg: TransformerConfig, depth_steps: int, *, weights_per_step: bool = True,
                 schedule: Sequence[int] | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.depth_steps = depth_steps
        if weights_per_step and schedule is not None:
            self.schedule = tuple(int(i) for i in schedule)
            self.num_weights = max(self.schedule) + 1
        elif weights_per_step:
            self.schedule = None
            self.num_weights = depth_steps
        else:
            self.schedule = None
            self.num_weights = 1
        num_weights = self.num_weights

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"})
        def make_layers(rngs):
            return TransformerBlock(cfg, num_weights=num_weights, windowed=False, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)

        self.layers = make_layers(rngs)

    def select(self, steps=None) -> StepWeights:
        """Weight selector for depth ``steps`` (None: all steps 0..depth_steps-1 in order)."""
        if self.num_weights == 1:
            return StepWeights(None)
        if steps is None:
            return StepWeights(slice(None) if self.schedule is None else jnp.asarray(self.schedule, jnp.int32))
        steps = jnp.asarray(steps, jnp.int32)
        return StepWeights(steps if self.schedule is None else jnp.asarray(self.schedule, jnp.int32)[steps])

    def init_state(self, batch: int, dtype=None) -> KVCache:
        """Empty stacked KV buffers [layers, batch, depth_steps, heads, head_dim] for step-by-step decoding."""
        cfg = self.cfg
        one = KVCache.empty(batch, self.depth_steps, cfg.num_heads, cfg.head_dim, dtype or self.dtype)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.num_layers,) + a.shape), one)

    def __call__(self, x, steps=None, cache: KVCache | None = None, step_major: bool = False):
        """x [N, S, dim]. Training: ``steps=None`` and S == depth_steps (all steps at once).
        Decoding: ``steps`` [S] int = the depth steps of the S positions, with a ``cache`` from
        :meth:`init_state` (or a previous call). Returns (y [N, S, dim], cache or None).
        ``step_major=True`` (training only): x and y are [S, N, dim] (the faster layout)."""
        if step_major:
            if steps is not None or cache is not None:
                raise ValueError("step_major is for training: no steps, no cache")
            s, n, _ = x.shape
        else:
            n, s, _ = x.shape
        if steps is None:
            if s != self.depth_steps:
                raise ValueError(f"depformer got {s} steps without `steps`, expected {self.depth_steps}")
            pos = jnp.arange(s, dtype=jnp.int32)
        else:
            pos = jnp.asarray(steps, jnp.int32).reshape(s)
        positions = jnp.broadcast_to(pos, (n, s))
        select = self.select(steps)
        return scan_layers(self.layers, x, cache, self.cfg.remat,
                           lambda layer, h, c: layer(h, positions, c, select=select, position_major=step_major),
                           prepare=flatten_projections if step_major else None, loop=self.cfg.layer_loop)
