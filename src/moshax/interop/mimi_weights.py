"""Kyutai Mimi checkpoints (safetensors state dicts) <-> moshax :class:`~moshax.models.mimi.model.Mimi`.

* :func:`load_kyutai_state_dict` writes a Kyutai state dict (numpy arrays) into a moshax Mimi.
  It reads both attention namings: the released ``self_attn.in_proj_weight`` /
  ``self_attn.out_proj.weight`` and ``moshi``'s own ``self_attn.in_projs.0.weight`` /
  ``out_projs.0.weight`` (and the legacy codebook names ``embed_avg``/``cluster_size``/``inited``).
  Missing or unexpected keys and wrong shapes raise :class:`MimiWeightsError`, listing them.
* :func:`kyutai_state_dict` gives the released form back (what Kyutai's Rust/MLX loaders accept).
* :func:`mimi_from_kyutai_state_dict` builds the model abstractly (``nnx.eval_shape``: no random
  init, which costs seconds of per-shape compiles on a CPU) and fills every variable.
* :func:`load_mimi` / :func:`save_mimi` read and write ``.safetensors`` files through
  ``safetensors.numpy`` (no torch needed).

Layout changes (Kyutai -> moshax): conv ``[O, I/g, K] -> [K, I/g, O]``; transposed conv
``[I, O/g, K] -> [K, I, O/g]``; fused qkv ``[3*D, D]`` rows (q|k|v, heads contiguous)
``-> [D, 3, H, hd]``; out proj ``[D, D] -> [H, hd, D]``; linears ``[out, in] -> [in, out]``;
1x1 quantizer projections ``[out, in, 1] -> [in, out]``; per-layer transformer weights and
per-level codebook buffers are stacked along a leading axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moshax.config import ConfigError
from moshax.models.mimi.config import MimiConfig


class MimiWeightsError(ValueError):
    """A state dict does not fit the Mimi architecture (missing/unexpected keys, wrong shapes)."""


@dataclass(frozen=True)
class _Entry:
    key: str  # Kyutai key; "{i}" is the layer/level index when ``count`` > 0
    path: tuple  # moshax variable path (attribute names and list indices)
    kind: str
    count: int = 0  # > 0: the moshax variable stacks ``count`` Kyutai tensors along axis 0


# ------------------------------------------------------------------------------ layout


def _to_ours(kind: str, a: np.ndarray, heads: int) -> np.ndarray:
    if kind == "conv":
        return a.transpose(2, 1, 0)
    if kind == "convtr":
        return a.transpose(0, 2, 1)
    if kind == "linear":
        return a.T
    if kind == "proj":
        return a[:, :, 0].T
    if kind == "attn_in":
        d = a.shape[1]
        return a.reshape(3, heads, d // heads, d).transpose(3, 0, 1, 2)
    if kind == "attn_out":
        d = a.shape[0]
        return a.T.reshape(heads, d // heads, d)
    if kind == "flag":
        return a.reshape(())
    return a


def _to_theirs(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return a.transpose(2, 1, 0)
    if kind == "convtr":
        return a.transpose(0, 2, 1)
    if kind == "linear":
        return a.T
    if kind == "proj":
        return a.T[:, :, None]
    if kind == "attn_in":
        return a.transpose(1, 2, 3, 0).reshape(-1, a.shape[0])
    if kind == "attn_out":
        return a.reshape(-1, a.shape[-1]).T
    if kind == "flag":
        return a.reshape(1)
    return a


# ------------------------------------------------------------------------------ key map


def _conv(key: str, path: tuple, bias: bool = True) -> list[_Entry]:
    out = [_Entry(f"{key}.weight", path + ("weight",), "conv")]
    if bias:
        out.append(_Entry(f"{key}.bias", path + ("bias",), "copy"))
    return out


def _resblock(prefix: str, path: tuple, true_skip: bool) -> list[_Entry]:
    out = _conv(f"{prefix}.block.1.conv.conv", path + ("conv1",)) + _conv(f"{prefix}.block.3.conv.conv", path + ("conv2",))
    if not true_skip:
        out += _conv(f"{prefix}.shortcut.conv.conv", path + ("shortcut",))
    return out


def _entries(cfg: MimiConfig) -> list[_Entry]:
    sc = cfg.seanet
    nres = sc.n_residual_layers
    out: list[_Entry] = []
    # encoder: conv, [res x n, ELU, down] per ratio, ELU, conv
    out += _conv("encoder.model.0.conv.conv", ("encoder", "conv_in"))
    idx = 1
    for b in range(len(sc.ratios)):
        for j in range(nres):
            out += _resblock(f"encoder.model.{idx}", ("encoder", "blocks", b, "res", j), sc.true_skip)
            idx += 1
        idx += 1  # ELU
        out += _conv(f"encoder.model.{idx}.conv.conv", ("encoder", "blocks", b, "down"))
        idx += 1
    out += _conv(f"encoder.model.{idx + 1}.conv.conv", ("encoder", "conv_out"))
    # decoder: conv, [ELU, up, res x n] per ratio, ELU, conv
    out += _conv("decoder.model.0.conv.conv", ("decoder", "conv_in"))
    idx = 1
    for b in range(len(sc.ratios)):
        idx += 1  # ELU
        out += [_Entry(f"decoder.model.{idx}.convtr.convtr.weight", ("decoder", "blocks", b, "up", "weight"), "convtr"),
                _Entry(f"decoder.model.{idx}.convtr.convtr.bias", ("decoder", "blocks", b, "up", "bias"), "copy")]
        idx += 1
        for j in range(nres):
            out += _resblock(f"decoder.model.{idx}", ("decoder", "blocks", b, "res", j), sc.true_skip)
            idx += 1
    out += _conv(f"decoder.model.{idx + 1}.conv.conv", ("decoder", "conv_out"))
    # transformers (stacked layers)
    n = cfg.transformer.num_layers
    for name in ("encoder_transformer", "decoder_transformer"):
        pre = f"{name}.transformer.layers.{{i}}"
        lay = (name, "layers")
        out += [
            _Entry(f"{pre}.self_attn.in_proj_weight", lay + ("self_attn", "in_proj"), "attn_in", n),
            _Entry(f"{pre}.self_attn.out_proj.weight", lay + ("self_attn", "out_proj"), "attn_out", n),
            _Entry(f"{pre}.norm1.weight", lay + ("norm1", "weight"), "copy", n),
            _Entry(f"{pre}.norm1.bias", lay + ("norm1", "bias"), "copy", n),
            _Entry(f"{pre}.norm2.weight", lay + ("norm2", "weight"), "copy", n),
            _Entry(f"{pre}.norm2.bias", lay + ("norm2", "bias"), "copy", n),
            _Entry(f"{pre}.linear1.weight", lay + ("mlp", "linear_in"), "linear", n),
            _Entry(f"{pre}.linear2.weight", lay + ("mlp", "linear_out"), "linear", n),
        ]
        if cfg.transformer.layer_scale is not None:
            out += [_Entry(f"{pre}.layer_scale_1.scale", lay + ("layer_scale_1",), "copy", n),
                    _Entry(f"{pre}.layer_scale_2.scale", lay + ("layer_scale_2",), "copy", n)]
    # resampling
    if cfg.downsample_stride > 1:
        out += [_Entry("downsample.conv.conv.conv.weight", ("downsample", "weight"), "conv"),
                _Entry("upsample.convtr.convtr.convtr.weight", ("upsample", "weight"), "convtr")]
    # quantizer
    q = cfg.quantizer
    for name, levels in (("rvq_first", q.n_q_semantic), ("rvq_rest", q.n_q - q.n_q_semantic)):
        pre, path = f"quantizer.{name}", ("quantizer", name)
        cb = f"{pre}.vq.layers.{{i}}._codebook"
        out += [
            _Entry(f"{pre}.input_proj.weight", path + ("input_proj",), "proj"),
            _Entry(f"{pre}.output_proj.weight", path + ("output_proj",), "proj"),
            _Entry(f"{cb}.embedding_sum", path + ("embedding_sum",), "copy", levels),
            _Entry(f"{cb}.cluster_usage", path + ("cluster_usage",), "copy", levels),
            _Entry(f"{cb}._initialized", path + ("initialized",), "flag", levels),
        ]
    return out


def expected_keys(cfg: MimiConfig) -> list[str]:
    """Every key of the released Kyutai state dict for this architecture."""
    keys = []
    for e in _entries(cfg):
        keys += [e.key.format(i=i) for i in range(e.count)] if e.count else [e.key]
    return keys


# ------------------------------------------------------------------------------ aliases

_ALIASES = (  # other spellings -> released spelling (suffix match)
    (".self_attn.in_projs.0.weight", ".self_attn.in_proj_weight"),
    (".self_attn.in_proj.weight", ".self_attn.in_proj_weight"),
    (".self_attn.out_projs.0.weight", ".self_attn.out_proj.weight"),
    ("._codebook.inited", "._codebook._initialized"),
    ("._codebook.cluster_size", "._codebook.cluster_usage"),
    ("._codebook.embed_avg", "._codebook.embedding_sum"),
    ("._codebook.embed_sum", "._codebook.embedding_sum"),
)


def _canonical(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        name = key
        for old, new in _ALIASES:
            if name.endswith(old):
                name = name[: -len(old)] + new
                break
        if name in out:
            raise MimiWeightsError(f"state dict has two spellings of {name!r} (one is {key!r})")
        out[name] = value
    return out


def _summary(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ------------------------------------------------------------------------------ access


def _variable(model, path: tuple) -> nnx.Variable:
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    if not isinstance(node, nnx.Variable):
        raise TypeError(f"{'.'.join(map(str, path))} is not a variable")
    return node


def load_kyutai_state_dict(model, state_dict: Mapping[str, np.ndarray], *, strict: bool = True):
    """Write a Kyutai Mimi state dict (name -> array) into ``model`` (in place); returns the model.

    ``strict``: unexpected keys are an error (missing keys always are)."""
    cfg: MimiConfig = model.cfg
    sd = _canonical(state_dict)
    heads = cfg.transformer.num_heads
    entries = _entries(cfg)
    wanted = set(expected_keys(cfg))
    missing = wanted - set(sd)
    unexpected = set(sd) - wanted
    if missing or (strict and unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_summary(missing)}")
        if strict and unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_summary(unexpected)}")
        raise MimiWeightsError("Mimi state dict does not match the config: " + "; ".join(parts))
    for e in entries:
        var = _variable(model, e.path)
        if e.count:
            value = np.stack([_to_ours(e.kind, np.asarray(sd[e.key.format(i=i)]), heads) for i in range(e.count)])
        else:
            value = _to_ours(e.kind, np.asarray(sd[e.key]), heads)
        current = var.get_value()  # an array, or a ShapeDtypeStruct for an abstract model
        if tuple(value.shape) != tuple(current.shape):
            shown = e.key.format(i=0) if e.count else e.key
            raise MimiWeightsError(f"{shown}: shape {np.asarray(sd[shown]).shape} gives {value.shape} for "
                                   f"{'.'.join(map(str, e.path))}, expected {tuple(current.shape)}")
        var.set_value(jnp.asarray(value, dtype=current.dtype))
    return model


def mimi_from_kyutai_state_dict(state_dict: Mapping[str, np.ndarray], cfg: MimiConfig | None = None, *,
                                strict: bool = True):
    """A moshax Mimi whose every variable comes from ``state_dict`` (no random init is run)."""
    from moshax.models.mimi.model import Mimi

    cfg = cfg or MimiConfig()
    model = nnx.eval_shape(lambda: Mimi(cfg, rngs=nnx.Rngs(0)))
    load_kyutai_state_dict(model, state_dict, strict=strict)
    left = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))
            if isinstance(v, jax.ShapeDtypeStruct)]
    if left:  # the key map must cover every variable
        raise MimiWeightsError(f"variables not set by the state dict: {_summary(left)}")
    return model


def kyutai_state_dict(model) -> dict[str, np.ndarray]:
    """The released-form Kyutai state dict of a moshax Mimi (numpy float arrays, contiguous)."""
    cfg: MimiConfig = model.cfg
    out: dict[str, np.ndarray] = {}
    for e in _entries(cfg):
        value = np.asarray(_variable(model, e.path)[...])
        if e.count:
            for i in range(e.count):
                out[e.key.format(i=i)] = np.ascontiguousarray(_to_theirs(e.kind, value[i]))
        else:
            out[e.key] = np.ascontiguousarray(_to_theirs(e.kind, value))
    return out


def load_mimi(path: str | Path, cfg: MimiConfig | None = None, *, strict: bool = True):
    """Build a moshax Mimi (default: the released architecture) and load a Kyutai ``.safetensors``."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Mimi checkpoint not found: {path}")
    return mimi_from_kyutai_state_dict(load_file(str(path)), cfg, strict=strict)


def save_mimi(model, path: str | Path) -> None:
    """Write a moshax Mimi as a Kyutai (released-form) ``.safetensors`` file."""
    from safetensors.numpy import save_file

    save_file(kyutai_state_dict(model), str(path))


# ---------------------------------------------------------------------------------------------
# Configs, and the interop the registry (kind "mimi") names
# ---------------------------------------------------------------------------------------------


def config_from_kyutai(d: dict[str, Any], **overrides):
    """A :class:`~moshax.models.mimi.config.MimiConfig` from a Kyutai ``_mimi_config``-shaped dict;
    missing keys take the released Mimi's values. Unsupported variants raise ConfigError."""
    cfg = MimiConfig()
    s, t, q = cfg.seanet, cfg.transformer, cfg.quantizer
    cfg.sample_rate = int(d.get("sample_rate", cfg.sample_rate))
    cfg.frame_rate = float(d.get("frame_rate", cfg.frame_rate))
    sd = dict(d.get("seanet") or {})
    for key, ok in (("activation", "ELU"), ("norm", "none"), ("causal", True), ("disable_norm_outer_blocks", 0)):
        if key in sd and sd[key] != ok:
            raise ConfigError(f"Kyutai Mimi config: seanet.{key}={sd[key]!r} is not supported (only {ok!r})")
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
            raise ConfigError(f"Kyutai Mimi config: transformer.{key}={td[key]!r} is not supported (only {ok!r})")
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
    for name in ("decay", "threshold_usage_ratio", "replaced_usage_ratio"):
        if name in qd:
            setattr(q, name, float(qd[name]))
    # codebooks in use: not part of Kyutai's dict (get_mimi's num_codebooks argument); moshax's JSON
    # writes it at the top level
    q.num_codebooks = int(d["num_codebooks"]) if "num_codebooks" in d else min(q.num_codebooks, q.n_q)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.validate("kyutai config")
    return cfg


def config_to_kyutai(cfg: MimiConfig) -> dict:
    """The Kyutai ``_mimi_config``-shaped dict of a :class:`MimiConfig` (inverse of
    :func:`config_from_kyutai`: ``config_from_kyutai(config_to_kyutai(cfg)) == cfg`` up to run
    settings: ``dtype``, ``param_dtype``, ``transformer.remat``, ``transformer.layer_loop``, and the EMA's ``epsilon``,
    ``check_unused_every`` and ``kmeans_iters``, which Kyutai's loader does not take).

    Reference ``loaders.get_mimi(path, this_dict)`` builds the same architecture; the extra
    top-level ``num_codebooks`` (the codebooks in use; get_mimi takes it as an argument) is
    ignored by it. A config Kyutai's Mimi cannot express raises :class:`ConfigError`."""
    s, t, q = cfg.seanet, cfg.transformer, cfg.quantizer
    fixed = {"transformer.gated": (t.gated, False), "transformer.activation": (t.activation, "gelu"),
             "transformer.norm": (t.norm, "layer_norm"), "transformer.positional": (t.positional, "rope"),
             "transformer.causal": (t.causal, True), "transformer.norm_eps": (t.norm_eps, 1e-5)}
    for name, (value, ok) in fixed.items():
        if value != ok:
            raise ConfigError(f"model.{name}={value!r}: Kyutai's Mimi has only {ok!r}; no Kyutai config for it")
    seanet = {
        "channels": s.channels, "dimension": s.dimension, "causal": True, "n_filters": s.n_filters,
        "n_residual_layers": s.n_residual_layers, "activation": "ELU", "activation_params": {"alpha": s.elu_alpha},
        "compress": s.compress, "dilation_base": s.dilation_base, "disable_norm_outer_blocks": 0,
        "kernel_size": s.kernel_size, "residual_kernel_size": s.residual_kernel_size,
        "last_kernel_size": s.last_kernel_size, "norm": "none", "pad_mode": s.pad_mode, "ratios": list(s.ratios),
        "true_skip": s.true_skip,
    }
    quantizer = {
        "dimension": q.dimension, "n_q": q.n_q, "n_q_semantic": q.n_q_semantic, "bins": q.bins,
        "input_dimension": s.dimension, "output_dimension": s.dimension, "decay": q.decay,
        "threshold_usage_ratio": q.threshold_usage_ratio, "replaced_usage_ratio": q.replaced_usage_ratio,
    }
    transformer = {
        "d_model": t.dim, "num_heads": t.num_heads, "num_layers": t.num_layers, "causal": True,
        "layer_scale": t.layer_scale, "context": t.context, "conv_layout": True, "max_period": t.max_period,
        "gating": "none", "norm": "layer_norm", "positional_embedding": "rope", "dim_feedforward": t.hidden_dim,
        "input_dimension": s.dimension, "output_dimensions": [s.dimension],
    }
    return {"sample_rate": cfg.sample_rate, "channels": s.channels, "frame_rate": cfg.frame_rate,
            "seanet": seanet, "quantizer": quantizer, "transformer": transformer, "num_codebooks": q.num_codebooks}


WeightsError = MimiWeightsError


def params_from_kyutai(weights: str | Path, cfg: MimiConfig) -> tuple[dict, dict]:
    """A Kyutai ``.safetensors`` Mimi -> (params, rest) pure numpy dicts for ``cfg``."""
    from safetensors.numpy import load_file

    model = mimi_from_kyutai_state_dict(load_file(str(weights)), cfg)
    _, p_state, r_state = nnx.split(model, nnx.Param, ...)
    to_np = lambda tree: jax.tree.map(np.asarray, nnx.to_pure_dict(tree))  # noqa: E731
    return to_np(p_state), to_np(r_state)


def params_to_kyutai(params: dict, rest: dict, cfg: MimiConfig, dtype=None) -> dict[str, np.ndarray]:
    """(params, rest) of a moshax Mimi -> Kyutai's released state dict (floats cast to ``dtype``)."""
    from moshax.layers.params import dtype_of
    from moshax.models.mimi.model import Mimi

    model = nnx.eval_shape(lambda: Mimi(cfg, rngs=nnx.Rngs(0)))
    _, p_state, r_state = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(p_state, params)
    nnx.replace_by_pure_dict(r_state, rest)
    nnx.update(model, p_state, r_state)
    tensors = kyutai_state_dict(model)
    if dtype:
        np_dtype = np.dtype(dtype_of(dtype))
        tensors = {k: v.astype(np_dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}
    return tensors


def write_kyutai(path: str | Path, tensors: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(dict(tensors), str(path))
