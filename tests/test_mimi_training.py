"""Mimi codec training: discriminator, losses, GAN gradient separation, the trainer task (EMA
codebooks, teacher features, exact resume) and the few-hundred-step run on synthetic speech (slow)."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline.audio import write_wav
from moshax.config import from_dict
from moshax.models.mimi import losses as L
from moshax.models.mimi.config import DiscriminatorConfig
from moshax.models.mimi.discriminator import MultiScaleSTFTDiscriminator, _DN, _pad2d, conv_freq_strided, stft
from moshax.parallel.mesh import build_mesh
from moshax.config import MeshConfig
from moshax.checkpoint.manager import Checkpointer
from moshax.training.mimi_task import MimiTask
from moshax.training.trainer import Trainer

from requirements import REFERENCE, require_binary, require_module

SR = 24000


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """The trainer runs below compile the same step: keep every executable in the session's
    persistent cache (tests/conftest.py), not only the slow ones; and the micro models here run for a
    few steps only: compile them fast (XLA:CPU's LLVM passes cost far more than they save)."""
    names = ("jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes",
             "jax_disable_most_optimizations")
    old = {k: jax.config.values[k] for k in names}
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


def speechlike(seconds, seed):
    """Gliding harmonic tones with a syllable envelope (as the reference benchmarks' signal)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    f0 = 110 + 80 * rng.random() + 30 * np.sin(2 * np.pi * (0.3 + 0.4 * rng.random()) * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    y = sum((0.6 ** k) * np.sin(k * phase + rng.random() * 6.28) for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * (3 + 2 * rng.random()) * t + rng.random() * 6.28), 0, None) ** 2
    y = y * env + 0.02 * rng.standard_normal(n)
    return (0.5 * y / (np.abs(y).max() + 1e-6)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    for i in range(8):
        write_wav(root / "train" / f"{i}.wav", speechlike(1.0 + 0.1 * i, i), SR)
    for i in range(2):
        write_wav(root / "eval" / f"{i}.wav", speechlike(0.5, 100 + i), SR)
    return root


def nano_config(root, **task):
    """A yet smaller Mimi (2 SEANet stages, 750 Hz frames) for the gradient test's two compiles."""
    d = {"model": {"kind": "mimi", "frame_rate": 750.0,
                   "seanet": {"dimension": 16, "n_filters": 4, "ratios": [4, 4]},
                   "transformer": {"dim": 16, "num_heads": 2, "num_layers": 1, "hidden_dim": 32, "gated": False,
                                   "activation": "gelu", "norm": "layer_norm", "norm_eps": 1e-5, "layer_scale": 0.01,
                                   "context": 8},
                   "quantizer": {"dimension": 8, "bins": 16, "n_q": 3, "num_codebooks": 3, "kmeans_iters": 2}},
         "task": {"discriminator": {"filters": 2, "n_ffts": [128], "dilations": [1]},
                  "teacher": {"kind": "mel", "frame_rate": 1500, "n_mels": 4}, **task},
         "data": {"train_sources": [str(root / "train")], "crop_seconds": 0.02}}
    return from_dict(d)


def micro_config(root, workdir, task=None, data=None, **train):
    """An extra-small Mimi (fast compiles) on 0.16 s crops; ``task`` / ``data`` update those sections."""
    task = {"quantizer_dropout": True, "discriminator": {"filters": 4, "n_ffts": [256, 128], "dilations": [1, 2]},
            "teacher": {"kind": "mel", "frame_rate": 50, "n_mels": 16}, **(task or {})}
    data = {"train_sources": [str(root / "train")], "eval_sources": [str(root / "eval")], "crop_seconds": 0.16,
            **(data or {})}
    d = {"workdir": str(workdir), "task": task, "data": data, "model": {
        "kind": "mimi", "seanet": {"dimension": 32, "n_filters": 4},
        "transformer": {"dim": 32, "num_heads": 2, "num_layers": 1, "hidden_dim": 64, "gated": False,
                        "activation": "gelu", "norm": "layer_norm", "norm_eps": 1e-5, "layer_scale": 0.01,
                        "context": 8},
        "quantizer": {"dimension": 16, "bins": 32, "n_q": 4, "num_codebooks": 4, "kmeans_iters": 5}},
        "train": {"steps": 4, "batch_size": 2, "log_every": 1, "progress": False, "eval_batches": 1, **train},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 1,
                  "param_groups": [{"pattern": "^discriminator/", "learning_rate": 1e-3, "weight_decay": 0.0}]},
        "checkpoint": {"every": 2, "async_save": True}}
    return from_dict(d)


# ------------------------------------------------------------------------------------ discriminator


def test_stft_matches_torch():
    torch = require_module("torch", REFERENCE)
    x = np.random.default_rng(0).standard_normal((2, 3000)).astype(np.float32)
    for n, hop, win in [(512, 128, 512), (256, 64, 200), (300, 70, 300)]:
        w = torch.hann_window(win)
        ref = torch.stft(torch.from_numpy(x), n, hop, win, window=w, center=False, return_complex=True)
        ref = (ref / w.pow(2).sum().sqrt()).numpy().transpose(0, 2, 1)
        np.testing.assert_allclose(np.asarray(stft(jnp.asarray(x), n, hop, win)), ref, atol=3e-6)


def test_freq_strided_conv_equals_lax():
    for width, kw, stride, dil in [(129, 9, 2, 1), (257, 9, 2, 4), (65, 3, 3, 1), (20, 4, 2, 1)]:
        x = jax.random.normal(jax.random.key(0), (2, 7, width, 3))
        w = jax.random.normal(jax.random.key(1), (3, kw, 3, 5))
        pad = _pad2d((3, kw), (dil, 1))
        ref = jax.lax.conv_general_dilated(x, w, (1, stride), pad, rhs_dilation=(dil, 1), dimension_numbers=_DN)
        np.testing.assert_allclose(np.asarray(conv_freq_strided(x, w, stride, pad, dil)), np.asarray(ref),
                                   rtol=1e-5, atol=1e-5)


def test_discriminator_shapes_and_weight_norm():
    cfg = DiscriminatorConfig(filters=4, n_ffts=[256, 128], dilations=[1, 2, 4])
    d = MultiScaleSTFTDiscriminator(cfg, rngs=nnx.Rngs(0))
    logits, fmaps = nnx.jit(lambda m, x: m(x))(d, jnp.ones((3, 1, 2400)) * 0.1)
    assert len(logits) == len(fmaps) == 2 and all(len(f) == 5 for f in fmaps)
    frames = (2400 - 256) // 64 + 1
    assert logits[0].shape == (3, frames, math.ceil(129 / 8), 1)
    conv = d.discriminators[0].convs[1]
    np.testing.assert_allclose(np.asarray(conv.kernel()), np.asarray(conv.weight[...]), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ losses


def test_adversarial_and_feature_matching_losses():
    real, fake = [jnp.array([[2.0, 0.5]]), jnp.array([[0.0]])], [jnp.array([[-2.0, 0.5]]), jnp.array([[3.0]])]
    # generator: mean(relu(1 - D(fake))) per scale, averaged: ((3 + 0.5) / 2 + 0) / 2
    np.testing.assert_allclose(np.asarray(L.hinge_generator_loss(fake)), [0.875])
    # discriminator: mean(relu(1 - real)) + mean(relu(1 + fake)) per scale, averaged
    np.testing.assert_allclose(np.asarray(L.hinge_discriminator_loss(real, fake)), [((0 + .25) + (0 + 0.75) + 1 + 4) / 2])
    fr = [[jnp.ones((2, 3, 4)), 2 * jnp.ones((2, 5))]]
    ff = [[jnp.zeros((2, 3, 4)), 3 * jnp.ones((2, 5))]]
    np.testing.assert_allclose(np.asarray(L.feature_matching_loss(fr, ff)), [0.75, 0.75], rtol=1e-6)  # (1 + 1/2) / 2
    assert float(jnp.max(L.feature_matching_loss(fr, fr))) == 0.0
    g = jax.grad(lambda r: jnp.sum(L.feature_matching_loss([[r]], [[jnp.zeros((1, 3))]])))(jnp.ones((1, 3)))
    assert float(jnp.abs(g).sum()) == 0.0  # real features are constants


def test_cosine_si_sdr_mel():
    a = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
    np.testing.assert_allclose(np.asarray(L.cosine_distance(a, a)), [0.0], atol=1e-7)
    np.testing.assert_allclose(np.asarray(L.cosine_distance(a, -a)), [2.0], atol=1e-7)
    x = jnp.asarray(speechlike(0.5, 1))[None, None]
    noise = 0.1 * jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), jnp.float32)
    want = 10 * np.log10(np.sum(np.asarray(x - x.mean()) ** 2) / np.sum(np.asarray(noise) ** 2))
    assert abs(float(L.si_sdr(x, 2.0 * (x + noise))[0]) - want) < 0.1
    assert float(L.mel_loss(x, x, SR)[0]) == 0.0 and float(L.mel_loss(x, 0.5 * x, SR)[0]) == pytest.approx(np.log10(2), 1e-3)


def test_balancer_normalizes_gradients():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 10)), jnp.float32)
    losses = {"big": lambda y: 100.0 * jnp.mean(y ** 2), "small": lambda y: 0.01 * jnp.mean(jnp.abs(y))}
    _, _, norms = L.balanced_surrogate(losses, {"big": 3.0, "small": 1.0}, x)
    g = jax.grad(lambda y: L.balanced_surrogate(losses, {"big": 3.0, "small": 1.0}, y)[0])(x)
    gb = jax.grad(losses["big"])(x)
    gs = jax.grad(losses["small"])(x)
    nb, ns = [float(jnp.mean(jnp.linalg.norm(v, axis=-1))) for v in (gb, gs)]
    np.testing.assert_allclose(np.asarray(g), np.asarray(0.75 * gb / nb + 0.25 * gs / ns), rtol=1e-5)


# ------------------------------------------------------------------------------------------ task


@pytest.mark.slow  # ~35 s on 2 cores; `make test` stays under 15 min, CI's slow suite runs it
def test_gan_gradients_stay_on_their_side(corpus, tmp_path):
    """G losses move only the codec (the discriminator is under stop_gradient there), the D loss
    only the discriminator (decoded audio under stop_gradient)."""
    from moshax.parallel.partition import ModelHandle

    def grads(**weights):
        cfg = nano_config(corpus, **weights)
        task = MimiTask(cfg)
        handle = ModelHandle.from_constructor(task.build_model)
        params, rest = handle.init(task.build_model, 0)
        batch = next(task.data_iterator("train", global_batch_size=2, process_index=0, process_count=1))

        def f(p, r, b):
            return jax.grad(lambda p: task.loss(handle.merge(p, r), b, jax.random.key(0))[0])(p)

        return jax.jit(f)(params, rest, jax.tree.map(jnp.asarray, batch))

    only_d = grads(adversarial_weight=0.0, feature_matching_weight=0.0, commitment_weight=0.0, distill_weight=0.0)
    full = grads()
    gen = {k: v for k, v in only_d.items() if k != "discriminator"}
    assert all(float(jnp.max(jnp.abs(v))) == 0.0 for v in jax.tree.leaves(gen))
    assert float(optax_norm(only_d["discriminator"])) > 0
    for a, b in zip(jax.tree.leaves(only_d["discriminator"]), jax.tree.leaves(full["discriminator"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
    assert float(optax_norm(full["encoder"])) > 0 and float(optax_norm(full["distill_proj"])) > 0


def test_balancer_step(corpus):
    """task.balancer: the audio losses (adversarial, feature matching, mel) are combined by
    their normalized gradients on the decoded audio; the step yields finite losses and gradients."""
    from moshax.parallel.partition import ModelHandle

    cfg = nano_config(corpus, balancer=True, mel_weight=1.0)
    task = MimiTask(cfg)
    handle = ModelHandle.from_constructor(task.build_model)
    params, rest = handle.init(task.build_model, 0)
    batch = jax.tree.map(jnp.asarray, next(task.data_iterator("train", global_batch_size=2, process_index=0,
                                                              process_count=1)))

    def f(p, r, b):
        (loss, (_, aux)), g = jax.value_and_grad(
            lambda p: (lambda out: (out[0], out[1:]))(task.loss(handle.merge(p, r), b, jax.random.key(0))),
            has_aux=True)(p)
        return loss, aux, g

    loss, aux, grads = jax.jit(f)(params, rest, batch)
    assert np.isfinite(float(loss)) and float(optax_norm(grads["encoder"])) > 0
    for k in ("adversarial", "feature_matching", "mel_distance"):
        assert np.isfinite(float(aux[k][0])) and float(aux[f"grad_norm_{k}"][0]) > 0


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _trainer(cfg, workdir):
    return Trainer(cfg, MimiTask(cfg), mesh=build_mesh(MeshConfig(2, 1, 1), jax.devices()[:2]), workdir=workdir)


def _losses(summary):
    return [h["loss"] for h in summary["history"] if "loss" in h]


@pytest.mark.slow  # ~90 s on 2 cores (three GAN-step compiles); `make test` stays under 15 min, CI's slow suite runs it
def test_training_updates_codebooks_and_resumes_exactly(corpus, tmp_path, capsys):
    """Online (mel) teacher, EMA codebooks, k-means init, eval, exact resume, and the workdir read
    back as a codec by `moshax mimi encode`."""
    cfg = micro_config(corpus, tmp_path / "full")
    full = _trainer(cfg, tmp_path / "full").run()
    hist = full["history"]
    assert full["end_step"] == 4 and all(np.isfinite(_losses(full)))
    for key in ("adversarial", "feature_matching", "commitment", "distillation", "d_loss", "si_sdr", "rvq_entropy"):
        assert key in hist[0], key
    assert "eval_loss" in hist[-1]
    # eval runs without quantizer dropout (task.quantizer_dropout is on in training): every level, every crop
    assert hist[-1]["eval_n_q"] == 4.0 and any(h["n_q"] < 4.0 for h in hist if "n_q" in h)
    first = _trainer(cfg, tmp_path / "split").run(max_steps=2)
    second = _trainer(cfg, tmp_path / "split").run()
    assert second["resumed_from"] == 2
    assert _losses(first) + _losses(second) == _losses(full)

    t = _trainer(cfg, tmp_path / "x")
    ckpt = Checkpointer(tmp_path / "full" / "checkpoints")
    state, _ = ckpt.restore(4, t.abstract_state)
    ckpt.close()
    rest = jax.device_get(state["rest"])
    init = np.asarray(rest["quantizer"]["rvq_rest"]["initialized"])
    assert init[:2].tolist() == [1.0, 1.0]  # k-means ran for the first levels (one more level per step)
    assert int(rest["forward_count"]) == 4

    # warm start: a new run's codec starts from this checkpoint (the discriminator starts fresh)
    warm = _trainer(micro_config(corpus, tmp_path / "warm", task={"init_from": str(tmp_path / "full")}),
                    tmp_path / "warm").init_state()
    trained = jax.device_get(state["params"])
    for a, b in zip(jax.tree.leaves(jax.device_get(warm["params"]["encoder"])), jax.tree.leaves(trained["encoder"])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(warm["rest"]["quantizer"]["rvq_rest"]["embedding_sum"]),
                                  rest["quantizer"]["rvq_rest"]["embedding_sum"])
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(warm["params"]["discriminator"])),
                                                        jax.tree.leaves(trained["discriminator"])))

    from moshax.cli import main

    src = tmp_path / "in.wav"
    write_wav(src, speechlike(0.7, 5), 16000)  # 16800 samples at 16 kHz -> 25200 at 24 kHz
    assert main(["mimi", "encode", "--checkpoint", str(tmp_path / "full"), "--input", str(src),
                 "--output", str(tmp_path / "codes.npy")]) == 0
    assert np.load(tmp_path / "codes.npy").shape == (4, math.ceil(25200 / 1920))


def test_precomputed_teacher_features(corpus, tmp_path):
    """teacher.kind=npy: features written next to the audio by write_features are read by the
    loader, aligned with the crops."""
    from data_pipeline.audio import list_audio_files
    from moshax.training.mimi_teacher import MelTeacher, write_features

    root = tmp_path / "data"
    shutil.copytree(corpus, root)
    teacher = MelTeacher(SR, 50.0, 16, normalize=False)  # raw log-mel: crops of the file's features
    written = write_features(teacher, list_audio_files([str(root / "train"), str(root / "eval")]), SR)
    assert all(np.load(p).shape[1] == 16 for p in written)
    cfg = micro_config(root, tmp_path / "run", steps=2, task={"teacher": {"kind": "npy", "frame_rate": 50}})
    task = MimiTask(cfg)
    assert task.teacher_dim == 16
    batch = next(task.data_iterator("train", global_batch_size=2, process_index=0, process_count=1))
    assert batch["teacher"].shape == (2, 8, 16)
    online = np.asarray(teacher(jnp.asarray(batch["audio"])))
    np.testing.assert_allclose(batch["teacher"][:, 2:], online[:, 2:], atol=1e-4)  # same frames (edges differ)
    # the train step is the one of the online-teacher run above (same batch spec): not run again here
    assert task.example_spec()["teacher"] == ((8, 16), np.float32)


def test_config_errors(corpus, tmp_path):
    from moshax.config import ConfigError

    with pytest.raises(ConfigError, match="teacher.kind"):
        micro_config(corpus, tmp_path, task={"teacher": {"kind": "wavlm"}})
    with pytest.raises(ConfigError, match="shorter than the largest discriminator n_fft"):
        MimiTask(micro_config(corpus, tmp_path, task={"discriminator": {"n_ffts": [8192]}}))
    with pytest.raises(ConfigError, match="not a multiple of the codec frame rate"):
        MimiTask(micro_config(corpus, tmp_path, task={"teacher": {"kind": "mel", "frame_rate": 18.75}}))
    with pytest.raises(ConfigError, match="train_sources is empty"):
        MimiTask(micro_config(corpus, tmp_path, data={"train_sources": []})).check_inputs()


# ------------------------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_tiny_mimi_on_synthetic_speech_lowers_losses(tmp_path):
    """configs/mimi_tiny.yaml (adversarial + feature matching + mel-teacher distillation, no
    reconstruction loss) for 120 of its 300 steps on a 120-utterance eSpeak NG corpus: the eval
    distillation loss goes down from the initial model's, and feature matching from the first
    eval (step 40) to the last. (Feature matching starts trivially small against the random
    initial discriminator and rises while the discriminator learns, in the first ~30 steps; the
    distillation loss falls within the first 50 steps, then stays near its level.)"""
    require_binary("espeak-ng", "speech synthesis needs espeak-ng (apt-get install espeak-ng)")
    from pathlib import Path

    from data_pipeline.speech_synth import synthesize_corpus
    from moshax.config import load_config

    synthesize_corpus(tmp_path / "speech", train=120, eval=8, seed=0)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/mimi_tiny.yaml", [
        f"data.train_sources=[{tmp_path}/speech/train]", f"data.eval_sources=[{tmp_path}/speech/eval]",
        "train.progress=false", "train.steps=120", "optim.decay_steps=300", "train.eval_every=40"])
    jax.config.update("jax_disable_most_optimizations", False)  # a real run: optimized code
    try:
        # one device: 8 simulated CPU devices on 2 cores make XLA:CPU's in-process collectives of
        # this many-branched step stall under load (and run slower)
        mesh = build_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
        trainer = Trainer(cfg, MimiTask(cfg), mesh=mesh, workdir=tmp_path / "run")
        initial = trainer.evaluate(trainer.init_state())
        summary = trainer.run()
    finally:
        jax.config.update("jax_disable_most_optimizations", True)
    evals = [h for h in summary["history"] if "eval_loss" in h]
    keys = ("eval_feature_matching", "eval_distillation", "eval_adversarial", "eval_d_loss", "eval_si_sdr",
            "eval_mel_distance")
    print(json.dumps([{"step": h["step"], **{k: round(h[k], 4) for k in keys}} for h in [{"step": 0, **initial}] + evals]))
    assert len(evals) == 3
    assert evals[-1]["eval_feature_matching"] < evals[0]["eval_feature_matching"]
    assert evals[-1]["eval_distillation"] < 0.8 * initial["eval_distillation"]
