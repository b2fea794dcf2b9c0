"""Typed configs: YAML, overrides and one-line errors."""

from pathlib import Path

import pytest

from moshax.config import ConfigError, HeliumConfig, load_config
from moshax.parallel.mesh import check_batch, resolve_mesh_shape
from moshax.config import MeshConfig

ROOT = Path(__file__).resolve().parents[1]


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
