"""Moshi RQ-Transformer training task: multi-stream shards, augmentations, moshi-finetune's loss,
per-stream metrics, Helium (or Moshi) warm start.

Batches are ``{"codes": int32 [B, num_streams, frames]}`` read from multi-stream token shards
(:mod:`data_pipeline.multistream`, ``data.train_shards`` / ``data.eval_shards``, ``frames =
data.frames``). The loss weights, augmentations and warm start are the ``task:`` section
(:class:`moshax.models.moshi_config.MoshiTaskConfig`).

Objective and gradient accumulation
-----------------------------------
moshi-finetune optimizes, per micro-batch, ``text_sum / text_weight + audio_sum / audio_weight``
(two weighted means, see :func:`moshax.models.moshi_lm.total_loss`), and with several
micro-batches it averages that number (and the gradients) over the micro-batches. This task
returns ``(total, 1.0, aux)`` for each micro-batch, so the trainer's ``sum(loss) / sum(weight)``
is exactly that: one micro-batch gives moshi-finetune's loss, ``grad_accum_steps = N`` gives the
mean of the N micro-batch losses as moshi-finetune does. Data sharding is exact as well (the
global micro-batch is one loss, whatever the mesh). The per-stream metrics are (sum, weight)
pairs, so they are token-weighted over the whole batch:

* ``text``: weighted text CE (PAD/EPAD targets count ``text_padding_weight``),
* ``semantic``: CE of the first (semantic) codebook, ``acoustic``: CE of the other codebooks,
* ``audio``: the weighted audio mean that enters the objective (semantic x ``semantic_weight``).

Augmentations (``task.augment``) shift each example's text stream by a random number of frames
and mask text positions, see :class:`moshax.models.moshi_config.MoshiAugmentConfig`. They are drawn
from the step's rng; ``rng=None`` (and :meth:`MoshiTask.eval_loss`) means no augmentation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moshax.config import Config, ConfigError
from moshax.models.moshi_lm import ZERO_TOKEN, MoshiAugmentConfig, MoshiLM, MoshiLMConfig, total_loss
from moshax.training.metrics import stack_matmul_params, training_flops_per_token
from moshax.training.task import Task

METRICS = ("text", "semantic", "acoustic", "audio")


def augment_codes(codes, rng, aug: MoshiAugmentConfig, frame_rate: float):
    """Pretraining augmentations of ``codes`` [B, K, T] from ``rng`` (jit-friendly): a random
    per-example text shift of up to ``floor(aug.text_delay_s * frame_rate)`` frames either way
    (frames shifted in are -1), then text positions set to -1 with ``aug.text_mask_prob``."""
    b, _, t = codes.shape
    text = codes[:, 0]
    k_shift, k_mask = jax.random.split(rng)
    max_shift = int(np.floor(aug.text_delay_s * frame_rate + 1e-6))
    if max_shift > 0:
        shift = jax.random.randint(k_shift, (b, 1), -max_shift, max_shift + 1)
        src = jnp.arange(t, dtype=jnp.int32)[None, :] - shift  # positive shift: text comes later
        valid = (src >= 0) & (src < t)
        text = jnp.where(valid, jnp.take_along_axis(text, jnp.clip(src, 0, t - 1), axis=1), ZERO_TOKEN)
    if aug.text_mask_prob > 0:
        shape = (b, t) if aug.text_mask_mode == "token" else (b, 1)
        drop = jax.random.bernoulli(k_mask, aug.text_mask_prob, shape)
        text = jnp.where(drop, ZERO_TOKEN, text)
    return codes.at[:, 0].set(text.astype(codes.dtype))


def augmentation_enabled(aug: MoshiAugmentConfig) -> bool:
    return aug.text_delay_s > 0 or aug.text_mask_prob > 0


class MoshiTask(Task):
    """What the generic trainer needs to train the Moshi LM on multi-stream token shards."""

    shard_kind = "multistream"

    def __init__(self, cfg: Config):
        if not isinstance(cfg.model, MoshiLMConfig):
            raise ConfigError(f"model.kind={getattr(cfg.model, 'kind', '?')!r}: the moshi task needs model.kind: moshi")
        super().__init__(cfg)
        self.frames = cfg.data.frames

    # ------------------------------------------------------------------ model + loss

    def example_spec(self) -> dict:
        return {"codes": ((self.model_cfg.num_streams, self.frames), np.int32)}

    def _losses(self, model: MoshiLM, codes, rng):
        if rng is not None and augmentation_enabled(self.task_cfg.augment):
            codes = augment_codes(codes, rng, self.task_cfg.augment, self.model_cfg.frame_rate)
        out = model.forward_train(codes)
        return out, model.loss(out, codes, self.task_cfg)

    def loss(self, model: MoshiLM, batch: dict, rng):
        """(total, 1.0, per-stream (sum, weight) pairs); see the module docstring. ``rng`` None
        means evaluation: no augmentation."""
        _, losses = self._losses(model, batch["codes"].astype(jnp.int32), rng)
        return total_loss(losses), jnp.ones((), jnp.float32), {name: losses[name] for name in METRICS}

    def eval_metrics(self, model: MoshiLM, batch: dict) -> dict:
        """The training losses plus unweighted cross-entropies: ``text_ce`` (every text target),
        ``text_nonpad`` (non-PAD/EPAD targets) and ``codebooks`` (a vector: one CE sum per
        predicted codebook, 1 = semantic)."""
        cfg = self.model_cfg
        codes = batch["codes"].astype(jnp.int32)
        out, losses = self._losses(model, codes, None)
        f32 = lambda m: m.astype(jnp.float32)  # noqa: E731
        text_t = codes[:, :1]
        tmask = out["text_mask"]
        tn = _nll(out["text_logits"], text_t, tmask)
        is_pad = (text_t == cfg.existing_text_padding_id) | (text_t == cfg.existing_text_end_padding_id)
        amask = out["mask"]
        an = _nll(out["logits"], codes[:, 1: 1 + cfg.dep_q], amask)  # [B, dep_q, T]
        return {
            "loss": (total_loss(losses), jnp.ones((), jnp.float32)),
            **{name: losses[name] for name in METRICS},
            "text_ce": (jnp.sum(tn * f32(tmask)), jnp.sum(f32(tmask))),
            "text_nonpad": (jnp.sum(tn * f32(tmask & ~is_pad)), jnp.sum(f32(tmask & ~is_pad))),
            "codebooks": (jnp.sum(an * f32(amask), axis=(0, 2)), jnp.sum(f32(amask), axis=(0, 2))),
        }

    def eval_report(self, totals: dict) -> dict:
        """Figures over a whole eval set: the objective as training computes it (weighted text
        mean + weighted audio mean, here over every record, so no number depends on the batch
        size) and per-stream cross-entropies (``streams``: rows of stream, tokens, CE, perplexity)."""
        import math

        def mean(name):
            s, w = totals[name]
            return float(s) / float(w) if float(w) > 0 else float("nan")

        rows = []

        def row(stream, s, w):
            s, w = float(s), float(w)
            ce = s / w if w > 0 else float("nan")
            rows.append({"stream": stream, "tokens": int(round(w)), "cross_entropy": ce,
                         "perplexity": float(math.exp(min(ce, 50.0))) if w > 0 else float("nan")})

        row("text", *totals["text_ce"])
        row("text (non-padding)", *totals["text_nonpad"])
        s, w = (np.asarray(x, np.float64) for x in totals["codebooks"])
        for k in range(len(s)):
            row(f"audio codebook {k + 1}" + (" (semantic)" if k == 0 else ""), s[k], w[k])
        row("acoustic (codebooks 2+)", np.sum(s[1:]), np.sum(w[1:]))
        out = super().eval_report(totals)  # every scalar metric's sum / weight
        out.update(text_loss=mean("text"), audio_loss=mean("audio"))
        out["objective"] = out["loss"] = out["text_loss"] + out["audio_loss"]
        out["semantic_loss"] = float(s[0] / w[0]) if w[0] > 0 else float("nan")
        out["acoustic_loss"] = rows[-1]["cross_entropy"]
        out["streams"] = rows
        return out

    # ------------------------------------------------------------------ warm start

    def init_params(self, params: dict, rest: dict, trainer) -> tuple[dict, dict]:
        """``task.init_from``: copy a Helium checkpoint's text embedding rows, transformer,
        out_norm and text head (audio and depth parts keep their random init), or every param of
        a Moshi LM checkpoint (e.g. a converted moshiko)."""
        if not self.task_cfg.init_from:
            return params, rest
        new, loaded = warm_start(params, rest, self.model_cfg, self.task_cfg.init_from, trainer.param_shardings,
                                 trainer.mesh)
        self.say(f"warm start (task.init_from): {loaded}")
        return new, rest

    # ------------------------------------------------------------------ data

    def data_iterator(self, split: str, *, global_batch_size: int, process_index: int, process_count: int):
        from data_pipeline.shard_loader import make_shard_iterator

        data = self.data_cfg
        shards = data.train_shards if split == "train" else data.eval_shards
        if not shards:
            return None
        self.check_shards(shards)
        return make_shard_iterator(shards, split=split, global_batch_size=global_batch_size, seed=self.cfg.seed,
                                   process_index=process_index, process_count=process_count,
                                   num_workers=data.num_workers, field="codes", crop_frames=self.frames)

    def check_shards(self, shards: str) -> dict:
        """The manifest of ``shards`` after checking that its records fit this model."""
        from data_pipeline.errors import DataError
        from data_pipeline.multistream import read_multistream_manifest

        manifest = read_multistream_manifest(shards)
        shape = manifest["record"]["shape"]
        if shape[0] != self.model_cfg.num_streams:
            raise DataError(f"multi-stream shards {shards} hold records of {shape[0]} streams, but the model needs "
                            f"num_streams = {self.model_cfg.num_streams}")
        # other lengths (e.g. whole recordings from `moshax data prepare`) are cropped to data.frames
        spec = manifest.get("multistream", {})
        for key, mine in (("text_card", self.model_cfg.text_card), ("card", self.model_cfg.card)):
            if spec.get(key, 0) > mine:
                raise DataError(f"multi-stream shards {shards} have {key}={spec[key]} but model.{key}={mine}")
        return manifest

    def check_eval_record(self, shards: str, shape: list[int]) -> None:
        from data_pipeline.errors import DataError

        if shape[0] != self.model_cfg.num_streams:
            raise DataError(f"{shards}: records have {shape[0]} streams, the model needs {self.model_cfg.num_streams}")

    def check_inputs(self) -> None:
        data = self.data_cfg
        if not data.train_shards:
            raise ConfigError("data.train_shards is empty: name a multi-stream token-shard directory")
        self.check_shards(data.train_shards)
        if data.eval_shards:
            self.check_shards(data.eval_shards)
        if self.task_cfg.init_from:
            from moshax.checkpoint.model import open_checkpoint

            open_checkpoint(self.task_cfg.init_from)

    # ------------------------------------------------------------------ accounting

    def flops_per_example(self) -> float:
        """6 N per frame for the matmul params each frame uses (temporal transformer + text head;
        per depth step: its depformer weight set, input projection and output head) + attention
        (temporal over the frames, depth over the dep_q steps)."""
        m = self.model_cfg
        t, d = m.transformer, m.depformer
        temporal = stack_matmul_params(t) + t.dim * m.text_card
        depth_step = stack_matmul_params(d) + t.dim * d.dim + d.dim * m.card
        per_frame = training_flops_per_token(temporal + m.dep_q * depth_step,
                                             ((t.num_layers, t.dim, self.frames), (d.num_layers, d.dim, m.dep_q * m.dep_q)))
        return per_frame * self.frames

    def tokens_per_example(self) -> int:
        """Tokens = frames x streams (text + every audio codebook), as the reference benchmark."""
        return self.frames * self.model_cfg.num_streams


def _nll(logits, targets, mask):
    """Per-position cross-entropy with masked (NaN) logits kept out."""
    logits = jnp.where(mask[..., None], logits, 0.0)
    targets = jnp.where(mask, targets, 0)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]


# ---------------------------------------------------------------------------------------------
# Warm start
# ---------------------------------------------------------------------------------------------

HELIUM_KEYS = ("transformer", "out_norm", "text_linear", "text_emb")


def warm_start(params: dict, rest: dict, cfg: MoshiLMConfig, source: str, shardings: dict, mesh) -> tuple[dict, str]:
    """New params with the parts ``source`` provides (see :meth:`MoshiTask.init_params`), restored
    straight onto ``shardings``, and a line saying what came from where."""
    from moshax.checkpoint.model import check_shapes, open_checkpoint

    ckpt = open_checkpoint(source)
    kind = ckpt.model_kind
    stored = ckpt.param_shapes()
    mine = jax.tree.map(lambda a: tuple(a.shape), params)
    dtypes = jax.tree.map(lambda a: a.dtype, params)

    def target(keys, override=None):
        out = {}
        for k in keys:
            shapes = (override or {}).get(k, mine[k])
            out[k] = jax.tree.map(lambda s, d, sh: jax.ShapeDtypeStruct(s, d, sharding=sh), shapes, dtypes[k],
                                  shardings[k], is_leaf=lambda x: isinstance(x, tuple))
        return out

    if kind == "moshi":
        check_shapes(stored, mine, f"task.init_from={source}")
        restored, _ = ckpt.restore(target(list(params)))
        return restored, f"every param from the Moshi LM checkpoint {ckpt.step_dir}"
    if kind != "helium":
        raise ConfigError(f"task.init_from={source}: a {kind} checkpoint cannot initialize a Moshi LM "
                          "(expected a Helium or Moshi LM checkpoint)")
    hcfg = ckpt.model_config_dict
    if hcfg.get("vocab_size") != cfg.text_card:
        raise ConfigError(f"task.init_from={source}: Helium vocab_size={hcfg.get('vocab_size')} != "
                          f"model.text_card={cfg.text_card}")
    missing = [k for k in HELIUM_KEYS if k not in stored]
    if missing:
        raise ConfigError(f"task.init_from={source}: no {', '.join(missing)} params in the Helium checkpoint")
    want = {k: mine[k] for k in HELIUM_KEYS}
    want["text_emb"] = (cfg.text_card, cfg.transformer.dim)
    check_shapes({k: stored[k] for k in HELIUM_KEYS}, want, f"task.init_from={source} (Helium)")
    from jax.sharding import NamedSharding, PartitionSpec

    rep = NamedSharding(mesh, PartitionSpec())
    tgt = target(HELIUM_KEYS[:3])
    tgt["text_emb"] = jax.ShapeDtypeStruct(want["text_emb"], dtypes["text_emb"], sharding=rep)
    restored, _ = ckpt.restore(tgt)
    new = dict(params)
    for k in HELIUM_KEYS[:3]:
        new[k] = restored[k]
    with jax.set_mesh(mesh):
        new["text_emb"] = jax.jit(lambda cur, emb: cur.at[: emb.shape[0]].set(emb.astype(cur.dtype)),
                                  out_shardings=shardings["text_emb"])(params["text_emb"], restored["text_emb"])
    return new, (f"text embedding, temporal transformer, out_norm and text head from the Helium checkpoint "
                 f"{ckpt.step_dir}; audio embeddings and the depth transformer start fresh")
