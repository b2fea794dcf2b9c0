"""Model checkpoints that users pass around: write, open, check, restore, build.

Model checkpoint layout (``CKPT_DIR``)
--------------------------------------
An Orbax ``CheckpointManager`` directory, written with
:class:`moshax.checkpoint.manager.Checkpointer` (so the same code reads it and a trainer's
``checkpoints/`` directory)::

    CKPT_DIR/
      0/                        one step (0 for a conversion)
        state/                  item "state" (Orbax StandardSave): {"params": ..., "rest": ...}
        meta/                   item "meta" (JSON)

* ``state["params"]`` is the model's pure param dict (``nnx.to_pure_dict(nnx.state(model,
  nnx.Param))``, the tree the trainer keeps) and ``state["rest"]`` the other variables (Mimi's
  codebook EMA buffers; ``{}`` for the LM).
* ``meta = {"format": "moshax-model/1", "kind": <model kind: helium | moshi | mimi; older
  conversions wrote "lm" for moshi>, "config": <model config dict, e.g. to_dict(MoshiLMConfig)>,
  "source": <the converted file>, "process_count": 1}``.

A trainer checkpoint (``WORKDIR/checkpoints/<step>/``) has the same ``state``/``meta`` items
(its ``state`` also holds ``step``, ``opt_state`` and ``rng``; its ``meta["config"]`` is the
whole run config, the model under ``"model"``). :func:`open_checkpoint` reads either kind from
a workdir, a ``checkpoints/`` dir, a converted dir or a step dir, restoring only params (and
rest) onto any sharding. ``moshax train`` warm-starts from one with ``task.init_from``; ``moshax
eval`` and ``moshax mimi`` read them with ``--checkpoint``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

from moshax import registry
from moshax.checkpoint.manager import CheckpointError, Checkpointer, quiet_orbax, stored_state_tree
from moshax.config import ConfigError, from_dict
from moshax.parallel.partition import ModelHandle

FORMAT = "moshax-model/1"


# ---------------------------------------------------------------------------------------------
# Model checkpoints: write / open / restore
# ---------------------------------------------------------------------------------------------


def save_model_checkpoint(directory: str | Path, params: dict, rest: dict | None, *, config: dict, kind: str,
                          source: str = "", step: int = 0) -> Path:
    """Write ``{"params", "rest"}`` + meta as a moshax model checkpoint (see the module docstring)."""
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"--output {directory} exists and is not empty; choose a new directory")
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
        """The stored model config (checkpoints of the old config layout load too)."""
        return from_dict({"model": copy.deepcopy(self.model_config_dict)}).model

    def param_shapes(self) -> dict:
        """Pure dict path -> shape tuple of the stored params."""
        import jax

        with unreadable_as_error(self.step_dir):
            tree = stored_state_tree(self.step_dir)
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
        with unreadable_as_error(self.step_dir), quiet_orbax():
            out = ocp.PyTreeCheckpointer().restore(self.step_dir / "state", args=args)
        return out["params"], out.get("rest", {}) if rest_target else {}


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
            raise ConfigError(f"{path}: no moshax checkpoint there (expected step dirs like 0/ or "
                                "checkpoints/<step>/ with state/ and meta/)")
        step = steps[-1]
    meta_dir = directory / str(step) / "meta"
    if not meta_dir.is_dir():
        raise ConfigError(f"{directory / str(step)}: no meta item (not a moshax checkpoint)")
    with unreadable_as_error(directory / str(step)):
        meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_dir}: unreadable checkpoint metadata")
    return ModelCheckpoint(directory, step, meta)


@contextlib.contextmanager
def unreadable_as_error(step_dir):
    """Any failure reading a checkpoint's files (cut short, corrupt, missing pieces) becomes one
    :class:`CheckpointError` line naming the step dir, instead of Orbax/TensorStore tracebacks."""
    try:
        yield
    except (CheckpointError, ConfigError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever Orbax, TensorStore or JSON raise
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CheckpointError(f"{step_dir}: checkpoint is unreadable (files cut short or corrupt?): "
                              f"{first[:200]}") from None


def build_model_from_checkpoint(ckpt: ModelCheckpoint, model_cfg=None, mesh=None):
    """Build the checkpoint's model (config from its meta unless ``model_cfg``) with the stored
    params and rest; sharded on ``mesh`` when given. Returns (model, config)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    cfg = model_cfg if model_cfg is not None else ckpt.model_config()
    handle = ModelHandle.from_constructor(lambda rngs: registry.build_model(cfg, rngs))
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
        raise ConfigError(f"{where} does not fit the model config: {'; '.join(bad[:6])}{more}")


def _pure(state) -> dict:
    from flax import nnx

    return nnx.to_pure_dict(state)


def load_codec(path, cfg=None):
    """A Mimi from ``path``: a moshax checkpoint (``moshax convert from-kyutai --model mimi``
    output, a trainer workdir, its ``checkpoints/`` dir or one step dir; the codec is read from
    ``state["params"]`` / ``state["rest"]``, extra trainer entries such as the discriminator are
    ignored) or a Kyutai ``.safetensors`` file (with ``cfg``, else the Kyutai config ``X.json``
    beside ``X.safetensors`` when present (what ``moshax convert to-kyutai`` writes), else the
    released Mimi). The config comes from the checkpoint's meta unless ``cfg`` is given."""
    p = Path(path)
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        from moshax.interop.kyutai_config import resolve_kyutai_config
        from moshax.interop.mimi_weights import MimiWeightsError, config_from_kyutai, load_mimi

        if cfg is None:
            kyutai, where = resolve_kyutai_config(p)
            try:
                cfg = config_from_kyutai(kyutai or {})
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        try:
            return load_mimi(p, cfg)
        except MimiWeightsError as e:
            raise ConfigError(f"{p}: {str(e).splitlines()[0]}") from None
    ckpt = open_checkpoint(p)
    if cfg is None and ckpt.model_kind != "mimi":
        raise ConfigError(f"{ckpt.step_dir} holds a {ckpt.model_kind} model, not a Mimi")
    model, _ = build_model_from_checkpoint(ckpt, cfg)
    return model
