"""From an NNX model constructor to pure pytrees of params, logical axes and shardings.

The trainer keeps params as plain nested dicts of arrays (easy to jit, shard and checkpoint);
:class:`ModelHandle` rebuilds the module from them inside a traced function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moshax.parallel.sharding import named_sharding


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


@dataclass
class ModelHandle:
    """Graph definition + abstract state of a model; turns pure param dicts back into modules."""

    graphdef: Any
    abstract_params: Any  # nnx.State of abstract Params (carries `axes` metadata)
    abstract_rest: Any  # nnx.State of the other variables (e.g. EMA buffers); empty for LMs

    @classmethod
    def from_constructor(cls, build: Callable[[nnx.Rngs], nnx.Module]) -> "ModelHandle":
        model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(graphdef, params, rest)

    def merge(self, params: dict, rest: dict | None = None) -> nnx.Module:
        p = jax.tree.map(lambda v: v, self.abstract_params, is_leaf=_is_var)
        nnx.replace_by_pure_dict(p, params)
        r = jax.tree.map(lambda v: v, self.abstract_rest, is_leaf=_is_var)
        if rest:
            nnx.replace_by_pure_dict(r, rest)
        return nnx.merge(self.graphdef, p, r)

    def axes(self) -> dict:
        """Pure dict: path -> tuple of logical axis names."""
        return nnx.to_pure_dict(self.abstract_params, lambda v: tuple(v.get_metadata().get("axes") or ((None,) * v.ndim)))

    def shapes(self) -> dict:
        return nnx.to_pure_dict(self.abstract_params, lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype))

    def shardings(self, mesh: Mesh) -> dict:
        axes, shapes = self.axes(), self.shapes()
        return jax.tree.map(lambda a, s: named_sharding(mesh, a, s.shape), axes, shapes,
                            is_leaf=lambda x: isinstance(x, tuple))

    def init(self, build: Callable[[nnx.Rngs], nnx.Module], seed: int, mesh: Mesh | None = None) -> tuple[dict, dict]:
        """Materialize (params, rest) directly with their shardings (no host-side full copy)."""

        def create():
            model = build(nnx.Rngs(seed))
            _, params, rest = nnx.split(model, nnx.Param, ...)
            return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

        if mesh is None:
            return jax.jit(create)()
        out_shardings = (self.shardings(mesh), jax.tree.map(lambda _: replicated(mesh), nnx.to_pure_dict(self.abstract_rest)))
        with jax.set_mesh(mesh):
            return jax.jit(create, out_shardings=out_shardings)()

    def num_params(self) -> int:
        return sum(int(v.size) for v in jax.tree.leaves(self.shapes()))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
