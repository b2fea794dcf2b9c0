"""Full-size memory-fit checks: the real train steps of the 7B models and of the released Mimi,
compiled for TPU topologies on this CPU through libtpu (``moshax.training.aot.compile_train_step``,
the library entry behind ``moshax compile``). Slow: minutes per compile on 2 cores.

Each bound is the per-chip total measured when the test was written (docs/scale.md) plus ~15%:
a sharding regression (a parameter or activation left replicated, a lost batch constraint) grows
the per-chip memory far past that, while a compiler update's small drift stays inside it.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from requirements import require_module

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3

pytestmark = pytest.mark.slow

# The library entry, in a fresh process (no simulated CPU devices; libtpu's abstract TPU devices).
WORKER = r"""
import json, sys
from moshax.config import load_config
from moshax.training import aot
from moshax.training.task import make_task

config, topology, out = sys.argv[1:4]
cfg = load_config(config, sys.argv[4:])
try:
    r = aot.compile_train_step(cfg, make_task(cfg), topology)
    res = {"fits": r.fits, "total_bytes": r.total_bytes, "argument_bytes": r.argument_bytes,
           "temp_bytes": r.temp_bytes, "hbm_bytes": r.hbm_bytes, "mesh": r.mesh,
           "compile_seconds": r.compile_seconds}
except aot.DoesNotFit as e:
    res = {"fits": False, "error": str(e)}
open(out, "w").write(json.dumps(res))
"""


def compile_train(config: str, topology: str, tmp_path: Path, *overrides: str) -> dict:
    require_module("libtpu", "TPU compile checks need the tpu extra (libtpu)")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", TPU_ACCELERATOR_TYPE="v5litepod-4",
               TPU_WORKER_HOSTNAMES="localhost")
    env.pop("XLA_FLAGS", None)  # no simulated host devices: the mesh is the topology's
    out = tmp_path / "report.json"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WORKER, config, topology, str(out), *overrides], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    report["wall_seconds"] = wall
    total = report.get("total_bytes")
    print(f"{config} on {topology}: fits={report['fits']} total="
          f"{total / GiB if total else float('nan'):.2f} GiB, wall {wall:.0f} s {report.get('error', '')}")
    return report


# (config, overrides, topology, expected mesh, per-chip bound in GiB, docs/scale.md figure in GiB)
FITS = [
    ("configs/helium_7b.yaml", [], "v5p:4x4x4", {"data": 1, "fsdp": 64, "tensor": 1}, 62.0, 54.1),
    ("configs/moshi_7b.yaml", [], "v5p:2x2x2", {"data": 1, "fsdp": 8, "tensor": 1}, 23.0, 20.1),
    # WavLM's 1024 features as the distillation target, stated (else read from the data's .npy files).
    # Known not to fit today: XLA asks for 25.3 GiB of temporaries per chip (RESOURCE_EXHAUSTED in
    # ~40 s), also at the commit that recorded 6.0 GiB in docs/scale.md; strict, so the day it fits
    # this xpasses and fails, and the bound gets set from the new figure.
    pytest.param("configs/mimi_full.yaml", ["task.teacher.dim=1024"], "v5e:2x2",
                 {"data": 1, "fsdp": 4, "tensor": 1}, 6.9, 6.0,
                 marks=pytest.mark.xfail(strict=True, reason="mimi_full (64 x 2 s crops) needs 25.3 GiB of HLO "
                                         "temporaries per chip on v5e:2x2 (16 GiB): docs/scale.md's 6.0 GiB does not "
                                         "reproduce")),
]


@pytest.mark.parametrize("config, overrides, topology, mesh, bound_gib, measured_gib", FITS,
                         ids=["helium_7b-v5p:4x4x4", "moshi_7b-v5p:2x2x2", "mimi_full-v5e:2x2"])
def test_fits_under_bound(config, overrides, topology, mesh, bound_gib, measured_gib, tmp_path):
    report = compile_train(config, topology, tmp_path, *overrides)
    assert report["fits"], report
    assert report["mesh"] == mesh
    total = report["total_bytes"] / GiB
    assert total <= bound_gib, (f"{config} on {topology}: {total:.2f} GiB per chip > bound {bound_gib} GiB "
                                f"(measured {measured_gib} GiB in docs/scale.md): a sharding regression?")
    assert report["total_bytes"] <= report["hbm_bytes"]


def test_helium_7b_does_not_fit_on_v5e_2x2(tmp_path):
    report = compile_train("configs/helium_7b.yaml", "v5e:2x2", tmp_path)
    assert not report["fits"], report
    if "error" in report:
        assert "does not fit on v5e:2x2" in report["error"]
    else:
        assert report["total_bytes"] > report["hbm_bytes"]
