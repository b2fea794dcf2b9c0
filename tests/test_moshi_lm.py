"""Moshi LM (RQ-Transformer) against Kyutai's PyTorch reference (moshi 0.2.13): random-weight
reference models saved as safetensors, loaded through moshax.interop.lm_weights; same codes
(with -1 entries) -> same text/audio logits and masks. Also: weight round trips, the loss against
numpy, step-by-step depformer == teacher-forced depformer, the -1 token, configs."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from moshax import config as moshax_config
from moshax.config import ConfigError, TransformerConfig
from moshax.interop.lm_weights import (
    CheckpointMismatchError, kyutai_shapes, lm_params_from_kyutai, lm_params_to_kyutai, load_lm_params, read_safetensors,
    save_lm_params, write_safetensors)
from moshax.models.moshi_lm import (
    MoshiLM, MoshiLMConfig, MoshiTaskConfig, delay_sequence, initial_tokens, loss, total_loss)

from requirements import REFERENCE, require_module

os.environ.setdefault("NO_TORCH_COMPILE", "1")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# jitted once per module (nnx.jit caches per function object): the tests share compilations
FORWARD = nnx.jit(lambda m, c: m.forward_train(c))


def _reference():
    torch = require_module("torch", REFERENCE)
    require_module("moshi", REFERENCE)
    from moshi.models import loaders

    torch.set_num_threads(2)
    return torch, loaders


def tiny_config(**kw) -> MoshiLMConfig:
    """A tiny moshiko-layout LM: dim 64, 2 layers, text 100, card 64, depformer dim 32."""
    dep = kw.pop("depformer", {})
    base = dict(text_card=100, card=64, n_q=16, dep_q=8, delays=[0, 0] + [1] * 7 + [0] + [1] * 7,
                transformer=TransformerConfig(dim=64, num_heads=4, num_layers=2, hidden_dim=176, context=100),
                depformer=TransformerConfig(**{**dict(dim=32, num_heads=4, num_layers=2, hidden_dim=88, context=8,
                                                      positional="none"), **dep}))
    base.update(kw)
    cfg = MoshiLMConfig(**base)
    cfg.validate()
    return cfg


def kyutai_kwargs(cfg: MoshiLMConfig) -> dict:
    """moshi's get_moshi_lm kwargs for a MoshiLMConfig (rms_norm_f32, silu gating, no biases)."""
    _, loaders = _reference()
    t, d = cfg.transformer, cfg.depformer
    ff, dff = t.hidden_dim * 3 // 2, d.hidden_dim * 3 // 2  # the reference's gated hidden = 2 * ff // 3
    assert ff != 4 * t.dim and dff != 4 * d.dim
    return dict(loaders._lm_kwargs, dim=t.dim, text_card=cfg.text_card, card=cfg.card, n_q=cfg.n_q, dep_q=cfg.dep_q,
                num_heads=t.num_heads, num_layers=t.num_layers, hidden_scale=ff / t.dim, context=t.context,
                max_period=t.max_period, delays=list(cfg.delays), depformer_dim=d.dim,
                depformer_dim_feedforward=dff, depformer_num_heads=d.num_heads, depformer_num_layers=d.num_layers,
                depformer_max_period=d.max_period,
                depformer_pos_emb="rope" if d.positional == "rope" else "none",
                depformer_weights_per_step=cfg.depformer_weights_per_step,
                depformer_weights_per_step_schedule=cfg.depformer_weights_per_step_schedule,
                depformer_multi_linear=cfg.depformer_multi_linear)


def reference_lm(cfg: MoshiLMConfig, seed: int = 0):
    torch, loaders = _reference()
    torch.manual_seed(seed)
    lm = loaders.get_moshi_lm(None, kyutai_kwargs(cfg), device="cpu", dtype=torch.float32)
    lm.eval()
    with torch.no_grad():  # the norms start at 1: randomize them so a transposed alpha would show
        for name, p in lm.named_parameters():
            if name.endswith("alpha"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return lm


def random_codes(cfg: MoshiLMConfig, batch: int, steps: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    text = rng.integers(0, cfg.text_card, (batch, 1, steps))
    text[:, :, ::3] = cfg.existing_text_padding_id  # plenty of PAD / EPAD targets
    text[:, :, 1::5] = cfg.existing_text_end_padding_id
    audio = rng.integers(0, cfg.card, (batch, cfg.n_q, steps))
    codes = np.concatenate([text, audio], axis=1).astype(np.int64)
    zero = rng.random(codes.shape) < 0.06  # -1 = "zero" token, anywhere (text, predicted, user)
    codes[zero] = -1
    codes[0, 0, 2] = codes[-1, 1, 3] = codes[0, 5, -1] = codes[-1, 12, 0] = -1
    return codes


def converted(cfg: MoshiLMConfig, lm, tmp_path: Path, name: str = "lm.safetensors") -> MoshiLM:
    """Save the reference's own state dict with safetensors, load it through moshax's interop."""
    import safetensors.torch

    path = tmp_path / name
    safetensors.torch.save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(path))
    model = MoshiLM(cfg, rngs=nnx.Rngs(123))
    return load_lm_params(model, path)


def compare(lm, model, codes):
    torch, _ = _reference()
    with torch.no_grad():
        ref = lm(torch.from_numpy(codes).long())
    out = FORWARD(model, jnp.asarray(codes, jnp.int32))
    diffs = {}
    for key, ref_val in (("text_logits", ref.text_logits), ("logits", ref.logits)):
        a, b = ref_val.numpy(), np.asarray(out[key])
        assert a.shape == b.shape, (key, a.shape, b.shape)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{key}: NaN (past-the-end) pattern")
        valid = ~np.isnan(a)
        diffs[key] = float(np.abs(a[valid] - b[valid]).max())
        np.testing.assert_allclose(b[valid], a[valid], atol=1e-4, rtol=0, err_msg=key)
    np.testing.assert_array_equal(np.asarray(out["mask"]), ref.mask.numpy())
    np.testing.assert_array_equal(np.asarray(out["text_mask"]), ref.text_mask.numpy())
    assert not np.asarray(out["mask"]).all() and not np.asarray(out["text_mask"]).all()
    return out, diffs


PARITY = {
    # tiny, moshiko layout (delays 0/1, per-step depformer, 2+2 layers)
    "lm_tiny": dict(),
    # pretraining-style acoustic delay 2, deeper per-step depformer
    "delay2_dep3": dict(delays=[0, 0] + [2] * 7 + [0] + [2] * 7,
                        depformer=dict(num_layers=3), depformer_weights_per_step=True),
    # one shared depformer weight set and input projection, RoPE in the depformer, mixed delays
    "shared_rope": dict(delays=[1, 0, 2, 1, 1, 0, 3, 1, 1, 0, 2, 1, 1, 1, 1, 0, 1], depformer=dict(positional="rope"),
                        depformer_weights_per_step=False, depformer_multi_linear=False),
    # a weight-sharing schedule over the 8 depth steps
    "schedule": dict(depformer_weights_per_step_schedule=[0, 1, 1, 2, 2, 2, 3, 3]),
}


@pytest.mark.parametrize("variant", [v if v in ("lm_tiny", "delay2_dep3") else pytest.param(v, marks=pytest.mark.slow)
                                     for v in PARITY])
def test_forward_matches_reference(variant, tmp_path):
    cfg = tiny_config(**PARITY[variant])
    lm = reference_lm(cfg, seed=len(variant))
    model = converted(cfg, lm, tmp_path)
    codes = random_codes(cfg, batch=2, steps=12, seed=len(variant))
    _, diffs = compare(lm, model, codes)
    print(f"{variant}: max |logit diff| text {diffs['text_logits']:.2e} audio {diffs['logits']:.2e}")
    assert diffs["text_logits"] < 1e-4 and diffs["logits"] < 1e-4


def test_round_trip_bitwise(tmp_path):
    torch, _ = _reference()
    cfg = tiny_config(delays=[0, 0] + [2] * 7 + [0] + [2] * 7, depformer=dict(num_layers=3))
    lm = reference_lm(cfg, seed=3)
    own = {k: v.numpy() for k, v in lm.state_dict().items()}  # moshi 0.2.13: in_projs.{s} / out_projs.{s}
    assert any(".in_projs.7.weight" in k for k in own)

    params = lm_params_from_kyutai(own, cfg)
    released = lm_params_to_kyutai(params, cfg)
    # released form: per-step weights stacked on axis 0 under in_proj_weight / out_proj.weight
    for i in range(cfg.depformer.num_layers):
        p = f"depformer.layers.{i}.self_attn"
        np.testing.assert_array_equal(released[f"{p}.in_proj_weight"],
                                      np.concatenate([own[f"{p}.in_projs.{s}.weight"] for s in range(8)]))
        np.testing.assert_array_equal(released[f"{p}.out_proj.weight"],
                                      np.concatenate([own[f"{p}.out_projs.{s}.weight"] for s in range(8)]))
    assert released["depformer.layers.0.self_attn.in_proj_weight"].shape == (8 * 3 * 32, 32)
    assert not any("in_projs" in k or "out_projs" in k for k in released)
    # every other key unchanged, bitwise
    split_names = ("in_projs", "out_projs")
    for k, v in own.items():
        if not any(s in k for s in split_names):
            assert released[k].dtype == v.dtype and np.array_equal(released[k], v), k
    assert len(released) == len(own) - 2 * (8 - 1) * cfg.depformer.num_layers

    # to_kyutai(from_kyutai(released)) is bitwise the released dict
    again = lm_params_to_kyutai(lm_params_from_kyutai(released, cfg), cfg)
    assert set(again) == set(released)
    for k in released:
        assert again[k].dtype == released[k].dtype and np.array_equal(again[k], released[k]), k
    assert {k: v.shape for k, v in released.items()} == kyutai_shapes(cfg)

    # ... through a model and a file, too; and the reference loads the released form
    path = tmp_path / "released.safetensors"
    model = load_lm_params(MoshiLM(cfg, rngs=nnx.Rngs(0)), released)
    save_lm_params(model, cfg, path)
    from_file = dict(read_safetensors(path))
    assert set(from_file) == set(released)
    for k in released:
        assert np.array_equal(from_file[k], released[k]), k
    fresh = reference_lm(cfg, seed=99)
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in from_file.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        assert np.array_equal(v.numpy(), own[k]), k


def test_bf16_checkpoint_loads_into_configured_dtype(tmp_path):
    import ml_dtypes

    cfg = tiny_config()
    model = MoshiLM(cfg, rngs=nnx.Rngs(0))
    sd = lm_params_to_kyutai(model, cfg, dtype="bfloat16")
    assert all(v.dtype == ml_dtypes.bfloat16 for v in sd.values())
    write_safetensors(tmp_path / "bf16.safetensors", sd)
    loaded = load_lm_params(MoshiLM(cfg, rngs=nnx.Rngs(1)), tmp_path / "bf16.safetensors")
    assert loaded.text_emb[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(loaded.text_emb[...]), sd["text_emb.weight"].astype(np.float32))
    back = lm_params_to_kyutai(loaded, cfg, dtype="bfloat16")
    for k in sd:
        assert np.array_equal(back[k], sd[k]), k
    cfg16 = tiny_config(param_dtype="bfloat16")
    assert lm_params_from_kyutai(sd, cfg16)["transformer"]["layers"]["mlp"]["linear_in"].dtype == ml_dtypes.bfloat16


def test_mismatched_checkpoint_lists_every_problem():
    cfg = tiny_config()
    sd = lm_params_to_kyutai(MoshiLM(cfg, rngs=nnx.Rngs(0)), cfg)
    del sd["linears.3.weight"]
    del sd["transformer.layers.1.self_attn.in_proj_weight"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["text_emb.weight"] = sd["text_emb.weight"][:-1]
    with pytest.raises(CheckpointMismatchError) as e:
        lm_params_from_kyutai(sd, cfg)
    msg = str(e.value)
    for part in ("linears.3.weight", "transformer.layers.1.self_attn.in_proj_weight", "extra.weight",
                 "text_emb.weight: (100, 64), expected (101, 64)"):
        assert part in msg, msg
    other = tiny_config(depformer=dict(num_layers=3))  # checkpoint of another size
    with pytest.raises(CheckpointMismatchError, match="depformer.layers.2"):
        lm_params_from_kyutai(lm_params_to_kyutai(MoshiLM(cfg, rngs=nnx.Rngs(0)), cfg), other)


def test_zero_token_embeds_to_zero():
    cfg = tiny_config()
    model = MoshiLM(cfg, rngs=nnx.Rngs(0))
    seq = jnp.full((2, cfg.num_streams, 5), -1, jnp.int32)
    assert np.all(np.asarray(model.embed(seq)) == 0.0)
    # one stream at -1 contributes exactly nothing
    codes = jnp.asarray(random_codes(cfg, 2, 5, seed=1).clip(0), jnp.int32)
    only_text = codes.at[:, 1:].set(-1)
    np.testing.assert_array_equal(np.asarray(model.embed(only_text)),
                                  np.asarray(model.text_emb[...])[np.asarray(codes[:, 0])])


def _numpy_loss(out, codes, cfg, w):
    def ce(logits, targets, mask, weights):
        logits = np.where(mask[..., None], logits, 0.0).astype(np.float64)
        t = np.where(mask, targets, 0)
        m = logits.max(-1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
        nll = logz - np.take_along_axis(logits, t[..., None], -1)[..., 0]
        w = np.where(mask, weights, 0.0)
        return (nll * w).sum(), w.sum()

    text_t = codes[:, :1]
    pad = (text_t == cfg.existing_text_padding_id) | (text_t == cfg.existing_text_end_padding_id)
    text = ce(out["text_logits"], text_t, out["text_mask"], np.where(pad, w.text_padding_weight, 1.0))
    audio_t = codes[:, 1:1 + cfg.dep_q]
    sem = ce(out["logits"][:, :1], audio_t[:, :1], out["mask"][:, :1], w.semantic_weight)
    aco = ce(out["logits"][:, 1:], audio_t[:, 1:], out["mask"][:, 1:], w.acoustic_weight)
    return dict(text=text, semantic=sem, acoustic=aco, audio=(sem[0] + aco[0], sem[1] + aco[1]))


def test_loss_matches_numpy_and_has_finite_gradients():
    cfg = tiny_config()
    model = MoshiLM(cfg, rngs=nnx.Rngs(0))
    codes = random_codes(cfg, 2, 12, seed=5)  # the parity tests' shape: FORWARD may reuse its compilation
    out = FORWARD(model, jnp.asarray(codes, jnp.int32))
    got = loss(out, jnp.asarray(codes), cfg)  # default weights: moshi-finetune's
    want = _numpy_loss({k: np.asarray(v) for k, v in out.items()}, codes, cfg, MoshiTaskConfig())
    for key in ("text", "semantic", "acoustic", "audio"):
        np.testing.assert_allclose(float(got[key][0]), want[key][0], rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(float(got[key][1]), want[key][1], rtol=1e-6, err_msg=key)
    # the weights: PAD/EPAD count half, the semantic codebook 100x
    mask = np.asarray(out["mask"])
    assert float(got["semantic"][1]) == 100.0 * mask[:, 0].sum()
    assert float(got["acoustic"][1]) == mask[:, 1:].sum()
    want_total = want["text"][0] / want["text"][1] + want["audio"][0] / want["audio"][1]
    np.testing.assert_allclose(float(total_loss(got)), want_total, rtol=1e-5)
    assert np.isfinite(want_total)

    # NaN (past-the-end) logits must not leak into gradients
    logits = {k: out[k] for k in ("text_logits", "logits")}
    grads = jax.grad(lambda lg: total_loss(loss({**out, **lg}, jnp.asarray(codes), cfg)))(logits)
    for key in ("text_logits", "logits"):
        g = np.asarray(grads[key])
        assert np.isfinite(g).all(), key
        masked = ~np.asarray(out["mask" if key == "logits" else "text_mask"])
        assert masked.any() and np.all(g[masked] == 0.0), key
        assert np.abs(g[~masked]).sum() > 0, key


def test_depformer_steps_match_teacher_forcing():
    cfg = tiny_config(depformer_weights_per_step_schedule=[0, 1, 1, 2, 3, 4, 5, 5], depformer=dict(positional="rope"))
    model = MoshiLM(cfg, rngs=nnx.Rngs(2))
    b, t = 2, 4
    codes = jnp.asarray(random_codes(cfg, b, t, seed=2), jnp.int32)
    init = initial_tokens(cfg)
    delayed = jnp.concatenate([jnp.broadcast_to(init[None, :, None], (b, cfg.num_streams, 1)),
                               delay_sequence(codes, cfg.delays, init)], axis=2)

    @nnx.jit
    def teacher_forced(m, seq):
        tout, _, _ = m.forward_text(seq[:, :, :-1])
        return tout, m.forward_depformer_training(seq[:, :, 1:], tout)  # [B, dep_q, T, card]

    tout, want = teacher_forced(model, delayed)

    step = nnx.jit(lambda m, s, tok, x, c: m.depformer_step(s, tok, x, c))
    for ti in range(t):
        cache = model.init_depformer_state(b)
        for s in range(cfg.dep_q):
            logits, cache = step(model, jnp.int32(s), delayed[:, s, ti + 1], tout[:, ti], cache)
            np.testing.assert_allclose(np.asarray(logits), np.asarray(want[:, s, ti]), atol=2e-5, rtol=0)


def test_config_validation():
    with pytest.raises(ConfigError, match="delays has 3 entries"):
        tiny_config(delays=[0, 1, 1])
    with pytest.raises(ConfigError, match="dep_q=17 exceeds"):
        tiny_config(dep_q=17)
    with pytest.raises(ConfigError, match="schedule has 2 entries"):
        tiny_config(depformer_weights_per_step_schedule=[0, 1])
    with pytest.raises(ConfigError, match="existing_text_padding_id=100"):
        tiny_config(existing_text_padding_id=100)
    with pytest.raises(ConfigError, match="model.depformer.dim=30 is not divisible"):
        tiny_config(depformer=dict(dim=30))


def test_tiny_yaml_builds_and_traces():
    cfg = moshax_config.load_config(CONFIGS / "moshi_tiny.yaml", ["model.transformer.num_layers=2"]).model
    assert isinstance(cfg, MoshiLMConfig) and cfg.delays[1] == 0 and cfg.delays[2] == 1
    model = nnx.eval_shape(lambda: MoshiLM(cfg, rngs=nnx.Rngs(0)))
    codes = jnp.asarray(random_codes(cfg, 2, 6, seed=0), jnp.int32)

    def run(m, c):
        out = m.forward_train(c)
        return out, total_loss(loss(out, c, cfg))

    out, total = nnx.eval_shape(run, model, codes)  # traces the whole model, compiles nothing
    assert out["logits"].shape == (2, 8, 6, 2048) and out["text_logits"].shape == (2, 1, 6, 512)
    assert out["mask"].dtype == jnp.bool_ and total.shape == () and total.dtype == jnp.float32


def test_7b_config_matches_moshiko():
    torch, loaders = _reference()
    cfg = moshax_config.load_config(CONFIGS / "moshi_7b.yaml").model
    assert cfg.delays == loaders._lm_kwargs["delays"]
    shapes = nnx.eval_shape(lambda: MoshiLM(cfg, rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(shapes, nnx.Param)))
    from moshi.models.lm import LMModel

    kw = {k: v for k, v in loaders._lm_kwargs.items()}
    ref = LMModel(device="meta", dtype=torch.float32, **kw)  # no memory: meta tensors
    shapes_ref = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert n == sum(int(np.prod(s)) for s in shapes_ref.values())
    print(f"moshi_7b params: {n / 1e9:.3f}B")
    # the released-form keys: the reference's own keys with per-step attention stacked on axis 0
    released = {}
    for k, shape in shapes_ref.items():
        for own, rel in ((".in_projs.", ".in_proj_weight"), (".out_projs.", ".out_proj.weight")):
            if own in k:
                key = k.split(own)[0] + rel
                old = released.get(key, (0, shape[1]))
                released[key] = (old[0] + shape[0], shape[1])
                break
        else:
            released[k] = shape
    assert kyutai_shapes(cfg) == released

