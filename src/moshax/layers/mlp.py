"""Feed-forward blocks: gated (fused ``linear_in`` whose halves are gate/up) or plain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moshax.layers.params import normal, param
from moshax.parallel.sharding import constrain

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class MLP(nnx.Module):
    """Gated: out(act(x W_gate) * (x W_up)); plain: out(act(x W_in)). No biases."""

    def __init__(self, dim: int, hidden: int, *, gated: bool, activation: str, init_std: float,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.gated = gated
        self.activation = activation
        self.dtype = dtype
        if gated:
            self.linear_in = param(rngs, normal(init_std), (dim, 2, hidden), ("embed", None, "mlp"), param_dtype)
        else:
            self.linear_in = param(rngs, normal(init_std), (dim, hidden), ("embed", "mlp"), param_dtype)
        self.linear_out = param(rngs, normal(init_std), (hidden, dim), ("mlp", "embed"), param_dtype)

    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        x = x.astype(self.dtype)
        w_in = self.linear_in[...].astype(self.dtype)
        if self.gated:
            h = jnp.einsum("btd,dgf->btgf", x, w_in)
            h = act(h[:, :, 0]) * h[:, :, 1]
        else:
            h = act(jnp.einsum("btd,df->btf", x, w_in))
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return jnp.einsum("btf,fd->btd", h, self.linear_out[...].astype(self.dtype))
