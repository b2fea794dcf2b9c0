"""``moshax convert``: Kyutai safetensors <-> moshax model checkpoints, for the Moshi LM and Mimi.

    moshax convert from-kyutai --model lm   WEIGHTS.safetensors --output CKPT_DIR [--kyutai-config CONFIG.json]
    moshax convert from-kyutai --model mimi WEIGHTS.safetensors --output CKPT_DIR [--kyutai-config CONFIG.json]
    moshax convert to-kyutai   --model lm|mimi --checkpoint CKPT_DIR --output WEIGHTS.safetensors [--dtype bfloat16]

``--kyutai-config`` is a JSON object in the shape of the reference loader's config dicts: for
``lm`` the kwargs of ``moshi.models.loaders.get_moshi_lm`` (``loaders._lm_kwargs``; keys left out
take moshiko's values), for ``mimi`` the ``loaders._mimi_config`` dict (``sample_rate``,
``channels``, ``frame_rate``, ``seanet``, ``transformer``, ``quantizer``; keys left out take the
released Mimi's values). Without it the released config (moshiko / Mimi) is used. Kyutai's
released checkpoints are bfloat16; they load into the config's ``param_dtype`` (float32 unless
``--param-dtype`` says otherwise).

Model checkpoint layout (``CKPT_DIR``)
--------------------------------------
An Orbax ``CheckpointManager`` directory, written with
:class:`moshax.training.checkpointing.Checkpointer` (so the same code reads it and a trainer's
``checkpoints/`` directory)::

    CKPT_DIR/
      0/                        one step (0 for a conversion)
        state/                  item "state" (Orbax StandardSave): {"params": ..., "rest": ...}
        meta/                   item "meta" (JSON)

* ``state["params"]`` is the model's pure param dict (``nnx.to_pure_dict(nnx.state(model,
  nnx.Param))``, the tree the trainer keeps) and ``state["rest"]`` the other variables (Mimi's
  codebook EMA buffers; ``{}`` for the LM).
* ``meta = {"format": "moshax-model/1", "kind": "lm" | "mimi", "config": <model config dict,
  e.g. to_dict(MoshiLMConfig)>, "source": <the converted file>, "process_count": 1}``.

A trainer checkpoint (``WORKDIR/checkpoints/<step>/``) has the same ``state``/``meta`` items
(its ``state`` also holds ``step``, ``opt_state`` and ``rng``; its ``meta["config"]`` is the
whole run config, the model under ``"model"``). :func:`open_checkpoint` reads either kind from
a workdir, a ``checkpoints/`` dir, a converted dir or a step dir, restoring only params (and
rest) onto any sharding. ``moshax train`` warm-starts from one with ``model.init_from``; ``moshax
eval`` and ``moshax mimi`` read them with ``--checkpoint``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "moshax-model/1"
KINDS = {"lm": "moshi", "mimi": "mimi"}  # --model -> model config kind


def _config_error(msg: str):
    from moshax.config import ConfigError

    return ConfigError(msg)


# ---------------------------------------------------------------------------------------------
# Model checkpoints: write / open / restore
# ---------------------------------------------------------------------------------------------


def save_model_checkpoint(directory: str | Path, params: dict, rest: dict | None, *, config: dict, kind: str,
                          source: str = "", step: int = 0) -> Path:
    """Write ``{"params", "rest"}`` + meta as a moshax model checkpoint (see the module docstring)."""
    from moshax.training.checkpointing import Checkpointer

    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise _config_error(f"--output {directory} exists and is not empty; choose a new directory")
    ckpt = Checkpointer(directory, max_to_keep=1, async_save=False)
    meta = {"format": FORMAT, "kind": kind, "config": config, "source": str(source)}
    ckpt.save(step, {"params": params, "rest": rest or {}}, None, meta)
    ckpt.close()
    return directory


@dataclass
class ModelCheckpoint:
    """One readable step of a moshax model or trainer checkpoint."""

    directory: Path  # the Orbax manager directory
    step: int
    meta: dict

    @property
    def step_dir(self) -> Path:
        return self.directory / str(self.step)

    @property
    def model_config_dict(self) -> dict:
        cfg = self.meta.get("config") or {}
        return cfg["model"] if "model" in cfg and isinstance(cfg["model"], dict) else cfg

    @property
    def model_kind(self) -> str:
        """``helium`` | ``moshi`` | ``mimi`` (the model config's kind)."""
        return self.model_config_dict.get("kind", "helium")

    def model_config(self):
        from moshax.config import from_dict

        return from_dict({"model": copy.deepcopy(self.model_config_dict)}).model

    def _state_tree(self):
        import orbax.checkpoint as ocp

        with _quiet_orbax():
            md = ocp.PyTreeCheckpointer().metadata(self.step_dir / "state")
        tree = getattr(md, "item_metadata", md)
        return getattr(tree, "tree", tree)

    def param_shapes(self) -> dict:
        """Pure dict path -> shape tuple of the stored params."""
        import jax

        tree = self._state_tree()
        return jax.tree.map(lambda m: tuple(m.shape), dict(tree["params"]),
                            is_leaf=lambda m: hasattr(m, "shape") and not isinstance(m, dict))

    def restore(self, params_target: dict, rest_target: dict | None = None) -> tuple[dict, dict]:
        """Restore params (and rest) only, onto the targets' shapes, dtypes and shardings
        (``jax.ShapeDtypeStruct`` leaves; without a sharding the leaf comes back as numpy)."""
        import orbax.checkpoint as ocp

        target = {"params": params_target}
        if rest_target:
            target["rest"] = rest_target
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
        with _quiet_orbax():
            out = ocp.PyTreeCheckpointer().restore(self.step_dir / "state", args=args)
        return out["params"], out.get("rest", {}) if rest_target else {}


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax looks for the step metadata inside the item dir it is given (it lives one level up,
    in the step dir) and logs a warning that means nothing here: hide absl warnings meanwhile."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def open_checkpoint(path: str | Path) -> ModelCheckpoint:
    """The newest step of a moshax checkpoint: a converted dir, a trainer workdir, its
    ``checkpoints/`` dir, or one step dir."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.name.isdigit() and (path / "state").is_dir():
        directory, step = path.parent, int(path.name)
    else:
        directory = path / "checkpoints" if _steps(path / "checkpoints") else path
        steps = _steps(directory)
        if not steps:
            raise _config_error(f"{path}: no moshax checkpoint there (expected step dirs like 0/ or "
                                "checkpoints/<step>/ with state/ and meta/)")
        step = steps[-1]
    meta_dir = directory / str(step) / "meta"
    if not meta_dir.is_dir():
        raise _config_error(f"{directory / str(step)}: no meta item (not a moshax checkpoint)")
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir)
    return ModelCheckpoint(directory, step, meta)


def build_model_from_checkpoint(ckpt: ModelCheckpoint, model_cfg=None, mesh=None):
    """Build the checkpoint's model (config from its meta unless ``model_cfg``) with the stored
    params and rest; sharded on ``mesh`` when given. Returns (model, config)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from moshax.parallel.partition import ModelHandle

    cfg = model_cfg if model_cfg is not None else ckpt.model_config()
    build = _model_builder(cfg)
    handle = ModelHandle.from_constructor(build)
    shapes = handle.shapes()
    rest_shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                               _pure(handle.abstract_rest))
    if mesh is not None:
        shardings = handle.shardings(mesh)
        shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
        rep = NamedSharding(mesh, PartitionSpec())
        rest_shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), rest_shapes)
    check_shapes(ckpt.param_shapes(), jax.tree.map(lambda s: tuple(s.shape), shapes), str(ckpt.step_dir))
    params, rest = ckpt.restore(shapes, rest_shapes)
    if mesh is None:
        params = jax.tree.map(jax.numpy.asarray, params)
        rest = jax.tree.map(jax.numpy.asarray, rest)
    return handle.merge(params, rest), cfg


def _model_builder(cfg):
    from moshax.models.moshi_lm import MoshiLM

    kind = getattr(cfg, "kind", "helium")
    if kind == "moshi":
        return lambda rngs: MoshiLM(cfg, rngs=rngs)
    if kind == "mimi":
        from moshax.models.mimi.model import Mimi

        return lambda rngs: Mimi(cfg, rngs=rngs)
    from moshax.models.helium import Helium

    return lambda rngs: Helium(cfg, rngs=rngs)


def check_shapes(stored: dict, wanted: dict, where: str) -> None:
    """Raise one line listing every param path whose stored shape differs (or is missing)."""
    import jax

    def flat(tree):  # "a/b/0/c" -> shape; int and str keys alike (Orbax stores dict keys as strings)
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
        return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): tuple(v) for p, v in leaves}

    flat_s, flat_w = flat(stored), flat(wanted)
    bad = [f"{k}: stored {flat_s[k]} vs model {v}" for k, v in flat_w.items() if k in flat_s and flat_s[k] != v]
    bad += [f"{k}: missing" for k in flat_w if k not in flat_s]
    if bad:
        more = f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""
        raise _config_error(f"{where} does not fit the model config: {'; '.join(bad[:6])}{more}")


def _pure(state) -> dict:
    from flax import nnx

    return nnx.to_pure_dict(state)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def mimi_config_from_kyutai(d: dict[str, Any], **overrides):
    """A :class:`~moshax.models.mimi.config.MimiConfig` from a Kyutai ``_mimi_config``-shaped dict;
    missing keys take the released Mimi's values. Unsupported variants raise ConfigError."""
    from moshax.models.mimi.config import MimiConfig

    cfg = MimiConfig()
    s, t, q = cfg.seanet, cfg.transformer, cfg.quantizer
    cfg.sample_rate = int(d.get("sample_rate", cfg.sample_rate))
    cfg.frame_rate = float(d.get("frame_rate", cfg.frame_rate))
    sd = dict(d.get("seanet") or {})
    for key, ok in (("activation", "ELU"), ("norm", "none"), ("causal", True), ("disable_norm_outer_blocks", 0)):
        if key in sd and sd[key] != ok:
            raise _config_error(f"Kyutai Mimi config: seanet.{key}={sd[key]!r} is not supported (only {ok!r})")
    s.channels = int(d.get("channels", sd.get("channels", s.channels)))
    for name in ("dimension", "n_filters", "n_residual_layers", "kernel_size", "last_kernel_size",
                 "residual_kernel_size", "dilation_base", "compress"):
        if name in sd:
            setattr(s, name, int(sd[name]))
    if "ratios" in sd:
        s.ratios = [int(r) for r in sd["ratios"]]
    if "true_skip" in sd:
        s.true_skip = bool(sd["true_skip"])
    if "pad_mode" in sd:
        s.pad_mode = str(sd["pad_mode"])
    if "activation_params" in sd:
        s.elu_alpha = float(dict(sd["activation_params"]).get("alpha", s.elu_alpha))
    td = dict(d.get("transformer") or {})
    for key, ok in (("gating", "none"), ("norm", "layer_norm"), ("positional_embedding", "rope"), ("causal", True)):
        if key in td and td[key] != ok:
            raise _config_error(f"Kyutai Mimi config: transformer.{key}={td[key]!r} is not supported (only {ok!r})")
    t.dim = int(td.get("d_model", s.dimension))
    for ours, theirs in (("num_heads", "num_heads"), ("num_layers", "num_layers"), ("hidden_dim", "dim_feedforward"),
                         ("context", "context")):
        if theirs in td:
            setattr(t, ours, int(td[theirs]))
    if "max_period" in td:
        t.max_period = float(td["max_period"])
    if "layer_scale" in td:
        t.layer_scale = None if td["layer_scale"] is None else float(td["layer_scale"])
    qd = dict(d.get("quantizer") or {})
    for name in ("dimension", "n_q", "bins"):
        if name in qd:
            setattr(q, name, int(qd[name]))
    if "n_q_semantic" in qd:
        q.n_q_semantic = int(qd["n_q_semantic"])
    q.num_codebooks = min(q.num_codebooks, q.n_q)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.validate("kyutai config")
    return cfg


def _read_json(path: str | None) -> dict | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--kyutai-config not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise _config_error(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise _config_error(f"{p}: expected a JSON object")
    if "lm" in data and isinstance(data["lm"], dict) and "dim" not in data:  # a release's config.json
        data = data["lm"]
    return data


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def from_kyutai(model: str, weights: str | Path, output: str | Path, kyutai_config: dict | None = None,
                param_dtype: str | None = None) -> dict:
    """Convert a Kyutai safetensors file into a moshax model checkpoint; returns a summary."""
    import jax
    import numpy as np
    from flax import nnx

    from moshax.config import to_dict

    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"weights not found: {weights}")
    overrides = {"param_dtype": param_dtype} if param_dtype else {}
    if model == "lm":
        from moshax.interop.lm_weights import (
            CheckpointMismatchError, lm_params_from_kyutai, moshi_config_from_kyutai, read_safetensors)
        from moshax.models.moshi_lm import MoshiLM, MoshiLMConfig
        from moshax.parallel.partition import ModelHandle

        cfg = moshi_config_from_kyutai(kyutai_config, **overrides) if kyutai_config is not None else MoshiLMConfig(
            **overrides)
        cfg.validate("model")
        try:
            params = lm_params_from_kyutai(read_safetensors(weights), cfg)
        except CheckpointMismatchError as e:
            raise _config_error(f"{weights}: {str(e).splitlines()[0]}") from None
        wanted = jax.tree.map(lambda s: tuple(s.shape),
                              ModelHandle.from_constructor(lambda r: MoshiLM(cfg, rngs=r)).shapes())
        check_shapes(jax.tree.map(lambda a: tuple(a.shape), params), wanted, str(weights))
        rest: dict = {}
    elif model == "mimi":
        from safetensors.numpy import load_file

        from moshax.interop.mimi_weights import MimiWeightsError, mimi_from_kyutai_state_dict

        cfg = mimi_config_from_kyutai(kyutai_config or {}, **overrides)
        sd = load_file(str(weights))
        try:
            m = mimi_from_kyutai_state_dict(sd, cfg)
        except MimiWeightsError as e:
            raise _config_error(f"{weights}: {str(e).splitlines()[0]}") from None
        _, p_state, r_state = nnx.split(m, nnx.Param, ...)
        params, rest = nnx.to_pure_dict(p_state), nnx.to_pure_dict(r_state)
        params = jax.tree.map(np.asarray, params)
        rest = jax.tree.map(np.asarray, rest)
    else:
        raise _config_error(f"--model {model!r}: expected lm or mimi")
    out = save_model_checkpoint(output, params, rest, config=to_dict(cfg), kind=model, source=str(weights))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    dtypes = sorted({str(a.dtype) for a in jax.tree.leaves(params)})
    return {"output": str(out), "params": n, "dtype": ",".join(dtypes), "kind": model}


def to_kyutai(model: str, checkpoint: str | Path, output: str | Path, dtype: str | None = None) -> dict:
    """Write a moshax model (or trainer) checkpoint as a Kyutai (released-layout) safetensors file."""
    import jax
    import numpy as np

    ckpt = open_checkpoint(checkpoint)
    want = KINDS.get(model)
    if want is None:
        raise _config_error(f"--model {model!r}: expected lm or mimi")
    if ckpt.model_kind != want:
        raise _config_error(f"{ckpt.step_dir} holds a {ckpt.model_kind} model, not --model {model}")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if model == "lm":
        from moshax.interop.lm_weights import lm_params_to_kyutai, write_safetensors
        from moshax.parallel.partition import ModelHandle
        from moshax.models.moshi_lm import MoshiLM

        cfg = ckpt.model_config()
        shapes = ModelHandle.from_constructor(lambda r: MoshiLM(cfg, rngs=r)).shapes()
        check_shapes(ckpt.param_shapes(), jax.tree.map(lambda s: tuple(s.shape), shapes), str(ckpt.step_dir))
        params, _ = ckpt.restore(shapes)
        tensors = lm_params_to_kyutai(params, cfg, dtype=dtype)
        write_safetensors(out, tensors)
    else:
        from safetensors.numpy import save_file

        from moshax.interop.mimi_weights import kyutai_state_dict
        from moshax.layers.params import dtype_of

        m, _ = build_model_from_checkpoint(ckpt)
        tensors = kyutai_state_dict(m)
        if dtype:
            np_dtype = np.dtype(dtype_of(dtype))
            tensors = {k: v.astype(np_dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}
        save_file(tensors, str(out))
    n = sum(int(np.prod(v.shape)) for v in tensors.values())
    return {"output": str(out), "tensors": len(tensors), "values": n,
            "dtype": ",".join(sorted({str(v.dtype) for v in tensors.values()}))}


def cmd_from_kyutai(args: argparse.Namespace) -> int:
    info = from_kyutai(args.model, args.weights, args.output, _read_json(args.kyutai_config), args.param_dtype)
    print(f"wrote {info['kind']} checkpoint {info['output']}: {info['params'] / 1e6:.2f}M params ({info['dtype']})")
    return 0


def cmd_to_kyutai(args: argparse.Namespace) -> int:
    info = to_kyutai(args.model, args.checkpoint, args.output, args.dtype)
    print(f"wrote {info['output']}: {info['tensors']} tensors, {info['values'] / 1e6:.2f}M values ({info['dtype']})")
    return 0


def add_parser(subparsers) -> None:
    conv = subparsers.add_parser("convert", help="convert Kyutai safetensors <-> moshax checkpoints (lm, mimi)")
    sub = conv.add_subparsers(dest="direction", required=True)
    p = sub.add_parser("from-kyutai", help="Kyutai .safetensors -> moshax model checkpoint dir")
    p.add_argument("--model", required=True, choices=sorted(KINDS))
    p.add_argument("weights", help="Kyutai .safetensors file")
    p.add_argument("--output", required=True, help="new checkpoint directory")
    p.add_argument("--kyutai-config", help="JSON config in the reference loader's shape (default: the release)")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the stored params (default: the config's param_dtype, float32)")
    p.set_defaults(fn=cmd_from_kyutai)
    p = sub.add_parser("to-kyutai", help="moshax checkpoint (converted or trained) -> Kyutai .safetensors")
    p.add_argument("--model", required=True, choices=sorted(KINDS))
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (converted, trainer workdir or checkpoints/)")
    p.add_argument("--output", required=True, help=".safetensors file to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="tensor dtype (default: the params' dtype; Kyutai's releases are bfloat16)")
    p.set_defaults(fn=cmd_to_kyutai)
