"""Kyutai Moshi LM configs: ``loaders._lm_kwargs``-shaped dicts <-> :class:`MoshiLMConfig`.

The JSON beside a converted checkpoint (:mod:`moshax.interop.kyutai_config`) and the benches'
config (b) use this shape; :func:`moshi_config_from_kyutai` fills missing keys with moshiko's values
and names any Kyutai feature moshax lacks (a :class:`~moshax.config.ConfigError`), and
:func:`moshi_config_to_kyutai` is its inverse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from moshax.config import ConfigError, TransformerConfig
from moshax.models.moshi_config import MoshiLMConfig


# Kyutai LMModel kwargs moshax has no counterpart for, with the only value it accepts for each.
_UNSUPPORTED_LM_KWARGS = {
    "text_card_out": None, "demux_second_text_stream": False, "demux_second_stream": False, "norm_emb": False,
    "bias_proj": False, "depformer_low_rank_embeddings": None, "depformer_norm": None, "extra_heads_num_heads": 0,
    "conditioners": None, "fuser": None, "cross_attention": False, "bias_ff": False, "bias_attn": False,
    "lora": False, "quantize": False,
}
_KYUTAI_NORMS = {"rms_norm_f32": "rms_norm", "rms_norm": "rms_norm", "layer_norm": "layer_norm",
                 "layer_norm_f32": "layer_norm"}


def _gated_hidden(dim: int, dim_feedforward: int, gating: str) -> int:
    """Kyutai's MLP hidden size: ActivationGating's ``2 * ff // 3`` (``21 * dim // 8`` when ff ==
    4 * dim); ``ff`` itself without gating."""
    if gating == "none":
        return dim_feedforward
    return (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3


def _feedforward_for(dim: int, hidden: int, gated: bool) -> int:
    """A ``dim_feedforward`` that Kyutai turns back into ``hidden``."""
    if not gated:
        return hidden
    for ff in ((3 * hidden + 1) // 2, (3 * hidden) // 2, (3 * hidden) // 2 + 1, 4 * dim):
        if _gated_hidden(dim, ff, "silu") == hidden:
            return ff
    raise ValueError(f"no Kyutai dim_feedforward gives a gated hidden size of {hidden} at dim {dim}")


def _hidden_scale_for(dim: int, ff: int) -> float:
    """A float ``hidden_scale`` with ``int(hidden_scale * dim) == ff`` (4.125 for moshiko)."""
    scale = ff / dim
    while int(scale * dim) < ff:
        scale = float(np.nextafter(scale, np.inf))
    return scale


def moshi_config_from_kyutai(kw: Mapping[str, Any], **overrides) -> MoshiLMConfig:
    """A :class:`MoshiLMConfig` from a Kyutai ``get_moshi_lm`` kwargs dict (the shape of
    ``moshi.models.loaders._lm_kwargs`` / a release's ``config.json`` ``lm`` part). Keys that are
    missing take moshiko's values; a Kyutai feature moshax lacks raises :class:`~moshax.config.ConfigError`.
    ``overrides`` set MoshiLMConfig fields afterwards (e.g. ``param_dtype``)."""
    base = MoshiLMConfig()
    bt, bd = base.transformer, base.depformer
    kw = dict(kw)
    for key, ok in _UNSUPPORTED_LM_KWARGS.items():
        if key in kw and kw[key] not in (ok, None) and kw[key] != ok:
            raise ConfigError(f"Kyutai LM config: {key}={kw[key]!r} is not supported by moshax")
    gating = kw.get("gating", "silu")
    if gating not in ("silu", "gelu", "none"):
        raise ConfigError(f"Kyutai LM config: gating={gating!r} is not supported (silu, gelu, none)")
    norm = kw.get("norm", "rms_norm_f32")
    if norm not in _KYUTAI_NORMS:
        raise ConfigError(f"Kyutai LM config: norm={norm!r} is not supported ({', '.join(_KYUTAI_NORMS)})")
    pos = kw.get("positional_embedding", "rope")
    if pos not in ("rope", "none"):
        raise ConfigError(f"Kyutai LM config: positional_embedding={pos!r} is not supported (rope, none)")
    dim = int(kw.get("dim", bt.dim))
    ff = int(kw.get("hidden_scale", 4.125) * dim)
    eps = 1e-8 if _KYUTAI_NORMS[norm] == "rms_norm" else 1e-5
    temporal = TransformerConfig(
        dim=dim, num_heads=int(kw.get("num_heads", bt.num_heads)), num_layers=int(kw.get("num_layers", bt.num_layers)),
        hidden_dim=_gated_hidden(dim, ff, gating), context=int(kw.get("context") or bt.context),
        max_period=float(kw.get("max_period", bt.max_period)), positional=pos, norm=_KYUTAI_NORMS[norm], norm_eps=eps,
        gated=gating != "none", activation="gelu" if gating == "gelu" else "silu", layer_scale=kw.get("layer_scale"),
        causal=bool(kw.get("causal", True)))
    ddim = int(kw.get("depformer_dim", bd.dim))
    dgating = kw.get("depformer_gating", gating)
    if dgating not in ("silu", "gelu"):
        raise ConfigError(f"Kyutai LM config: depformer_gating={dgating!r} is not supported (silu, gelu)")
    dff = kw.get("depformer_dim_feedforward")
    if isinstance(dff, (list, tuple)):
        if len(set(dff)) != 1:
            raise ConfigError(f"Kyutai LM config: per-step depformer_dim_feedforward={list(dff)} is not supported")
        dff = dff[0]
    dff = int(dff if dff is not None else int(kw.get("hidden_scale", 4.125) * ddim))
    dpos = kw.get("depformer_pos_emb", "none")
    if dpos not in ("rope", "none"):
        raise ConfigError(f"Kyutai LM config: depformer_pos_emb={dpos!r} is not supported (rope, none)")
    depformer = TransformerConfig(
        dim=ddim, num_heads=int(kw.get("depformer_num_heads", bd.num_heads)),
        num_layers=int(kw.get("depformer_num_layers", bd.num_layers)), hidden_dim=_gated_hidden(ddim, dff, dgating),
        context=int(kw.get("depformer_context") or bd.context),
        max_period=float(kw.get("depformer_max_period", kw.get("max_period", bd.max_period))), positional=dpos,
        norm=_KYUTAI_NORMS[norm], norm_eps=eps, gated=True, activation="gelu" if dgating == "gelu" else "silu",
        layer_scale=kw.get("depformer_layer_scale", kw.get("layer_scale")), causal=bool(kw.get("causal", True)))
    sched = kw.get("depformer_weights_per_step_schedule")
    cfg = MoshiLMConfig(
        text_card=int(kw.get("text_card", base.text_card)), card=int(kw.get("card", base.card)),
        n_q=int(kw.get("n_q", base.n_q)), dep_q=int(kw.get("dep_q", base.dep_q)),
        delays=[int(d) for d in kw.get("delays", base.delays)], transformer=temporal, depformer=depformer,
        depformer_weights_per_step=bool(kw.get("depformer_weights_per_step", base.depformer_weights_per_step)),
        depformer_weights_per_step_schedule=None if sched is None else [int(s) for s in sched],
        depformer_multi_linear=bool(kw.get("depformer_multi_linear", base.depformer_multi_linear)),
        existing_text_padding_id=int(kw.get("existing_text_padding_id", 3)),
        existing_text_end_padding_id=int(kw.get("existing_text_end_padding_id", 0)))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.validate("kyutai config")
    return cfg


def moshi_config_to_kyutai(cfg: MoshiLMConfig) -> dict:
    """The Kyutai ``get_moshi_lm`` kwargs dict of a :class:`MoshiLMConfig` (inverse of
    :func:`moshi_config_from_kyutai`)."""
    t, d = cfg.transformer, cfg.depformer
    norm = "rms_norm_f32" if t.norm == "rms_norm" else "layer_norm"
    gating = "none" if not t.gated else t.activation
    return {
        "dim": t.dim, "text_card": cfg.text_card, "existing_text_padding_id": cfg.existing_text_padding_id,
        "existing_text_end_padding_id": cfg.existing_text_end_padding_id, "n_q": cfg.n_q, "dep_q": cfg.dep_q,
        "card": cfg.card, "num_heads": t.num_heads, "num_layers": t.num_layers,
        "hidden_scale": _hidden_scale_for(t.dim, _feedforward_for(t.dim, t.hidden_dim, t.gated)),
        "causal": t.causal, "layer_scale": t.layer_scale, "context": t.context, "max_period": t.max_period,
        "gating": gating, "norm": norm, "positional_embedding": t.positional,
        "depformer_dim": d.dim, "depformer_dim_feedforward": _feedforward_for(d.dim, d.hidden_dim, True),
        "depformer_num_heads": d.num_heads, "depformer_num_layers": d.num_layers,
        "depformer_layer_scale": d.layer_scale, "depformer_multi_linear": cfg.depformer_multi_linear,
        "depformer_context": d.context, "depformer_max_period": d.max_period, "depformer_gating": d.activation,
        "depformer_pos_emb": d.positional, "depformer_weights_per_step": cfg.depformer_weights_per_step,
        "depformer_weights_per_step_schedule": cfg.depformer_weights_per_step_schedule,
        "delays": list(cfg.delays),
    }
