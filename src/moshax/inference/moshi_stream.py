"""Streaming Moshi: one jitted step per 80 ms frame for many independent conversations.

The whole decoder state is one pytree, :class:`MoshiState`:

* ``cache``: the temporal transformer's KV ring buffers (capacity = ``transformer.context``,
  3000 steps for moshiko; absolute positions per slot, so the mask and RoPE follow each slot's
  own offset and the ring wraps by itself);
* ``tokens`` [B, K, max_delay + 2] int32: Kyutai ``LMGen``'s token ring (-2 = ungenerated): user
  codes are written ``delay`` steps ahead, generated tokens one step ahead, the step's input is
  read at ``offset``, and the output (delays undone) ``max_delay`` steps behind;
* ``offset`` [B] int32: steps taken by each slot;
* ``key`` [B, 2] uint32: each slot's PRNG key data, split once per step inside the step.

:func:`step` (pure, jit it with the state donated) runs the temporal transformer on the frame's
17 tokens, samples the text token, then the ``dep_q`` depth steps in a ``lax.scan`` (the depth
transformer's per-step weights picked by the traced step index, a fresh ``dep_q``-slot KV cache
per frame) and returns a :class:`StepOutput`. For the first ``max_delay`` steps of a slot
``valid`` is False and the tokens are -2 (``LMGen`` returns None there). :func:`reset` restarts
chosen slots (a bool mask, traced: no recompilation).

Exactly ``LMGen(lm, use_sampling=False).step`` with greedy sampling (tests compare tokens frame by
frame), including its quirk that a slot's first user frame is replaced by the initial tokens.

Python API::

    gen = MoshiStream(model, batch=4, sampling=Sampling(), seed=0)
    out = gen.step(user_codes)            # [B, >= n_q - dep_q, 1] -> StepOutput (jax arrays)
    gen.reset([False, True, False, False])

    loop = DuplexLoop(model, mimi, batch=1)   # Mimi encode -> LM step -> Mimi decode
    pcm_out, out = loop.step(pcm)         # [B, 1, 1920] float -> [B, 1, 1920] (zeros while not valid)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moshax.inference.sampling import Sampling, sample, slot_keys
from moshax.layers.attention import KV_CACHES, KVCache
from moshax.models.moshi_lm import UNGENERATED_TOKEN, initial_tokens


class MoshiState(NamedTuple):
    cache: Any  # temporal KV rings: a stacked KVCache [layers, B, ...] or a list of per-layer KVCache/RowsKVCache
    tokens: jax.Array  # [B, K, max_delay + 2] int32, -2 = ungenerated
    offset: jax.Array  # [B] int32
    key: jax.Array  # [B, 2] uint32 PRNG key data


class StepOutput(NamedTuple):
    text: jax.Array  # [B] int32: the text token aligned with ``audio`` (delays undone), -2 while not valid
    audio: jax.Array  # [B, dep_q] int32: Moshi's codes of that frame, -2 while not valid
    valid: jax.Array  # [B] bool: False for a slot's first max_delay steps
    text_now: jax.Array  # [B] int32: the text token sampled this step (no delay applied)


def max_delay(cfg) -> int:
    return int(max(cfg.delays))


def init_state(model, batch: int, seed: int = 0, capacity: int | None = None, keys=None) -> MoshiState:
    """A fresh state for ``batch`` slots (every leaf its own buffer: a step may donate it).
    ``keys``: raw key data [batch, 2] (default :func:`slot_keys` of ``seed``)."""
    cfg = model.cfg
    cache = model.init_state(batch, capacity)
    tokens = jnp.full((batch, cfg.num_streams, max_delay(cfg) + 2), UNGENERATED_TOKEN, jnp.int32)
    key = slot_keys(seed, batch) if keys is None else jnp.asarray(keys, jnp.uint32)
    return MoshiState(cache, tokens, jnp.zeros((batch,), jnp.int32), key)


def _reset_cache(cache, mask):
    """Empty the KV rings of the slots in ``mask`` (pos = -1; keys/values are then never read)."""
    def one(c):
        axis = c.pos.ndim - 2  # [.., B, capacity]
        m = mask.reshape((1,) * axis + (-1, 1))
        return c._replace(pos=jnp.where(m, -1, c.pos))

    return jax.tree.map(one, cache, is_leaf=lambda x: isinstance(x, KV_CACHES))


def reset(state: MoshiState, mask, keys=None) -> MoshiState:
    """Restart the slots where ``mask`` [B] is True (as a fresh :func:`init_state` slot); their keys
    become ``keys`` [B, 2] where given (else they are kept)."""
    mask = jnp.asarray(mask, bool)
    key = state.key if keys is None else jnp.where(mask[:, None], jnp.asarray(keys, jnp.uint32), state.key)
    return MoshiState(_reset_cache(state.cache, mask),
                      jnp.where(mask[:, None, None], UNGENERATED_TOKEN, state.tokens),
                      jnp.where(mask, 0, state.offset), key)


def _gather_ring(tokens, index):
    """tokens [B, K, C], index [B, K] -> tokens[b, k, index[b, k]]."""
    return jnp.take_along_axis(tokens, index[:, :, None], axis=2)[:, :, 0]


def _scatter_ring(tokens, streams, index, values):
    """tokens[b, streams[j], index[b, j]] = values[b, j]."""
    b = jnp.arange(tokens.shape[0])[:, None]
    return tokens.at[b, jnp.asarray(streams)[None, :], index].set(values.astype(tokens.dtype))


def depth_sample(model, transformer_out, text_token, keys, sampling: Sampling):
    """The dep_q depth steps of one frame: transformer_out [B, D], text_token [B], keys [dep_q, B]
    typed -> audio tokens [B, dep_q]. A ``lax.scan`` over the steps (per-step weights selected by
    the traced step index)."""
    cfg = model.cfg
    cache = model.init_depformer_state(transformer_out.shape[0])

    def body(carry, xs):
        prev, cache = carry
        s, k = xs
        logits, cache = model.depformer_step(s, prev, transformer_out, cache)
        tok = sample(logits, k, sampling.temperature, sampling.top_k)
        return (tok, cache), tok

    _, toks = jax.lax.scan(body, (text_token, cache), (jnp.arange(cfg.dep_q, dtype=jnp.int32), keys))
    return toks.T


def _static_in_index(cfg, s: int) -> int:
    if not cfg.depformer_multi_linear:
        return 0
    sched = cfg.depformer_weights_per_step_schedule
    return s if sched is None else int(sched[s])


def unroll_depformer(model) -> None:
    """Inference layout of the depth transformer (in place, eagerly): one plain
    :class:`~moshax.layers.transformer.TransformerBlock` per (depth step, layer) holding that
    step's own contiguous weights, in ``model.depformer_steps``; the stacked ``[layers,
    depth_steps, ...]`` weights are dropped. A scanned step would copy every layer's weights
    (all steps') before each matmul: 8x the depth transformer's size per frame."""
    from moshax.layers.transformer import TransformerBlock

    dep = model.depformer
    if getattr(model, "depformer_steps", None) is not None:
        return
    cfg = dep.cfg
    abstract = nnx.eval_shape(lambda: TransformerBlock(cfg, num_weights=None, windowed=False, dtype=dep.dtype,
                                                       rngs=nnx.Rngs(0)))
    shapes = nnx.to_pure_dict(nnx.state(abstract))
    stacked = nnx.to_pure_dict(nnx.state(dep.layers))
    steps = []
    for s in range(dep.depth_steps):
        w = 0 if dep.num_weights == 1 else (s if dep.schedule is None else dep.schedule[s])
        layers = []
        for layer in range(cfg.num_layers):
            sliced = jax.tree.map(lambda a, ab: jnp.array(a[layer, w] if a.ndim == len(ab.shape) + 2 else a[layer]),
                                  stacked, shapes)
            graphdef, st = nnx.split(abstract)
            nnx.replace_by_pure_dict(st, sliced)
            layers.append(nnx.merge(graphdef, st))
        steps.append(nnx.List(layers))
    model.depformer_steps = nnx.List(steps)
    dep.layers = None
    # the per-step input projection, embedding table and output head, each its own array: a
    # static slice of the stacked ones is a copy before every matmul (XLA:CPU copied 40 MB per
    # frame of config (b) that way, at ~1 GB/s)
    emb = model.depformer_emb[...]
    model.depformer_step_weights = nnx.List([
        _DepthStepWeights(model.depformer_in[...][_static_in_index(model.cfg, s)],
                          model.depformer_text_emb[...] if s == 0 else emb[s - 1], model.linears[...][s])
        for s in range(dep.depth_steps)])


class _DepthStepWeights(nnx.Module):
    """One depth step's own copies of ``depformer_in``, its input embedding table and its head
    (:func:`unroll_depformer`)."""

    def __init__(self, w_in, table, head):
        self.w_in = nnx.Param(jnp.array(w_in))
        self.table = nnx.Param(jnp.array(table))
        self.head = nnx.Param(jnp.array(head))


def depth_sample_unrolled(model, transformer_out, text_token, keys, sampling: Sampling):
    """:func:`depth_sample` over :func:`unroll_depformer`'s per-step blocks (a Python loop over
    the static depth steps: no weight copies)."""
    from moshax.models.moshi_lm import _embed

    cfg, dt = model.cfg, model.dtype
    d = cfg.depformer
    b = transformer_out.shape[0]
    caches = [KVCache.empty(b, cfg.dep_q, d.num_heads, d.head_dim, model.depformer.dtype) for _ in range(d.num_layers)]
    prev, toks = text_token, []
    for s in range(cfg.dep_q):
        own = model.depformer_step_weights[s]
        x = jnp.einsum("bd,de->be", transformer_out.astype(dt), own.w_in[...].astype(dt))
        x = (x + _embed(own.table[...], prev).astype(dt))[:, None]
        positions = jnp.full((b, 1), s, jnp.int32)
        for layer, block in enumerate(model.depformer_steps[s]):
            x, caches[layer] = block(x, positions, caches[layer])
        logits = jnp.einsum("bd,dv->bv", x[:, 0].astype(dt), own.head[...].astype(dt)).astype(jnp.float32)
        prev = sample(logits, keys[s], sampling.temperature, sampling.top_k)
        toks.append(prev)
    return jnp.stack(toks, axis=1)


def step(model, state: MoshiState, user_codes, sampling: Sampling = Sampling()) -> tuple[MoshiState, StepOutput]:
    """One 80 ms frame for every slot. ``user_codes`` [B, >= n_q - dep_q, 1] int (the user's
    Mimi codes, semantic first; extra codebooks are ignored). Pure: jit it, donating ``state``."""
    cfg = model.cfg
    b = state.offset.shape[0]
    dep_q, k_all = cfg.dep_q, cfg.num_streams
    n_user = k_all - 1 - dep_q
    md = max_delay(cfg)
    ct = md + 2
    delays = jnp.asarray(cfg.delays, jnp.int32)
    user = jnp.asarray(user_codes, jnp.int32)
    if user.ndim != 3 or user.shape[0] != b or user.shape[1] < n_user or user.shape[2] != 1:
        raise ValueError(f"user codes must be [{b}, >= {n_user}, 1], got {user.shape}")
    user = user[:, :n_user, 0]
    t = state.offset
    tokens = state.tokens

    # user codes go `delay` steps ahead
    user_streams = np.arange(1 + dep_q, k_all)
    tokens = _scatter_ring(tokens, user_streams, (t[:, None] + delays[None, 1 + dep_q:]) % ct, user)
    # this step's input: the ring at `offset`, initial tokens while offset <= delay
    inp = _gather_ring(tokens, jnp.broadcast_to((t % ct)[:, None], (b, k_all)))
    inp = jnp.where(t[:, None] <= delays[None, :], initial_tokens(cfg)[None, :], inp)

    out, text_logits, cache = model.forward_text(inp[:, :, None], t[:, None], state.cache)

    keys = jax.vmap(lambda k: jax.random.split(k, 2 + dep_q))(jax.random.wrap_key_data(state.key))  # [B, 2 + dep_q]
    text = sample(text_logits[:, 0], keys[:, 1], sampling.text_temperature, sampling.text_top_k)
    depth = depth_sample_unrolled if getattr(model, "depformer_steps", None) is not None else depth_sample
    audio = depth(model, out[:, 0], text, keys[:, 2:].T, sampling)

    t1 = t + 1
    gen = jnp.concatenate([text[:, None], audio], axis=1)  # [B, 1 + dep_q]
    tokens = _scatter_ring(tokens, np.arange(1 + dep_q), jnp.broadcast_to((t1 % ct)[:, None], (b, 1 + dep_q)), gen)
    idx = (t1[:, None] - md + delays[None, : 1 + dep_q]) % ct
    aligned = _gather_ring(tokens[:, : 1 + dep_q], idx)
    valid = t1 > md
    aligned = jnp.where(valid[:, None], aligned, UNGENERATED_TOKEN)
    new_state = MoshiState(cache, tokens, t1, jax.random.key_data(keys[:, 0]))
    return new_state, StepOutput(aligned[:, 0], aligned[:, 1:], valid, text)


# ---------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------


def _streaming_copy(model):
    """A shallow copy of ``model`` (same arrays) with the depth transformer unrolled."""
    copy = nnx.merge(*nnx.split(model))
    unroll_depformer(copy)
    return copy


_JITS: dict = {}


def _cached_jit(bound, name, sampling, make, donate):
    """``bound.jit(make(sampling))``, shared by every stream of the same model structure and
    sampling settings (new streams of one model do not recompile)."""
    try:
        key = (name, bound._graphdef, bound._treedef, sampling)
        hash(key)
    except TypeError:
        return bound.jit(make(sampling), donate_argnums=donate)
    jitted = _JITS.get(key)
    if jitted is None:
        graphdef, treedef = bound._graphdef, bound._treedef
        fn = make(sampling)
        jitted = _JITS[key] = jax.jit(
            lambda leaves, *a: fn(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), *a),
            donate_argnums=tuple(i + 1 for i in donate))
    leaves = bound._leaves
    return lambda *a: jitted(leaves, *a)


class MoshiStream:
    """LMGen-like driver of :func:`step` for ``batch`` slots: weights bound once (the temporal
    transformer in the unstacked inference layout), the step jitted once with the state donated.
    Sampling settings are static (a change builds a new stream); slots reset without recompiling."""

    def __init__(self, model, batch: int = 1, sampling: Sampling | None = None, seed: int = 0, *,
                 capacity: int | None = None, seeds=None):
        from moshax.inference.bound import BoundModel

        self.sampling = (sampling or Sampling()).validate()
        self.batch = int(batch)
        self.seed = int(seed)
        self.capacity = capacity
        self._seeds = None if seeds is None else [int(s) for s in seeds]
        bound = BoundModel(_streaming_copy(model))
        self.model = bound.model
        self.cfg = model.cfg
        self._step = _cached_jit(bound, "step", self.sampling,
                                 lambda sampling: lambda m, s, c: step(m, s, c, sampling), (0,))
        self._reset = jax.jit(reset, donate_argnums=(0,))
        self.state = init_state(self.model, self.batch, capacity=capacity, keys=self._initial_keys())

    def _initial_keys(self):
        if self._seeds is None:
            return slot_keys(self.seed, self.batch)
        if len(self._seeds) != self.batch:
            raise ValueError(f"seeds: {len(self._seeds)} given for batch {self.batch}")
        return jnp.concatenate([slot_keys(s, 1) for s in self._seeds])

    @property
    def max_delay(self) -> int:
        return max_delay(self.cfg)

    def step(self, user_codes) -> StepOutput:
        self.state, out = self._step(self.state, jnp.asarray(user_codes, jnp.int32))
        return out

    def reset(self, slot_mask=None, seed: int | None = None) -> None:
        """Restart the slots in ``slot_mask`` (default all); their keys are those a fresh stream
        with ``seed`` (default this stream's seeds) gives them."""
        mask = np.ones(self.batch, bool) if slot_mask is None else np.asarray(slot_mask, bool)
        keys = self._initial_keys() if seed is None else slot_keys(seed, self.batch)
        self.state = self._reset(self.state, jnp.asarray(mask), keys)


# The position a parked slot steps at: negative, so no KV ring keeps what it computes
# (KVCache.write drops negative positions) and only its small state leaves need restoring.
PARKED = -(2 ** 30)


def _park(mask, offset):
    return jnp.where(mask, offset, PARKED)


def _select_slots(mask, new, old):
    """Per-slot choice between two states whose leaves all lead with the batch axis, KV rings
    excepted: those are taken from ``new`` as they are (selecting rings rewrites them all). The
    slots outside ``mask`` must not have written to them: they stepped parked (:data:`PARKED`),
    or their rings are emptied afterwards (:func:`_reset_cache`)."""
    def pick(a, b):
        if isinstance(a, KV_CACHES):
            return a
        if a.shape[:1] != mask.shape:
            raise ValueError(f"state leaf {a.shape} does not lead with the batch axis {mask.shape}")
        return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old, is_leaf=lambda x: isinstance(x, KV_CACHES))


class _Pair(nnx.Module):
    def __init__(self, lm, mimi):
        self.lm = lm
        self.mimi = mimi


def duplex_step(lm, mimi, lm_state: MoshiState, mimi_state, pcm, sampling: Sampling = Sampling()):
    """Full duplex, one frame: the user's pcm [B, 1, frame_size] -> Mimi encode -> :func:`step`
    -> Mimi decode of Moshi's codes. Returns (lm_state, mimi_state, pcm_out [B, 1, frame_size],
    StepOutput). Slots not yet valid output silence and leave their Mimi decoder untouched (the
    reference server decodes nothing before the first tokens). Needs the inference layout
    (every Mimi state leaf batch-major: :class:`~moshax.inference.bound.BoundModel`)."""
    n_user = lm.cfg.num_streams - 1 - lm.cfg.dep_q
    codes, enc_state = mimi.encode_step(pcm, mimi_state, n_user)
    lm_state, out = step(lm, lm_state, codes, sampling)
    audio = jnp.where(out.valid[:, None], out.audio, 0)
    parked = enc_state._replace(decoder_offset=_park(out.valid, enc_state.decoder_offset))
    pcm_out, dec_state = mimi.decode_step(audio[:, :, None], parked)
    mimi_state = _select_slots(out.valid, dec_state, enc_state)
    pcm_out = jnp.where(out.valid[:, None, None], pcm_out, 0.0)
    return lm_state, mimi_state, pcm_out, out


def masked_duplex_step(lm, mimi, lm_state: MoshiState, mimi_state, pcm, active, sampling: Sampling = Sampling()):
    """:func:`duplex_step` for the slots in ``active`` [B] bool; the others keep their states, as
    if this step had not happened. They step parked (negative positions: their KV ring writes are
    dropped), so only their small state leaves are restored, not the rings. Their outputs are
    not valid (silence, -2 tokens)."""
    parked_lm = lm_state._replace(offset=_park(active, lm_state.offset))
    parked_mimi = mimi_state._replace(encoder_offset=_park(active, mimi_state.encoder_offset),
                                      decoder_offset=_park(active, mimi_state.decoder_offset))
    new_lm, new_mimi, pcm_out, out = duplex_step(lm, mimi, parked_lm, parked_mimi, pcm, sampling)
    return (_select_slots(active, new_lm, lm_state),
            _select_slots(active, new_mimi, mimi_state), pcm_out, out)


def reset_mimi(mimi, mimi_state, mask):
    """Restart the Mimi streaming state of the slots in ``mask``: their small leaves from a fresh
    state, their KV rings emptied in place (as :func:`reset` does the LM's)."""
    kept = _select_slots(~mask, mimi_state, mimi.init_state(mask.shape[0]))
    return jax.tree.map(lambda c: _reset_cache(c, mask) if isinstance(c, KV_CACHES) else c, kept,
                        is_leaf=lambda x: isinstance(x, KV_CACHES))


class DuplexLoop:
    """Mimi encode of each user frame -> LM step -> Mimi decode of Moshi's codes, for ``batch``
    conversations; one jitted call per 80 ms frame with both states donated."""

    def __init__(self, lm, mimi, batch: int = 1, sampling: Sampling | None = None, seed: int = 0, *,
                 capacity: int | None = None):
        from moshax.inference.bound import BoundModel

        check_pair(lm.cfg, mimi.cfg)
        self.sampling = (sampling or Sampling()).validate()
        self.batch = int(batch)
        self.seed = int(seed)
        bound = BoundModel(_Pair(_streaming_copy(lm), mimi))
        self.lm, self.mimi = bound.model.lm, bound.model.mimi
        self.frame_size = mimi.frame_size
        self.sample_rate = mimi.cfg.sample_rate
        self._step = _cached_jit(bound, "duplex", self.sampling,
                                 lambda s: lambda p, a, b, x: duplex_step(p.lm, p.mimi, a, b, x, s), (0, 1))
        self._reset = bound.jit(lambda p, a, b, m, k: (reset(a, m, k), reset_mimi(p.mimi, b, m)),
                                donate_argnums=(0, 1))
        self.lm_state = init_state(self.lm, self.batch, seed, capacity)
        self.mimi_state = self.mimi.init_state(self.batch)
        self._bound, self._masked_step, self._reset_mimi = bound, None, None

    def step(self, pcm, active=None):
        """pcm [B, 1, frame_size] float -> (pcm_out [B, 1, frame_size], StepOutput). ``active`` [B]
        bool (default all): slots outside it keep their state, as if this step had not happened
        (a server steps only the conversations that have a frame; same batched cost; the outputs
        of the others are not valid). All True runs the plain step (:func:`masked_duplex_step`
        otherwise)."""
        pcm = jnp.asarray(pcm, jnp.float32)
        if pcm.shape != (self.batch, 1, self.frame_size):
            raise ValueError(f"pcm: shape {pcm.shape}, expected [batch, 1, frame_size] = "
                             f"{[self.batch, 1, self.frame_size]}")
        if active is not None:
            active = self._slot_mask(active, "active")
        if active is None or active.all():
            self.lm_state, self.mimi_state, pcm_out, out = self._step(self.lm_state, self.mimi_state, pcm)
        else:
            if self._masked_step is None:
                self._masked_step = self._bound.jit(
                    lambda p, a, b, x, m: masked_duplex_step(p.lm, p.mimi, a, b, x, m, self.sampling),
                    donate_argnums=(0, 1))
            self.lm_state, self.mimi_state, pcm_out, out = self._masked_step(
                self.lm_state, self.mimi_state, pcm, jnp.asarray(active))
        return pcm_out, out

    def _slot_mask(self, mask, name: str) -> np.ndarray:
        """A per-slot bool mask as numpy, or one clear line when it does not have ``batch`` entries."""
        mask = np.asarray(mask)
        if mask.shape != (self.batch,) or not (mask.dtype == bool or np.issubdtype(mask.dtype, np.integer)):
            raise ValueError(f"{name}: expected {self.batch} bools (one per slot), got shape {mask.shape} "
                             f"of {mask.dtype}")
        return mask.astype(bool)

    def reset_mimi(self, slot_mask) -> None:
        """Restart only the Mimi streaming state of the slots in ``slot_mask`` (Kyutai's server does
        this after a conversation's first frame: its encoding carries the left padding)."""
        if self._reset_mimi is None:
            self._reset_mimi = self._bound.jit(lambda p, b, m: reset_mimi(p.mimi, b, m), donate_argnums=(0,))
        self.mimi_state = self._reset_mimi(self.mimi_state, jnp.asarray(self._slot_mask(slot_mask, "slot_mask")))

    def reset(self, slot_mask=None, seed: int | None = None) -> None:
        mask = np.ones(self.batch, bool) if slot_mask is None else self._slot_mask(slot_mask, "slot_mask")
        keys = slot_keys(self.seed if seed is None else seed, self.batch)
        self.lm_state, self.mimi_state = self._reset(self.lm_state, self.mimi_state, jnp.asarray(mask), keys)


def check_pair(lm_cfg, mimi_cfg) -> None:
    """A Mimi fits an LM when its codebooks have the LM's card entries and it has at least
    max(dep_q, n_q - dep_q) levels (raises ValueError with one line otherwise)."""
    q = mimi_cfg.quantizer
    need = max(lm_cfg.dep_q, lm_cfg.num_streams - 1 - lm_cfg.dep_q)
    if q.bins != lm_cfg.card:
        raise ValueError(f"the Mimi's codebooks have {q.bins} entries but the LM's card is {lm_cfg.card}")
    if q.n_q < need:
        raise ValueError(f"the Mimi has {q.n_q} codebooks but the LM needs {need} "
                         f"(dep_q {lm_cfg.dep_q}, {lm_cfg.num_streams - 1 - lm_cfg.dep_q} user streams)")
