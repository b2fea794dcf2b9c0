"""Mimi against Kyutai's PyTorch reference (moshi 0.2.13): random weights, codebooks filled with
random vectors at the scale of the latents reaching each level, saved as safetensors and loaded
through moshax.interop.mimi_weights. Also: weight round trip, streaming == batch."""

import copy
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from moshax import config as moshax_config
from moshax.config import ConfigError, TransformerConfig
from moshax.interop.mimi_weights import (
    MimiWeightsError, expected_keys, kyutai_state_dict, load_kyutai_state_dict, load_mimi, mimi_from_kyutai_state_dict,
    save_mimi)
from moshax.models.mimi.config import MimiConfig, QuantizerConfig, SEANetConfig
from moshax.models.mimi.model import Mimi

from helpers import draw_codebooks
from requirements import REFERENCE, require_module

os.environ.setdefault("NO_TORCH_COMPILE", "1")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SR = 24000


def _reference():
    """(torch, moshi loaders, safetensors.torch), or skip: the reference is a test-only dependency."""
    torch = require_module("torch", REFERENCE)
    require_module("moshi", REFERENCE)
    st = require_module("safetensors.torch", REFERENCE)
    from moshi.models import loaders

    torch.set_num_threads(2)
    return torch, loaders, st


# jitted once per module (nnx.jit caches per function object): the tests share compilations
ENCODE = nnx.jit(lambda m, x: m.encode(x))
DECODE = nnx.jit(lambda m, c: m.decode(c))
ENCODE_STEP = nnx.jit(lambda m, x, s: m.encode_step(x, s))
DECODE_STEP = nnx.jit(lambda m, c, s: m.decode_step(c, s))


def tiny_config() -> MimiConfig:
    return MimiConfig(
        seanet=SEANetConfig(dimension=64, n_filters=8),
        transformer=TransformerConfig(dim=64, num_heads=4, num_layers=2, hidden_dim=128, gated=False,
                                      activation="gelu", norm="layer_norm", norm_eps=1e-5, layer_scale=0.01,
                                      context=16, max_period=10000.0, positional="rope", causal=True),
        quantizer=QuantizerConfig(dimension=32, bins=128, n_q=8, num_codebooks=6),
    )


def kyutai_config(cfg: MimiConfig) -> dict:
    """moshi's get_mimi config dict for a MimiConfig."""
    _, loaders, _ = _reference()
    out = copy.deepcopy(loaders._mimi_config)
    s, t, q = cfg.seanet, cfg.transformer, cfg.quantizer
    out["sample_rate"], out["frame_rate"], out["channels"] = cfg.sample_rate, cfg.frame_rate, s.channels
    out["seanet"].update(channels=s.channels, dimension=s.dimension, n_filters=s.n_filters,
                         n_residual_layers=s.n_residual_layers, ratios=list(s.ratios), kernel_size=s.kernel_size,
                         last_kernel_size=s.last_kernel_size, residual_kernel_size=s.residual_kernel_size,
                         dilation_base=s.dilation_base, compress=s.compress, true_skip=s.true_skip,
                         pad_mode=s.pad_mode)
    out["transformer"].update(d_model=t.dim, num_heads=t.num_heads, num_layers=t.num_layers,
                              dim_feedforward=t.hidden_dim, context=t.context, max_period=t.max_period,
                              layer_scale=t.layer_scale, input_dimension=s.dimension, output_dimensions=[s.dimension])
    out["quantizer"].update(dimension=q.dimension, bins=q.bins, n_q=q.n_q, input_dimension=s.dimension,
                            output_dimension=s.dimension)
    return out


def synth_audio(seconds, seed=0, batch=1):
    """Speech-like test signal [batch, 1, n] float32: gliding harmonics, syllable envelope, noise."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    out = []
    for _ in range(batch):
        f0 = 110 + 80 * rng.random() + 30 * np.sin(2 * np.pi * (0.3 + 0.4 * rng.random()) * t)
        phase = 2 * np.pi * np.cumsum(f0) / SR
        y = sum((0.6 ** k) * np.sin(k * phase + rng.random() * 6.28) for k in range(1, 12))
        env = np.clip(np.sin(2 * np.pi * (3 + 2 * rng.random()) * t + rng.random() * 6.28), 0, None) ** 2
        y = y * env + 0.02 * rng.standard_normal(n)
        out.append(0.5 * y / (np.abs(y).max() + 1e-6))
    return np.stack(out).astype(np.float32)[:, None]


def fill_codebooks(mimi, audio, seed=99):
    """A fresh reference Mimi has all-zero codebooks: fill each level of both branches with random
    picks of the residual latents that reach it (+ noise), so that codes are informative."""
    torch, _, _ = _reference()
    seen = {}
    hooks = [getattr(mimi.quantizer, name).input_proj.register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, o)) for name in ("rvq_first", "rvq_rest")]
    with torch.no_grad():
        mimi.encode(torch.from_numpy(audio))
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("rvq_first", "rvq_rest"):
            z = seen[name].transpose(1, 2).reshape(-1, seen[name].shape[1])
            residual = z.clone()
            for layer in getattr(mimi.quantizer, name).vq.layers:
                cb = layer._codebook
                pick = torch.randint(0, residual.shape[0], (cb.codebook_size,), generator=g)
                emb = residual[pick] + 0.3 * residual.std(0) * torch.randn(cb.codebook_size, cb.dim, generator=g)
                usage = 0.5 + torch.rand(cb.codebook_size, generator=g)  # non-trivial normalization
                cb.embedding_sum.copy_(emb * usage[:, None])
                cb.cluster_usage.copy_(usage)
                cb._initialized.fill_(1.0)
                cb._embedding = None
                residual = residual - emb[torch.cdist(residual, emb).argmin(-1)]
    return mimi


def build_reference(cfg: MimiConfig, seed: int):
    torch, loaders, _ = _reference()
    torch.manual_seed(seed)
    ref = loaders.get_mimi(None, kyutai_config(cfg), device="cpu", num_codebooks=cfg.quantizer.num_codebooks)
    fill_codebooks(ref, synth_audio(4.8, seed=100, batch=2))
    ref.eval()
    return ref


def released_form(state_dict) -> dict:
    """moshi's state_dict() writes in_projs.0 / out_projs.0; the released checkpoints use the fused names."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace(".self_attn.in_projs.0.weight", ".self_attn.in_proj_weight")
        k = k.replace(".self_attn.out_projs.0.weight", ".self_attn.out_proj.weight")
        out[k] = v.detach().contiguous()
    return out


def snr_db(ref, test):
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    return 10 * np.log10(np.sum(ref ** 2) / max(np.sum((ref - test) ** 2), 1e-30))


def random_mimi(cfg: MimiConfig, seed: int = 0) -> Mimi:
    """A Mimi with random weights (numpy, no per-shape compiles) and codebooks filled from its own
    latents: for the tests that need no reference."""
    model = nnx.eval_shape(lambda: Mimi(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable):
            continue
        shape, name = var.get_value().shape, path[-1]
        stacked = "layers" in path
        if "norm1" in path or "norm2" in path:
            value = np.ones(shape) if name == "weight" else np.zeros(shape)
        elif str(name).startswith("layer_scale"):
            value = np.full(shape, 0.01)
        elif name == "cluster_usage":
            value = np.ones(shape)
        elif name in ("embedding_sum", "initialized"):
            value = np.zeros(shape)
        else:
            dims = shape[1:] if stacked else shape
            fan_in = dims[0] if name == "in_proj" else int(np.prod(dims[:-1])) if len(dims) > 1 else 16
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    return draw_codebooks(model, synth_audio(4.8, seed=100, batch=2), rng)


def check_parity(cfg, ref, model, audio, min_distinct):
    torch, _, _ = _reference()
    with torch.no_grad():
        want = ref.encode(torch.from_numpy(audio)).numpy()
    got = np.asarray(ENCODE(model, jnp.asarray(audio)))
    assert got.shape == want.shape == (audio.shape[0], cfg.quantizer.num_codebooks, audio.shape[-1] // cfg.frame_size)
    equal = float(np.mean(got == want))
    distinct = [len(np.unique(want[:, k])) for k in range(want.shape[1])]
    assert min(distinct) >= min_distinct, f"too few distinct codes per level: {distinct}"
    assert equal >= 0.99, f"only {equal:.2%} equal codes"
    with torch.no_grad():
        audio_ref = ref.decode(torch.from_numpy(want)).numpy()
    audio_got = np.asarray(DECODE(model, jnp.asarray(want)))
    assert audio_got.shape == audio_ref.shape
    snr = snr_db(audio_ref, audio_got)
    assert snr >= 40.0, f"decode SNR {snr:.1f} dB"
    return equal, snr, distinct


# ------------------------------------------------------------------------------------------ tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, _, safetensors_torch = _reference()
    cfg = tiny_config()
    ref = build_reference(cfg, seed=1234)
    path = tmp_path_factory.mktemp("mimi") / "tiny_released.safetensors"
    safetensors_torch.save_file(released_form(ref.state_dict()), str(path))
    model = load_mimi(path, cfg)
    return cfg, ref, model, path


def test_tiny_parity(tiny):
    cfg, ref, model, _ = tiny
    audio = synth_audio(4.0, seed=7, batch=2)  # 50 frames: longer than the transformer context (16)
    equal, snr, distinct = check_parity(cfg, ref, model, audio, min_distinct=20)
    print(f"tiny parity: {equal:.2%} equal codes, decode SNR {snr:.1f} dB, distinct per level {distinct}")


def test_tiny_parity_unaligned_length(tiny):
    """Audio not a multiple of the frame: both pad on the right to whole frames."""
    cfg, ref, model, _ = tiny
    torch, _, _ = _reference()
    audio = synth_audio(1.0, seed=8)[..., :-500]
    with torch.no_grad():
        want = ref.encode(torch.from_numpy(audio)).numpy()
    got = np.asarray(ENCODE(model, jnp.asarray(audio)))
    assert got.shape == want.shape and np.mean(got == want) >= 0.99


def test_load_moshi_naming(tiny):
    """moshi's own state_dict() naming (in_projs.0 / out_projs.0) loads to the same weights."""
    cfg, ref, model, _ = tiny
    other = mimi_from_kyutai_state_dict({k: v.numpy() for k, v in ref.state_dict().items()}, cfg)
    a, b = nnx.state(model), nnx.state(other)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_identical(tiny, tmp_path):
    """to_kyutai(from_kyutai(x)) == x, tensor for tensor, and save -> load -> save is stable."""
    cfg, _, model, path = tiny
    from safetensors.numpy import load_file

    original = load_file(str(path))
    back = kyutai_state_dict(model)
    assert set(back) == set(original) == set(expected_keys(cfg))
    for k, v in original.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    save_mimi(model, tmp_path / "again.safetensors")
    again = load_file(str(tmp_path / "again.safetensors"))
    for k, v in original.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_missing_and_unexpected_keys_are_listed(tiny):
    cfg, ref, _, _ = tiny
    sd = {k: v.numpy() for k, v in released_form(ref.state_dict()).items()}
    del sd["encoder.model.0.conv.conv.bias"]
    sd["quantizer.rvq_rest.vq.layers.99._codebook.embedding_sum"] = np.zeros((1,), np.float32)
    with pytest.raises(MimiWeightsError, match=r"1 missing: encoder\.model\.0\.conv\.conv\.bias.*1 unexpected"):
        load_kyutai_state_dict(nnx.eval_shape(lambda: Mimi(cfg, rngs=nnx.Rngs(0))), sd)
    sd = {k: v.numpy() for k, v in released_form(ref.state_dict()).items()}
    sd["downsample.conv.conv.conv.weight"] = np.zeros((3, 3, 3), np.float32)
    with pytest.raises(MimiWeightsError, match="downsample.conv.conv.conv.weight: shape"):
        load_kyutai_state_dict(nnx.eval_shape(lambda: Mimi(cfg, rngs=nnx.Rngs(0))), sd)


@pytest.fixture(scope="module")
def random_tiny():
    cfg = tiny_config()
    return cfg, random_mimi(cfg)


def test_streaming_equals_batch(random_tiny):
    """encode_step / decode_step frame by frame (and 2 frames at a time) == batch encode / decode,
    past the transformer context (ring-buffer wrap). Needs no reference."""
    cfg, model = random_tiny
    frames = 14  # 28 transformer steps > context 16
    audio = jnp.asarray(synth_audio(frames * cfg.frame_size / SR, seed=9, batch=2))
    codes = ENCODE(model, audio)
    decoded = DECODE(model, codes)
    enc_step, dec_step = ENCODE_STEP, DECODE_STEP
    for per_call in (1, 2):
        state = model.init_state(2)
        cs, ys = [], []
        for i in range(0, frames, per_call):
            c, state = enc_step(model, audio[..., i * cfg.frame_size:(i + per_call) * cfg.frame_size], state)
            y, state = dec_step(model, c, state)
            cs.append(c)
            ys.append(y)
        np.testing.assert_array_equal(np.concatenate(cs, -1), np.asarray(codes))
        assert min(len(np.unique(np.asarray(codes)[:, k])) for k in range(codes.shape[1])) >= 10
        np.testing.assert_allclose(np.concatenate(ys, -1), np.asarray(decoded), rtol=1e-4, atol=1e-5)


def test_streaming_matches_reference_streaming(tiny):
    """Within the context, moshi's streaming encode/decode equals ours step by step."""
    cfg, ref, model, _ = tiny
    torch, _, _ = _reference()
    frames = 6
    audio = synth_audio(frames * cfg.frame_size / SR, seed=10, batch=2)
    want_codes, want_audio = [], []
    with torch.no_grad(), ref.streaming(2):
        for i in range(frames):
            c = ref.encode(torch.from_numpy(audio[..., i * cfg.frame_size:(i + 1) * cfg.frame_size]))
            want_codes.append(c.numpy())
            want_audio.append(ref.decode(c).numpy())
    state = model.init_state(2)
    got_codes, got_audio = [], []
    for i in range(frames):
        c, state = ENCODE_STEP(model, jnp.asarray(audio[..., i * cfg.frame_size:(i + 1) * cfg.frame_size]), state)
        y, state = DECODE_STEP(model, jnp.asarray(want_codes[i]), state)
        got_codes.append(np.asarray(c))
        got_audio.append(np.asarray(y))
    assert np.mean(np.concatenate(got_codes, -1) == np.concatenate(want_codes, -1)) >= 0.99
    assert snr_db(np.concatenate(want_audio, -1), np.concatenate(got_audio, -1)) >= 40.0


# ------------------------------------------------------------------------------------------ full


@pytest.mark.slow  # ~20-30 s on 2 busy cores; keeps this file under ~60 s by default
def test_full_architecture_parity(tmp_path):
    """The released architecture (random weights, 32 filled codebooks, 8 used), through safetensors."""
    _, _, safetensors_torch = _reference()
    cfg = MimiConfig()
    ref = build_reference(cfg, seed=4321)
    path = tmp_path / "mimi_full.safetensors"
    safetensors_torch.save_file(released_form(ref.state_dict()), str(path))
    model = load_mimi(path, cfg)
    path.unlink()
    audio = synth_audio(3.2, seed=11, batch=2)  # 40 frames
    equal, snr, distinct = check_parity(cfg, ref, model, audio, min_distinct=30)
    print(f"full parity: {equal:.2%} equal codes, decode SNR {snr:.1f} dB, distinct per level {distinct}")


# ------------------------------------------------------------------------------------------ config


def test_yaml_configs_load():
    full = moshax_config.load_config(CONFIGS / "mimi_full.yaml")
    assert full.model == MimiConfig()  # the file spells out the released defaults
    assert (full.model.frame_size, full.model.downsample_stride, full.model.encoder_frame_rate) == (1920, 2, 25.0)
    tiny = moshax_config.load_config(CONFIGS / "mimi_tiny.yaml")
    assert tiny.model == tiny_config()
    over = moshax_config.load_config(CONFIGS / "mimi_tiny.yaml", ["model.quantizer.num_codebooks=3"])
    assert over.model.quantizer.num_codebooks == 3


@pytest.mark.parametrize("override, match", [
    ("model.quantizer.num_codebooks=40", "num_codebooks=40"),
    ("model.transformer.dim=128", "must equal model.seanet.dimension"),
    ("model.frame_rate=11.0", "integer multiple of frame_rate"),
    ("model.seanet.pad_mode=reflect", "pad_mode"),
    ("model.quantizer.n_q=1", "n_q=1 must be larger"),
])
def test_bad_configs_raise(override, match):
    data = yaml.safe_load((CONFIGS / "mimi_tiny.yaml").read_text())
    with pytest.raises(ConfigError, match=match):
        moshax_config.from_dict(data, [override])


# ------------------------------------------------------------------------------------------ quantizer training

from moshax.models.mimi.quantizer import (  # noqa: E402
    CodebookStats, SplitResidualVQ, ema_update, kmeans, replace_dead_codes, rvq_train)


def test_rvq_train_step_matches_reference(tiny):
    """One train-mode forward of Kyutai's split RVQ (initialized codebooks, no dead-code check)
    with the run-time number of codebooks below n_q: same output, codes, penalty and EMA
    statistics (levels past num_codebooks neither used nor updated, on both sides)."""
    cfg, ref, model, _ = tiny
    torch, _, _ = _reference()
    rq = copy.deepcopy(ref.quantizer)
    rq.train()
    for branch in (rq.rvq_first, rq.rvq_rest):
        for layer in branch.vq.layers:
            layer._codebook._next_unused_check = 10 ** 9
    k = model.quantizer.cfg.num_codebooks
    assert k < cfg.quantizer.n_q
    rq.set_num_codebooks(k)
    latent = nnx.jit(lambda m, a: m.encode_latent(a))(model, jnp.asarray(synth_audio(1.2, seed=12, batch=2)))
    x = np.asarray(latent).transpose(0, 2, 1).copy()  # [B, D, T] as the reference takes it
    with torch.no_grad():
        res = rq(torch.from_numpy(x), cfg.frame_rate)
    q = model.quantizer
    saved = (q.rvq_first.stats(), q.rvq_rest.stats())
    try:
        quantized, codes, penalty, metrics = q.train_forward(jnp.asarray(x.transpose(0, 2, 1)), jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(codes), res.codes.numpy())
        np.testing.assert_allclose(np.asarray(quantized).transpose(0, 2, 1), res.x.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(penalty), float(res.penalty), rtol=1e-4)
        for name in ("rvq_first", "rvq_rest"):
            stats = getattr(q, name).stats()
            for j, layer in enumerate(getattr(rq, name).vq.layers):
                np.testing.assert_allclose(np.asarray(stats.embedding_sum[j]), layer._codebook.embedding_sum.numpy(),
                                           rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(np.asarray(stats.cluster_usage[j]), layer._codebook.cluster_usage.numpy(),
                                           rtol=1e-5, atol=1e-6)
    finally:
        q.rvq_first.set_stats(saved[0])
        q.rvq_rest.set_stats(saved[1])


def _blobs(n_per, centers, seed=0, scale=0.05):
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + scale * rng.standard_normal((n_per, len(c))) for c in centers])
    return jnp.asarray(x.astype(np.float32))


def test_kmeans_finds_blobs():
    centers = np.array([[0, 0], [5, 5], [-5, 5], [5, -5]], np.float32)
    x = _blobs(100, centers)  # 32 random seeds miss a blob with probability ~4e-4 (plain Lloyd, as Kyutai's)
    means, bins = jax.jit(kmeans, static_argnums=(2, 3))(jax.random.key(1), x, 32, 20)
    assert float(jnp.sum(bins)) == 400.0  # every sample counted once (no empty cluster at the end)
    found = np.asarray(means)
    dist = np.linalg.norm(found[:, None] - centers[None], axis=-1)  # [means, centers]
    assert dist.min(axis=0).max() < 0.1  # every blob has a centroid
    assert dist.min(axis=1).max() < 0.2  # no centroid between blobs


def test_ema_and_dead_codes():
    es, cu = jnp.ones((3, 2)), jnp.array([1.0, 1.0, 0.01])
    x = jnp.array([[2.0, 0.0], [4.0, 0.0]])
    es2, cu2 = ema_update(es, cu, x, jnp.array([0, 0]), decay=0.9)
    np.testing.assert_allclose(np.asarray(cu2), [0.9 + 0.2, 0.9, 0.009], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(es2[0]), [0.9 + 0.6, 0.9], rtol=1e-6)
    es3, cu3, frac = replace_dead_codes(jax.random.key(0), es, cu, x, threshold_usage_ratio=0.1,
                                        replaced_usage_ratio=1.0)
    share = float(np.sum(cu)) / 3
    assert float(frac) == pytest.approx(1 / 3)
    np.testing.assert_allclose(np.asarray(cu3), [1.0, 1.0, share], rtol=1e-6)
    assert any(np.allclose(np.asarray(es3[2]), share * np.asarray(v)) for v in x)
    np.testing.assert_array_equal(np.asarray(es3[:2]), np.asarray(es[:2]))


def test_rvq_train_staggered_init_and_dropout():
    """Fresh codebooks: level i is k-means-initialized at step i (once level i-1 is); inactive
    levels (dropout) neither learn nor contribute."""
    qcfg = QuantizerConfig(dimension=4, bins=8, n_q=4, num_codebooks=4, kmeans_iters=5)
    stats = CodebookStats(jnp.zeros((3, 8, 4)), jnp.ones((3, 8)), jnp.zeros((3,)))
    z = jax.random.normal(jax.random.key(0), (64, 4))
    step = jax.jit(lambda s, k, n: rvq_train(s, z, k, cfg=qcfg, n_active=n))
    for i in range(3):
        out = step(stats, jax.random.key(i + 1), 3)
        stats = out.stats
        np.testing.assert_array_equal(np.asarray(stats.initialized), [1.0] * (i + 1) + [0.0] * (2 - i))
    assert len(np.unique(np.asarray(out.codes[0]))) > 4
    before = stats
    out = step(stats, jax.random.key(9), 1)
    np.testing.assert_array_equal(np.asarray(out.stats.embedding_sum[1:]), np.asarray(before.embedding_sum[1:]))
    cb0 = before.embedding_sum[0] / jnp.maximum(before.cluster_usage[0], 1e-5)[:, None]
    np.testing.assert_allclose(np.asarray(out.quantized), np.asarray(cb0[out.codes[0]]), rtol=1e-5, atol=1e-6)


def test_train_forward_straight_through_and_commitment_gradient():
    qcfg = QuantizerConfig(dimension=4, bins=8, n_q=3, num_codebooks=3)
    q = SplitResidualVQ(6, qcfg, rngs=nnx.Rngs(0))
    for b in (q.rvq_first, q.rvq_rest):
        n = b.n_levels
        b.set_stats(CodebookStats(jax.random.normal(jax.random.key(n), (n, 8, 4)), jnp.ones((n, 8)), jnp.ones((n,))))
    x = jax.random.normal(jax.random.key(3), (2, 5, 6))

    def out_sum(q, x):
        return jnp.sum(q.train_forward(x, jax.random.key(0), update_stats=False)[0])

    def lin_sum(q, x):
        return sum(jnp.sum(b.project_out(b.project_in(x))) for b in (q.rvq_first, q.rvq_rest))

    def penalty(q, x):
        return q.train_forward(x, jax.random.key(0), update_stats=False)[2]

    grad = nnx.jit(lambda q, x, f: jax.grad(lambda x: f(q, x))(x), static_argnums=2)
    np.testing.assert_allclose(np.asarray(grad(q, x, out_sum)), np.asarray(grad(q, x, lin_sum)), rtol=1e-5)
    assert float(jnp.abs(grad(q, x, penalty)).sum()) > 0
    n_q = nnx.jit(lambda q, x, k: q.train_forward(x, k, update_stats=False, dropout=True)[3]["n_q"])
    ns = {int(n_q(q, x, jax.random.key(k))) for k in range(12)}
    assert len(ns) > 1 and ns <= {2, 3}
