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


class ConfigError(ValueError):
    """A config the user wrote is wrong; the message is one line that says what and where."""


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------

REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
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
    init_std: float = 0.02

    def validate(self, where: str) -> None:
        if self.dim % self.num_heads:
            raise ConfigError(f"{where}.dim={self.dim} is not divisible by {where}.num_heads={self.num_heads}")
        if (self.dim // self.num_heads) % 2 and self.positional == "rope":
            raise ConfigError(f"{where}: RoPE needs an even head dim, got {self.dim // self.num_heads}")
        _choice(f"{where}.positional", self.positional, ("rope", "none"))
        _choice(f"{where}.norm", self.norm, ("rms_norm", "layer_norm"))
        _choice(f"{where}.activation", self.activation, ("silu", "gelu"))
        _choice(f"{where}.remat", self.remat, REMAT_POLICIES)
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


# model.kind -> config class; classes living next to their model are imported on first use.
MODEL_CONFIGS: dict[str, type | str] = {
    "helium": HeliumConfig,
    "moshi": "moshax.models.moshi_lm:MoshiLMConfig",
    "mimi": "moshax.models.mimi.config:MimiConfig",
}


def model_config_class(kind: str) -> type:
    cls = MODEL_CONFIGS[kind]
    if isinstance(cls, str):
        import importlib

        module, name = cls.split(":")
        cls = MODEL_CONFIGS[kind] = getattr(importlib.import_module(module), name)
    return cls


@dataclass
class MeshConfig:
    """Device mesh sizes; -1 means "the rest of the devices" (at most one axis)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass
class TextDataConfig:
    """Text sources, tokenizer and packing for LM pretraining."""

    train_sources: list[str] = field(default_factory=list)  # .txt/.jsonl paths or globs, tfds:NAME[/CONFIG][:SPLIT]
    eval_sources: list[str] = field(default_factory=list)
    tokenizer: str = ""  # sentencepiece .model file
    train_shards: str = ""  # token-shard dir (`moshax data tokenize`): elastic loader, used instead of sources
    eval_shards: str = ""
    seq_len: int = 128
    jsonl_field: str = "text"
    tfds_data_dir: str | None = None
    num_workers: int = 0  # Grain worker processes (0 = in-process)
    add_bos: bool = True
    add_eos: bool = True


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
    name: str = "run"
    seed: int = 0
    workdir: str = "runs/default"
    model: Any = field(default_factory=HeliumConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        self.model.validate("model")
        _positive("train.steps", self.train.steps)
        _positive("train.batch_size", self.train.batch_size)
        _positive("train.grad_accum_steps", self.train.grad_accum_steps)
        _positive("train.log_every", self.train.log_every)
        _positive("checkpoint.every", self.checkpoint.every)
        _positive("checkpoint.max_to_keep", self.checkpoint.max_to_keep)
        _positive("data.seq_len", self.data.seq_len)
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
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        if cls is Config and key == "model":
            kwargs[key] = _build_model(value, full)
        else:
            kwargs[key] = _coerce(full, value, hints[key])
    return cls(**kwargs)


def _build_model(data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping")
    kind = data.get("kind", "helium")
    if kind not in MODEL_CONFIGS:
        raise ConfigError(f"{where}.kind={kind!r}: expected one of {', '.join(MODEL_CONFIGS)}")
    return _build(model_config_class(kind), data, where)


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


def from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    data = dict(data or {})
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return from_dict(data, overrides)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
