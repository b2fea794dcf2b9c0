"""Optimizer: schedule, decay mask, per-module learning rates (optax.multi_transform)."""

import jax
import numpy as np
import pytest

from helpers import tiny_lm_config
from moshax.config import ConfigError, MeshConfig
from moshax.parallel.mesh import build_mesh
from moshax.training.lm_task import LMTask
from moshax.training.optimizer import make_schedule
from moshax.training.trainer import Trainer


def _step(cfg, shape=(1, 1, 1)):
    trainer = Trainer(cfg, LMTask(cfg), mesh=build_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))]))
    state = trainer.init_state()
    before = jax.device_get(state["params"])
    tokens = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
    state, _ = trainer.train_step(state, trainer.to_global({"tokens": tokens}, 1))
    return before, jax.device_get(state["params"])


def test_schedule_warmup_then_cosine():
    cfg = tiny_lm_config(optim={"learning_rate": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1}).optim
    s = make_schedule(cfg, 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(s(110)) == pytest.approx(0.1)


def test_param_groups_get_their_own_learning_rate(devices):
    groups = [{"pattern": r"^transformer/", "learning_rate": 0.0}, {"pattern": r"text_linear", "learning_rate": 1e-1}]
    before, after = _step(tiny_lm_config(optim={"param_groups": groups, "learning_rate": 1e-2, "warmup_steps": 0, "weight_decay": 0.0}))
    frozen = jax.tree.leaves(before["transformer"]), jax.tree.leaves(after["transformer"])
    for a, b in zip(*frozen):
        np.testing.assert_array_equal(a, b)  # lr 0 group did not move
    d_head = np.abs(after["text_linear"] - before["text_linear"]).max()
    d_emb = np.abs(after["text_emb"] - before["text_emb"]).max()
    assert d_head == pytest.approx(1e-1, rel=0.05) and d_emb == pytest.approx(1e-2, rel=0.05)  # Adam's first step ~ lr


def test_param_group_errors():
    with pytest.raises(ConfigError, match="matches no parameter"):
        _step(tiny_lm_config(optim={"param_groups": [{"pattern": "nothing_here", "learning_rate": 1.0}]}))
    with pytest.raises(ConfigError, match="bad regex"):
        _step(tiny_lm_config(optim={"param_groups": [{"pattern": "(", "learning_rate": 1.0}]}))


def test_norms_are_not_decayed(devices):
    cfg = tiny_lm_config(optim={"learning_rate": 1e-3, "weight_decay": 10.0, "warmup_steps": 0, "grad_clip": None})
    before, after = _step(cfg)
    # with a zero gradient the only change would be decay: alphas start at 1 and see tiny grads
    assert np.abs(after["out_norm"]["alpha"] - before["out_norm"]["alpha"]).max() < 2e-3


@pytest.mark.parametrize("clip", [1.0, None])
def test_fused_adamw_matches_optax_chain(clip):
    """make_optimizer's fused AdamW (no param_groups): optax's clip + adamw chain in one expression
    per parameter, same state pytree, same numbers up to float rounding, with clipping on and off."""
    import optax

    from moshax.training.optimizer import _adamw, decay_mask, make_optimizer

    cfg = tiny_lm_config(optim={"learning_rate": 1e-2, "warmup_steps": 3, "grad_clip": clip, "weight_decay": 0.1}).optim
    axes = {"w": ("embed", "mlp"), "norm": {"alpha": ("norm",)}}
    g = np.random.default_rng(0)
    params = {"w": g.standard_normal((8, 16)).astype(np.float32), "norm": {"alpha": np.ones(16, np.float32)}}
    fused, _ = make_optimizer(cfg, 20, axes)
    parts = ([optax.clip_by_global_norm(clip)] if clip else []) + [_adamw(cfg, make_schedule(cfg, 20), decay_mask(axes))]
    ref = optax.chain(*parts)
    states = {"fused": (params, fused.init(params)), "ref": (params, ref.init(params))}
    assert jax.tree.structure(states["fused"][1]) == jax.tree.structure(states["ref"][1])
    for step in range(5):
        scale = 30.0 if step % 2 else 0.01  # global norm above and below the clip threshold
        grads = jax.tree.map(lambda p: scale * g.standard_normal(p.shape).astype(np.float32), params)
        for name, tx in (("fused", fused), ("ref", ref)):
            p, s = states[name]
            u, s = jax.jit(tx.update)(grads, s, p)
            states[name] = (optax.apply_updates(p, u), s)
    for a, b in zip(jax.tree.leaves(states["fused"]), jax.tree.leaves(states["ref"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
