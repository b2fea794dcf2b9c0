"""The CPU allocator setting of the ``moshax`` command (moshax.host_malloc): a jitted step's
freed temporaries stay mapped, so the next step does not page-fault them in again. Each case
runs in its own process (mallopt changes the whole process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import resource, sys
from moshax.host_malloc import tune_host_malloc
tuned = tune_host_malloc() if sys.argv[1] == "tuned" else False
import jax, jax.numpy as jnp
x = jnp.arange(10 * 2**20, dtype=jnp.float32)  # 40 MB: above glibc's largest mmap threshold (32 MB)
f = jax.jit(lambda x: jnp.sort(jnp.sin(x) * 2.0)[::3].sum())  # 40 MB temporaries (the sort's), freed after each call
for _ in range(3):
    f(x).block_until_ready()
faults = []
for _ in range(5):  # the fewest of 5 calls: the heap may still grow while threads interleave differently
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, min(faults))
"""


def _probe(mode: str, **env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS="cpu", **env))
    assert out.returncode == 0, out.stderr[-2000:]
    tuned, faults = out.stdout.split()[-2:]
    return tuned, int(faults)


@pytest.mark.slow  # two JAX processes, ~1 min on 2 busy cores
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_allocator_keeps_step_buffers_mapped():
    tuned, faults = _probe("tuned")
    assert tuned == "True"
    assert faults < 1000  # 40 MB of temporaries reused: (almost) no page faults in some call
    plain, plain_faults = _probe("default")
    assert plain == "False"
    assert plain_faults > 5_000  # glibc's defaults: the freed 40 MB blocks come back as fresh pages every call


def test_opt_out_leaves_glibc_alone():
    code = "from moshax.host_malloc import tune_host_malloc; print(tune_host_malloc())"
    for env, expected in (({"MOSHAX_MALLOC": "default"}, "False"), ({}, "True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, PYTHONPATH=str(ROOT / "src"), **env))
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == expected


def test_cpu_only_detection(monkeypatch):
    from moshax.cli import _cpu_only

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert _cpu_only()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert not _cpu_only()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not _cpu_only()


CONSOLE = r"""
import sys
import moshax.cli as cli
import moshax.host_malloc as host_malloc
calls = []
host_malloc.tune_host_malloc = lambda *a, **k: calls.append(1) or True
sys.argv = ["moshax", "--help"]
try:
    cli.console_main()
except SystemExit:
    pass
print("tuned", len(calls))
"""


@pytest.mark.parametrize("platforms, tuned", [("cpu", 1), ("tpu", 0)])
def test_console_command_tunes_only_cpu_runs(platforms, tuned):
    out = subprocess.run([sys.executable, "-c", CONSOLE], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS=platforms))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == f"tuned {tuned}"


def test_unknown_malloc_setting_is_one_line():
    out = subprocess.run([sys.executable, "-m", "moshax.cli", "config", "--help"], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS="cpu",
                                               MOSHAX_MALLOC="off"))
    assert out.returncode == 2
    assert out.stderr.strip() == "moshax: error: MOSHAX_MALLOC='off': expected 'tuned' or 'default'"
