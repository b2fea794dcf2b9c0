"""Moshi's LM (RQ-Transformer): a temporal transformer over 80 ms steps and a depth transformer
over the codebooks of each step.

Streams (K = n_q + 1): index 0 is text, 1..dep_q the predicted audio codebooks (semantic first),
the rest input-only audio (the user). Every size, stream count and delay is config.

Training forward (:meth:`MoshiLM.forward_train`), as Kyutai's ``LMModel.forward``:
shift each stream right by its delay (filling with the initial token), prepend one all-initial
step, run the temporal transformer over steps 0..T-1 on the sum of the stream embeddings, run the
teacher-forced depformer on steps 1..T, and shift the logits back left by each delay. Positions
past the end (NaN logits) and targets equal to -1 are masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moshax.config import ConfigError
from moshax.layers.attention import KVCache
from moshax.layers.losses import cross_entropy_sums
from moshax.layers.norms import make_norm
from moshax.layers.params import dtype_of, normal, param
from moshax.layers.transformer import Transformer
from moshax.models.depformer import STEP_AXIS, Depformer
from moshax.models.moshi_config import MOSHIKO_DELAYS, MoshiAugmentConfig, MoshiLMConfig, MoshiTaskConfig  # noqa: F401
from moshax.parallel.sharding import constrain

ZERO_TOKEN = -1  # embeds to an exact zero vector, masked in the loss
UNGENERATED_TOKEN = -2  # inference only: "to be sampled"


# ---------------------------------------------------------------------------------------------
# Delay pattern
# ---------------------------------------------------------------------------------------------


def initial_tokens(cfg: MoshiLMConfig) -> jax.Array:
    """[K] initial token per stream: text_card for text, card for every audio stream."""
    return jnp.asarray([cfg.text_card] + [cfg.card] * cfg.n_q, jnp.int32)


def delay_sequence(codes, delays, padding):
    """Shift stream k of ``codes`` [B, K, T] right by ``delays[k]``, filling with ``padding[k]``."""
    t = codes.shape[-1]
    out = []
    for k, d in enumerate(delays):
        line = codes[:, k]
        d = min(int(d), t)
        if d > 0:
            fill = jnp.broadcast_to(jnp.asarray(padding[k], line.dtype), line.shape[:-1] + (d,))
            line = jnp.concatenate([fill, line[:, : t - d]], axis=-1)
        out.append(line)
    return jnp.stack(out, axis=1)


def undelay_sequence(x, delays, fill_value=jnp.nan):
    """Shift stream k of ``x`` [B, K, T, ...] left by ``delays[k]``; returns (x, mask [B, K, T])
    with the last ``delays[k]`` positions of stream k filled and masked out."""
    b, _, t = x.shape[:3]
    outs, masks = [], []
    for k, d in enumerate(delays):
        line = x[:, k]
        d = min(int(d), t)
        valid = jnp.ones((b, t), bool)
        if d > 0:
            fill = jnp.full((b, d) + line.shape[2:], fill_value, line.dtype)
            line = jnp.concatenate([line[:, d:], fill], axis=1)
            valid = valid.at[:, t - d:].set(False)
        outs.append(line)
        masks.append(valid)
    return jnp.stack(outs, axis=1), jnp.stack(masks, axis=1)


def _embed(table, ids):
    """Rows of ``table`` for ``ids``; id -1 gives an exact zero vector (other negatives: row 0)."""
    y = jnp.take(table, jnp.maximum(ids, 0), axis=0)
    return jnp.where((ids == ZERO_TOKEN)[..., None], jnp.zeros((), y.dtype), y)


def _embed_stacked(tables, ids):
    """``tables`` [K, R, D], ``ids`` [B, K, T] -> [B, K, T, D]: row ``ids[:, k]`` of table k, as
    :func:`_embed` per k, but one gather from the flattened tables (so the gradient is one scatter
    into one buffer instead of K zero-filled table-sized buffers)."""
    k, rows = tables.shape[0], tables.shape[1]
    offs = (jnp.arange(k, dtype=jnp.int32) * rows)[None, :, None]
    flat_ids = jnp.where(ids == ZERO_TOKEN, ZERO_TOKEN, jnp.maximum(ids, 0) + offs)
    return _embed(tables.reshape(k * rows, tables.shape[-1]), flat_ids)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class MoshiLM(nnx.Module):
    """Params (Kyutai name -> moshax): ``text_emb`` [text_card+1, D], ``emb.{k}`` -> ``emb`` [n_q,
    card+1, D], ``transformer`` (shared stack), ``out_norm``, ``text_linear`` [D, text_card],
    ``depformer_in.{k}`` -> ``depformer_in`` [n_in, D, Dd], ``depformer_text_emb`` [text_card+1, Dd],
    ``depformer_emb.{k}`` -> ``depformer_emb`` [dep_q-1, card+1, Dd], ``depformer`` (per-step
    weights), ``linears.{k}`` -> ``linears`` [dep_q, Dd, card]."""

    def __init__(self, cfg: MoshiLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        t, d = cfg.transformer, cfg.depformer
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.dtype = dtype
        self.text_emb = param(rngs, normal(1.0), (cfg.text_card + 1, t.dim), ("vocab", "embed"), pdtype)
        self.emb = param(rngs, normal(1.0), (cfg.n_q, cfg.card + 1, t.dim), ("codebooks", "vocab", "embed"), pdtype)
        self.transformer = Transformer(t, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.transformer.decodes_one_query = True  # its streaming step: one position per call
        self.out_norm = make_norm(t.norm, t.dim, t.norm_eps, rngs=rngs)
        self.text_linear = param(rngs, normal(t.init_std), (t.dim, cfg.text_card), ("embed", "vocab"), pdtype)

        self.depformer_in = param(rngs, normal(t.init_std), (cfg.num_depformer_in, t.dim, d.dim),
                                  (STEP_AXIS, "embed", None), pdtype)
        self.depformer_text_emb = param(rngs, normal(1.0), (cfg.text_card + 1, d.dim), ("vocab", "embed"), pdtype)
        self.depformer_emb = param(rngs, normal(1.0), (max(cfg.dep_q - 1, 0), cfg.card + 1, d.dim),
                                   ("codebooks", "vocab", "embed"), pdtype)
        self.depformer = Depformer(d, cfg.dep_q, weights_per_step=cfg.depformer_weights_per_step,
                                   schedule=cfg.depformer_weights_per_step_schedule, dtype=dtype,
                                   param_dtype=pdtype, rngs=rngs)
        self.linears = param(rngs, normal(d.init_std), (cfg.dep_q, d.dim, cfg.card), ("codebooks", "embed", "vocab"),
                             pdtype)

    # -- temporal ------------------------------------------------------------------------------

    def embed(self, sequence):
        """Sum of the stream embeddings: sequence [B, K, T] int -> [B, T, D] (compute dtype)."""
        cfg = self.cfg
        # Gather from replicated tables (see Helium: a vocab-sharded gather replicates activations).
        x = _embed(constrain(self.text_emb[...], (None, None)), sequence[:, 0]).astype(self.dtype)
        audio = _embed_stacked(constrain(self.emb[...], (None, None, None)), sequence[:, 1:])
        for k in range(cfg.n_q):  # summed in stream order, as the reference
            x = x + audio[:, k].astype(self.dtype)
        return constrain(x, ("act_batch", "act_length", "act_embed"))

    def forward_text(self, sequence, positions=None, cache: KVCache | None = None):
        """Temporal transformer: sequence [B, K, T] (already delayed) -> (transformer_out [B, T, D]
        after out_norm, text_logits [B, T, text_card] float32, cache)."""
        b, _, t = sequence.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(sequence)
        x, cache = self.transformer(x, positions, cache)
        x = self.out_norm(x)
        logits = jnp.einsum("btd,dv->btv", x.astype(self.dtype), self.text_linear[...].astype(self.dtype))
        logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
        return x, logits.astype(jnp.float32), cache

    def init_state(self, batch: int, capacity: int | None = None) -> KVCache:
        """Temporal KV ring buffers (capacity defaults to the temporal context)."""
        return self.transformer.init_state(batch, capacity)

    # -- depth ---------------------------------------------------------------------------------

    def _depformer_in_index(self, steps=None):
        """Which depformer_in projection each depth step uses (None: the single shared one)."""
        cfg = self.cfg
        if not cfg.depformer_multi_linear:
            return None
        sched = cfg.depformer_weights_per_step_schedule
        if steps is None:
            return slice(None) if sched is None else jnp.asarray(sched, jnp.int32)
        steps = jnp.asarray(steps, jnp.int32)
        return steps if sched is None else jnp.asarray(sched, jnp.int32)[steps]

    def _depformer_inputs(self, transformer_out, tokens):
        """transformer_out [B, T, D], tokens [B, dep_q, T] (input token of each depth step: text,
        then audio codebooks 0..dep_q-2) -> [dep_q, B*T, Dd] (step major) = depformer_in_s(out) +
        emb_s(token)."""
        cfg, dt = self.cfg, self.dtype
        b, t, _ = transformer_out.shape
        idx = self._depformer_in_index()
        w = self.depformer_in[...]
        h = transformer_out.astype(dt).reshape(b * t, -1)
        if idx is None:
            proj = jnp.einsum("nd,de->ne", h, w[0].astype(dt))[None]
        else:
            w = w if isinstance(idx, slice) else jnp.take(w, idx, axis=0)
            proj = jnp.einsum("nd,sde->sne", h, w.astype(dt))
        text_tab = constrain(self.depformer_text_emb[...], (None, None))
        embs = [_embed(text_tab, tokens[:, 0])]
        if cfg.dep_q > 1:
            audio = _embed_stacked(constrain(self.depformer_emb[...], (None, None, None)), tokens[:, 1:])
            embs += [audio[:, s] for s in range(cfg.dep_q - 1)]
        emb = jnp.stack(embs, axis=0).reshape(cfg.dep_q, b * t, -1)  # [S, B*T, Dd]
        return proj + emb.astype(dt)

    def forward_depformer_training(self, sequence, transformer_out):
        """Teacher-forced depformer. sequence [B, K, T] (delayed steps 1..T), transformer_out
        [B, T, D] -> audio logits [B, dep_q, T, card] float32. Runs depth-step major ([S, B*T, .])."""
        cfg = self.cfg
        b, _, t = sequence.shape
        x = self._depformer_inputs(transformer_out, sequence[:, : cfg.dep_q])  # [S, B*T, Dd]
        x = constrain(x, (None, "act_batch", "act_embed"))
        y, _ = self.depformer(x, step_major=True)
        logits = jnp.einsum("snd,sdv->snv", y.astype(self.dtype), self.linears[...].astype(self.dtype))
        logits = logits.reshape(cfg.dep_q, b, t, cfg.card).transpose(1, 0, 2, 3)
        return logits.astype(jnp.float32)

    def init_depformer_state(self, batch: int) -> KVCache:
        return self.depformer.init_state(batch)

    def depformer_step(self, step, token, transformer_out, cache: KVCache):
        """One depth step while decoding: ``step`` (int, may be traced) in [0, dep_q), ``token`` [B]
        = the previous depth step's token (the text token for step 0, audio codebook step-1
        otherwise), transformer_out [B, D] (after out_norm). Returns (logits [B, card] float32,
        cache). Start each time step with a fresh :meth:`init_depformer_state`."""
        dt = self.dtype
        step = jnp.asarray(step, jnp.int32)
        steps = jnp.reshape(step, (1,))
        idx = self._depformer_in_index(steps)
        w = self.depformer_in[...][0] if idx is None else jnp.take(self.depformer_in[...], idx[0], axis=0)
        x = jnp.einsum("bd,de->be", transformer_out.astype(dt), w.astype(dt))
        text = _embed(self.depformer_text_emb[...], token)
        if self.cfg.dep_q > 1:
            audio = _embed(jnp.take(self.depformer_emb[...], jnp.maximum(step - 1, 0), axis=0), token)
            text = jnp.where(step == 0, text, audio)
        x = (x + text.astype(dt))[:, None]
        y, cache = self.depformer(x, steps, cache)
        w = jnp.take(self.linears[...], step, axis=0)
        logits = jnp.einsum("bd,dv->bv", y[:, 0].astype(dt), w.astype(dt))
        return logits.astype(jnp.float32), cache

    # -- training ------------------------------------------------------------------------------

    def forward_train(self, codes):
        """codes [B, n_q + 1, T] int -> dict(text_logits [B, 1, T, text_card], text_mask [B, 1, T],
        logits [B, dep_q, T, card], mask [B, dep_q, T]); logits aligned with ``codes`` (no extra
        shift), NaN where masked for running past the end, as Kyutai's ``LMModel.forward``."""
        cfg = self.cfg
        b, k, t = codes.shape
        if k != cfg.num_streams:
            raise ValueError(f"codes have {k} streams, expected n_q + 1 = {cfg.num_streams}")
        codes = codes.astype(jnp.int32)
        init = initial_tokens(cfg)
        delayed = delay_sequence(codes, cfg.delays, init)
        delayed = jnp.concatenate([jnp.broadcast_to(init[None, :, None], (b, k, 1)), delayed], axis=2)
        transformer_out, text_logits, _ = self.forward_text(delayed[:, :, :-1])
        logits = self.forward_depformer_training(delayed[:, :, 1:], transformer_out)
        logits, mask = undelay_sequence(logits, cfg.delays[1: 1 + cfg.dep_q])
        mask &= codes[:, 1: 1 + cfg.dep_q] != ZERO_TOKEN
        text_logits, text_mask = undelay_sequence(text_logits[:, None], cfg.delays[:1])
        text_mask &= codes[:, :1] != ZERO_TOKEN
        return dict(text_logits=text_logits, text_mask=text_mask, logits=logits, mask=mask)

    __call__ = forward_train

    def loss(self, outputs: dict, codes, weights: MoshiTaskConfig | None = None) -> dict:
        """:func:`loss` with this model's config (``weights``: the task's loss weights, default
        moshi-finetune's)."""
        return loss(outputs, codes, self.cfg, weights)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def loss(outputs: dict, codes, cfg: MoshiLMConfig, weights: MoshiTaskConfig | None = None) -> dict:
    """moshi-finetune's losses as (sum, weight) pairs (float32 scalars), from
    :meth:`MoshiLM.forward_train` outputs and the same ``codes`` [B, n_q + 1, T]:

    ``weights`` (a :class:`MoshiTaskConfig`, default moshi-finetune's values) holds the weights:

    * ``text``: CE of valid text positions, PAD/EPAD targets weighted ``text_padding_weight``;
    * ``semantic``: CE of the first predicted codebook, weight ``semantic_weight`` per position;
    * ``acoustic``: CE of the other predicted codebooks, weight ``acoustic_weight``;
    * ``audio``: semantic + acoustic (moshi-finetune's audio loss is its weighted mean).

    moshi-finetune's training loss is ``text_sum / text_weight + audio_sum / audio_weight``
    (see :func:`total_loss`). Masked positions have zero weight and their (NaN) logits are ignored.
    """
    w = weights if weights is not None else MoshiTaskConfig()
    codes = codes.astype(jnp.int32)
    dep_q = outputs["logits"].shape[1]

    def ce(logits, targets, mask, weights):
        logits = jnp.where(mask[..., None], logits, 0.0)  # masked logits are NaN: keep them out
        targets = jnp.where(mask, targets, 0)
        return cross_entropy_sums(logits, targets, jnp.where(mask, weights, 0.0))

    text_t = codes[:, :1]
    text_mask = outputs["text_mask"]
    is_pad = (text_t == cfg.existing_text_padding_id) | (text_t == cfg.existing_text_end_padding_id)
    text_w = jnp.where(is_pad, w.text_padding_weight, 1.0)
    out = {"text": ce(outputs["text_logits"], text_t, text_mask, text_w)}

    audio_t = codes[:, 1: 1 + dep_q]
    mask = outputs["mask"]
    sem = ce(outputs["logits"][:, :1], audio_t[:, :1], mask[:, :1],
             jnp.full(mask[:, :1].shape, w.semantic_weight, jnp.float32))
    aco = ce(outputs["logits"][:, 1:], audio_t[:, 1:], mask[:, 1:],
             jnp.full(mask[:, 1:].shape, w.acoustic_weight, jnp.float32))
    out["semantic"] = sem
    out["acoustic"] = aco
    out["audio"] = (sem[0] + aco[0], sem[1] + aco[1])
    return out


def total_loss(losses: dict) -> jax.Array:
    """moshi-finetune's objective: weighted-mean text CE + weighted-mean audio CE."""
    def mean(pair):
        s, w = pair
        return s / jnp.maximum(w, 1e-12)

    return mean(losses["text"]) + mean(losses["audio"])
