"""Jitted functions of a model whose weights are bound once, for many small calls (streaming).

``nnx.jit(fn)(model, x)`` re-walks the module graph on every call, and ``jax.jit`` over an
``nnx.State`` flattens every Variable in Python: for Mimi's 88 weights either costs milliseconds
per call, as much as a streamed frame's compute. :class:`BoundModel` flattens the weights once into a
list of arrays (flattened in C++ per call) and, by default, switches the model's transformers to
the unstacked inference layout (see :mod:`moshax.layers.transformer`) and calls the
``inference_layout()`` of every module that has one (Mimi's quantizer: centroids computed once).
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from moshax.layers.transformer import unstack_for_inference


class BoundModel:
    """``model``'s weights as a flat list of arrays, and ``jit(fn)`` taking them implicitly.

    The model passed in is not modified: a shallow copy (same arrays) gets the inference layout.
    ``self.model`` is that copy: make streaming states with it (``init_state``), as their caches
    follow its layout."""

    def __init__(self, model: nnx.Module, *, unstack: bool = True):
        model = nnx.merge(*nnx.split(model))
        if unstack:
            unstack_for_inference(model)
            for _, module in list(nnx.iter_graph(model)):  # e.g. Mimi's codebooks: centroids computed once
                if isinstance(module, nnx.Module) and hasattr(module, "inference_layout"):
                    module.inference_layout()
        self.model = model
        self._graphdef, state = nnx.split(model)
        self._leaves, self._treedef = jax.tree.flatten(state)

    def place(self, sharding) -> None:
        """Put the weights on ``sharding``'s devices (e.g. replicated over a host's local
        accelerators); call before :meth:`jit`."""
        self._leaves = [jax.device_put(x, sharding) for x in self._leaves]

    def _merge(self, leaves):
        return nnx.merge(self._graphdef, jax.tree.unflatten(self._treedef, leaves))

    def jit(self, fn: Callable, *, donate_argnums: tuple[int, ...] = ()) -> Callable:
        """``fn(model, *args)`` jitted; call the result as ``f(*args)``. ``donate_argnums``
        index ``args`` (e.g. a streaming state updated in place)."""
        jitted = jax.jit(lambda leaves, *args: fn(self._merge(leaves), *args),
                         donate_argnums=tuple(i + 1 for i in donate_argnums))
        leaves = self._leaves
        return lambda *args: jitted(leaves, *args)
