"""One entry per model kind: what ``train``, ``convert``, ``eval``, ``compile`` and ``generate``
look up instead of wiring each kind by hand.

An entry names its parts as ``"module:attribute"`` strings, imported on first use: loading a
config needs only the config classes (no JAX import), and this module sits below everything it
names (``models``, ``training``, ``interop``), so the one-way import order holds.

* ``config`` / ``task_config`` / ``data_config``: the typed dataclasses of the ``model:``,
  ``task:`` and ``data:`` sections;
* ``model``: the Flax NNX module class, built as ``Model(model_cfg, rngs=...)``;
* ``task``: the training task (:class:`moshax.training.task.Task`);
* ``kyutai``: the interop module (``config_from_kyutai``, ``config_to_kyutai``,
  ``params_from_kyutai``, ``params_to_kyutai``), or None when Kyutai ships no such model;
* ``decode_step``: a function compiling one streaming step (``moshax compile --step decode``),
  or None while the kind has none.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


class UnknownKind(ValueError):
    """A model kind nobody registered (a user mistake: one line, exit 2)."""


@dataclass(frozen=True)
class ModelKind:
    name: str
    description: str
    config: str
    task_config: str
    data_config: str
    model: str
    task: str
    kyutai: str | None = None
    decode_step: str | None = None
    aliases: tuple[str, ...] = ()

    def load(self, part: str) -> Any:
        """Import and return the named part (``"config"``, ``"model"``, ``"task"``, ...)."""
        target = getattr(self, part)
        if target is None:
            raise UnknownKind(f"model kind {self.name!r} has no {part.replace('_', ' ')}")
        module, _, attr = target.partition(":")
        mod = importlib.import_module(module)
        return getattr(mod, attr) if attr else mod


KINDS: dict[str, ModelKind] = {
    k.name: k
    for k in (
        ModelKind(
            name="helium",
            description="Helium decoder-only text LM",
            config="moshax.config:HeliumConfig",
            task_config="moshax.config:LMTaskConfig",
            data_config="data_pipeline.configs:TextDataConfig",
            model="moshax.models.helium:Helium",
            task="moshax.training.lm_task:LMTask",
            decode_step="moshax.training.aot:helium_decode_step",
        ),
        ModelKind(
            name="moshi",
            description="Moshi RQ-Transformer (temporal + depth transformer over 17 streams)",
            config="moshax.models.moshi_config:MoshiLMConfig",
            task_config="moshax.models.moshi_config:MoshiTaskConfig",
            data_config="data_pipeline.configs:MultistreamDataConfig",
            model="moshax.models.moshi_lm:MoshiLM",
            task="moshax.training.moshi_task:MoshiTask",
            kyutai="moshax.interop.lm_weights",
            decode_step="moshax.training.aot:moshi_decode_step",
            aliases=("lm",),
        ),
        ModelKind(
            name="mimi",
            description="Mimi neural audio codec",
            config="moshax.models.mimi.config:MimiConfig",
            task_config="moshax.models.mimi.config:MimiTaskConfig",
            data_config="data_pipeline.configs:AudioDataConfig",
            model="moshax.models.mimi.model:Mimi",
            task="moshax.training.mimi_task:MimiTask",
            kyutai="moshax.interop.mimi_weights",
            decode_step="moshax.training.aot:mimi_decode_step",
        ),
    )
}


def names() -> list[str]:
    return list(KINDS)


def get(name: str, where: str = "model.kind") -> ModelKind:
    """The entry for ``name`` (or one of its aliases); an unknown kind is one clear line."""
    if name in KINDS:
        return KINDS[name]
    for kind in KINDS.values():
        if name in kind.aliases:
            return kind
    raise UnknownKind(f"{where}={name!r}: unknown model kind (known: {', '.join(KINDS)})")


def build_model(model_cfg, rngs):
    """The model a config describes: ``Model(model_cfg, rngs=rngs)`` for its kind."""
    return get(model_cfg.kind).load("model")(model_cfg, rngs=rngs)
