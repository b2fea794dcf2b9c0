"""Kyutai Moshi LM checkpoints (safetensors) <-> moshax :class:`~moshax.models.moshi_lm.MoshiLM` params.

Kyutai layout (PyTorch ``nn.Linear`` weights are [out, in]) -> moshax:

* ``text_emb.weight`` [text_card+1, D] -> ``text_emb``; ``emb.{k}.weight`` -> ``emb`` [n_q, card+1, D];
  ``text_linear.weight`` [text_card, D] -> ``text_linear`` [D, text_card]; ``out_norm.alpha``
  [1, 1, D] -> [D];
* ``transformer.layers.{i}.self_attn.in_proj_weight`` [3D, D] (q, k, v blocks, heads contiguous)
  -> ``transformer.layers.self_attn.in_proj`` [L, D, 3, H, Dh]; ``out_proj.weight`` [D, D] ->
  ``out_proj`` [L, H, Dh, D]; ``gating.linear_in.weight`` [2F, D] (gate, up) -> ``mlp.linear_in``
  [L, D, 2, F]; ``gating.linear_out.weight`` [D, F] -> [L, F, D]; ``norm{1,2}.alpha`` -> [L, D];
* depformer: ``depformer.layers.{i}.self_attn.in_proj_weight`` [W*3*Dd, Dd] (all W weight sets
  stacked on axis 0) -> ``depformer.layers.self_attn.in_proj`` [L, W, Dd, 3, H, Dh];
  ``out_proj.weight`` [W*Dd, Dd] -> [L, W, H, Dh, Dd]; ``gating.{s}.linear_in/linear_out`` ->
  ``mlp.linear_in`` [L, W, Dd, 2, F] / ``linear_out`` [L, W, F, Dd]; ``depformer_in.{k}.weight``
  [Dd, D] -> ``depformer_in`` [n_in, D, Dd]; ``depformer_text_emb.weight``; ``depformer_emb.{k}``
  -> ``depformer_emb`` [dep_q-1, card+1, Dd]; ``linears.{k}.weight`` [card, Dd] -> ``linears``
  [dep_q, Dd, card].

Attention weights are read in the released form (``in_proj_weight`` / ``out_proj.weight``), as
``in_proj.weight``, or in moshi 0.2.13's own ``state_dict()`` form (``in_projs.{s}.weight`` /
``out_projs.{s}.weight``); they are always written in the released form. Files are read with
``safetensors`` (numpy; bf16 via ml_dtypes), one tensor at a time; no torch needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moshax.interop.lm_config import moshi_config_from_kyutai, moshi_config_to_kyutai
from moshax.models.moshi_lm import MoshiLM, MoshiLMConfig
from moshax.layers.params import dtype_of


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model config (lists every problem)."""


# ---------------------------------------------------------------------------------------------
# safetensors io
# ---------------------------------------------------------------------------------------------


class SafetensorsReader(Mapping):
    """Read-only mapping name -> numpy array over a .safetensors file, loading tensors on access."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {self.path}")
        self._f = safe_open(str(self.path), framework="np")
        self._keys = list(self._f.keys())

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        return self._f.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_safetensors(path: str | Path) -> SafetensorsReader:
    return SafetensorsReader(path)


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: dict | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Key plan
# ---------------------------------------------------------------------------------------------


class _Reader:
    """Tracks which keys were used, which are missing and which shapes are wrong."""

    def __init__(self, sd: Mapping[str, np.ndarray]):
        self.sd = sd
        self.keys = set(sd.keys())
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.bad_shapes: list[str] = []

    def get(self, key: str, shape: tuple | None = None):
        if key not in self.keys:
            self.missing.append(key)
            return None
        self.used.add(key)
        arr = np.asarray(self.sd[key])
        if shape is not None and tuple(arr.shape) != tuple(shape):
            self.bad_shapes.append(f"{key}: {tuple(arr.shape)}, expected {tuple(shape)}")
            return None
        return arr

    def get_stacked(self, alternatives: list[list[str]], shape: tuple):
        """First alternative (a list of keys, concatenated on axis 0) whose keys all exist."""
        for keys in alternatives:
            if all(k in self.keys for k in keys):
                parts = [self.get(k) for k in keys]
                arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
                if tuple(arr.shape) != tuple(shape):
                    self.bad_shapes.append(f"{' + '.join(keys)}: {tuple(arr.shape)}, expected {tuple(shape)}")
                    return None
                return arr
        self.missing.append(alternatives[0][0] if len(alternatives[0]) == 1 else
                            f"{alternatives[0][0]} (or {alternatives[-1][0]} ...)")
        return None

    def check(self, what: str) -> None:
        unexpected = sorted(self.keys - self.used)
        problems = []
        if self.missing:
            problems.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if self.bad_shapes:
            problems.append(f"wrong shapes ({len(self.bad_shapes)}): {'; '.join(self.bad_shapes)}")
        if problems:
            raise CheckpointMismatchError(f"{what} does not match the model config: " + " | ".join(problems))


def _attn_alternatives(prefix: str, name: str, mult: int) -> list[list[str]]:
    """Key forms of a (possibly per-step stacked) attention projection. name: 'in' or 'out'."""
    if name == "in":
        return [[f"{prefix}.in_proj_weight"], [f"{prefix}.in_proj.weight"],
                [f"{prefix}.in_projs.{s}.weight" for s in range(mult)]]
    return [[f"{prefix}.out_proj.weight"], [f"{prefix}.out_projs.{s}.weight" for s in range(mult)]]


# -- per-array layout changes (numpy, exact: only reshapes and transposes) ---------------------


def _in_proj_from(w, mult, heads, dim):  # [mult*3*dim, dim] -> [mult, dim, 3, H, Dh]
    return w.reshape(mult, 3, heads, dim // heads, dim).transpose(0, 4, 1, 2, 3)


def _in_proj_to(w):  # [mult, dim, 3, H, Dh] -> [mult*3*dim, dim]
    mult, dim = w.shape[0], w.shape[1]
    return w.transpose(0, 2, 3, 4, 1).reshape(mult * 3 * dim, dim)


def _out_proj_from(w, mult, heads, dim):  # [mult*dim(out), dim(in)] -> [mult, H, Dh, dim(out)]
    return w.reshape(mult, dim, heads, dim // heads).transpose(0, 2, 3, 1)


def _out_proj_to(w):  # [mult, H, Dh, dim] -> [mult*dim, dim]
    mult, dim = w.shape[0], w.shape[-1]
    return w.transpose(0, 3, 1, 2).reshape(mult * dim, dim)


def _gate_in_from(w, hidden, dim):  # [2F, D] -> [D, 2, F]
    return w.reshape(2, hidden, dim).transpose(2, 0, 1)


def _gate_in_to(w):  # [D, 2, F] -> [2F, D]
    dim, _, hidden = w.shape
    return w.transpose(1, 2, 0).reshape(2 * hidden, dim)


def _norm_names(norm: str) -> tuple[str, ...]:
    return ("alpha",) if norm == "rms_norm" else ("weight", "bias")


def _norm_kyutai_shape(norm: str, dim: int) -> tuple:
    return (1, 1, dim) if norm == "rms_norm" else (dim,)


# ---------------------------------------------------------------------------------------------
# Kyutai -> moshax
# ---------------------------------------------------------------------------------------------


def _stack(arrs):
    return None if any(a is None for a in arrs) else np.stack(arrs)


def _transformer_from(r: _Reader, prefix: str, tcfg, mult: int | None, per_step_gating: bool) -> dict:
    """Stacked params of a transformer (``mult`` None: temporal, no step axis; int: depformer
    with ``mult`` weight sets). Returns the moshax nested dict (arrays [L, ...])."""
    dim, heads, hidden, n_layers = tcfg.dim, tcfg.num_heads, tcfg.hidden_dim, tcfg.num_layers
    m = mult or 1
    layers: dict[str, list] = {k: [] for k in ("in_proj", "out_proj", "linear_in", "linear_out")}
    norms = {f"norm{j}": {n: [] for n in _norm_names(tcfg.norm)} for j in (1, 2)}
    scales: dict[str, list] = {"layer_scale_1": [], "layer_scale_2": []}
    for i in range(n_layers):
        p = f"{prefix}.layers.{i}"
        w = r.get_stacked(_attn_alternatives(f"{p}.self_attn", "in", m), (m * 3 * dim, dim))
        layers["in_proj"].append(None if w is None else _in_proj_from(w, m, heads, dim))
        w = r.get_stacked(_attn_alternatives(f"{p}.self_attn", "out", m), (m * dim, dim))
        layers["out_proj"].append(None if w is None else _out_proj_from(w, m, heads, dim))
        gate_prefixes = [f"{p}.gating.{s}" for s in range(m)] if per_step_gating else [f"{p}.gating"]
        lin_in, lin_out = [], []
        for g in gate_prefixes:
            if tcfg.gated:
                a = r.get(f"{g}.linear_in.weight", (2 * hidden, dim))
                lin_in.append(None if a is None else _gate_in_from(a, hidden, dim))
                a = r.get(f"{g}.linear_out.weight", (dim, hidden))
                lin_out.append(None if a is None else a.T)
            else:
                a = r.get(f"{p}.linear1.weight", (hidden, dim))
                lin_in.append(None if a is None else a.T)
                a = r.get(f"{p}.linear2.weight", (dim, hidden))
                lin_out.append(None if a is None else a.T)
        layers["linear_in"].append(_stack(lin_in))
        layers["linear_out"].append(_stack(lin_out))
        for j in (1, 2):
            for n in _norm_names(tcfg.norm):
                shape = _norm_kyutai_shape(tcfg.norm, dim) if n == "alpha" else (dim,)
                a = r.get(f"{p}.norm{j}.{n}", shape)
                norms[f"norm{j}"][n].append(None if a is None else a.reshape(dim))
        if tcfg.layer_scale is not None:
            for j in (1, 2):
                scales[f"layer_scale_{j}"].append(r.get(f"{p}.layer_scale_{j}.scale", (dim,)))

    def stacked(name):
        a = _stack(layers[name])
        if a is None or mult is not None:
            return a
        return a[:, 0]  # temporal: drop the single weight-set axis

    out = {
        "self_attn": {"in_proj": stacked("in_proj"), "out_proj": stacked("out_proj")},
        "mlp": {"linear_in": stacked("linear_in"), "linear_out": stacked("linear_out")},
    }
    for j in (1, 2):
        out[f"norm{j}"] = {n: _stack(v) for n, v in norms[f"norm{j}"].items()}
    if tcfg.layer_scale is not None:
        for k, v in scales.items():
            out[k] = _stack(v)
    return {"layers": out}


def lm_params_from_kyutai(sd: Mapping[str, np.ndarray], cfg: MoshiLMConfig, dtype=None) -> dict:
    """Kyutai state dict -> moshax pure param dict (the structure of
    ``nnx.to_pure_dict(nnx.state(MoshiLM(cfg), nnx.Param))``), numpy arrays cast to ``dtype``
    (default ``cfg.param_dtype``). Raises :class:`CheckpointMismatchError` listing every missing,
    unexpected or wrongly shaped key."""
    r = _Reader(sd)
    t, d = cfg.transformer, cfg.depformer
    D, Dd = t.dim, d.dim
    out: dict[str, Any] = {}
    out["text_emb"] = r.get("text_emb.weight", (cfg.text_card + 1, D))
    out["emb"] = _stack([r.get(f"emb.{k}.weight", (cfg.card + 1, D)) for k in range(cfg.n_q)])
    out["transformer"] = _transformer_from(r, "transformer", t, None, False)
    out["out_norm"] = {}
    for n in _norm_names(t.norm):
        a = r.get(f"out_norm.{n}", _norm_kyutai_shape(t.norm, D) if n == "alpha" else (D,))
        out["out_norm"][n] = None if a is None else a.reshape(D)
    a = r.get("text_linear.weight", (cfg.text_card, D))
    out["text_linear"] = None if a is None else a.T
    ins = [r.get(f"depformer_in.{k}.weight", (Dd, D)) for k in range(cfg.num_depformer_in)]
    out["depformer_in"] = None if any(a is None for a in ins) else np.stack([a.T for a in ins])
    out["depformer_text_emb"] = r.get("depformer_text_emb.weight", (cfg.text_card + 1, Dd))
    embs = [r.get(f"depformer_emb.{k}.weight", (cfg.card + 1, Dd)) for k in range(cfg.dep_q - 1)]
    out["depformer_emb"] = _stack(embs) if embs else np.zeros((0, cfg.card + 1, Dd), np.float32)
    out["depformer"] = _transformer_from(r, "depformer", d, cfg.num_depformer_weights,
                                         cfg.depformer_weights_per_step)
    lins = [r.get(f"linears.{k}.weight", (cfg.card, Dd)) for k in range(cfg.dep_q)]
    out["linears"] = None if any(a is None for a in lins) else np.stack([a.T for a in lins])
    r.check("Moshi LM checkpoint")
    np_dtype = np.dtype(dtype_of(dtype or cfg.param_dtype))
    return _map(out, lambda a: np.ascontiguousarray(a.astype(np_dtype, copy=False)))


def _map(tree, fn: Callable):
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(tree)


# ---------------------------------------------------------------------------------------------
# moshax -> Kyutai
# ---------------------------------------------------------------------------------------------


def _transformer_to(prefix: str, tree: dict, tcfg, mult: int | None, per_step_gating: bool) -> dict:
    lay = tree["layers"]
    sd = {}
    for i in range(tcfg.num_layers):
        p = f"{prefix}.layers.{i}"
        w_in, w_out = lay["self_attn"]["in_proj"][i], lay["self_attn"]["out_proj"][i]
        l_in, l_out = lay["mlp"]["linear_in"][i], lay["mlp"]["linear_out"][i]
        if mult is None:  # temporal: add the single weight-set axis
            w_in, w_out, l_in, l_out = w_in[None], w_out[None], l_in[None], l_out[None]
        sd[f"{p}.self_attn.in_proj_weight"] = _in_proj_to(w_in)
        sd[f"{p}.self_attn.out_proj.weight"] = _out_proj_to(w_out)
        gate_prefixes = [f"{p}.gating.{s}" for s in range(l_in.shape[0])] if per_step_gating else [f"{p}.gating"]
        for s, g in enumerate(gate_prefixes):
            if tcfg.gated:
                sd[f"{g}.linear_in.weight"] = _gate_in_to(l_in[s])
                sd[f"{g}.linear_out.weight"] = l_out[s].T
            else:
                sd[f"{p}.linear1.weight"] = l_in[s].T
                sd[f"{p}.linear2.weight"] = l_out[s].T
        for j in (1, 2):
            for n, v in lay[f"norm{j}"].items():
                v = v[i]
                sd[f"{p}.norm{j}.{n}"] = v.reshape(1, 1, -1) if n == "alpha" else v
        if tcfg.layer_scale is not None:
            for j in (1, 2):
                sd[f"{p}.layer_scale_{j}.scale"] = lay[f"layer_scale_{j}"][i]
    return sd


def lm_params_to_kyutai(params, cfg: MoshiLMConfig, dtype=None) -> dict[str, np.ndarray]:
    """moshax params (a :class:`MoshiLM`, its ``nnx.State`` or pure dict) -> Kyutai state dict in
    the released form (stacked ``in_proj_weight`` / ``out_proj.weight``), numpy arrays (cast to
    ``dtype`` when given, e.g. ``"bfloat16"``)."""
    tree = _pure_numpy(params)
    t, d = cfg.transformer, cfg.depformer
    sd: dict[str, np.ndarray] = {}
    for k in range(cfg.n_q):
        sd[f"emb.{k}.weight"] = tree["emb"][k]
    sd["text_emb.weight"] = tree["text_emb"]
    sd["text_linear.weight"] = tree["text_linear"].T
    sd.update(_transformer_to("transformer", tree["transformer"], t, None, False))
    for n, v in tree["out_norm"].items():
        sd[f"out_norm.{n}"] = v.reshape(1, 1, -1) if n == "alpha" else v
    for k in range(tree["depformer_in"].shape[0]):
        sd[f"depformer_in.{k}.weight"] = tree["depformer_in"][k].T
    for k in range(cfg.dep_q - 1):
        sd[f"depformer_emb.{k}.weight"] = tree["depformer_emb"][k]
    sd["depformer_text_emb.weight"] = tree["depformer_text_emb"]
    sd.update(_transformer_to("depformer", tree["depformer"], d, cfg.num_depformer_weights,
                              cfg.depformer_weights_per_step))
    for k in range(cfg.dep_q):
        sd[f"linears.{k}.weight"] = tree["linears"][k].T
    np_dtype = None if dtype is None else np.dtype(dtype_of(dtype))
    return {k: np.ascontiguousarray(v if np_dtype is None else v.astype(np_dtype)) for k, v in sd.items()}


def _pure_numpy(params) -> dict:
    from flax import nnx

    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return _map(params, np.asarray)


def kyutai_shapes(cfg: MoshiLMConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a released-form Kyutai checkpoint for ``cfg`` with its shape (no arrays built)."""
    t, d = cfg.transformer, cfg.depformer
    out: dict[str, tuple[int, ...]] = {}

    def stack(prefix, tcfg, mult, per_step_gating):
        dim, hid = tcfg.dim, tcfg.hidden_dim
        for i in range(tcfg.num_layers):
            p = f"{prefix}.layers.{i}"
            out[f"{p}.self_attn.in_proj_weight"] = (mult * 3 * dim, dim)
            out[f"{p}.self_attn.out_proj.weight"] = (mult * dim, dim)
            gates = [f"{p}.gating.{s}" for s in range(mult)] if per_step_gating else [f"{p}.gating"]
            for g in gates:
                if tcfg.gated:
                    out[f"{g}.linear_in.weight"] = (2 * hid, dim)
                    out[f"{g}.linear_out.weight"] = (dim, hid)
                else:
                    out[f"{p}.linear1.weight"] = (hid, dim)
                    out[f"{p}.linear2.weight"] = (dim, hid)
            for j in (1, 2):
                for n in _norm_names(tcfg.norm):
                    out[f"{p}.norm{j}.{n}"] = _norm_kyutai_shape(tcfg.norm, dim) if n == "alpha" else (dim,)
                if tcfg.layer_scale is not None:
                    out[f"{p}.layer_scale_{j}.scale"] = (dim,)

    for k in range(cfg.n_q):
        out[f"emb.{k}.weight"] = (cfg.card + 1, t.dim)
    out["text_emb.weight"] = (cfg.text_card + 1, t.dim)
    out["text_linear.weight"] = (cfg.text_card, t.dim)
    stack("transformer", t, 1, False)
    for n in _norm_names(t.norm):
        out[f"out_norm.{n}"] = _norm_kyutai_shape(t.norm, t.dim) if n == "alpha" else (t.dim,)
    for k in range(cfg.num_depformer_in):
        out[f"depformer_in.{k}.weight"] = (d.dim, t.dim)
    for k in range(cfg.dep_q - 1):
        out[f"depformer_emb.{k}.weight"] = (cfg.card + 1, d.dim)
    out["depformer_text_emb.weight"] = (cfg.text_card + 1, d.dim)
    stack("depformer", d, cfg.num_depformer_weights, cfg.depformer_weights_per_step)
    for k in range(cfg.dep_q):
        out[f"linears.{k}.weight"] = (cfg.card, d.dim)
    return out


# ---------------------------------------------------------------------------------------------
# Model-level helpers
# ---------------------------------------------------------------------------------------------


def load_lm_params(model: MoshiLM, source: str | Path | Mapping[str, np.ndarray]) -> MoshiLM:
    """Fill ``model``'s params (in place) from a Kyutai checkpoint path or state dict; returns it.
    Arrays land in each param's dtype and sharding (bf16 checkpoints load into the configured
    dtype; build the model under the mesh first to load straight into sharded params)."""
    import jax
    from flax import nnx

    sd = read_safetensors(source) if isinstance(source, (str, Path)) else source
    pure = lm_params_from_kyutai(sd, model.cfg)
    state = nnx.state(model, nnx.Param)
    current = nnx.to_pure_dict(state)
    bad = []

    def check(path, cur, new):
        if tuple(cur.shape) != tuple(new.shape):
            bad.append(f"{'.'.join(map(str, path))}: checkpoint {tuple(new.shape)} vs model {tuple(cur.shape)}")

    _walk2(current, pure, check, ())
    if bad:
        raise CheckpointMismatchError("Moshi LM checkpoint does not fit the model: " + "; ".join(bad))
    # keep each param's dtype and sharding (a model built under a mesh stays sharded)
    pure = _map2(current, pure, lambda cur, new: jax.device_put(np.asarray(new).astype(cur.dtype), cur.sharding))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def save_lm_params(model_or_params, cfg: MoshiLMConfig, path: str | Path, dtype=None) -> None:
    """Write a Kyutai-format (released layout) safetensors file."""
    write_safetensors(path, lm_params_to_kyutai(model_or_params, cfg, dtype=dtype))


def _walk2(a, b, fn, path):
    if isinstance(a, dict):
        if set(a) != set(b):
            raise CheckpointMismatchError(f"param tree mismatch at {'.'.join(map(str, path)) or '<root>'}: "
                                          f"{sorted(map(str, a))} vs {sorted(map(str, b))}")
        for k in a:
            _walk2(a[k], b[k], fn, path + (k,))
    else:
        fn(path, a, b)


def _map2(a, b, fn):
    if isinstance(a, dict):
        return {k: _map2(a[k], b[k], fn) for k in a}
    return fn(a, b)


# ---------------------------------------------------------------------------------------------
# The interop the registry (kind "moshi") names
# ---------------------------------------------------------------------------------------------

config_from_kyutai = moshi_config_from_kyutai
config_to_kyutai = moshi_config_to_kyutai
WeightsError = CheckpointMismatchError


def params_from_kyutai(weights: str | Path, cfg: MoshiLMConfig) -> tuple[dict, dict]:
    """A Kyutai ``.safetensors`` Moshi LM -> (params, rest={}) pure numpy dicts for ``cfg``."""
    return lm_params_from_kyutai(read_safetensors(weights), cfg), {}


def params_to_kyutai(params: dict, rest: dict, cfg: MoshiLMConfig, dtype=None) -> dict[str, np.ndarray]:
    del rest
    return lm_params_to_kyutai(params, cfg, dtype=dtype)


def write_kyutai(path: str | Path, tensors: Mapping[str, np.ndarray]) -> None:
    write_safetensors(path, tensors)
