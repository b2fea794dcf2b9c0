"""AdamW with linear warmup + cosine decay and global-norm clipping (optax); per-module learning
rates through ``optax.multi_transform`` when ``optim.param_groups`` is set."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from moshax.config import ConfigError, OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int, peak: float | None = None) -> optax.Schedule:
    peak = cfg.learning_rate if peak is None else peak
    decay_steps = cfg.decay_steps or total_steps
    warmup = min(cfg.warmup_steps, max(decay_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else peak,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(decay_steps, warmup + 1),
        end_value=peak * cfg.min_lr_ratio,
    )


def decay_mask(axes: dict) -> dict:
    """Weight decay on matrices only: no decay on norms, layer scales and other vectors."""
    return jax.tree.map(lambda a: "norm" not in a, axes, is_leaf=lambda x: isinstance(x, tuple))


def param_labels(axes: dict, cfg: OptimConfig) -> dict:
    """Group name per param ('group{i}' for the first matching pattern, else 'default')."""
    patterns = []
    for i, g in enumerate(cfg.param_groups):
        try:
            patterns.append((f"group{i}", re.compile(g.pattern)))
        except re.error as e:
            raise ConfigError(f"optim.param_groups[{i}].pattern={g.pattern!r}: bad regex ({e})") from None
    flat, treedef = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))
    labels = []
    for path, _ in flat:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        labels.append(next((label for label, rx in patterns if rx.search(name)), "default"))
    used = set(labels)
    for i, g in enumerate(cfg.param_groups):
        if f"group{i}" not in used:
            raise ConfigError(f"optim.param_groups[{i}].pattern={g.pattern!r} matches no parameter")
    return jax.tree_util.tree_unflatten(treedef, labels)


def _adamw(cfg: OptimConfig, schedule, mask, *, weight_decay=None, b1=None, b2=None):
    return optax.adamw(schedule, b1=cfg.b1 if b1 is None else b1, b2=cfg.b2 if b2 is None else b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay if weight_decay is None else weight_decay, mask=mask)


def fused_adamw(cfg: OptimConfig, schedule, mask, reference: optax.GradientTransformation) -> optax.GradientTransformation:
    """``reference`` = ``chain([clip_by_global_norm], adamw(schedule, mask))`` computed in one
    elementwise expression per parameter: same state pytree (checkpoints are interchangeable),
    same math up to float rounding. optax's chain materializes the clipped gradient (a division
    by the norm: XLA does not duplicate a divide into its two users, the mu and nu updates) and
    divides by the bias corrections; here every scalar factor is folded into one multiplier per
    moment, so XLA reads g, mu, nu and p and writes mu, nu and p with nothing in between
    (the update of a 299M-param model is memory bound: see docs/performance.md)."""
    b1, b2, eps, wd = cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay

    def update(grads, state, params):
        if params is None:
            raise ValueError("fused_adamw needs the params (weight decay)")
        *clip_state, (adam, masked, sched) = state
        scale = jnp.ones((), jnp.float32)
        if cfg.grad_clip:  # optax.clip_by_global_norm: g * max_norm / norm when norm >= max_norm
            norm = optax.global_norm(grads)
            scale = jnp.where(norm < cfg.grad_clip, 1.0, cfg.grad_clip / norm)
        count = optax.safe_increment(adam.count)
        c1 = 1.0 / (1.0 - jnp.asarray(b1, jnp.float32) ** count)  # bias corrections
        c2 = 1.0 / (1.0 - jnp.asarray(b2, jnp.float32) ** count)
        step_size = -schedule(sched.count)

        def one(g, m, v, p, decay):
            g = g * scale.astype(g.dtype)
            m = (1 - b1) * g + b1 * m
            v = (1 - b2) * (g * g) + b2 * v
            u = (m * c1.astype(m.dtype)) / (jnp.sqrt(v * c2.astype(v.dtype)) + eps)
            if decay and wd:
                u = u + wd * p
            return m, v, (step_size * u).astype(p.dtype)

        flat_g, treedef = jax.tree.flatten(grads)
        leaves = [one(*a) for a in zip(flat_g, treedef.flatten_up_to(adam.mu), treedef.flatten_up_to(adam.nu),
                                       treedef.flatten_up_to(params), treedef.flatten_up_to(mask))]
        mu, nu, updates = (treedef.unflatten(x) for x in zip(*leaves))
        new_state = (*clip_state, (adam._replace(count=count, mu=mu, nu=nu), masked,
                                   sched._replace(count=optax.safe_increment(sched.count))))
        return updates, tuple(new_state)

    return optax.GradientTransformation(reference.init, update)


def make_optimizer(cfg: OptimConfig, total_steps: int, axes: dict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (transformation, the base schedule reported as ``learning_rate``). Without
    ``param_groups`` it is :func:`fused_adamw` (optax's chain, fused); with them, optax's
    ``multi_transform``."""
    schedule = make_schedule(cfg, total_steps)
    mask = decay_mask(axes)
    parts = []
    if cfg.grad_clip:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    if not cfg.param_groups:
        parts.append(_adamw(cfg, schedule, mask))
        return fused_adamw(cfg, schedule, mask, optax.chain(*parts)), schedule
    else:
        labels = param_labels(axes, cfg)

        def group_mask(name):  # multi_transform hands each group a tree with MaskedNode elsewhere
            return jax.tree.map(lambda m, label: m if label == name else optax.MaskedNode(), mask, labels)

        transforms = {"default": _adamw(cfg, schedule, group_mask("default"))}
        for i, g in enumerate(cfg.param_groups):
            transforms[f"group{i}"] = _adamw(cfg, make_schedule(cfg, total_steps, g.learning_rate),
                                             group_mask(f"group{i}"), weight_decay=g.weight_decay, b1=g.b1, b2=g.b2)
        parts.append(optax.multi_transform(transforms, labels))
    return optax.chain(*parts), schedule
