"""Kyutai safetensors <-> moshax model checkpoints, for every model kind with Kyutai interop.

The registry entry of a kind (:mod:`moshax.registry`, ``kyutai``) names a module with
``config_from_kyutai(dict, **overrides)``, ``params_from_kyutai(path, cfg) -> (params, rest)``,
``params_to_kyutai(params, rest, cfg, dtype) -> tensors``, ``write_kyutai(path, tensors)`` and
``WeightsError``; this module does the rest once for all of them.

A Kyutai config is a JSON object in the shape of the reference loader's config dicts: for the
Moshi LM the kwargs of ``moshi.models.loaders.get_moshi_lm`` (``loaders._lm_kwargs``; keys left out
take moshiko's values), for Mimi the ``loaders._mimi_config`` dict (``sample_rate``,
``channels``, ``frame_rate``, ``seanet``, ``transformer``, ``quantizer``; keys left out take the
released Mimi's values). Without one the released config (moshiko / Mimi) is used. Kyutai's
released checkpoints are bfloat16; they load into the config's ``param_dtype`` (float32 unless
``param_dtype`` says otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from moshax import registry
from moshax.checkpoint.model import (
    ModelHandle, build_model_from_checkpoint, check_shapes, open_checkpoint, save_model_checkpoint)
from moshax.config import ConfigError, to_dict


def interop_for(kind_name: str):
    """(registry entry, interop module) of a kind; one line when the kind has no Kyutai form."""
    kind = registry.get(kind_name, where="--model")
    if kind.kyutai is None:
        names = ", ".join(k.name for k in registry.KINDS.values() if k.kyutai)
        raise ConfigError(f"--model {kind_name}: Kyutai publishes no {kind.name} weights (convertible: {names})")
    return kind, kind.load("kyutai")


def read_kyutai_config(path: str | Path | None) -> dict | None:
    """A Kyutai config JSON (a release's ``config.json`` with an ``lm`` section works too)."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--kyutai-config not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    if "lm" in data and isinstance(data["lm"], dict) and "dim" not in data:  # a release's config.json
        data = data["lm"]
    return data


def from_kyutai(model: str, weights: str | Path, output: str | Path, kyutai_config: dict | None = None,
                param_dtype: str | None = None) -> dict:
    """Convert a Kyutai safetensors file into a moshax model checkpoint; returns a summary."""
    kind, interop = interop_for(model)
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"weights not found: {weights}")
    overrides = {"param_dtype": param_dtype} if param_dtype else {}
    cfg = interop.config_from_kyutai(kyutai_config or {}, **overrides)
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
    return {"output": str(out), "params": n, "dtype": ",".join(dtypes), "kind": kind.name}


def to_kyutai(model: str, checkpoint: str | Path, output: str | Path, dtype: str | None = None) -> dict:
    """Write a moshax model (or trainer) checkpoint as a Kyutai (released-layout) safetensors file."""
    kind, interop = interop_for(model)
    ckpt = open_checkpoint(checkpoint)
    if ckpt.model_kind != kind.name:
        raise ConfigError(f"{ckpt.step_dir} holds a {ckpt.model_kind} model, not --model {model}")
    cfg = ckpt.model_config()
    handle = ModelHandle.from_constructor(lambda r: registry.build_model(cfg, r))
    shapes = handle.shapes()
    check_shapes(ckpt.param_shapes(), jax.tree.map(lambda s: tuple(s.shape), shapes), str(ckpt.step_dir))
    rest_shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), _pure(handle.abstract_rest))
    params, rest = ckpt.restore(shapes, rest_shapes)
    tensors = interop.params_to_kyutai(jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, rest), cfg, dtype)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    interop.write_kyutai(out, tensors)
    n = sum(int(np.prod(v.shape)) for v in tensors.values())
    return {"output": str(out), "tensors": len(tensors), "values": n,
            "dtype": ",".join(sorted({str(v.dtype) for v in tensors.values()}))}


def _pure(state) -> dict:
    from flax import nnx

    return nnx.to_pure_dict(state)


__all__ = ["build_model_from_checkpoint", "from_kyutai", "interop_for", "read_kyutai_config", "to_kyutai"]
