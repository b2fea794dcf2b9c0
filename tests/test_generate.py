"""Streaming Moshi decoding (moshax.inference.moshi_stream): token parity with Kyutai's
``LMGen(lm, use_sampling=False)`` (moshi 0.2.13) frame by frame, batched == one by one, slot
resets, sampling, the Mimi duplex loop, and ``moshax generate``."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from requirements import require_module

from test_moshi_lm import converted, reference_lm, tiny_config

from moshax.inference.moshi_stream import MoshiStream
from moshax.inference.sampling import Sampling, sample
from moshax.layers.attention import RowsKVCache

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
    stream = MoshiStream(model, batch=2, sampling=Sampling.greedy())
    assert all(isinstance(c, RowsKVCache) for c in stream.state.cache)  # the CPU decoding layout
    ours = moshax_tokens(stream, codes)
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


# ----------------------------------------------------------------------------- moshax generate


def _save(model, root, kind):
    from flax import nnx

    from moshax.checkpoint.model import save_model_checkpoint
    from moshax.config import to_dict

    _, p, r = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(p))
    rest = jax.tree.map(np.asarray, nnx.to_pure_dict(r))
    return save_model_checkpoint(root, params, rest, config=to_dict(model.cfg), kind=kind)


def _tiny_mimi(bins=64, n_q=8):
    from flax import nnx

    from test_mimi_cli import tiny_cfg, tone

    from helpers import draw_codebooks
    from moshax.models.mimi.config import QuantizerConfig
    from moshax.models.mimi.model import Mimi

    cfg = dataclasses.replace(tiny_cfg(), quantizer=QuantizerConfig(dimension=16, bins=bins, n_q=n_q, num_codebooks=n_q))
    model = Mimi(cfg, rngs=nnx.Rngs(0))
    return draw_codebooks(model, tone(1.6)[None], np.random.default_rng(0))


def test_duplex_loop_steps_every_slot_without_the_masked_step():
    """``active`` all True is the plain step (same outputs as no mask, no masked step compiled);
    a partial mask keeps the other slot's state as it was."""
    from moshax.inference.moshi_stream import DuplexLoop

    lm, mimi = _small_model(seed=1), _tiny_mimi()
    plain, masked = (DuplexLoop(lm, mimi, batch=2, sampling=Sampling.greedy()) for _ in range(2))
    pcm = np.random.default_rng(0).normal(0, 0.1, (5, 2, 1, mimi.frame_size)).astype(np.float32)
    for t in range(4):
        p_plain, o_plain = plain.step(pcm[t])
        p_masked, o_masked = masked.step(pcm[t], active=np.ones(2, bool))
        np.testing.assert_array_equal(p_masked, p_plain)
        np.testing.assert_array_equal(o_masked.audio, o_plain.audio)
    assert masked._masked_step is None
    before = jax.tree.map(np.asarray, masked.lm_state)
    masked.step(pcm[4], active=np.array([True, False]))
    assert masked._masked_step is not None
    after = jax.tree.map(np.asarray, masked.lm_state)
    assert after.offset[1] == before.offset[1] and after.offset[0] == before.offset[0] + 1
    np.testing.assert_array_equal(after.tokens[1], before.tokens[1])
    ring_before, ring_after = before.cache[0], after.cache[0]  # RowsKVCache: rows [B * H, D, S]
    h = ring_after.k.shape[0] // 2
    np.testing.assert_array_equal(ring_after.k[h:], ring_before.k[h:])
    np.testing.assert_array_equal(ring_after.pos[1], ring_before.pos[1])
    assert (ring_after.pos[0] != ring_before.pos[0]).any()


def test_duplex_loop_rejects_wrong_shapes_in_one_line():
    """A frame or a slot mask of the wrong size is a ValueError naming what was expected, raised
    before any state is touched (not a shape error from inside the jitted step)."""
    from moshax.inference.moshi_stream import DuplexLoop

    lm, mimi = _small_model(seed=1), _tiny_mimi()
    loop = DuplexLoop(lm, mimi, batch=2, sampling=Sampling.greedy())
    before = jax.tree.map(np.asarray, loop.lm_state)
    with pytest.raises(ValueError, match=r"pcm: shape \(1, 1, \d+\), expected"):
        loop.step(np.zeros((1, 1, mimi.frame_size), np.float32))
    with pytest.raises(ValueError, match="active: expected 2 bools"):
        loop.step(np.zeros((2, 1, mimi.frame_size), np.float32), active=[True, False, True])
    with pytest.raises(ValueError, match="slot_mask: expected 2 bools"):
        loop.reset(np.ones(3, bool))
    with pytest.raises(ValueError, match="slot_mask: expected 2 bools"):
        loop.reset_mimi([0.5, 1.0])
    for got, want in zip(jax.tree.leaves(loop.lm_state), jax.tree.leaves(before)):
        np.testing.assert_array_equal(got, want)
    loop.step(np.zeros((2, 1, mimi.frame_size), np.float32), active=[1, 0])  # ints are a mask too


def test_reset_mimi_restarts_one_slot_and_leaves_the_other():
    """``reset_mimi`` gives the slots in the mask a fresh Mimi state (small leaves as a fresh
    state's, every KV ring slot empty: pos -1) and leaves every leaf of the others as it was."""
    from moshax.inference.moshi_stream import DuplexLoop
    from moshax.layers.attention import KV_CACHES

    lm, mimi = _small_model(seed=3), _tiny_mimi()
    loop = DuplexLoop(lm, mimi, batch=2, sampling=Sampling.greedy())
    pcm = np.random.default_rng(2).normal(0, 0.1, (3, 2, 1, mimi.frame_size)).astype(np.float32)
    for t in range(3):
        loop.step(pcm[t])
    is_ring = lambda x: isinstance(x, KV_CACHES)  # noqa: E731
    before = jax.tree.map(np.asarray, loop.mimi_state)
    fresh = jax.tree.map(np.asarray, loop.mimi.init_state(2))
    loop.reset_mimi(np.array([True, False]))
    after = jax.tree.map(np.asarray, loop.mimi_state)
    def slot(tree, i):  # slot i of every leaf; a ring's batch axis is its pos's second to last
        def take(x):
            if is_ring(x):
                return [np.take(f, i, axis=x.pos.ndim - 2) for f in x]
            return x[i]
        return jax.tree.leaves(jax.tree.map(take, tree, is_leaf=is_ring))

    rings = [r for r in jax.tree.leaves(after, is_leaf=is_ring) if is_ring(r)]
    assert rings and all((np.take(r.pos, 0, axis=r.pos.ndim - 2) == -1).all() for r in rings)
    rings_before = [r for r in jax.tree.leaves(before, is_leaf=is_ring) if is_ring(r)]
    assert any((np.take(r.pos, 0, axis=r.pos.ndim - 2) >= 0).any() for r in rings_before)  # it emptied something
    for got, want in zip(slot(after, 1), slot(before, 1)):
        np.testing.assert_array_equal(got, want)
    small = lambda tree: jax.tree.leaves(jax.tree.map(lambda x: None if is_ring(x) else x, tree, is_leaf=is_ring))  # noqa: E731
    for got, want in zip(small(after), small(fresh)):
        np.testing.assert_array_equal(got[0], want[0])


def test_masked_step_leaves_idle_slots_as_they_were():
    """A masked duplex step parks the idle slot: every leaf of its LM and Mimi states (KV rings
    included) is as before the step, and the active slot's are those of a step of every slot."""
    from moshax.inference.moshi_stream import DuplexLoop

    lm, mimi = _small_model(seed=2), _tiny_mimi()
    plain, masked = (DuplexLoop(lm, mimi, batch=2, sampling=Sampling.greedy()) for _ in range(2))
    pcm = np.random.default_rng(1).normal(0, 0.1, (6, 2, 1, mimi.frame_size)).astype(np.float32)
    for t in range(5):  # past max_delay: the Mimi decoder runs for both slots
        plain.step(pcm[t])
        masked.step(pcm[t])
    assert np.asarray(plain.step(pcm[5])[1].valid).all()

    def slot(state, b):  # each leaf leads with B (or B * heads for rows rings), slot-major
        return [np.asarray(a).reshape((2, a.shape[0] // 2) + a.shape[1:])[b] for a in jax.tree.leaves(state)]

    before = slot((masked.lm_state, masked.mimi_state), 1)
    masked.step(pcm[5], active=np.array([True, False]))
    for got, want in zip(slot((masked.lm_state, masked.mimi_state), 1), before):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(slot((masked.lm_state, masked.mimi_state), 0), slot((plain.lm_state, plain.mimi_state), 0)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from flax import nnx

    from helpers import tiny_lm_config
    from moshax.models.helium import Helium

    root = tmp_path_factory.mktemp("generate")
    lm = _small_model(seed=1)
    helium_cfg = tiny_lm_config().model
    return {"root": root, "lm": _save(lm, root / "lm", "moshi"), "mimi": _save(_tiny_mimi(), root / "mimi", "mimi"),
            "mimi_bad": _save(_tiny_mimi(bins=32), root / "mimi_bad", "mimi"),
            "helium": _save(Helium(helium_cfg, rngs=nnx.Rngs(0)), root / "helium", "helium"), "lm_cfg": lm.cfg}


@pytest.mark.slow  # ~2 min with its checkpoints on 2 cores: CI's slow suite runs it
def test_generate_cli_moshi(ckpts, tmp_path, capsys):
    from data_pipeline.audio import read_audio, write_wav
    from test_mimi_cli import tone

    from moshax.cli import main

    src = tmp_path / "user.wav"
    write_wav(src, tone(0.9, sr=16000), 16000)  # 21600 samples at 24 kHz: 11.25 frames
    out, text, toks = tmp_path / "moshi.wav", tmp_path / "moshi.txt", tmp_path / "tokens.npy"
    args = ["generate", "--checkpoint", str(ckpts["lm"]), "--mimi-checkpoint", str(ckpts["mimi"]), "--input", str(src),
            "--output", str(out), "--text-output", str(text), "--tokens-output", str(toks), "--seed", "3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "p50" in printed and "p99" in printed and "real-time factor" in printed
    n = read_audio(src, 24000).shape[-1]
    assert read_audio(out, 24000).shape[-1] == n
    tokens = np.load(toks)
    cfg = ckpts["lm_cfg"]
    assert tokens.dtype == np.int32 and tokens.shape == (1 + cfg.dep_q, -(-n // 1920))
    assert (tokens >= 0).all() and (tokens[1:] < cfg.card).all() and (tokens[0] < cfg.text_card).all()
    assert text.read_text().split() == [str(v) for v in tokens[0]]
    # reproducible with the seed; batch of 2: sample 0 is the same as alone
    toks2 = tmp_path / "tokens2.npy"
    assert main(args[:-6] + ["--tokens-output", str(toks2), "--seed", "3", "--batch-size", "2"]) == 0
    np.testing.assert_array_equal(np.load(toks2), tokens)
    assert (tmp_path / "tokens2-1.npy").is_file() and (tmp_path / "moshi-1.wav").is_file()


@pytest.mark.slow
def test_generate_cli_errors(ckpts, tmp_path, capsys):
    from data_pipeline.audio import write_wav

    from moshax.cli import main

    src = tmp_path / "user.wav"
    write_wav(src, np.zeros(4000, np.float32), 24000)
    empty = tmp_path / "empty.wav"
    write_wav(empty, np.zeros(0, np.float32), 24000)
    base = ["generate", "--output", str(tmp_path / "o.wav")]
    cases = {
        "holds a mimi model": ["--checkpoint", str(ckpts["mimi"]), "--mimi-checkpoint", str(ckpts["mimi"]),
                               "--input", str(src)],
        "not a Mimi": ["--checkpoint", str(ckpts["lm"]), "--mimi-checkpoint", str(ckpts["lm"]), "--input", str(src)],
        "entries but the LM's card": ["--checkpoint", str(ckpts["lm"]), "--mimi-checkpoint", str(ckpts["mimi_bad"]),
                                      "--input", str(src)],
        "no audio samples": ["--checkpoint", str(ckpts["lm"]), "--mimi-checkpoint", str(ckpts["mimi"]),
                             "--input", str(empty)],
    }
    for needle, extra in cases.items():
        assert main(base + extra) == 2, needle
        err = capsys.readouterr().err.strip()
        assert err.startswith("moshax: error:") and len(err.splitlines()) == 1 and needle in err, (needle, err)


@pytest.mark.slow
def test_generate_cli_helium(ckpts, tmp_path, capsys):
    from moshax.checkpoint.model import build_model_from_checkpoint, open_checkpoint
    from moshax.cli import main
    from moshax.inference.helium_sample import greedy_reference

    toks = tmp_path / "h.npy"
    assert main(["generate", "--checkpoint", str(ckpts["helium"]), "--prompt-ids", "1,5,9", "--max-tokens", "20",
                 "--text-temperature", "0", "--tokens-output", str(toks)]) == 0
    assert "per-token latency" in capsys.readouterr().out
    model, _ = build_model_from_checkpoint(open_checkpoint(ckpts["helium"]))
    # greedy with the KV cache (context 16: the window slides) == re-running the whole sequence
    np.testing.assert_array_equal(np.load(toks), greedy_reference(model, [1, 5, 9], 20))
    assert main(["generate", "--checkpoint", str(ckpts["helium"]), "--prompt", "hi"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("config, extra, gib", [("configs/moshi_7b.yaml", [], (4.0, 12.0)),
                                               ("configs/mimi_full.yaml", [], (0.05, 2.0))])
def test_decode_step_compiles_for_v5e(config, extra, gib, tmp_path):
    """`moshax compile --step decode` builds the registry's streaming step for a TPU topology
    (moshi_7b: 9.2 GiB per chip at batch 1: fsdp-sharded bf16 weights, the 3000-step KV ring, temporaries)."""
    require_module("libtpu", "TPU compile checks need the tpu extra (libtpu)")
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-m", "moshax.cli", "compile", "--config", config, "--topology", "v5e:2x2",
                        "--step", "decode", "--json", str(tmp_path / "r.json"), *extra], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    print(r.stdout)
    assert report["fits"] and "decode step" in report["name"]
    assert gib[0] * 2**30 < report["total_bytes"] < gib[1] * 2**30
    assert report["alias_bytes"] > 0  # the state is donated
    names = [row[0] for row in report["largest"]]
    assert any(n.startswith("params/") for n in names)
