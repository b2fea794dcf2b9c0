"""`moshax compile`: the real train step compiled for TPU topologies on this CPU (libtpu)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from requirements import require_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _libtpu():
    require_module("libtpu", "TPU compile checks need the tpu extra (libtpu)")


def compile_cmd(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "moshax.cli", "compile", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("topology, mesh", [("v5e:2x2", ["mesh.fsdp=-1"]),
                                            ("v5p:2x2x1", ["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=-1"])])
def test_tiny_config_compiles_and_fits(topology, mesh, tmp_path):
    r = compile_cmd("--config", "configs/helium_tiny.yaml", "--topology", topology, "--json", tmp_path / "r.json", *mesh)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["num_devices"] == 4 and report["fits"]
    assert 0 < report["total_bytes"] < report["hbm_bytes"]
    assert report["flops"] > 1e8
    assert "-> fits" in r.stdout and "largest arrays" in r.stdout
    path, shape, spec, _ = report["largest"][0]
    assert "linear_in" in path and shape == [4, 128, 2, 352]
    if "tensor=-1" in mesh:
        assert report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2} and "'tensor'" in spec


def test_too_big_for_the_topology_is_a_clear_failure(tmp_path):
    r = compile_cmd("--config", "configs/helium_7b.yaml", "--topology", "v5e:2x2", "model.transformer.num_layers=2",
                    "train.batch_size=256")
    assert r.returncode == 3, r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("moshax: error:")]
    assert len(err) == 1 and "does not fit on v5e:2x2" in err[0], r.stderr[-2000:]


def test_unknown_topology_is_one_line():
    r = compile_cmd("--config", "configs/helium_tiny.yaml", "--topology", "v9z:1x1")
    assert r.returncode == 2 and r.stderr.strip().startswith("moshax: error: topology 'v9z:1x1'")


def test_decode_step_compiles(tmp_path):
    r = compile_cmd("--config", "configs/helium_tiny.yaml", "--topology", "v5e:2x2", "--step", "decode", "--batch", "4",
                    "--json", tmp_path / "d.json")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["fits"] and "decode step (batch 4)" in report["name"]
    names = [row[0] for row in report["largest"]]
    assert any(n.startswith("cache/") for n in names) and any(n.startswith("params/") for n in names)
