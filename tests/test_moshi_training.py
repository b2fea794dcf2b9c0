"""Moshi LM training: multi-stream shards, augmentations, the moshi-finetune objective, sharded ==
single-device steps, exact resume, Helium warm start, stage configs, and that training on
structured synthetic data lowers the text, semantic and acoustic losses."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline.errors import DataError
from data_pipeline.multistream import (
    MultistreamWriter, read_multistream_manifest, synthetic_examples, validate_example, write_examples)
from moshax.config import ConfigError, MeshConfig, from_dict, load_config, to_dict
from moshax.models.moshi_lm import MoshiAugmentConfig
from moshax.parallel.mesh import build_mesh
from moshax.checkpoint.manager import Checkpointer
from moshax.training.moshi_task import MoshiTask, augment_codes
from moshax.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
T = 16  # frames per example in the small tests
TEXT_CARD, CARD = 64, 64

TINY_T = {"dim": 32, "num_heads": 4, "num_layers": 2, "hidden_dim": 48, "context": 32}
TINY_D = {"dim": 16, "num_heads": 2, "num_layers": 1, "hidden_dim": 24, "context": 8, "positional": "none"}


def moshi_config(shards, **sections):
    model = {"kind": "moshi", "text_card": TEXT_CARD, "card": CARD, "transformer": TINY_T, "depformer": TINY_D,
             **sections.pop("model", {})}
    data = {"model": model, "task": sections.pop("task", {}),
            "data": {"frames": T, "train_shards": str(shards), **sections.pop("data", {})},
            "train": {"batch_size": 8, "steps": 4, "log_every": 1, "progress": False, **sections.pop("train", {})},
            "optim": {"learning_rate": 1e-2, "warmup_steps": 1, **sections.pop("optim", {})},
            "checkpoint": {"every": 2, "async_save": True}, **sections}
    return from_dict(data)


def trainer_for(cfg, workdir, mesh_shape=(2, 2, 2)):
    devs = jax.devices()[: int(np.prod(mesh_shape))]
    return Trainer(cfg, MoshiTask(cfg), mesh=build_mesh(MeshConfig(*mesh_shape), devs), workdir=workdir)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("ms") / "train"
    write_examples(out, synthetic_examples(48, steps=T, text_card=TEXT_CARD, card=CARD, seed=0), steps=T,
                   text_card=TEXT_CARD, card=CARD, records_per_shard=20)
    return out


# ----------------------------------------------------------------------------- data


def test_multistream_writer_and_manifest(shards, tmp_path):
    m = read_multistream_manifest(shards)
    assert m["kind"] == "multistream" and m["total_records"] == 48 and len(m["shards"]) == 3
    assert m["record"] == {"dtype": "int32", "shape": [17, T]}
    assert m["multistream"]["text_card"] == TEXT_CARD and m["stats"]["frames"] == 48 * T
    ex = next(synthetic_examples(1, steps=40, text_card=TEXT_CARD, card=CARD, seed=1, two_streams=False))
    assert ex.shape == (17, 40) and (ex[9:] == -1).all() and (ex[1:9] >= 0).all()
    text = ex[0]
    assert 0.3 < np.isin(text, [0, 3]).mean() < 0.8 and (text == 0).any()  # PAD/EPAD like aligned speech
    ok = dict(num_streams=17, steps=40, text_card=TEXT_CARD, card=CARD)
    validate_example(ex, **ok)
    with pytest.raises(DataError, match=r"shape \(17, 39\)"):
        validate_example(ex[:, :39], **ok)
    bad = ex.copy()
    bad[3, 5] = CARD
    with pytest.raises(DataError, match="audio codes span"):
        validate_example(bad, **ok)
    with pytest.raises(DataError, match="expected integer"):
        validate_example(ex.astype(np.float32), **ok)
    with MultistreamWriter(tmp_path / "w", steps=40, text_card=TEXT_CARD, card=CARD) as w:
        with pytest.raises(DataError, match="example 0: text ids"):
            w.write(np.where(np.arange(40) == 0, TEXT_CARD, ex))
        w.write(ex)
    assert read_multistream_manifest(tmp_path / "w")["total_records"] == 1
    from data_pipeline.token_shards import ShardWriter

    with ShardWriter(tmp_path / "text") as sw:
        sw.write(np.arange(5, dtype=np.int32))
    with pytest.raises(DataError, match="kind 'text'"):
        read_multistream_manifest(tmp_path / "text")


def test_data_iterator_checks_shapes_and_resumes(shards):
    cfg = moshi_config(shards)
    task = MoshiTask(cfg)
    task.check_inputs()
    it = task.data_iterator("train", global_batch_size=8, process_index=0, process_count=1)
    first = next(it)["codes"]
    assert first.shape == (8, 17, T) and first.dtype == np.int32
    state = it.get_state()
    want = next(it)["codes"]
    it2 = task.data_iterator("train", global_batch_size=8, process_index=0, process_count=1)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["codes"], want)
    # records of another length are cropped (longer) or padded with -1 (shorter) to data.frames
    longer = MoshiTask(moshi_config(shards, data={"frames": 20}))
    longer.check_inputs()
    padded = next(longer.data_iterator("train", global_batch_size=8, process_index=0, process_count=1))["codes"]
    assert padded.shape == (8, 17, 20) and (padded[:, :, 16:] == -1).all() and (padded[:, 1:, :16] >= 0).all()
    with pytest.raises(DataError, match="records of 17 streams, but the model needs num_streams = 5"):
        MoshiTask(moshi_config(shards, model={"n_q": 4, "dep_q": 2, "delays": [0, 0, 1, 0, 1]})).check_inputs()
    with pytest.raises(DataError, match="text_card=64 but model.text_card=32"):
        MoshiTask(moshi_config(shards, model={"text_card": 32})).check_inputs()


def test_augmentations():
    rng = np.random.default_rng(0)
    codes = jnp.asarray(np.concatenate([rng.integers(4, 100, (64, 1, 50)), rng.integers(0, 64, (64, 16, 50))], 1),
                        jnp.int32)
    aug = MoshiAugmentConfig(text_delay_s=0.6)
    out = np.asarray(jax.jit(lambda c, k: augment_codes(c, k, aug, 12.5))(codes, jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(out[:, 1:], np.asarray(codes)[:, 1:])  # audio untouched
    shifts = []
    for b in range(64):
        src, dst = np.asarray(codes)[b, 0], out[b, 0]
        for s in range(-7, 8):  # 0.6 s at 12.5 Hz = 7.5 frames -> +-7
            shifted = np.full(50, -1)
            if s >= 0:
                shifted[s:] = src[: 50 - s]
            else:
                shifted[:s] = src[-s:]
            if (shifted == dst).all():
                shifts.append(s)
                break
        else:
            raise AssertionError(f"example {b}: text is not a shift of +-7 frames")
    assert min(shifts) < -3 and max(shifts) > 3 and len(set(shifts)) > 8
    masked = np.asarray(augment_codes(codes, jax.random.PRNGKey(1), MoshiAugmentConfig(text_mask_prob=0.3), 12.5))
    frac = (masked[:, 0] == -1).mean()
    assert 0.25 < frac < 0.35 and (masked[:, 1:] == np.asarray(codes)[:, 1:]).all()
    whole = np.asarray(augment_codes(codes, jax.random.PRNGKey(1),
                                     MoshiAugmentConfig(text_mask_prob=0.5, text_mask_mode="example"), 12.5))
    per_example = (whole[:, 0] == -1).all(axis=1)
    assert 0.2 < per_example.mean() < 0.8 and ((whole[:, 0] == -1).any(axis=1) == per_example).all()
    with pytest.raises(ConfigError, match="text_mask_prob=1.5"):
        moshi_config("x", task={"augment": {"text_mask_prob": 1.5}})


# ----------------------------------------------------------------------------- objective, sharding, resume

AUG = {"augment": {"text_delay_s": 0.3, "text_mask_prob": 0.3}}


@pytest.fixture(scope="module")
def trainers(devices, shards, tmp_path_factory):
    """One config (augmentations on, 2 micro-batches of 4) on the (2, 2, 2) mesh and on one device;
    each trainer compiles its step once and hands out copies of one initial state (the tests
    share compilations: they dominate the time on a CPU)."""
    cfg = moshi_config(shards, task=AUG, train={"grad_accum_steps": 2})
    root = tmp_path_factory.mktemp("trainers")
    out = {}
    for shape in ((2, 2, 2), (1, 1, 1)):
        tr = trainer_for(cfg, root / "x".join(map(str, shape)), shape)
        init = tr.init_state()
        tr.init_state = lambda init=init: jax.tree.map(lambda x: x + jnp.zeros((), x.dtype), init)
        out[shape] = tr
    return out


def _first_batch(tr):
    return next(tr.task.data_iterator("train", global_batch_size=8, process_index=0, process_count=1))


def test_sharded_step_equals_single_device_and_is_the_finetune_objective(trainers):
    """mesh data=2, fsdp=2, tensor=2 vs one device (fp32, two steps, augmentations and gradient
    accumulation on); the reported loss is moshi-finetune's text mean + audio mean averaged over
    the micro-batches, the stream metrics are token-weighted over the whole batch."""
    from moshax.models.moshi_lm import total_loss

    results = []
    for shape in ((2, 2, 2), (1, 1, 1)):
        tr = trainers[shape]
        state = tr.init_state()
        it = tr.task.data_iterator("train", global_batch_size=8, process_index=0, process_count=1)
        losses = []
        for i in range(2):
            batch = next(it)
            if i == 0 and shape == (1, 1, 1):  # the objective, recomputed outside the train step
                p, r = state["params"], state["rest"]
                task_loss = jax.jit(lambda p, r, c, k: tr.task.loss(tr.handle.merge(p, r), {"codes": c}, k))
                keys = jax.random.split(jax.random.split(state["rng"])[1], 2)
                totals, auxes = [], []
                for j in range(2):
                    total, weight, aux = task_loss(p, r, jnp.asarray(batch["codes"][j * 4:(j + 1) * 4]), keys[j])
                    assert float(weight) == 1.0
                    totals.append(float(total))
                    auxes.append(aux)

                @jax.jit
                def clean_loss(p, r, c):  # no rng: no augmentation
                    model = tr.handle.merge(p, r)
                    return tr.task.loss(model, {"codes": c}, None), model.loss(model.forward_train(c), c)

                (total, _, aux), losses_ = clean_loss(p, r, jnp.asarray(batch["codes"][:4]))
                np.testing.assert_allclose(float(total), float(total_loss(losses_)), rtol=1e-6)
                sem, aco = losses_["semantic"], losses_["acoustic"]
                assert float(sem[1]) == 100.0 * 4 * T  # semantic weight 100, delay 0, no -1 codes
                np.testing.assert_allclose(float(aux["audio"][0]), float(sem[0] + aco[0]), rtol=1e-6)
            state, m = tr.train_step(state, tr.to_global(batch, 2))
            losses.append({k: float(m[k]) for k in ("loss", "text", "semantic", "acoustic", "grad_norm")})
            if i == 0 and shape == (1, 1, 1):
                np.testing.assert_allclose(losses[0]["loss"], np.mean(totals), rtol=1e-5)
                for name in ("text", "semantic", "acoustic"):
                    s = sum(float(a[name][0]) for a in auxes)
                    w = sum(float(a[name][1]) for a in auxes)
                    np.testing.assert_allclose(losses[0][name], s / w, rtol=1e-5)
        results.append((losses, jax.device_get(state["params"])))
    (l8, p8), (l1, p1) = results
    for a, b in zip(l8, l1):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def _history(summary, key="loss"):
    return [h[key] for h in summary["history"] if key in h]


def test_resume_is_bitwise_exact(trainers, tmp_path):
    """4 steps == 2 steps + resume 2 steps (same floats), augmentations and data position included."""
    tr = trainers[(2, 2, 2)]

    def run(workdir, max_steps=None):
        tr.workdir = tmp_path / workdir
        return tr.run(max_steps=max_steps)

    full = run("full")
    first = run("split", 2)
    second = run("split")
    assert first["end_step"] == 2 and second["resumed_from"] == 2 and second["end_step"] == 4
    for key in ("loss", "text", "semantic", "acoustic"):
        assert _history(first, key) + _history(second, key) == _history(full, key), key


def test_eval_step_has_no_augmentations(trainers):
    """The trainer's eval step uses ``task.eval_metrics`` (no rng): with text delay and masking on in the
    config, eval losses equal the plain (unaugmented) forward's, and differ from the train loss."""
    tr = trainers[(1, 1, 1)]
    state = tr.init_state()
    batch = _first_batch(tr)
    got = jax.device_get(tr.eval_step(state, tr.to_global(batch, 1)))
    model = tr.handle.merge(state["params"], state["rest"])
    codes = {"codes": jnp.asarray(batch["codes"])}
    plain = jax.device_get(tr.task.loss(model, codes, None))
    augmented = jax.device_get(tr.task.loss(model, codes, jax.random.PRNGKey(0)))
    for name in ("text", "semantic", "acoustic"):
        np.testing.assert_allclose(got[name][0] / got[name][1], plain[2][name][0] / plain[2][name][1], rtol=1e-5)
    assert abs(got["text"][0] / got["text"][1] - augmented[2]["text"][0] / augmented[2]["text"][1]) > 1e-4


# ----------------------------------------------------------------------------- warm start


def helium_checkpoint(path, transformer=TINY_T, vocab=TEXT_CARD, seed=5):
    """A Helium checkpoint in the trainer's layout (random params, built eagerly: no compile)."""
    import optax
    from flax import nnx

    from moshax.config import HeliumConfig, TransformerConfig
    from moshax.models.helium import Helium

    hcfg = from_dict({"model": {"kind": "helium", "vocab_size": vocab, "transformer": transformer}})
    model = Helium(HeliumConfig(vocab_size=vocab, transformer=TransformerConfig(**transformer)), rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = {"step": jnp.int32(3), "params": params, "opt_state": optax.adam(1e-3).init(params), "rest": {},
             "rng": jax.random.PRNGKey(0)}
    ck = Checkpointer(Path(path) / "checkpoints", async_save=False)
    ck.save(3, state, None, {"config": to_dict(hcfg), "step": 3})
    ck.close()
    return jax.device_get(params)


def test_warm_start_from_helium(trainers, shards, tmp_path):
    tr = trainers[(2, 2, 2)]
    hp = helium_checkpoint(tmp_path / "helium")
    fresh_state = tr.init_state()
    fresh = jax.device_get(fresh_state["params"])
    task = MoshiTask(moshi_config(shards, task={"init_from": str(tmp_path / "helium")}))
    new, rest = task.init_params(fresh_state["params"], fresh_state["rest"], tr)  # the trainer's hook
    params = jax.device_get(new)
    for key in ("transformer", "out_norm", "text_linear"):
        for a, b in zip(jax.tree.leaves(params[key]), jax.tree.leaves(hp[key])):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(params["text_emb"][:TEXT_CARD], hp["text_emb"])
    np.testing.assert_array_equal(params["text_emb"][TEXT_CARD], fresh["text_emb"][TEXT_CARD])  # initial token row
    for key in ("emb", "depformer", "linears", "depformer_in", "depformer_text_emb", "depformer_emb"):
        for a, b in zip(jax.tree.leaves(params[key]), jax.tree.leaves(fresh[key])):  # audio + depth: fresh
            np.testing.assert_array_equal(a, b)
    assert jax.tree.map(lambda a: a.sharding, new) == tr.param_shardings  # restored onto the mesh
    # with silent audio streams, the warm-started temporal side computes Helium's logits
    from moshax.config import HeliumConfig, TransformerConfig
    from moshax.models.helium import Helium

    helium = Helium(HeliumConfig(vocab_size=TEXT_CARD, transformer=TransformerConfig(**TINY_T)), rngs=nnx.Rngs(5))
    model = tr.handle.merge(params, {})
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TEXT_CARD, (2, 6)), jnp.int32)
    seq = jnp.full((2, 17, 6), -1, jnp.int32).at[:, 0].set(tokens)
    np.testing.assert_allclose(np.asarray(model.forward_text(seq)[1]), np.asarray(helium(tokens)[0]), atol=1e-5, rtol=0)
    # the workdir, its checkpoints/ dir and a step dir all work; mismatches are one clear line
    MoshiTask(moshi_config(shards, task={"init_from": str(tmp_path / "helium" / "checkpoints" / "3")})).check_inputs()
    MoshiTask(moshi_config(shards, task={"init_from": str(tmp_path / "helium" / "checkpoints")})).check_inputs()
    helium_checkpoint(tmp_path / "wide", transformer={**TINY_T, "hidden_dim": 64})
    with pytest.raises(ConfigError, match=r"does not fit.*stored \(2, 32, 2, 64\) vs model \(2, 32, 2, 48\)"):
        MoshiTask(moshi_config(shards, task={"init_from": str(tmp_path / "wide")})).init_params(
            fresh_state["params"], {}, tr)
    helium_checkpoint(tmp_path / "vocab", vocab=32)
    with pytest.raises(ConfigError, match="vocab_size=32 != model.text_card=64"):
        MoshiTask(moshi_config(shards, task={"init_from": str(tmp_path / "vocab")})).init_params(
            fresh_state["params"], {}, tr)
    with pytest.raises(FileNotFoundError):
        MoshiTask(moshi_config(shards, task={"init_from": str(tmp_path / "nope")})).check_inputs()


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["moshi_tiny", "moshi_7b", "moshi_7b_pretrain", "moshi_7b_posttrain",
                                  "moshi_7b_finetune"])
def test_stage_configs(name):
    from flax import nnx

    from moshax.models.moshi_lm import MoshiLM
    from moshax.parallel.partition import ModelHandle
    from moshax.training.optimizer import make_optimizer, param_labels

    cfg = load_config(CONFIGS / f"{name}.yaml")
    m = cfg.model
    assert m.kind == "moshi" and len(m.delays) == 17
    handle = ModelHandle.from_constructor(lambda r: MoshiLM(m, rngs=r))
    make_optimizer(cfg.optim, cfg.train.steps, handle.axes())  # every param group matches something
    if name == "moshi_7b_pretrain":
        assert m.delays[2:9] == [2] * 7 and m.delays[1] == 0 and m.delays[0] == 0
        assert cfg.task.augment.text_delay_s == 0.6 and cfg.task.augment.text_mask_prob == 0.3
        labels = param_labels(handle.axes(), cfg.optim)
        lrs = {f"group{i}": g.learning_rate for i, g in enumerate(cfg.optim.param_groups)}
        lr = lambda label: lrs.get(label, cfg.optim.learning_rate)  # noqa: E731
        assert lr(labels["transformer"]["layers"]["self_attn"]["in_proj"]) == 3e-5
        assert lr(labels["emb"]) == 3e-5 and lr(labels["text_linear"]) == 3e-5
        for key in ("depformer", "linears", "depformer_in", "depformer_emb", "depformer_text_emb"):
            assert {lr(x) for x in jax.tree.leaves(labels[key])} == {2e-4}, key
        assert cfg.task.init_from  # warm start from Helium
    if name == "moshi_7b_posttrain":
        assert m.delays == [0, 0] + [1] * 7 + [0] + [1] * 7 and cfg.task.augment.text_mask_prob == 0
    if name == "moshi_7b_finetune":
        assert cfg.optim.learning_rate == 2e-6
    del nnx


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_training_from_helium_lowers_every_loss(devices, tmp_path):
    """moshi_tiny's stream layout at a smaller width, warm-started from a Helium checkpoint, on
    structured synthetic shards: text, semantic and acoustic losses all fall."""
    steps = 32
    out = tmp_path / "train"
    write_examples(out, synthetic_examples(256, steps=steps, text_card=128, card=256, seed=0), steps=steps,
                   text_card=128, card=256)
    helium_checkpoint(tmp_path / "helium", transformer={**TINY_T, "dim": 64, "hidden_dim": 176}, vocab=128)
    cfg = moshi_config(out, data={"frames": steps}, task={"init_from": str(tmp_path / "helium")},
                       model={"text_card": 128, "card": 256,
                              "transformer": {**TINY_T, "dim": 64, "hidden_dim": 176},
                              "depformer": {**TINY_D, "dim": 32, "hidden_dim": 88}},
                       train={"steps": 120, "log_every": 10}, optim={"learning_rate": 3e-3, "warmup_steps": 10},
                       checkpoint={"every": 1000})
    summary = trainer_for(cfg, tmp_path / "run", (1, 1, 1)).run()
    hist = [h for h in summary["history"] if "text" in h]
    first, last = hist[0], hist[-1]
    print({k: (round(first[k], 3), round(last[k], 3)) for k in ("text", "semantic", "acoustic")})
    assert last["text"] < 0.8 * first["text"]
    assert last["semantic"] < 0.7 * first["semantic"]
    assert last["acoustic"] < 0.8 * first["acoustic"]


def test_train_eval_and_moshax_eval_report_the_same_numbers(devices, shards, tmp_path):
    """One eval path: the trainer's eval over every eval record and `moshax eval` on a checkpoint
    of the same params give the same objective and per-stream losses (and say the batches used)."""
    from moshax.checkpoint.model import open_checkpoint, save_model_checkpoint
    from moshax.training.evaluate import evaluate_shards

    cfg = moshi_config(shards, data={"eval_shards": str(shards)}, train={"eval_batches": 100})
    tr = trainer_for(cfg, tmp_path / "run", (1, 1, 1))
    state = tr.init_state()
    ev = tr.evaluate(state)
    assert ev["eval_batches_used"] == 48 // 8
    save_model_checkpoint(tmp_path / "ck", jax.device_get(state["params"]), {}, config=to_dict(cfg.model),
                          kind="moshi")
    rep = evaluate_shards(open_checkpoint(tmp_path / "ck"), None, str(shards), batch_size=8, progress=False)
    assert rep["records"] == 48
    for key in ("objective", "text_loss", "audio_loss", "semantic_loss", "acoustic_loss"):
        np.testing.assert_allclose(ev[f"eval_{key}"], rep[key], rtol=1e-5, err_msg=key)
    assert ev["eval_loss"] == ev["eval_objective"] and "eval_perplexity" not in ev  # not a token CE
