"""Parameter creation with logical axis names, and dtype helpers."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str | jnp.dtype) -> jnp.dtype:
    return DTYPES[name] if isinstance(name, str) else name


def param(
    rngs: nnx.Rngs,
    init: Callable,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """An ``nnx.Param`` with its logical axis names in the ``axes`` metadata (see parallel.sharding)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


def normal(std: float) -> Callable:
    def init(key, shape, dtype):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def constant(value: float) -> Callable:
    def init(key, shape, dtype):
        del key
        return jnp.full(shape, value, dtype)

    return init
