"""Orbax resume: exact (bitwise on CPU) continuation, iterator position, restore onto other meshes."""

import jax
import numpy as np
import pytest

from helpers import tiny_lm_config
from moshax.config import MeshConfig
from moshax.parallel.mesh import build_mesh
from moshax.checkpoint.manager import Checkpointer
from moshax.training.lm_task import LMTask
from moshax.training.trainer import Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_pipeline.corpus import write_corpus
    from data_pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    paths = write_corpus(root, train_docs=400, eval_docs=40, seed=1)
    model = train_tokenizer([paths["train"]], root / "spm", 128)
    return {"train": str(paths["train"]), "eval": str(paths["eval"]), "tokenizer": str(model)}


def _cfg(corpus, **kw):
    return tiny_lm_config(data={"train_sources": [corpus["train"]], "eval_sources": [corpus["eval"]],
                                "tokenizer": corpus["tokenizer"], "seq_len": 16},
                          train={"steps": 6, "eval_batches": 2, "log_every": 1, **kw.pop("train", {})},
                          model={"vocab_size": 128}, **kw)


def _trainer(cfg, workdir, mesh_shape=(2, 2, 2)):
    devs = jax.devices()[: int(np.prod(mesh_shape))]
    return Trainer(cfg, LMTask(cfg), mesh=build_mesh(MeshConfig(*mesh_shape), devs), workdir=workdir)


def _losses(summary):
    return [h["loss"] for h in summary["history"] if "loss" in h]


def test_resume_is_bitwise_exact(devices, corpus, tmp_path):
    cfg = _cfg(corpus, checkpoint={"every": 3})
    full = _trainer(cfg, tmp_path / "full").run()
    first = _trainer(cfg, tmp_path / "split").run(max_steps=3)  # "killed" after a checkpoint at step 3
    assert first["end_step"] == 3
    second = _trainer(cfg, tmp_path / "split").run()
    assert second["resumed_from"] == 3 and second["end_step"] == 6
    last = second["history"][-1 if "goodput" in second["history"][-1] else -2]
    assert 0 < last["goodput_total"] <= 1  # accumulated over both invocations via the checkpoint
    assert _losses(first) + _losses(second) == _losses(full)  # bitwise: same floats
    # same tree (tree.map checks the structure; a zip would stop at the shorter one), same bits
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(_final_params(tmp_path / "full", cfg)),
                 jax.device_get(_final_params(tmp_path / "split", cfg)))


def _final_params(workdir, cfg, mesh_shape=(2, 2, 2)):
    t = _trainer(cfg, workdir, mesh_shape)
    ckpt = Checkpointer(workdir / "checkpoints")
    state, meta = ckpt.restore(ckpt.latest_step(), t.abstract_state)
    ckpt.close()
    assert meta["step"] == ckpt.latest_step()
    return state["params"]


def test_data_iterator_resumes_at_the_same_batch(devices, corpus, tmp_path):
    cfg = _cfg(corpus)
    task = LMTask(cfg)
    it = task.data_iterator("train", global_batch_size=8, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    t = _trainer(cfg, tmp_path, (1, 1, 1))
    ckpt = Checkpointer(tmp_path / "ck", async_save=False)
    ckpt.save(3, t.init_state(), it, {"step": 3})
    ckpt.wait()
    expected = [next(it)["tokens"] for _ in range(3)]
    fresh = task.data_iterator("train", global_batch_size=8, process_index=0, process_count=1)
    ckpt.restore(3, t.abstract_state, fresh)
    ckpt.close()
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["tokens"], want)


@pytest.mark.parametrize("new_shape", [(2, 2, 2), (1, 1, 1), (1, 2, 2)])
def test_restore_onto_a_different_mesh(devices, corpus, tmp_path, new_shape):
    cfg = _cfg(corpus, train={"steps": 2}, checkpoint={"every": 2})
    _trainer(cfg, tmp_path, (1, 8, 1)).run()
    saved = jax.device_get(_final_params(tmp_path, cfg, (1, 8, 1)))
    restored = _final_params(tmp_path, cfg, new_shape)
    n = int(np.prod(new_shape))
    emb = restored["text_emb"]
    assert len(emb.sharding.device_set) == n
    jax.tree.map(np.testing.assert_array_equal, saved, jax.device_get(restored))
    # and training continues from it on the new mesh
    more = _cfg(corpus, train={"steps": 3}, checkpoint={"every": 2})
    summary = _trainer(more, tmp_path, new_shape).run()
    assert summary["resumed_from"] == 2 and summary["end_step"] == 3
