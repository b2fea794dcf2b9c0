"""Kyutai safetensors <-> moshax model checkpoints, for every model kind with Kyutai interop.

The registry entry of a kind (:mod:`moshax.registry`, ``kyutai``) names a module with
``config_from_kyutai(dict, **overrides)``, ``params_from_kyutai(path, cfg) -> (params, rest)``,
``params_to_kyutai(params, rest, cfg, dtype) -> tensors``, ``write_kyutai(path, tensors)`` and
``WeightsError``; this module does the rest once for all of them.

A Kyutai config is a JSON object in the shape of the reference loader's config dicts: for the
Moshi LM the kwargs of ``moshi.models.loaders.get_moshi_lm`` (``loaders._lm_kwargs``; keys left out
take moshiko's values), for Mimi the ``loaders._mimi_config`` dict (``sample_rate``,
``channels``, ``frame_rate``, ``seanet``, ``transformer``, ``quantizer``; keys left out take the
released Mimi's values). :func:`to_kyutai` writes it as ``X.json`` beside ``X.safetensors`` (the
kind's ``config_to_kyutai``); :func:`from_kyutai` reads an explicit one, else ``X.json`` beside
the weights, else uses the released config (moshiko / Mimi). Kyutai's
released checkpoints are bfloat16; they load into the config's ``param_dtype`` (float32 unless
``param_dtype`` says otherwise).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from moshax import registry
from moshax.checkpoint.model import (
    ModelHandle, build_model_from_checkpoint, check_shapes, open_checkpoint, save_model_checkpoint)
from moshax.config import ConfigError, to_dict
from moshax.interop.kyutai_config import config_beside, read_kyutai_config, resolve_kyutai_config, write_kyutai_config


def interop_for(kind_name: str):
    """(registry entry, interop module) of a kind; one line when the kind has no Kyutai form."""
    kind = registry.get(kind_name, where="--model")
    if kind.kyutai is None:
        names = ", ".join(k.name for k in registry.KINDS.values() if k.kyutai)
        raise ConfigError(f"--model {kind_name}: Kyutai publishes no {kind.name} weights (convertible: {names})")
    return kind, kind.load("kyutai")


def from_kyutai(model: str, weights: str | Path, output: str | Path, kyutai_config: dict | str | Path | None = None,
                param_dtype: str | None = None) -> dict:
    """Convert a Kyutai safetensors file into a moshax model checkpoint; returns a summary.

    ``kyutai_config``: a config dict or JSON path; None reads ``X.json`` beside ``X.safetensors``
    when it is there (what :func:`to_kyutai` writes), else the released architecture."""
    kind, interop = interop_for(model)
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"weights not found: {weights}")
    overrides = {"param_dtype": param_dtype} if param_dtype else {}
    kyutai_config, config_source = resolve_kyutai_config(weights, kyutai_config)
    try:
        cfg = interop.config_from_kyutai(kyutai_config or {}, **overrides)
    except ConfigError as e:
        raise ConfigError(f"{config_source}: {e}") from None
    cfg.validate("model")
    try:
        params, rest = interop.params_from_kyutai(weights, cfg)
    except interop.WeightsError as e:
        raise ConfigError(f"{weights}: {str(e).splitlines()[0]}") from None
    wanted = jax.tree.map(lambda s: tuple(s.shape),
                          ModelHandle.from_constructor(lambda r: registry.build_model(cfg, r)).shapes())
    check_shapes(jax.tree.map(lambda a: tuple(a.shape), params), wanted, str(weights))
    out = save_model_checkpoint(output, params, rest, config=to_dict(cfg), kind=kind.name, source=str(weights))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    dtypes = sorted({str(a.dtype) for a in jax.tree.leaves(params)})
    return {"output": str(out), "params": n, "dtype": ",".join(dtypes), "kind": kind.name, "config": config_source}


def to_kyutai(model: str, checkpoint: str | Path, output: str | Path, dtype: str | None = None) -> dict:
    """Write a moshax model (or trainer) checkpoint as a Kyutai (released-layout) safetensors file,
    and its Kyutai config as ``X.json`` beside ``X.safetensors``."""
    kind, interop = interop_for(model)
    ckpt = open_checkpoint(checkpoint)
    if ckpt.model_kind != kind.name:
        raise ConfigError(f"{ckpt.step_dir} holds a {ckpt.model_kind} model, not --model {model}")
    cfg = ckpt.model_config()
    kyutai_config = interop.config_to_kyutai(cfg)  # before writing anything: a config Kyutai lacks fails here
    out = Path(output)
    if out.suffix == ".json":
        raise ConfigError(f"--output {out}: expected a .safetensors file (its Kyutai config goes beside it as .json)")
    handle = ModelHandle.from_constructor(lambda r: registry.build_model(cfg, r))
    shapes = handle.shapes()
    check_shapes(ckpt.param_shapes(), jax.tree.map(lambda s: tuple(s.shape), shapes), str(ckpt.step_dir))
    rest_shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), _pure(handle.abstract_rest))
    params, rest = ckpt.restore(shapes, rest_shapes)
    tensors = interop.params_to_kyutai(jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, rest), cfg, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    interop.write_kyutai(out, tensors)
    config_path = write_kyutai_config(config_beside(out), kyutai_config)
    n = sum(int(np.prod(v.shape)) for v in tensors.values())
    return {"output": str(out), "config": str(config_path), "tensors": len(tensors), "values": n,
            "dtype": ",".join(sorted({str(v.dtype) for v in tensors.values()}))}


def _pure(state) -> dict:
    from flax import nnx

    return nnx.to_pure_dict(state)


__all__ = ["build_model_from_checkpoint", "config_beside", "from_kyutai", "interop_for", "read_kyutai_config",
           "resolve_kyutai_config", "to_kyutai"]
