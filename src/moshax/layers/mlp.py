"""Feed-forward blocks: gated (fused ``linear_in`` whose halves are gate/up) or plain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moshax.layers.linear import STEP_AXIS, Selector, project, shared
from moshax.layers.params import normal, param
from moshax.parallel.sharding import constrain

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class MLP(nnx.Module):
    """Gated: out(act(x W_gate) * (x W_up)); plain: out(act(x W_in)). No biases. With
    ``num_weights`` the weights get a leading ``depth_steps`` axis of that size, and each call picks
    them through its ``select`` (see :mod:`moshax.layers.linear`)."""

    def __init__(self, dim: int, hidden: int, *, gated: bool, activation: str, init_std: float,
                 num_weights: int | None = None, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.gated = gated
        self.activation = activation
        self.hidden = hidden
        self.dtype = dtype
        steps = () if num_weights is None else (num_weights,)
        step_axis = () if num_weights is None else (STEP_AXIS,)
        if gated:
            self.linear_in = param(rngs, normal(init_std), steps + (dim, 2, hidden),
                                   step_axis + ("embed", None, "mlp"), param_dtype)
        else:
            self.linear_in = param(rngs, normal(init_std), steps + (dim, hidden), step_axis + ("embed", "mlp"),
                                   param_dtype)
        self.linear_out = param(rngs, normal(init_std), steps + (hidden, dim), step_axis + ("mlp", "embed"),
                                param_dtype)

    def __call__(self, x, *, select: Selector = shared, position_major: bool = False):
        """x [B, T, dim] ([T, B, dim] when ``position_major``) -> the same layout. A gated
        ``linear_in`` may come flattened to [.., dim, 2*hidden] (one matmul)."""
        act, dt = ACTIVATIONS[self.activation], self.dtype
        x = x.astype(dt)
        w, per = select(self.linear_in[...])
        h = project(x, w.astype(dt), 1, per_position=per, position_major=position_major)
        if self.gated:
            h = h.reshape(h.shape[:2] + (2, self.hidden))  # a no-op unless flattened
            h = act(h[:, :, 0]) * h[:, :, 1]
        else:
            h = act(h)
        h = constrain(h, ("act_length", "act_batch", "act_mlp") if position_major else
                      ("act_batch", "act_length", "act_mlp"))
        w, per = select(self.linear_out[...])
        return project(h, w.astype(dt), 1, per_position=per, position_major=position_major)
