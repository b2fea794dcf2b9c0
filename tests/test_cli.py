"""The `moshax` command end to end: tokenizer, training on the built-in corpus, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def moshax(*args, cwd=None):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", "moshax.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    r = moshax("data", "corpus", "--output", root / "corpus", "--train-docs", 3000, "--eval-docs", 100)
    assert r.returncode == 0, r.stderr
    r = moshax("tokenizer", "train", "--input", root / "corpus/train.txt", "--vocab-size", 256,
               "--output", root / "tok/spm")
    assert r.returncode == 0, r.stderr
    assert (root / "tok/spm.model").is_file()
    return root


def _data_overrides(root):
    return [f"data.train_sources=[{root}/corpus/train.txt]", f"data.eval_sources=[{root}/corpus/eval.txt]",
            f"data.tokenizer={root}/tok/spm.model", "model.vocab_size=256"]


def test_train_lowers_loss_and_writes_run_dir(corpus, tmp_path):
    work = tmp_path / "run"
    r = moshax("train", "--config", "configs/helium_tiny.yaml", "--workdir", work, *_data_overrides(corpus),
               "train.steps=60", "train.eval_every=30", "train.log_every=10", "checkpoint.every=30",
               "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.transformer.num_layers=2", "--profile", "3:4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert list((work / "profile").rglob("*.xplane.pb")), "no profiler trace written"
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in records if "loss" in x]
    for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu", "step_time",
                "tokens_per_second_per_device", "goodput", "goodput_total", "compile_seconds", "checkpoint_seconds"):
        assert key in train[0]
    assert 0 < train[-1]["goodput"] <= 1 and train[-1]["compile_seconds"] > 0
    assert train[0]["tokens_per_second_per_device"] == pytest.approx(train[0]["tokens_per_second"] / 8)
    assert train[0]["mfu"] is None  # no honest peak FLOPs for a CPU
    assert train[-1]["loss"] < 0.6 * train[0]["loss"], (train[0]["loss"], train[-1]["loss"])
    evals = [x for x in records if "eval_loss" in x]
    assert [x["step"] for x in evals] == [30, 60]
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))
    assert (work / "config.yaml").read_text().count("num_layers: 2") == 1
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["30", "60"]

    # running the same command again resumes (here: already finished -> nothing to do, no retraining)
    more = moshax("train", "--config", "configs/helium_tiny.yaml", "--workdir", work, *_data_overrides(corpus),
                  "train.steps=70", "train.eval_every=30", "train.log_every=10", "checkpoint.every=30",
                  "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.transformer.num_layers=2")
    assert more.returncode == 0, more.stderr[-2000:]
    assert "steps 60 -> 70 (resumed)" in more.stdout


@pytest.mark.parametrize("extra, message", [
    (["train.stepz=3"], "unknown config key 'train.stepz'"),
    (["mesh.data=3", "mesh.fsdp=1"], "needs 3 devices, but 8 are available"),
    (["train.batch_size=6", "mesh.fsdp=4", "mesh.tensor=2"], "not divisible by the data x fsdp mesh axes"),
    (["data.tokenizer=/nonexistent/spm.model"], "tokenizer file not found: /nonexistent/spm.model"),
    (["data.train_sources=[/nonexistent/*.txt]"], "/nonexistent/*.txt"),
])
def test_user_errors_are_one_line(corpus, tmp_path, extra, message):
    r = moshax("train", "--config", "configs/helium_tiny.yaml", "--workdir", tmp_path, *_data_overrides(corpus),
               *extra)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moshax: error: "), r.stderr[-2000:]
    assert message in lines[0]


def test_missing_config_file(tmp_path):
    r = moshax("train", "--config", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_absent_tpu_means_cpu(monkeypatch):
    """libtpu installed on a machine with no TPU: the CLI picks the CPU platform (no page of
    libtpu metadata warnings on every command); an explicit JAX_PLATFORMS is left alone."""
    import glob
    from importlib.util import find_spec

    from moshax.cli import _skip_absent_tpu

    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    _skip_absent_tpu()
    assert os.environ["JAX_PLATFORMS"] == "cuda"
    monkeypatch.delenv("JAX_PLATFORMS")
    _skip_absent_tpu()
    if (find_spec("libtpu") is None or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
            or find_spec("jax_cuda12_plugin") or find_spec("jax_cuda13_plugin")):
        assert "JAX_PLATFORMS" not in os.environ
    else:
        assert os.environ["JAX_PLATFORMS"] == "cpu"
