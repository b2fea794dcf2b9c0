"""`moshax convert`: Kyutai safetensors <-> moshax model checkpoints for the Moshi LM and Mimi
(round trips bitwise, parity of the converted LM with the reference, the checkpoint layout other
tools read, warm start from a converted LM, Kyutai config dicts, one-line errors)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moshax.cli import main
from moshax.checkpoint.model import build_model_from_checkpoint, open_checkpoint
from moshax.config import ConfigError
from moshax.interop.lm_config import moshi_config_from_kyutai, moshi_config_to_kyutai
from moshax.interop.lm_weights import read_safetensors
from moshax.models.moshi_lm import MoshiLMConfig

from requirements import REFERENCE, require_module

os.environ.setdefault("NO_TORCH_COMPILE", "1")


def _ref():
    torch = require_module("torch", REFERENCE)
    require_module("moshi", REFERENCE)
    from moshi.models import loaders

    torch.set_num_threads(2)
    return torch, loaders


def test_kyutai_lm_configs_round_trip():
    _, loaders = _ref()
    from test_moshi_lm import PARITY, kyutai_kwargs, tiny_config

    assert moshi_config_from_kyutai(loaders._lm_kwargs) == MoshiLMConfig()  # moshiko
    assert moshi_config_from_kyutai({}) == MoshiLMConfig()  # missing keys: moshiko's values
    for variant, kw in PARITY.items():
        cfg = tiny_config(**kw)
        theirs = kyutai_kwargs(cfg)
        assert moshi_config_from_kyutai(theirs) == cfg, variant
        assert moshi_config_from_kyutai(moshi_config_to_kyutai(cfg)) == cfg, variant
    with pytest.raises(ConfigError, match="demux_second_text_stream=True is not supported"):
        moshi_config_from_kyutai({**loaders._lm_kwargs, "demux_second_text_stream": True})
    with pytest.raises(ConfigError, match="norm='weird'"):
        moshi_config_from_kyutai({"norm": "weird"})


def test_lm_from_and_to_kyutai(devices, tmp_path, capsys):
    """A bf16 'released' file -> float32 moshax checkpoint (same logits as the reference) -> bf16
    safetensors bitwise equal to the input; the checkpoint layout; warm start from it."""
    import ml_dtypes
    import orbax.checkpoint as ocp

    from test_moshi_lm import compare, kyutai_kwargs, random_codes, reference_lm, tiny_config

    from moshax.interop.lm_weights import lm_params_from_kyutai, lm_params_to_kyutai, write_safetensors

    torch, _ = _ref()
    cfg = tiny_config()
    lm = reference_lm(cfg, seed=11)
    released = lm_params_to_kyutai(lm_params_from_kyutai({k: v.numpy() for k, v in lm.state_dict().items()}, cfg),
                                   cfg, dtype="bfloat16")
    weights = tmp_path / "model.safetensors"
    write_safetensors(weights, released)
    (tmp_path / "cfg.json").write_text(json.dumps(kyutai_kwargs(cfg)))
    out = tmp_path / "ckpt"
    assert main(["convert", "from-kyutai", "--model", "lm", str(weights), "--output", str(out),
                 "--kyutai-config", str(tmp_path / "cfg.json")]) == 0
    assert "wrote moshi checkpoint" in capsys.readouterr().out

    # layout: CKPT/0/{state,meta}; state = {params, rest}; meta = {format, kind, config, source}
    assert (out / "0" / "state").is_dir() and (out / "0" / "meta").is_dir()
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(out / "0" / "meta")
    assert meta["kind"] == "moshi" and meta["format"] == "moshax-model/1" and meta["source"] == str(weights)
    assert meta["config"]["kind"] == "moshi" and meta["config"]["text_card"] == cfg.text_card
    ckpt = open_checkpoint(out)
    assert ckpt.model_kind == "moshi" and ckpt.model_config() == cfg
    model, _ = build_model_from_checkpoint(ckpt)
    assert model.text_emb[...].dtype == jnp.float32  # bf16 file -> the config's param dtype
    np.testing.assert_array_equal(np.asarray(model.text_emb[...]), released["text_emb.weight"].astype(np.float32))

    # the converted model computes what the reference computes with the same (bf16-rounded) weights
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    compare(lm, model, random_codes(cfg, batch=2, steps=10, seed=4))

    # back to a released-form bf16 file: bitwise the input
    back = tmp_path / "back.safetensors"
    assert main(["convert", "to-kyutai", "--model", "moshi", "--checkpoint", str(out), "--output", str(back),
                 "--dtype", "bfloat16"]) == 0
    again = dict(read_safetensors(back))
    assert set(again) == set(released)
    for k, v in released.items():
        assert again[k].dtype == ml_dtypes.bfloat16 and np.array_equal(again[k], v), k

    # task.init_from a converted Moshi LM copies every param, onto the target shardings
    from moshax.config import MeshConfig
    from moshax.models.moshi_lm import MoshiLM
    from moshax.parallel.mesh import build_mesh
    from moshax.parallel.partition import ModelHandle
    from moshax.training.moshi_task import warm_start

    mesh = build_mesh(MeshConfig(2, 2, 2), jax.devices())
    handle = ModelHandle.from_constructor(lambda r: MoshiLM(cfg, rngs=r))
    shardings = handle.shardings(mesh)
    params, loaded = warm_start(handle.shapes(), {}, cfg, str(out), shardings, mesh)
    assert loaded.startswith("every param from the Moshi LM checkpoint")
    assert jax.tree.map(lambda a: a.sharding, params) == shardings
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # one-line errors, exit 2
    assert main(["convert", "to-kyutai", "--model", "mimi", "--checkpoint", str(out), "--output",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "holds a moshi model, not --model mimi" in capsys.readouterr().err
    assert main(["convert", "from-kyutai", "--model", "lm", str(weights), "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err  # the moshiko config does not fit the tiny file
    assert err.count("\n") == 1 and "Moshi LM checkpoint" in err
    assert main(["convert", "from-kyutai", "--model", "lm", str(weights), "--output", str(out),
                 "--kyutai-config", str(tmp_path / "cfg.json")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["convert", "from-kyutai", "--model", "lm", str(tmp_path / "nope.safetensors"), "--output",
                 str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_mimi_from_and_to_kyutai(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from test_mimi_parity import build_reference, kyutai_config, released_form, tiny_config

    from moshax.interop.mimi_weights import kyutai_state_dict, mimi_from_kyutai_state_dict

    cfg = tiny_config()
    ref = build_reference(cfg, seed=2)
    sd = {k: v.numpy() for k, v in released_form(ref.state_dict()).items()}
    weights = tmp_path / "mimi.safetensors"
    save_file(sd, str(weights))
    (tmp_path / "mimi.json").write_text(json.dumps(kyutai_config(cfg)))
    out = tmp_path / "ckpt"
    assert main(["convert", "from-kyutai", "--model", "mimi", str(weights), "--output", str(out),
                 "--kyutai-config", str(tmp_path / "mimi.json")]) == 0
    ckpt = open_checkpoint(out)
    assert ckpt.meta["kind"] == "mimi" and ckpt.model_kind == "mimi"
    got = ckpt.model_config()
    assert got.seanet == cfg.seanet and got.transformer == cfg.transformer
    assert (got.quantizer.dimension, got.quantizer.bins, got.quantizer.n_q) == (32, 128, 8)
    mimi, _ = build_model_from_checkpoint(ckpt)
    direct = mimi_from_kyutai_state_dict(sd, got)
    a, b = kyutai_state_dict(mimi), kyutai_state_dict(direct)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)  # codebook buffers ("rest") too
    back = tmp_path / "back.safetensors"
    assert main(["convert", "to-kyutai", "--model", "mimi", "--checkpoint", str(out), "--output", str(back)]) == 0
    again = load_file(str(back))
    assert set(again) == set(sd)
    for k, v in sd.items():
        assert np.array_equal(again[k], v), k
    capsys.readouterr()
    # without --kyutai-config, mimi.json beside mimi.safetensors is read
    assert main(["convert", "from-kyutai", "--model", "mimi", str(weights), "--output", str(tmp_path / "o")]) == 0
    assert f"config: {tmp_path / 'mimi.json'}" in capsys.readouterr().out
    # without either, the released architecture is expected: a tiny file does not fit
    (tmp_path / "mimi.json").unlink()
    assert main(["convert", "from-kyutai", "--model", "mimi", str(weights), "--output", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ------------------------------------------------------------------ Kyutai config JSON round trip


def _non_release_mimi():
    from moshax.config import TransformerConfig
    from moshax.models.mimi.config import MimiConfig, QuantizerConfig, SEANetConfig

    return MimiConfig(
        seanet=SEANetConfig(dimension=32, n_filters=4, ratios=[8, 6, 5, 4], true_skip=False, elu_alpha=0.5,
                            n_residual_layers=2, compress=4),
        transformer=TransformerConfig(dim=32, num_heads=2, num_layers=1, hidden_dim=48, gated=False,
                                      activation="gelu", norm="layer_norm", norm_eps=1e-5, layer_scale=None,
                                      context=10, max_period=5000.0, positional="rope", causal=True),
        quantizer=QuantizerConfig(dimension=16, bins=64, n_q=6, n_q_semantic=2, num_codebooks=4, decay=0.95))


def test_mimi_kyutai_configs_round_trip():
    from moshax.config import load_config
    from moshax.interop.mimi_weights import config_from_kyutai, config_to_kyutai
    from moshax.models.mimi.config import MimiConfig

    from moshax import registry

    assert registry.get("mimi").load("kyutai").config_to_kyutai is config_to_kyutai
    assert registry.get("moshi").load("kyutai").config_to_kyutai is moshi_config_to_kyutai
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfgs = {"default": MimiConfig(), "non-release": _non_release_mimi()}
    for name in ("mimi_tiny", "mimi_full"):
        cfgs[name] = load_config(os.path.join(root, "configs", f"{name}.yaml")).model
    for name, cfg in cfgs.items():
        theirs = config_to_kyutai(cfg)
        assert json.loads(json.dumps(theirs)) == theirs, name  # plain JSON
        assert config_from_kyutai(theirs) == cfg, name
    assert config_to_kyutai(cfgs["mimi_tiny"])["num_codebooks"] == 6
    bad = _non_release_mimi()
    bad.transformer.gated = True
    with pytest.raises(ConfigError, match="transformer.gated=True"):
        config_to_kyutai(bad)
    # Kyutai's own loader builds the same architecture from the dict (state-dict keys and shapes)
    try:
        torch, loaders = _ref()
    except pytest.skip.Exception:
        return
    from moshax.interop.mimi_weights import expected_keys, mimi_from_kyutai_state_dict

    cfg = cfgs["non-release"]
    ref = loaders.get_mimi(None, config_to_kyutai(cfg), num_codebooks=cfg.quantizer.num_codebooks)
    sd = {k.replace(".self_attn.in_projs.0.weight", ".self_attn.in_proj_weight")
          .replace(".self_attn.out_projs.0.weight", ".self_attn.out_proj.weight"): v.detach().numpy()
          for k, v in ref.state_dict().items()}
    mimi_from_kyutai_state_dict(sd, cfg)  # strict: every key, every shape
    assert set(expected_keys(cfg)) <= set(sd)


def _save_random(kind, cfg, directory):
    from moshax import registry
    from moshax.checkpoint.model import save_model_checkpoint
    from moshax.config import to_dict

    model = registry.build_model(cfg, nnx.Rngs(3))
    _, p, r = nnx.split(model, nnx.Param, ...)
    to_np = lambda t: jax.tree.map(np.asarray, nnx.to_pure_dict(t))  # noqa: E731
    params, rest = to_np(p), to_np(r)
    if kind == "mimi":  # codebook buffers that are not all zeros
        rest = jax.tree.map(lambda a: (np.arange(a.size).reshape(a.shape) % 7 + 1).astype(a.dtype), rest)
    save_model_checkpoint(directory, params, rest, config=to_dict(cfg), kind=kind)
    return params, rest


@pytest.mark.parametrize("kind", [pytest.param("mimi", marks=pytest.mark.slow), "moshi"])
def test_non_release_model_round_trips_without_kyutai_config(kind, tmp_path, capsys):
    """to-kyutai writes back.json beside back.safetensors; from-kyutai reads it without
    --kyutai-config: the same config and bitwise-equal tensors, for an architecture that is not
    the release. An explicit --kyutai-config wins over the JSON beside the file."""
    from safetensors.numpy import load_file

    from test_moshi_lm import tiny_config

    cfg = _non_release_mimi() if kind == "mimi" else tiny_config(text_card=120, n_q=8, dep_q=4,
                                                                 delays=[0, 0, 1, 1, 1, 0, 1, 1, 1])
    params, rest = _save_random(kind, cfg, tmp_path / "ckpt")
    back = tmp_path / "back.safetensors"
    assert main(["convert", "to-kyutai", "--model", kind, "--checkpoint", str(tmp_path / "ckpt"),
                 "--output", str(back)]) == 0
    assert f"Kyutai config {tmp_path / 'back.json'}" in capsys.readouterr().out
    assert (tmp_path / "back.json").is_file()
    out = tmp_path / "again"
    assert main(["convert", "from-kyutai", "--model", kind, str(back), "--output", str(out)]) == 0
    assert f"config: {tmp_path / 'back.json'}" in capsys.readouterr().out
    ckpt = open_checkpoint(out)
    assert ckpt.model_config() == cfg
    got_params, got_rest = ckpt.restore(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params),
                                        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), rest))
    for want, got in ((params, got_params), (rest, got_rest)):
        flat_w, flat_g = jax.tree.leaves(want), jax.tree.leaves(got)
        assert len(flat_w) == len(flat_g) and all(np.array_equal(a, np.asarray(b)) for a, b in zip(flat_w, flat_g))
    # and back again: the same tensors bit for bit, and the same JSON
    back2 = tmp_path / "back2.safetensors"
    assert main(["convert", "to-kyutai", "--model", kind, "--checkpoint", str(out), "--output", str(back2)]) == 0
    a, b = load_file(str(back)), load_file(str(back2))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "back2.json").read_text()) == json.loads((tmp_path / "back.json").read_text())
    capsys.readouterr()
    # an explicit --kyutai-config wins (the release's: does not fit these tensors, one line)
    (tmp_path / "release.json").write_text("{}")
    assert main(["convert", "from-kyutai", "--model", kind, str(back), "--output", str(tmp_path / "o"),
                 "--kyutai-config", str(tmp_path / "release.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("does not fit" in err or "missing" in err), err
    if kind == "mimi":
        # moshax mimi encode --checkpoint back.safetensors uses back.json too: same codes as the checkpoint
        from data_pipeline.audio import write_wav

        from test_mimi_cli import tone

        write_wav(tmp_path / "a.wav", tone(0.5), 24000)
        for src, name in ((back, "st.npy"), (tmp_path / "ckpt", "ck.npy")):
            assert main(["mimi", "encode", "--checkpoint", str(src), "--input", str(tmp_path / "a.wav"),
                         "--output", str(tmp_path / name)]) == 0
        codes = np.load(tmp_path / "st.npy")
        assert codes.shape == (4, 7)
        np.testing.assert_array_equal(codes, np.load(tmp_path / "ck.npy"))
        capsys.readouterr()
        (tmp_path / "back.json").unlink()  # without it: the released Mimi, which this file does not fit
        assert main(["mimi", "encode", "--checkpoint", str(back), "--input", str(tmp_path / "a.wav"),
                     "--output", str(tmp_path / "x.npy")]) == 2
        assert capsys.readouterr().err.count("\n") == 1
