"""model.kind -> training task (imported on first use).

A task gives the generic trainer: ``build_model(rngs)``, ``loss(model, batch, rng) -> (sum, weight,
aux)`` (aux: name -> (sum, weight); in-place updates of non-Param variables are kept),
``example_spec()``, ``batch_axes()``, ``data_iterator(split, ...)``, ``check_inputs()``,
``flops_per_example(...)``, ``tokens_per_example()``, ``embedding_params()``, and optionally
``init_params(params, rest, trainer)`` (warm starts).
"""

from __future__ import annotations

import importlib

from moshax.config import ConfigError

TASKS = {
    "helium": "moshax.training.lm_task:LMTask",
    "moshi": "moshax.training.moshi_task:MoshiTask",
    "mimi": "moshax.training.mimi_task:MimiTask",
}


def make_task(cfg):
    kind = cfg.model.kind
    target = TASKS.get(kind)
    if target is None:
        raise ConfigError(f"model.kind={kind!r} has no training task (known: {', '.join(TASKS)})")
    module, name = target.split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise ConfigError(f"model.kind={kind!r}: training is not available yet ({module} missing)") from None
        raise
    return cls(cfg)
