"""`moshax eval`: per-stream losses of a Moshi LM checkpoint on multi-stream shards (checked against
the model's own loss), Helium on text shards, the codec path (--audio) and one-line errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline.multistream import synthetic_examples, write_examples
from moshax.cli import main
from moshax.checkpoint.model import save_model_checkpoint
from moshax.config import HeliumConfig, TransformerConfig, to_dict
from moshax.models.moshi_lm import MoshiLM, MoshiLMConfig

T = 12


def tiny_cfg() -> MoshiLMConfig:
    cfg = MoshiLMConfig(text_card=64, card=64,
                        transformer=TransformerConfig(dim=32, num_heads=4, num_layers=2, hidden_dim=48, context=32),
                        depformer=TransformerConfig(dim=16, num_heads=2, num_layers=1, hidden_dim=24, context=8,
                                                    positional="none"))
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def moshi_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_cfg()
    model = nnx.jit(lambda: MoshiLM(cfg, rngs=nnx.Rngs(3)))()  # one compile instead of many eager ops
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    save_model_checkpoint(root / "ckpt", params, {}, config=to_dict(cfg), kind="lm", source="test")
    examples = list(synthetic_examples(11, steps=T, text_card=64, card=64, seed=2))
    examples[3][5, 4:] = -1  # a -1 stretch: masked
    write_examples(root / "shards", examples, steps=T, text_card=64, card=64, records_per_shard=4)
    return root, model, np.stack(examples)


def test_eval_reports_per_stream_losses(devices, moshi_ckpt, tmp_path, capsys):
    root, model, codes = moshi_ckpt
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(root / "ckpt"), "--shards", str(root / "shards"), "--batch-size", "4",
                 "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "| audio codebook 1 (semantic) |" in text and "objective" in text
    rep = json.loads(out.read_text())
    assert rep["records"] == 11 and rep["kind"] == "moshi"

    # the same numbers from the model directly, on all 11 examples at once
    c = jnp.asarray(codes)
    o = model.forward_train(c)
    losses = model.loss(o, c)
    lp_text = jax.nn.log_softmax(jnp.where(o["text_mask"][..., None], o["text_logits"], 0.0), -1)
    nll_text = -jnp.take_along_axis(lp_text, jnp.maximum(c[:, :1], 0)[..., None], -1)[..., 0]
    mask = np.asarray(o["text_mask"])
    rows = {r["stream"]: r for r in rep["streams"]}
    np.testing.assert_allclose(rows["text"]["cross_entropy"], float(np.asarray(nll_text)[mask].mean()), rtol=1e-5)
    assert rows["text"]["tokens"] == int(mask.sum())
    lp = jax.nn.log_softmax(jnp.where(o["mask"][..., None], o["logits"], 0.0), -1)
    nll = -np.asarray(jnp.take_along_axis(lp, jnp.maximum(c[:, 1:9], 0)[..., None], -1)[..., 0])
    amask = np.asarray(o["mask"])
    for k in range(8):
        name = f"audio codebook {k + 1}" + (" (semantic)" if k == 0 else "")
        np.testing.assert_allclose(rows[name]["cross_entropy"], nll[:, k][amask[:, k]].mean(), rtol=1e-5)
        np.testing.assert_allclose(rows[name]["perplexity"], np.exp(nll[:, k][amask[:, k]].mean()), rtol=1e-5)
        assert rows[name]["tokens"] == int(amask[:, k].sum())
    assert rows["audio codebook 5"]["tokens"] == 11 * (T - 1) - (T - 5)  # delay 1, and the -1 stretch (t >= 4)
    np.testing.assert_allclose(rep["acoustic_loss"], nll[:, 1:][amask[:, 1:]].mean(), rtol=1e-5)
    np.testing.assert_allclose(rep["text_loss"], float(losses["text"][0] / losses["text"][1]), rtol=1e-5)
    np.testing.assert_allclose(rep["audio_loss"], float(losses["audio"][0] / losses["audio"][1]), rtol=1e-5)
    np.testing.assert_allclose(rep["objective"], rep["text_loss"] + rep["audio_loss"], rtol=1e-6)
    # no number depends on the batch size (the last batch is padded with -1 frames)
    assert main(["eval", "--checkpoint", str(root / "ckpt"), "--shards", str(root / "shards"), "--batch-size", "16",
                 "--json", str(tmp_path / "r16.json"), "--quiet"]) == 0
    rep16 = json.loads((tmp_path / "r16.json").read_text())
    for a, b in zip(rep["streams"], rep16["streams"]):
        np.testing.assert_allclose(a["cross_entropy"], b["cross_entropy"], rtol=1e-5)


def test_eval_helium_on_text_shards(devices, tmp_path, capsys):
    from data_pipeline.token_shards import ShardWriter
    from moshax.models.helium import Helium

    hcfg = HeliumConfig(vocab_size=64, transformer=TransformerConfig(dim=32, num_heads=4, num_layers=1,
                                                                     hidden_dim=48, context=16))
    model = Helium(hcfg, rngs=nnx.Rngs(0))
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    save_model_checkpoint(tmp_path / "h", params, {}, config=to_dict(hcfg), kind="lm", source="test")
    rows = np.random.default_rng(0).integers(0, 64, (5, 17)).astype(np.int32)
    with ShardWriter(tmp_path / "text") as w:
        for r in rows:
            w.write(r)
    assert main(["eval", "--checkpoint", str(tmp_path / "h"), "--shards", str(tmp_path / "text"), "--quiet",
                 "--json", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    logits, _ = model(jnp.asarray(rows[:, :-1]))
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(rows[:, 1:])[..., None], -1)
    np.testing.assert_allclose(rep["streams"][0]["cross_entropy"], float(nll.mean()), rtol=1e-5)
    capsys.readouterr()


def test_eval_codec_path_and_errors(moshi_ckpt, tmp_path, capsys, monkeypatch):
    import moshax.evaluation.codec as codec_eval

    root, _, _ = moshi_ckpt
    ck, shards = str(root / "ckpt"), str(root / "shards")
    assert main(["eval", "--checkpoint", ck, "--shards", shards, "--audio", str(tmp_path)]) == 2
    assert "exactly one of --shards" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--shards", shards]) == 2
    assert "not found" in capsys.readouterr().err
    # an LM checkpoint with --audio: a codec is expected
    seen = {}
    real_evaluate_codec = codec_eval.evaluate_codec

    def evaluate_codec(mimi, folder, **kw):
        seen["args"] = (type(mimi).__name__, folder)
        return {"si_snr_db": 3.5, "files": 2}

    monkeypatch.setattr(codec_eval, "evaluate_codec", evaluate_codec)
    assert main(["eval", "--checkpoint", ck, "--audio", str(tmp_path)]) == 2
    assert "--audio evaluates a Mimi codec" in capsys.readouterr().err
    # a Mimi checkpoint goes to evaluate_codec
    from moshax.models.mimi.config import MimiConfig, QuantizerConfig, SEANetConfig
    from moshax.models.mimi.model import Mimi

    mcfg = MimiConfig(seanet=SEANetConfig(dimension=16, n_filters=4),
                      transformer=TransformerConfig(dim=16, num_heads=2, num_layers=1, hidden_dim=32, gated=False,
                                                    activation="gelu", norm="layer_norm", norm_eps=1e-5,
                                                    layer_scale=0.01, context=8),
                      quantizer=QuantizerConfig(dimension=8, bins=16, n_q=4, num_codebooks=2))
    mimi = nnx.eval_shape(lambda: Mimi(mcfg, rngs=nnx.Rngs(0)))
    _, p, r = nnx.split(mimi, nnx.Param, ...)
    zeros = lambda t: jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), nnx.to_pure_dict(t))  # noqa: E731
    save_model_checkpoint(tmp_path / "mimi", zeros(p), zeros(r), config=to_dict(mcfg), kind="mimi", source="t")
    (tmp_path / "wavs").mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path / "mimi"), "--audio", str(tmp_path / "wavs"),
                 "--json", str(tmp_path / "c.json")]) == 0
    assert seen["args"] == ("Mimi", str(tmp_path / "wavs"))
    assert json.loads((tmp_path / "c.json").read_text())["si_snr_db"] == 3.5
    assert "| si_snr_db | 3.5000 |" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "mimi"), "--shards", shards]) == 2
    assert "use --audio DIR for a codec" in capsys.readouterr().err
    # the real codec evaluation, end to end (a tiny random Mimi: only the plumbing is checked)
    from data_pipeline.audio import write_wav

    monkeypatch.setattr(codec_eval, "evaluate_codec", real_evaluate_codec)
    write_wav(tmp_path / "wavs" / "a.wav", (0.1 * np.sin(np.arange(4800) / 7.0)).astype(np.float32), 24000)
    mimi = nnx.jit(lambda: Mimi(mcfg, rngs=nnx.Rngs(0)))()
    _, p, r = nnx.split(mimi, nnx.Param, ...)
    host = lambda t: jax.tree.map(np.asarray, nnx.to_pure_dict(t))  # noqa: E731
    save_model_checkpoint(tmp_path / "mimi2", host(p), host(r), config=to_dict(mcfg), kind="mimi", source="t")
    assert main(["eval", "--checkpoint", str(tmp_path / "mimi2"), "--audio", str(tmp_path / "wavs"),
                 "--json", str(tmp_path / "c2.json")]) == 0
    rep = json.loads((tmp_path / "c2.json").read_text())
    assert rep["files"] == 1 and rep["num_codebooks"] == 2 and np.isfinite(rep["mel_distance"])
    assert len(rep["per_file"]) == 1 and "| si_sdr_db |" in capsys.readouterr().out
