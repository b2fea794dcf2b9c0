"""Moshi's depth transformer ("depformer"): a small causal transformer run across the codebooks
of one time step, with its own attention and MLP weights for every depth step.

Per-step weights are data, not code paths: each layer stores its projections with a leading
``depth_steps`` axis ``[W, ...]`` (W = dep_q with per-step weights, 1 without, or
``max(schedule) + 1`` with a sharing schedule). The norms (and LayerScales) of a layer are shared
by all steps, as in Kyutai's ``StreamingTransformerLayer``.

Two ways to run it, same weights and same numbers:

* training (teacher forcing, all ``dep_q`` steps at once, :meth:`DepformerLayer.step_major`):
  activations are laid out depth-step major ``[S, N, dim]`` and each layer projects step ``s``
  with weight set ``schedule[s]`` as one batched matmul with a leading step axis (no loop, no
  cache), then causal attention across the steps;
* decoding (one depth step at a time): ``steps`` names the depth step(s) of the input, the
  matching weight sets are gathered and a :class:`~moshax.layers.attention.KVCache` of capacity
  ``dep_q`` holds the earlier steps.

Layers are stacked with ``nnx.vmap`` and run with ``jax.lax.scan`` like
:class:`moshax.layers.transformer.Transformer`; the remat policy comes from the config.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moshax.config import TransformerConfig
from moshax.kernels.attention import attention
from moshax.layers.attention import KVCache, attend
from moshax.layers.mlp import ACTIVATIONS
from moshax.layers.norms import make_norm
from moshax.layers.params import constant, normal, param
from moshax.layers.rope import apply_rope
from moshax.layers.transformer import REMAT, scan_layers
from moshax.parallel.sharding import constrain

STEP_AXIS = "depth_steps"


class StepAttention(nnx.Module):
    """Fused qkv ``in_proj`` [W, embed, 3, heads, head_dim] and ``out_proj`` [W, heads, head_dim, embed]."""

    def __init__(self, dim: int, num_heads: int, num_weights: int, *, init_std: float, param_dtype, rngs: nnx.Rngs):
        head_dim = dim // num_heads
        self.in_proj = param(rngs, normal(init_std), (num_weights, dim, 3, num_heads, head_dim),
                             (STEP_AXIS, "embed", None, "heads", "kv"), param_dtype)
        self.out_proj = param(rngs, normal(init_std), (num_weights, num_heads, head_dim, dim),
                              (STEP_AXIS, "heads", "kv", "embed"), param_dtype)


class StepMLP(nnx.Module):
    """Gated MLP per step: ``linear_in`` [W, embed, 2, hidden] (gate, up), ``linear_out`` [W, hidden, embed]."""

    def __init__(self, dim: int, hidden: int, num_weights: int, *, init_std: float, param_dtype, rngs: nnx.Rngs):
        self.linear_in = param(rngs, normal(init_std), (num_weights, dim, 2, hidden),
                               (STEP_AXIS, "embed", None, "mlp"), param_dtype)
        self.linear_out = param(rngs, normal(init_std), (num_weights, hidden, dim),
                                (STEP_AXIS, "mlp", "embed"), param_dtype)


def _weights_for(w, widx):
    """Per-position weights: ``w`` [W, ...] -> ([S, ...], True), or (w[0], False) when all share one."""
    if widx is None:
        return w[0], False
    if isinstance(widx, slice):
        return w, True
    return jnp.take(w, widx, axis=0), True


class DepformerLayer(nnx.Module):
    """x + ls1 * attn_s(norm1(x)); x + ls2 * mlp_s(norm2(x)), with step-s weights at position s."""

    def __init__(self, cfg: TransformerConfig, num_weights: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.norm1 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, rngs=rngs)
        self.self_attn = StepAttention(cfg.dim, cfg.num_heads, num_weights, init_std=cfg.init_std,
                                       param_dtype=param_dtype, rngs=rngs)
        self.norm2 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, rngs=rngs)
        self.mlp = StepMLP(cfg.dim, cfg.hidden_dim, num_weights, init_std=cfg.init_std,
                           param_dtype=param_dtype, rngs=rngs)
        if cfg.layer_scale is not None:
            self.layer_scale_1 = param(rngs, constant(cfg.layer_scale), (cfg.dim,), ("norm",), param_dtype)
            self.layer_scale_2 = param(rngs, constant(cfg.layer_scale), (cfg.dim,), ("norm",), param_dtype)
        else:
            self.layer_scale_1 = self.layer_scale_2 = None

    def __call__(self, x, positions, widx, cache: KVCache | None = None):
        """x [N, S, dim]; positions [N, S] depth-step indices; widx: weight set per position
        (a slice = all sets in order, an int array [S], or None = the single shared set)."""
        cfg, dt = self.cfg, self.dtype
        h = self.norm1(x).astype(dt)
        w_in, per = _weights_for(self.self_attn.in_proj[...], widx)
        qkv = jnp.einsum("nsd,sdchk->nschk" if per else "nsd,dchk->nschk", h, w_in.astype(dt))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if cfg.positional == "rope":
            q = apply_rope(q, positions, cfg.max_period)
            k = apply_rope(k, positions, cfg.max_period)
        # The reference drops the depformer's context (kwargs_dep["context"] = None): causal only.
        out, new_cache = attend(q, k, v, positions, cache, context=None, causal=cfg.causal)
        w_out, per = _weights_for(self.self_attn.out_proj[...], widx)
        y = jnp.einsum("nshk,shkd->nsd" if per else "nshk,hkd->nsd", out, w_out.astype(dt))
        if self.layer_scale_1 is not None:
            y = y * self.layer_scale_1[...].astype(y.dtype)
        x = x + y.astype(x.dtype)

        h = self.norm2(x).astype(dt)
        w1, per = _weights_for(self.mlp.linear_in[...], widx)
        g = jnp.einsum("nsd,sdgf->nsgf" if per else "nsd,dgf->nsgf", h, w1.astype(dt))
        g = ACTIVATIONS[cfg.activation](g[:, :, 0]) * g[:, :, 1]
        g = constrain(g, ("act_batch", "act_length", "act_mlp"))
        w2, per = _weights_for(self.mlp.linear_out[...], widx)
        y = jnp.einsum("nsf,sfd->nsd" if per else "nsf,fd->nsd", g, w2.astype(dt))
        if self.layer_scale_2 is not None:
            y = y * self.layer_scale_2[...].astype(y.dtype)
        x = x + y.astype(x.dtype)
        return constrain(x, ("act_batch", "act_length", "act_embed")), new_cache


    def step_major(self, x, positions, widx):
        """Training path, same numbers as :meth:`__call__`: x [S, N, dim] (depth step major, so the
        per-step projections are batched matmuls with a leading batch axis, which XLA runs ~1.5x
        faster on CPUs than with the step axis in the middle); positions [N, S]; no cache."""
        cfg, dt = self.cfg, self.dtype
        s, n, d = x.shape
        heads, hd = cfg.num_heads, cfg.dim // cfg.num_heads

        def proj(h, w, per, tail):  # h [S, N, din] -> [S, N, *tail] with w [(S,) din, *tail or prod(tail)]
            if w.ndim == 2 + per:  # flattened (see Depformer._train_step_major): one lane-dense matmul
                y = jnp.einsum("snd,sdf->snf" if per else "snd,df->snf", h, w.astype(dt))
                return y.reshape(y.shape[:2] + tail)
            letters = "abcdefg"[: w.ndim - 1 - per]
            spec = f"snd,{'s' if per else ''}d{letters}->sn{letters}"
            return jnp.einsum(spec, h, w.astype(dt))

        h = self.norm1(x).astype(dt)
        w_in, per = _weights_for(self.self_attn.in_proj[...], widx)
        qkv = proj(h, w_in, per, (3, heads, hd))  # [S, N, 3, H, Dh]
        q, k, v = (jnp.swapaxes(qkv[:, :, i], 0, 1) for i in range(3))  # [N, S, H, Dh]
        if cfg.positional == "rope":
            q = apply_rope(q, positions, cfg.max_period)
            k = apply_rope(k, positions, cfg.max_period)
        out = attention(q, k, v, positions, positions, context=None, causal=cfg.causal)
        out = jnp.swapaxes(out, 0, 1).reshape(s, n, heads * hd)  # heads major: sharding-safe merge
        w_out, per = _weights_for(self.self_attn.out_proj[...], widx)
        w_out = w_out.reshape(w_out.shape[: int(per)] + (heads * hd, d))  # heads major (no-op if flat)
        y = jnp.einsum("snf,sfd->snd" if per else "snf,fd->snd", out, w_out.astype(dt))
        if self.layer_scale_1 is not None:
            y = y * self.layer_scale_1[...].astype(y.dtype)
        x = x + y.astype(x.dtype)

        h = self.norm2(x).astype(dt)
        w1, per = _weights_for(self.mlp.linear_in[...], widx)
        g = proj(h, w1, per, (2, cfg.hidden_dim))  # [S, N, 2, F]
        g = ACTIVATIONS[cfg.activation](g[:, :, 0]) * g[:, :, 1]
        g = constrain(g, (None, "act_batch", "act_mlp"))
        w2, per = _weights_for(self.mlp.linear_out[...], widx)
        y = jnp.einsum("snf,sfd->snd" if per else "snf,fd->snd", g, w2.astype(dt))
        if self.layer_scale_2 is not None:
            y = y * self.layer_scale_2[...].astype(y.dtype)
        x = x + y.astype(x.dtype)
        return constrain(x, (None, "act_batch", "act_embed"))


def _heads_split() -> bool:
    """Whether the current mesh shards the ``heads``/``mlp`` axes (then a weight reshape that
    merges the leading q/k/v or gate/up axis with them would force a reshard: keep them apart)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return False
    from moshax.parallel.sharding import logical_to_spec

    for entry in logical_to_spec(("heads", "mlp"), mesh.axis_names):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        if any(mesh.shape[n] > 1 for n in names):
            return True
    return False


class Depformer(nnx.Module):
    """``cfg.num_layers`` depformer layers (stacked weights ``[layers, depth_steps, ...]``) over
    ``num_steps`` depth steps; ``schedule[s]`` is the weight set of step s (None: set s, or set 0
    when there is a single set)."""

    def __init__(self, cfg: TransformerConfig, num_steps: int, *, weights_per_step: bool = True,
                 schedule: Sequence[int] | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.num_steps = num_steps
        if weights_per_step and schedule is not None:
            self.schedule = tuple(int(i) for i in schedule)
            self.num_weights = max(self.schedule) + 1
        elif weights_per_step:
            self.schedule = None
            self.num_weights = num_steps
        else:
            self.schedule = None
            self.num_weights = 1
        num_weights = self.num_weights

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"})
        def make_layers(rngs):
            return DepformerLayer(cfg, num_weights, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = make_layers(rngs)

    def weight_index(self, steps=None):
        """Weight-set selector for depth ``steps`` (None: all steps 0..num_steps-1 in order)."""
        if self.num_weights == 1:
            return None
        if steps is None:
            if self.schedule is None:
                return slice(None)
            return jnp.asarray(self.schedule, jnp.int32)
        steps = jnp.asarray(steps, jnp.int32)
        if self.schedule is None:
            return steps
        return jnp.asarray(self.schedule, jnp.int32)[steps]

    def init_cache(self, batch: int, dtype=None) -> KVCache:
        """Empty stacked KV buffers [layers, batch, num_steps, heads, head_dim] for step-by-step decoding."""
        cfg = self.cfg
        one = KVCache.empty(batch, self.num_steps, cfg.num_heads, cfg.head_dim, dtype or self.dtype)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.num_layers,) + a.shape), one)

    def __call__(self, x, steps=None, cache: KVCache | None = None, step_major: bool = False):
        """x [N, S, dim]. Training: ``steps=None`` and S == num_steps (all steps at once).
        Decoding: ``steps`` [S] int = the depth steps of the S positions, with a ``cache`` from
        :meth:`init_cache` (or a previous call). Returns (y [N, S, dim], cache or None).
        ``step_major=True`` (training only): x and y are [S, N, dim] (the faster layout)."""
        if step_major:
            if steps is not None or cache is not None:
                raise ValueError("step_major is for training: no steps, no cache")
            return self._train_step_major(x), None
        n, s, _ = x.shape
        if steps is None:
            if s != self.num_steps:
                raise ValueError(f"depformer got {s} steps without `steps`, expected {self.num_steps}")
            pos = jnp.arange(s, dtype=jnp.int32)
        else:
            pos = jnp.asarray(steps, jnp.int32).reshape(s)
        widx = self.weight_index(steps)
        positions = jnp.broadcast_to(pos, (n, s))
        return scan_layers(self.layers, x, cache, self.cfg.remat,
                           lambda layer, h, c: layer(h, positions, widx, c))

    def _train_step_major(self, x):
        s, n, _ = x.shape
        if s != self.num_steps:
            raise ValueError(f"depformer got {s} steps, expected {self.num_steps}")
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (n, s))
        widx = self.weight_index(None)
        graphdef, state = nnx.split(self.layers)
        if not _heads_split():
            # Flatten the fused projections once, outside the scan: [.., D, 3, H, Dh] ->
            # [.., D, 3*H*Dh], [.., D, 2, F] -> [.., D, 2F], [.., H, Dh, D] -> [.., H*Dh, D] (bitcasts).
            # Inside the body the reshaped weights would be scan residuals (a stacked copy) and
            # their gradients would need a second zero-filled buffer.
            pure = nnx.to_pure_dict(state)
            attn, mlp = pure["self_attn"], pure["mlp"]
            attn["in_proj"] = attn["in_proj"].reshape(attn["in_proj"].shape[:3] + (-1,))
            attn["out_proj"] = attn["out_proj"].reshape(attn["out_proj"].shape[:2] + (-1, attn["out_proj"].shape[-1]))
            mlp["linear_in"] = mlp["linear_in"].reshape(mlp["linear_in"].shape[:3] + (-1,))
            nnx.replace_by_pure_dict(state, pure)

        def body(carry, layer_state):
            return nnx.merge(graphdef, layer_state).step_major(carry, positions, widx), None

        policy = self.cfg.remat
        if policy != "none":
            body = jax.checkpoint(body, policy=REMAT[policy], prevent_cse=False)
        x, _ = jax.lax.scan(body, x, state)
        return x
