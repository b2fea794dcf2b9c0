"""pjit train step: sharded == single device; params carry the shardings the rules declare."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import tiny_lm_config
from moshax.config import MeshConfig
from moshax.parallel.mesh import build_mesh
from moshax.training.lm_task import LMTask
from moshax.training.trainer import Trainer


def _batch(seed=0, rows=8):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, 64, (rows, 17)).astype(np.int32)}


def _run_steps(cfg, mesh_shape, n=2, tmp="/tmp/unused"):
    devs = jax.devices()[: int(np.prod(mesh_shape))]
    trainer = Trainer(cfg, LMTask(cfg), mesh=build_mesh(MeshConfig(*mesh_shape), devs), workdir=tmp)
    state = trainer.init_state()
    losses = []
    for i in range(n):
        state, m = trainer.train_step(state, trainer.to_global(_batch(i), cfg.train.grad_accum_steps))
        losses.append(float(m["loss"]))
    return trainer, state, losses


@pytest.fixture(scope="module")
def single():
    cfg = tiny_lm_config()
    _, state, losses = _run_steps(cfg, (1, 1, 1))
    return jax.device_get(state["params"]), losses


def test_sharded_step_equals_single_device(devices, single):
    cfg = tiny_lm_config()
    trainer, state, losses = _run_steps(cfg, (2, 2, 2))
    ref_params, ref_losses = single
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(jax.device_get(state["params"]))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # params and Adam moments carry the shardings the rules table declares
    params = state["params"]
    assert params["transformer"]["layers"]["self_attn"]["in_proj"].sharding.spec == P(None, "fsdp", None, "tensor", None)
    assert params["transformer"]["layers"]["mlp"]["linear_in"].sharding.spec == P(None, "fsdp", None, "tensor")
    assert params["transformer"]["layers"]["mlp"]["linear_out"].sharding.spec == P(None, "tensor", "fsdp")
    assert params["text_emb"].sharding.spec == P("tensor", "fsdp")
    assert params["text_linear"].sharding.spec == P("fsdp", "tensor")
    assert params["transformer"]["layers"]["norm1"]["alpha"].sharding.is_fully_replicated
    mu = jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
    adam = [s for s in mu if hasattr(s, "mu")][0]
    assert adam.mu["text_linear"].sharding.spec == P("fsdp", "tensor")
    # FSDP really splits the memory: each device holds 1/(fsdp*tensor) of the embedding
    shard = params["text_emb"].addressable_shards[0].data
    assert shard.shape == (64 // 2, 32 // 2)


def test_pure_fsdp_and_tensor_meshes_agree(devices, single):
    ref_params, ref_losses = single
    for shape in [(1, 8, 1), (1, 2, 4)]:
        _, state, losses = _run_steps(tiny_lm_config(), shape)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(jax.device_get(state["params"]))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_equals_full_batch(devices, single):
    ref_params, ref_losses = single
    cfg = tiny_lm_config(train={"grad_accum_steps": 2})
    _, state, losses = _run_steps(cfg, (2, 2, 1))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(jax.device_get(state["params"]))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_compute_keeps_fp32_params(devices):
    cfg = tiny_lm_config(model={"dtype": "bfloat16"})
    _, state, losses = _run_steps(cfg, (1, 2, 1), n=1)
    assert np.isfinite(losses[0])
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state["params"]))
