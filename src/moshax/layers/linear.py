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
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from moshax.kernels.attention import target_platform

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
    first ``n_in`` of ``w`` [*in, *out] ([T, *in, *out] per position) -> [B, T, *out] ([T, B, *out]).

    Traced for a CPU, a shared weight's gradient goes through :func:`_project_cpu` (same values)."""
    if not per_position and target_platform() == "cpu":
        return _project_cpu(x, w, n_in)  # with a shared weight both layouts are the same contraction
    return _einsum(x, w, n_in, per_position, position_major)


def _einsum(x, w, n_in: int, per_position: bool = False, position_major: bool = False):
    lead = "tb" if position_major else "bt"
    cin = "ijkl"[:n_in]
    cout = "uvwxyz"[: w.ndim - per_position - n_in]
    return jnp.einsum(f"{lead}{cin},{'t' if per_position else ''}{cin}{cout}->{lead}{cout}", x, w)


# Products with this many rows (batch x positions) run as one matrix-vector product per row on a
# CPU: streaming Mimi at batch 1 (two 25 Hz positions a frame) and a batch-2 LM step. XLA:CPU's
# GEMV reads a weight at ~23-25 GB/s here, its 2-row GEMM (YNNPACK) at 9-12; with one GEMV per
# row the second read of the weight comes mostly from the cache: 13-16 GB/s of weight for the
# Mimi transformer's shapes (docs/performance.md). Three rows or more: the GEMM is as fast.
GEMV_ROWS = 2


def matmul(x, w):
    """x [M, K] @ w [K, N]; traced for a CPU with M == :data:`GEMV_ROWS`, one GEMV per row."""
    if x.shape[0] != GEMV_ROWS or target_platform() != "cpu":
        return x @ w
    return jnp.concatenate([x[i:i + 1] @ w for i in range(GEMV_ROWS)])


def _einsum_cpu(x, w, n_in: int):
    """The shared-weight einsum, through :func:`matmul` when x has :data:`GEMV_ROWS` rows."""
    lead = x.shape[: x.ndim - n_in]
    if math.prod(lead) != GEMV_ROWS:
        return _einsum(x, w, n_in)
    k = math.prod(x.shape[x.ndim - n_in:])
    return matmul(x.reshape(-1, k), w.reshape(k, -1)).reshape(lead + w.shape[n_in:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project_cpu(x, w, n_in: int):
    """``project`` with a shared weight, whose weight gradient is ``x^T @ g`` over a materialized
    ``x^T``. XLA:CPU's layout assignment otherwise transposes the output gradient ``g`` for that
    dot, fused into g's producer (the GELU backward, the attention's) as a loop that writes at a
    stride of T floats: ~5 ms per [200, 2048] MLP gradient. Mimi's transformer fwd+bwd (8 layers,
    4 x 50 tokens): -15 to -19% (docs/performance.md). The optimization barrier keeps XLA from
    folding the transpose back into the dot. Forward: :func:`_einsum_cpu`; input gradient: the
    plain einsum's."""
    return _einsum_cpu(x, w, n_in)


def _project_cpu_fwd(x, w, n_in):
    return _einsum_cpu(x, w, n_in), (x, w)


def _project_cpu_bwd(n_in, res, g):
    x, w = res
    n_out = w.ndim - n_in
    dx = jnp.tensordot(g, w, axes=(tuple(range(2, 2 + n_out)), tuple(range(n_in, w.ndim))))
    x2 = x.reshape(-1, math.prod(x.shape[2:]))
    xt = jax.lax.optimization_barrier(x2.T)
    dw = xt @ g.reshape(x2.shape[0], -1)
    return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_project_cpu.defvjp(_project_cpu_fwd, _project_cpu_bwd)
