"""Real multi-process training: 2 processes x 4 CPU devices on localhost (gloo collectives).

The 2-process run equals the 1-process (8-device) run, and checkpoints move between process
counts in both directions, data position included (elastic token-shard loader).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_lm_config
from moshax.config import to_dict

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cfg, workdir, out, processes, max_steps=None):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent), env.get("PYTHONPATH", "")])
    procs = []
    for pid in range(processes):
        spec = {"config": to_dict(cfg), "workdir": str(workdir), "max_steps": max_steps, "out": str(out),
                "coordinator": f"127.0.0.1:{port}", "num_processes": processes, "process_id": pid}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return json.loads(Path(out).read_text())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_pipeline.corpus import write_corpus
    from data_pipeline.text_to_shards import tokenize_to_shards
    from data_pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("mh")
    paths = write_corpus(root, train_docs=300, eval_docs=20, seed=3)
    tok = train_tokenizer([paths["train"]], root / "spm", 128)
    cfg = tiny_lm_config(data={"train_sources": [str(paths["train"])], "tokenizer": str(tok), "seq_len": 16})
    tokenize_to_shards(cfg.data, root / "shards", records_per_shard=100, progress=False)
    return root / "shards"


def _cfg(shards):
    return tiny_lm_config(model={"vocab_size": 128}, mesh={"data": 2, "fsdp": -1, "tensor": 1},
                          data={"train_shards": str(shards), "seq_len": 16},
                          train={"steps": 4, "batch_size": 8}, checkpoint={"every": 2})


def test_two_processes_equal_one_and_checkpoints_cross_process_counts(shards, tmp_path):
    cfg = _cfg(shards)
    ref = _run(cfg, tmp_path / "one", tmp_path / "one.json", 1)  # 1 process x 8 devices, steps 0 -> 4
    assert ref["devices"] == 8 and len(ref["losses"]) == 4

    two = _run(cfg, tmp_path / "two", tmp_path / "two.json", 2, max_steps=2)  # 2 processes x 4 devices
    assert two["processes"] == 2 and two["devices"] == 8 and two["end"] == 2
    np.testing.assert_allclose(two["losses"], ref["losses"][:2], rtol=1e-5)

    # written by 2 processes -> resumed by 1 (params, optimizer and data position)
    shutil.copytree(tmp_path / "two", tmp_path / "two_then_one")
    one = _run(cfg, tmp_path / "two_then_one", tmp_path / "a.json", 1)
    assert one["resumed_from"] == 2 and one["end"] == 4
    np.testing.assert_allclose(one["losses"], ref["losses"][2:], rtol=1e-5)
    np.testing.assert_allclose(one["param_sums"], ref["param_sums"], rtol=1e-5, atol=1e-5)

    # written by 1 process -> resumed by 2
    _run(cfg, tmp_path / "one_then_two", tmp_path / "b0.json", 1, max_steps=2)
    both = _run(cfg, tmp_path / "one_then_two", tmp_path / "b.json", 2)
    assert both["resumed_from"] == 2 and both["end"] == 4
    np.testing.assert_allclose(both["losses"], ref["losses"][2:], rtol=1e-5)
    np.testing.assert_allclose(both["param_sums"], ref["param_sums"], rtol=1e-5, atol=1e-5)


def test_sigterm_on_one_host_saves_the_same_step_on_all(shards, tmp_path):
    """The preemption notice reaches one process; both agree on a step, save it and exit 0."""
    import signal
    import time

    root = Path(__file__).resolve().parents[1]
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    overrides = ["model.vocab_size=128", "mesh.data=2", "mesh.fsdp=-1", f"data.train_shards={shards}",
                 "data.seq_len=16", "data.eval_sources=[]", "model.transformer.num_layers=1",
                 "model.transformer.dim=32", "model.transformer.num_heads=2", "model.transformer.hidden_dim=64",
                 "train.steps=100000", "train.batch_size=8", "train.log_every=1", "train.progress=false",
                 "checkpoint.every=100000"]
    procs = [subprocess.Popen([sys.executable, "-m", "moshax.cli", "train", "--config", "configs/helium_tiny.yaml",
                               "--workdir", str(tmp_path), "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(pid), *overrides],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(2)]
    metrics = tmp_path / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and sum(1 for _ in metrics.open()) >= 3):
        assert time.time() - t0 < 300 and all(p.poll() is None for p in procs), "no progress"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and steps[0] >= 3
    assert f"preempted: checkpoint saved at step {steps[0]}" in outs[0]
    assert (tmp_path / "checkpoints" / str(steps[0]) / "data_elastic").exists()
