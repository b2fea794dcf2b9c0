"""Typed experiment configs: dataclasses loaded from YAML, with dotted ``key=value`` overrides.

Every user mistake (unknown key, wrong type, bad value) raises :class:`ConfigError` with one line
that names the offending key, so the CLI can print it and exit non-zero without a stack trace.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.configs import TextDataConfig  # noqa: F401  (the text data section, re-exported)


class ConfigError(ValueError):
    """A config the user wrote is wrong; the message is one line that says what and where."""


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------

REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
LAYER_LOOPS = ("auto", "scan", "unrolled")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TransformerConfig:
    """One transformer stack; shared by Helium, Moshi's temporal/depth transformers and Mimi."""

    dim: int = 4096
    num_heads: int = 32
    num_layers: int = 32
    hidden_dim: int = 11264  # MLP hidden size (per half for gated MLPs)
    context: int = 4096  # attention window (and KV ring-buffer capacity)
    max_period: float = 10000.0  # RoPE
    positional: str = "rope"  # rope | none
    norm: str = "rms_norm"  # rms_norm (fp32, weight `alpha`) | layer_norm
    norm_eps: float = 1e-8
    gated: bool = True  # gated MLP: act(gate) * up, fused `linear_in`
    activation: str = "silu"  # silu | gelu (exact erf)
    layer_scale: float | None = None  # LayerScale init (Mimi: 0.01), None = off
    causal: bool = True
    remat: str = "none"  # none | full | dots | dots_with_no_batch_dims
    # the layer loop: auto (unrolled when tracing for a CPU with layers of 4M+ weights, else the scan) | scan | unrolled
    layer_loop: str = "auto"
    init_std: float = 0.02
    attention: str = "auto"  # auto (Pallas on TPU, XLA elsewhere) | xla | chunked | pallas

    def validate(self, where: str) -> None:
        if self.dim % self.num_heads:
            raise ConfigError(f"{where}.dim={self.dim} is not divisible by {where}.num_heads={self.num_heads}")
        if (self.dim // self.num_heads) % 2 and self.positional == "rope":
            raise ConfigError(f"{where}: RoPE needs an even head dim, got {self.dim // self.num_heads}")
        _choice(f"{where}.positional", self.positional, ("rope", "none"))
        _choice(f"{where}.norm", self.norm, ("rms_norm", "layer_norm"))
        _choice(f"{where}.activation", self.activation, ("silu", "gelu"))
        _choice(f"{where}.remat", self.remat, REMAT_POLICIES)
        _choice(f"{where}.layer_loop", self.layer_loop, LAYER_LOOPS)
        _choice(f"{where}.attention", self.attention, ("auto", "xla", "chunked", "pallas"))
        for name in ("dim", "num_heads", "num_layers", "hidden_dim", "context"):
            _positive(f"{where}.{name}", getattr(self, name))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass
class HeliumConfig:
    """Helium: decoder-only text LM (embedding, transformer stack, out_norm, text head)."""

    kind: str = "helium"
    vocab_size: int = 32000
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    dtype: str = "float32"  # compute dtype; params stay float32
    param_dtype: str = "float32"

    def validate(self, where: str = "model") -> None:
        _positive(f"{where}.vocab_size", self.vocab_size)
        _choice(f"{where}.dtype", self.dtype, DTYPES)
        _choice(f"{where}.param_dtype", self.param_dtype, DTYPES)
        self.transformer.validate(f"{where}.transformer")


@dataclass
class LMTaskConfig:
    """Helium pretraining: next-token cross-entropy (nothing to set yet; the section exists so every
    kind has the same ``task:`` seam)."""

    def validate(self, where: str = "task") -> None:
        pass


@dataclass
class MeshConfig:
    """Device mesh sizes; -1 means "the rest of the devices" (at most one axis)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass
class ParamGroupConfig:
    """Params whose '/'-joined path matches ``pattern`` (a regex, searched) get their own AdamW."""

    pattern: str = ""
    learning_rate: float = 3e-4
    weight_decay: float | None = None  # None: optim.weight_decay
    b1: float | None = None
    b2: float | None = None


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay, global-norm clipping; optional per-module groups
    (e.g. Moshi's temporal 3e-5 vs depth 2e-4), first matching pattern wins."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int | None = None  # None: train.steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    param_groups: list[ParamGroupConfig] = field(default_factory=list)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global, in sequences, per optimizer step
    grad_accum_steps: int = 1
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end (when eval data is configured)
    eval_batches: int = 4
    progress: bool = True
    profile_steps: list[int] = field(default_factory=list)  # [first, last]: JAX profiler trace -> workdir/profile


@dataclass
class CheckpointConfig:
    every: int = 500
    max_to_keep: int = 3
    async_save: bool = True


@dataclass
class Config:
    """A run: ``model`` (architecture only), ``task`` (how that model trains: losses, augmentation,
    warm start), ``data`` (typed per kind: text, multi-stream shards or audio), and the kind-free
    sections. The model kind (:mod:`moshax.registry`) picks the classes of the three typed sections."""

    name: str = "run"
    seed: int = 0
    workdir: str = "runs/default"
    model: Any = field(default_factory=HeliumConfig)
    task: Any = field(default_factory=LMTaskConfig)
    data: Any = field(default_factory=TextDataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def missing_paths(self) -> list[str]:
        """One line per file or directory the config names that is not there (data sources,
        tokenizer, shards, ``task.init_from``): checked without importing JAX."""
        out = list(self.data.missing_paths("data")) if hasattr(self.data, "missing_paths") else []
        init_from = getattr(self.task, "init_from", "")
        if init_from and not init_from.startswith("gs://") and not Path(init_from).exists():
            out.append(f"task.init_from: checkpoint not found: {init_from}")
        return out

    def validate(self) -> None:
        self.model.validate("model")
        self.task.validate("task")
        try:
            self.data.validate("data")
        except ValueError as e:  # DataError: the same one-line user error
            raise ConfigError(str(e)) from None
        _positive("train.steps", self.train.steps)
        _positive("train.batch_size", self.train.batch_size)
        _positive("train.grad_accum_steps", self.train.grad_accum_steps)
        _positive("train.log_every", self.train.log_every)
        _positive("checkpoint.every", self.checkpoint.every)
        _positive("checkpoint.max_to_keep", self.checkpoint.max_to_keep)
        if self.train.batch_size % self.train.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} is not divisible by "
                f"train.grad_accum_steps={self.train.grad_accum_steps}"
            )
        sizes = (self.mesh.data, self.mesh.fsdp, self.mesh.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1, got data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}")
        for name, s in zip(("data", "fsdp", "tensor"), sizes):
            if s == 0 or s < -1:
                raise ConfigError(f"mesh.{name}={s}: must be a positive size or -1")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: int) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{key}={value}: must be > 0")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert one YAML value against a dataclass field type; raise ConfigError on mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is str:
            value = [value] if value != "" else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    kind = None
    if cls is Config:
        kind = _kind_of(data)
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        if kind is not None and key in KIND_SECTIONS:
            kwargs[key] = _build(kind.load(KIND_SECTIONS[key]), value, full)
        else:
            kwargs[key] = _coerce(full, value, hints[key])
    if kind is not None:
        for key, part in KIND_SECTIONS.items():
            kwargs.setdefault(key, kind.load(part)())
    return cls(**kwargs)


# Config sections whose class the model kind picks -> the registry entry's field naming it.
KIND_SECTIONS = {"model": "config", "task": "task_config", "data": "data_config"}


def _kind_of(data: dict):
    from moshax import registry

    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping, got {type(model).__name__} {model!r}")
    try:
        return registry.get(model.get("kind", "helium"))
    except registry.UnknownKind as e:
        raise ConfigError(str(e)) from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def _as_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_as_dict(v) for v in obj]
    return obj


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (for YAML/JSON dumps and checkpoint metadata)."""
    return _as_dict(cfg)


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}': empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


# Keys that moved when ``model:`` became architecture only, per model kind: old dotted path ->
# new dotted path. Old files (and checkpoints written before the move) still load through it.
LEGACY_MOVES: dict[str, list[tuple[str, str]]] = {
    "moshi": [(f"model.{k}", f"task.{k}") for k in
              ("text_padding_weight", "semantic_weight", "acoustic_weight", "augment", "init_from")]
    + [("data.seq_len", "data.frames")],
    "mimi": [(f"model.train.{k}", f"data.{k}") for k in
             ("train_sources", "eval_sources", "crop_seconds", "num_workers", "num_threads")]
    + [("model.quantizer.q_dropout", "task.quantizer_dropout"), ("model.train", "task")],
}


def migrate_legacy(data: dict) -> tuple[dict, list[str]]:
    """Move keys of the pre-``task:`` layout to their new places; returns (data, ["old -> new", ...])."""
    import copy

    data = copy.deepcopy(data)
    model = data.get("model")
    kind = model.get("kind", "helium") if isinstance(model, dict) else "helium"
    moved = []
    for old, new in LEGACY_MOVES.get(kind, []):
        *parents, leaf = old.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        *new_parents, new_leaf = new.split(".")
        dst = data
        for p in new_parents:
            dst = dst.setdefault(p, {})
        if isinstance(value, dict) and isinstance(dst.get(new_leaf), dict):
            value = {**dst[new_leaf], **value}
        dst[new_leaf] = value
        moved.append(f"{old} -> {new}")
    return data, moved


def from_dict(data: dict, overrides: list[str] | None = None, *, on_legacy=None) -> Config:
    """Build and validate a Config from a plain dict (``base:`` already resolved) and overrides.
    Keys of the old layout are moved (``on_legacy(["old -> new", ...])`` is told, if given)."""
    data = dict(data or {})
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    data, moved = migrate_legacy(data)
    if moved and on_legacy is not None:
        on_legacy(moved)
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_tree(path: str | Path, _chain: tuple = ()) -> dict:
    """A YAML config file as a dict, with its ``base:`` (a path relative to the file) merged under
    it: mappings merge key by key, anything else in the file replaces the base's value."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory: give a YAML file, e.g. configs/helium_tiny.yaml")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected a path to another config file, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in _chain or base_path == path.resolve():
        raise ConfigError(f"{path}: base: {base} makes a cycle")
    if not base_path.is_file():
        raise ConfigError(f"{path}: base config not found: {base} (looked at {base_path})")
    return _deep_merge(read_config_tree(base_path, _chain + (path.resolve(),)), data)


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, on_legacy=None) -> Config:
    """Load a YAML config file (or defaults when ``path`` is None), resolve its ``base:`` chain,
    then apply ``key=value`` overrides. Old-layout keys load, and ``on_legacy`` hears of them
    (default: one warning line on stderr)."""
    data: dict = {} if path is None else read_config_tree(path)
    if on_legacy is None:
        def on_legacy(moved):
            import sys

            print(f"moshax: warning: {path}: old config layout, loaded with {'; '.join(moved)} "
                  "(update the file; `moshax config show` prints the new form)", file=sys.stderr)
    return from_dict(data, overrides, on_legacy=on_legacy)


class _Dumper(yaml.SafeDumper):
    """Lists of plain values on one line (``delays: [0, 0, 1, ...]``), as the files write them."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=all(not isinstance(x, (dict, list)) for x in v)))


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML; :func:`load_config` of it gives an equal config."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False)
