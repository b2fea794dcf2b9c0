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
from moshax.commands.convert import build_model_from_checkpoint, open_checkpoint
from moshax.config import ConfigError
from moshax.interop.lm_weights import moshi_config_from_kyutai, moshi_config_to_kyutai, read_safetensors
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
    assert "wrote lm checkpoint" in capsys.readouterr().out

    # layout: CKPT/0/{state,meta}; state = {params, rest}; meta = {format, kind, config, source}
    assert (out / "0" / "state").is_dir() and (out / "0" / "meta").is_dir()
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(out / "0" / "meta")
    assert meta["kind"] == "lm" and meta["format"] == "moshax-model/1" and meta["source"] == str(weights)
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
    assert main(["convert", "to-kyutai", "--model", "lm", "--checkpoint", str(out), "--output", str(back),
                 "--dtype", "bfloat16"]) == 0
    again = dict(read_safetensors(back))
    assert set(again) == set(released)
    for k, v in released.items():
        assert again[k].dtype == ml_dtypes.bfloat16 and np.array_equal(again[k], v), k

    # model.init_from a converted Moshi LM copies every param, onto the target shardings
    from moshax.config import MeshConfig
    from moshax.models.moshi_lm import MoshiLM
    from moshax.parallel.mesh import build_mesh
    from moshax.parallel.partition import ModelHandle
    from moshax.training.moshi_task import warm_start

    mesh = build_mesh(MeshConfig(2, 2, 2), jax.devices())
    handle = ModelHandle.from_constructor(lambda r: MoshiLM(cfg, rngs=r))
    shardings = handle.shardings(mesh)
    params = warm_start(handle.shapes(), {}, cfg, str(out), shardings, mesh)
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
    # without --kyutai-config the released architecture is expected: a tiny file does not fit
    assert main(["convert", "from-kyutai", "--model", "mimi", str(weights), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
