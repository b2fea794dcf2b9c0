"""One table maps logical axis names (on params and activations) to mesh axes.

Parallelism is data: changing ``RULES`` (or the mesh sizes) changes how every model is sharded,
with no code forks. Params carry their logical names in the ``axes`` metadata of each
``nnx.Param``; activations are pinned with :func:`constrain`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

# logical name -> mesh axis (or axes). Names not listed are replicated.
RULES: tuple[tuple[str, MeshAxes], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("kv", None),
    ("norm", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

_rules_var: contextvars.ContextVar = contextvars.ContextVar("moshax_rules", default=RULES)


@contextlib.contextmanager
def use_rules(rules: Iterable[tuple[str, MeshAxes]]):
    """Temporarily replace the logical-axis rules (e.g. pure data parallel for a benchmark)."""
    token = _rules_var.set(tuple(rules))
    try:
        yield
    finally:
        _rules_var.reset(token)


def current_rules() -> tuple[tuple[str, MeshAxes], ...]:
    return _rules_var.get()


def logical_to_spec(axes: Sequence[str | None] | None, mesh_axis_names: Sequence[str] | None = None) -> PartitionSpec:
    """PartitionSpec for a tuple of logical names; a mesh axis is used at most once per array,
    and mesh axes absent from the mesh (or of size 1 there) are dropped."""
    if axes is None:
        return PartitionSpec()
    table = dict(current_rules())
    used: set[str] = set()
    spec = []
    for name in axes:
        target = table.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        keep = tuple(t for t in targets if t not in used and (mesh_axis_names is None or t in mesh_axis_names))
        used.update(keep)
        spec.append(keep[0] if len(keep) == 1 else (keep or None))
    return PartitionSpec(*spec)


def _drop_indivisible(spec: PartitionSpec, mesh_shape, shape: Sequence[int]) -> PartitionSpec:
    """Replicate the dimensions whose size the mesh axes assigned to them do not divide."""
    out = list(spec)
    for i, entry in enumerate(out):
        if entry is None:
            continue
        names = (entry,) if isinstance(entry, str) else entry
        size = 1
        for n in names:
            size *= mesh_shape[n]
        if shape[i] % size:
            out[i] = None
    return PartitionSpec(*out)


def named_sharding(mesh: jax.sharding.Mesh, axes: Sequence[str | None] | None, shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding for logical ``axes``; axes whose dimension does not divide are replicated."""
    spec = logical_to_spec(axes, mesh.axis_names)
    if shape is not None:
        spec = _drop_indivisible(spec, mesh.shape, shape)
    return NamedSharding(mesh, spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = _drop_indivisible(logical_to_spec(axes, mesh.axis_names), mesh.shape, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)
