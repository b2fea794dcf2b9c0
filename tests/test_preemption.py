"""Preemption: SIGTERM saves at the next step boundary and exits cleanly; resume picks it up;
an interrupted or unreadable checkpoint is never used."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import tiny_lm_config
from moshax.config import MeshConfig
from moshax.parallel.mesh import build_mesh
from moshax.training.lm_task import LMTask
from moshax.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_pipeline.corpus import write_corpus
    from data_pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("pre")
    paths = write_corpus(root, train_docs=300, eval_docs=20, seed=4)
    tok = train_tokenizer([paths["train"]], root / "spm", 128)
    return {"train": str(paths["train"]), "tokenizer": str(tok), "root": root}


def _overrides(corpus):
    return [f"data.train_sources=[{corpus['train']}]", f"data.tokenizer={corpus['tokenizer']}", "data.eval_sources=[]",
            "model.vocab_size=128", "model.transformer.num_layers=1", "model.transformer.dim=32",
            "model.transformer.num_heads=2", "model.transformer.hidden_dim=64", "data.seq_len=32",
            "train.log_every=1", "train.progress=false"]


def _wait_for_steps(metrics: Path, n: int, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{proc.communicate()[0][-3000:]}")
        if metrics.exists() and sum(1 for _ in metrics.open()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("trainer made no progress")


def test_sigterm_saves_at_next_step_and_resume_continues(corpus, tmp_path):
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "moshax.cli", "train", "--config", "configs/helium_tiny.yaml", "--workdir", str(work),
           *_overrides(corpus), "train.steps=100000", "checkpoint.every=100000"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_steps(work / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and 3 <= steps[0] < 100000
    assert f"preempted: checkpoint saved at step {steps[0]}" in out
    logged = [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == steps[0]  # nothing trained after the saved step is lost

    again = subprocess.run(cmd[:-2] + [f"train.steps={steps[0] + 2}", "checkpoint.every=100000"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"steps {steps[0]} -> {steps[0] + 2} (resumed)" in again.stdout


def _trainer(cfg, workdir):
    return Trainer(cfg, LMTask(cfg), mesh=build_mesh(MeshConfig(1, 2, 1), jax.devices()[:2]), workdir=workdir)


def test_interrupted_or_unreadable_checkpoints_are_skipped(corpus, tmp_path, caplog):
    cfg = tiny_lm_config(model={"vocab_size": 128}, data={"train_sources": [corpus["train"]], "seq_len": 16,
                                                          "tokenizer": corpus["tokenizer"]},
                         train={"steps": 4}, checkpoint={"every": 2, "max_to_keep": 5})
    ref = _trainer(cfg, tmp_path / "ref").run()
    losses = [h["loss"] for h in ref["history"] if "loss" in h]

    # a write cut off before Orbax finalized it (tmp directory) is invisible
    work = tmp_path / "cut"
    shutil.copytree(tmp_path / "ref", work)
    shutil.rmtree(work / "checkpoints" / "4")
    (work / "checkpoints" / "4.orbax-checkpoint-tmp-1234").mkdir()
    (work / "checkpoints" / "4.orbax-checkpoint-tmp-1234" / "state").mkdir()
    s = _trainer(cfg, work).run()
    assert s["resumed_from"] == 2
    np.testing.assert_array_equal([h["loss"] for h in s["history"] if "loss" in h], losses[2:])

    # a finalized but damaged checkpoint falls back to the previous one, with a warning
    work = tmp_path / "damaged"
    shutil.copytree(tmp_path / "ref", work)
    state_dir = work / "checkpoints" / "4" / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and f.name != "_METADATA":
            f.write_bytes(b"\x00garbage")
    shutil.rmtree(work / "checkpoints" / "4" / "meta")
    with caplog.at_level("WARNING"):
        s = _trainer(cfg, work).run()
    assert s["resumed_from"] == 2
    assert "checkpoint 4" in caplog.text and "falling back to step 2" in caplog.text
    np.testing.assert_array_equal([h["loss"] for h in s["history"] if "loss" in h], losses[2:])
    # the damaged step is kept aside, untouched, for inspection; step 4 is written anew
    (aside,) = (work / "checkpoints").glob("unusable-4-*")
    assert not (aside / "meta").exists() and any(f.read_bytes() == b"\x00garbage" for f in aside.rglob("*") if f.is_file())
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
