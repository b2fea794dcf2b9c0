"""Streaming Moshi decoding (moshax.inference.moshi_stream): token parity with Kyutai's
``LMGen(lm, use_sampling=False)`` (moshi 0.2.13) frame by frame, batched == one by one, slot
resets, sampling, the Mimi duplex loop, and ``moshax generate``."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_moshi_lm import converted, reference_lm, tiny_config

from moshax.inference.moshi_stream import MoshiStream
from moshax.inference.sampling import Sampling, sample

os.environ.setdefault("NO_TORCH_COMPILE", "1")


def user_codes(cfg, batch, frames, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.card, (batch, cfg.n_q - cfg.dep_q, frames)).astype(np.int64)


def reference_tokens(lm, codes):
    """LMGen greedy over user codes [B, 8, T]: per frame the [B, 1 + dep_q] tokens (None while
    LMGen returns None)."""
    import torch
    from moshi.models import LMGen

    gen = LMGen(lm, use_sampling=False, check=True)
    outs = []
    with torch.no_grad(), gen.streaming(codes.shape[0]):
        for t in range(codes.shape[-1]):
            out = gen.step(torch.from_numpy(codes[:, :, t:t + 1]))
            outs.append(None if out is None else out[:, :, 0].numpy())
    return outs


def moshax_tokens(stream, codes):
    outs = []
    for t in range(codes.shape[-1]):
        out = stream.step(codes[:, :, t:t + 1])
        tok = np.concatenate([np.asarray(out.text)[:, None], np.asarray(out.audio)], axis=1)
        outs.append((tok, np.asarray(out.valid)))
    return outs


@pytest.mark.parametrize("acoustic_delay", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_greedy_tokens_match_lmgen(acoustic_delay, tmp_path):
    frames = 60
    cfg = tiny_config(delays=[0, 0] + [acoustic_delay] * 7 + [0] + [acoustic_delay] * 7,
                      transformer=dataclasses.replace(tiny_config().transformer, context=24))
    assert cfg.transformer.context < frames  # the temporal KV ring wraps
    lm = reference_lm(cfg, seed=acoustic_delay)
    model = converted(cfg, lm, tmp_path)
    codes = user_codes(cfg, 2, frames, seed=acoustic_delay)
    ref = reference_tokens(lm, codes)
    ours = moshax_tokens(MoshiStream(model, batch=2, sampling=Sampling.greedy()), codes)
    equal = 0
    for t, (r, (tok, valid)) in enumerate(zip(ref, ours)):
        if r is None:
            assert not valid.any(), t
            assert (tok == -2).all()
            continue
        assert valid.all(), t
        np.testing.assert_array_equal(tok, r, err_msg=f"frame {t}")
        equal += 1
    print(f"acoustic delay {acoustic_delay}: {equal} frames of equal tokens (batch 2, context {cfg.transformer.context})")
    assert equal >= frames - acoustic_delay >= 50
    # the tokens are not degenerate
    allt = np.stack([r for r in ref if r is not None])
    assert len(np.unique(allt[:, :, 0])) > 3 and len(np.unique(allt[:, :, 1:])) > 10


def _small_model(seed=0, **kw):
    from flax import nnx

    from moshax.models.moshi_lm import MoshiLM

    return MoshiLM(tiny_config(**kw), rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("sampling", [Sampling.greedy(), pytest.param(Sampling(0.8, 20, 0.7, 10), marks=pytest.mark.slow)],
                         ids=["greedy", "sampled"])
def test_batched_equals_one_by_one_and_reset(sampling):
    model = _small_model(delays=[0, 0] + [2] * 7 + [0] + [2] * 7)
    cfg = model.cfg
    frames = 10
    codes = user_codes(cfg, 3, frames, seed=5)
    seeds = [11, 12, 13]
    batched = moshax_tokens(MoshiStream(model, 3, sampling, seeds=seeds), codes)
    for i in range(3):
        alone = moshax_tokens(MoshiStream(model, 1, sampling, seeds=[seeds[i]]), codes[i:i + 1])
        for t in range(frames):
            np.testing.assert_array_equal(batched[t][0][i:i + 1], alone[t][0], err_msg=f"slot {i} frame {t}")
    if sampling.temperature > 0:  # sampling does sample, and another seed gives other tokens
        other = moshax_tokens(MoshiStream(model, 1, sampling, seeds=[99]), codes[:1])
        assert any((o[0] != b[0][:1]).any() for o, b in zip(other, batched) if b[1].all())

    # reset slot 1 mid-stream: from then on it equals a fresh stream on the remaining frames
    gen = MoshiStream(model, 3, sampling, seeds=seeds)
    cut = 4
    moshax_tokens(gen, codes[:, :, :cut])
    gen.reset([False, True, False])
    after = moshax_tokens(gen, codes[:, :, cut:])
    fresh = moshax_tokens(MoshiStream(model, 1, sampling, seeds=[seeds[1]]), codes[1:2, :, cut:])
    for t in range(frames - cut):
        np.testing.assert_array_equal(after[t][0][1:2], fresh[t][0], err_msg=f"reset slot, frame {t}")
        np.testing.assert_array_equal(after[t][1][1:2], fresh[t][1])
        # the other slots did not notice
        np.testing.assert_array_equal(after[t][0][[0, 2]], batched[cut + t][0][[0, 2]])


def test_sampler():
    keys = jax.random.split(jax.random.key(0), 4000)
    logits = jnp.broadcast_to(jnp.log(jnp.asarray([0.1, 0.2, 0.3, 0.4, 1e-9])), (4000, 5))
    greedy = sample(logits, keys, 0.0, 0)
    assert (np.asarray(greedy) == 3).all()
    full = np.bincount(np.asarray(sample(logits, keys, 1.0, 0)), minlength=5) / 4000
    np.testing.assert_allclose(full, [0.1, 0.2, 0.3, 0.4, 0.0], atol=0.03)
    top2 = np.bincount(np.asarray(sample(logits, keys, 1.0, 2)), minlength=5) / 4000
    np.testing.assert_allclose(top2, [0, 0, 3 / 7, 4 / 7, 0], atol=0.03)
    # same keys -> same tokens
    np.testing.assert_array_equal(np.asarray(sample(logits, keys, 0.8, 3)), np.asarray(sample(logits, keys, 0.8, 3)))
