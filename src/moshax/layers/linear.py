"""Projections of the transformer block, in two layouts, with plain or per-position weights.

One block serves every transformer (see :mod:`moshax.layers.transformer`), including Moshi's depth
transformer, whose every depth step has its own weights: its projections are stacked on a leading
``depth_steps`` axis ``[W, *in, *out]`` and a weight selector (:class:`StepWeights`) hands the
block the weights of the positions at hand, ``[*in, *out]`` shared by all positions or ``[T, *in,
*out]`` one set per position (a batched matmul). Per-step weights are data, not code paths.

Layouts: activations are ``[B, T, ...]`` (batch major), or ``[T, B, ...]`` (position major): with
per-position weights the position axis then leads both operands, which XLA:CPU runs ~1.5x faster
than with it in the middle (the depth transformer's training path).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

STEP_AXIS = "depth_steps"  # logical name of the leading per-step axis of stacked weights

# w -> (the weight for the current positions, whether it has a leading per-position axis)
Selector = Callable[[jax.Array], "tuple[jax.Array, bool]"]


def shared(w) -> tuple[jax.Array, bool]:
    """The plain selector: one weight for every position."""
    return w, False


@dataclasses.dataclass(frozen=True)
class StepWeights:
    """Selector for weights stacked over ``depth_steps`` [W, ...]: ``index`` None = the single
    set (W == 1); ``slice(None)`` = set t at position t (all W == T of them); an int array [T] = set index[t]."""

    index: Any = None

    def __call__(self, w) -> tuple[jax.Array, bool]:
        if self.index is None:
            return w[0], False
        if isinstance(self.index, slice):
            return w, True
        return jnp.take(w, self.index, axis=0), True


def project(x, w, n_in: int, *, per_position: bool = False, position_major: bool = False):
    """Contract the last ``n_in`` axes of ``x`` [B, T, *in] ([T, B, *in] position major) with the
    first ``n_in`` of ``w`` [*in, *out] ([T, *in, *out] per position) -> [B, T, *out] ([T, B, *out])."""
    lead = "tb" if position_major else "bt"
    cin = "ijkl"[:n_in]
    cout = "uvwxyz"[: w.ndim - per_position - n_in]
    return jnp.einsum(f"{lead}{cin},{'t' if per_position else ''}{cin}{cout}->{lead}{cout}", x, w)
