"""Typed configs: YAML, overrides and one-line errors."""

from pathlib import Path

import pytest
import yaml

from moshax.config import ConfigError, HeliumConfig, MeshConfig, from_dict, load_config
from moshax.parallel.mesh import check_batch, resolve_mesh_shape

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_shipped_configs_load():
    tiny = load_config(ROOT / "configs/helium_tiny.yaml")
    assert isinstance(tiny.model, HeliumConfig)
    big = load_config(ROOT / "configs/helium_7b.yaml")
    t = big.model.transformer
    assert (t.dim, t.num_heads, t.num_layers, t.hidden_dim, t.context) == (4096, 32, 32, 11264, 4096)
    assert big.model.vocab_size == 32000 and t.norm_eps == 1e-8 and t.max_period == 10000
    assert big.train.batch_size * big.data.seq_len == 1024 * 4096


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/helium_tiny.yaml",
                      ["train.steps=7", "optim.learning_rate=1e-4", "model.transformer.num_layers=2",
                       "data.train_sources=[a.txt, b.txt]", "optim.grad_clip=null"])
    assert cfg.train.steps == 7 and cfg.optim.learning_rate == 1e-4
    assert cfg.model.transformer.num_layers == 2
    assert cfg.data.train_sources == ["a.txt", "b.txt"] and cfg.optim.grad_clip is None


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("model.transformer.dimm=3", "unknown config key 'model.transformer.dimm'"),
    ("train.steps=abc", "train.steps='abc': expected an integer"),
    ("train.steps=0", "train.steps=0: must be > 0"),
    ("model.transformer.remat=sometimes", "model.transformer.remat='sometimes'"),
    ("model.transformer.layer_loop=loop", "model.transformer.layer_loop='loop'"),
    ("model.transformer.num_heads=5", "not divisible by model.transformer.num_heads=5"),
    ("mesh.data=-1", "at most one axis may be -1"),
    ("train.grad_accum_steps=3", "not divisible by train.grad_accum_steps=3"),
    ("nokey", "expected key=value"),
])
def test_bad_overrides_give_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/helium_tiny.yaml", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_mesh_shapes():
    assert resolve_mesh_shape(MeshConfig(2, -1, 2), 8) == (2, 2, 2)
    assert resolve_mesh_shape(MeshConfig(1, -1, 1), 8) == (1, 8, 1)
    with pytest.raises(ConfigError, match="needs 12 devices, but 8 are available"):
        resolve_mesh_shape(MeshConfig(3, 2, 2), 8)
    with pytest.raises(ConfigError, match="do not divide the 8 devices"):
        resolve_mesh_shape(MeshConfig(3, -1, 1), 8)


def test_batch_must_divide_data_axes(devices):
    from moshax.parallel.mesh import build_mesh

    mesh = build_mesh(MeshConfig(2, 2, 2))
    check_batch(mesh, 8)
    with pytest.raises(ConfigError, match="not divisible by the data x fsdp mesh axes"):
        check_batch(mesh, 6)


# ----------------------------------------------------------------------------- layered configs

ALL_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_config_loads_and_show_round_trips(name, capsys):
    """Each file loads (through its base: chain) without a legacy warning, and `moshax config show`
    prints YAML that loads back to the same config."""
    from moshax.cli import main
    from moshax.config import from_dict

    legacy = []
    cfg = load_config(CONFIGS / name, on_legacy=legacy.append)
    assert not legacy, f"{name} uses the old layout: {legacy}"
    assert main(["config", "show", "--config", str(CONFIGS / name)]) == 0
    shown = capsys.readouterr().out
    assert from_dict(yaml.safe_load(shown)) == cfg
    assert "base" not in yaml.safe_load(shown)


def test_stage_presets_are_deltas_over_one_base():
    base = load_config(CONFIGS / "moshi_7b.yaml")
    for stage in ("pretrain", "posttrain", "finetune"):
        text = (CONFIGS / f"moshi_7b_{stage}.yaml").read_text()
        body = yaml.safe_load(text)
        assert body["base"] == "moshi_7b.yaml" and "transformer" not in body.get("model", {})  # said once
        assert load_config(CONFIGS / f"moshi_7b_{stage}.yaml").model.transformer == base.model.transformer
    assert load_config(CONFIGS / "moshi_7b_pretrain.yaml").model.delays[1:9] == [0] + [2] * 7


def test_base_chain_merges_and_overrides_apply_last(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nmodel: {kind: helium, vocab_size: 64, transformer: {dim: 32, "
                                     "num_heads: 4, num_layers: 2, hidden_dim: 48}}\ntrain: {steps: 5, batch_size: 4}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nname: b\nmodel: {transformer: {num_layers: 3}}\n")
    cfg = load_config(tmp_path / "sub" / "b.yaml", ["train.steps=9"])
    assert cfg.name == "b" and cfg.model.vocab_size == 64 and cfg.model.transformer.dim == 32
    assert cfg.model.transformer.num_layers == 3 and cfg.train.steps == 9 and cfg.train.batch_size == 4
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="base config not found: missing.yaml"):
        load_config(tmp_path / "d.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_old_layout_loads_with_one_warning_line(tmp_path, capsys):
    """A config written before `task:` existed loads into the new sections, with one line naming
    every move; the result equals the new-layout file's."""
    from moshax.cli import main

    from moshax.config import to_dict

    new = load_config(CONFIGS / "moshi_7b_pretrain.yaml")
    old = to_dict(new)
    task = old.pop("task")
    old["model"].update(augment=task["augment"], init_from=task["init_from"], semantic_weight=task["semantic_weight"])
    old["data"]["seq_len"] = old["data"].pop("frames")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    assert main(["config", "show", "--config", str(tmp_path / "old.yaml")]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "model.init_from -> task.init_from" in err and "data.seq_len -> data.frames" in err
    assert from_dict(yaml.safe_load(out)) == new
    # Mimi's old model.train section splits into task: and data:
    mimi = yaml.safe_load((CONFIGS / "mimi_tiny.yaml").read_text())
    mimi["model"]["train"] = {**mimi.pop("task"), **mimi.pop("data")}
    mimi["model"]["train"].pop("quantizer_dropout")
    mimi["model"]["quantizer"]["q_dropout"] = True
    legacy = []
    assert from_dict(mimi, on_legacy=legacy.append) == load_config(CONFIGS / "mimi_tiny.yaml")
    assert any("model.train -> task" in m for m in legacy)


def test_unknown_kind_is_one_line(capsys):
    from moshax.cli import main

    assert main(["config", "show", "--config", str(CONFIGS / "helium_tiny.yaml"), "model.kind=gpt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model kind (known: helium, moshi, mimi)" in err
    from moshax import registry

    with pytest.raises(registry.UnknownKind, match="--model"):
        registry.get("gpt", where="--model")
    assert registry.get("lm").name == "moshi"  # convert's old spelling


def test_config_load_does_not_import_jax():
    """Config mistakes print before JAX starts: loading every config imports no JAX."""
    import subprocess
    import sys

    code = ("import sys, glob; from moshax.config import load_config\n"
            f"[load_config(p) for p in glob.glob({str(CONFIGS)!r} + '/*.yaml')]\n"
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
