"""What a careless rerun or a damaged file must never cost: checkpoints, config.yaml, one curve in
metrics.jsonl, and a traceback instead of one line."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from requirements import require_module

from moshax.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.vocab_size=128", "model.transformer.dim=32", "model.transformer.num_heads=2",
        "model.transformer.num_layers=1", "model.transformer.hidden_dim=48", "data.seq_len=16",
        "train.batch_size=8", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "train.progress=false",
        "checkpoint.every=2", "checkpoint.async_save=false", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_pipeline.corpus import write_corpus
    from data_pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("trust")
    paths = write_corpus(root / "corpus", train_docs=600, eval_docs=40, seed=0)
    train_tokenizer([str(paths["train"])], str(root / "tok/spm"), 128)
    return [f"data.train_sources=[{paths['train']}]", f"data.eval_sources=[{paths['eval']}]",
            f"data.tokenizer={root}/tok/spm.model"]


def _train(workdir, corpus, *extra, flags=()):
    return main(["train", "--config", str(ROOT / "configs/helium_tiny.yaml"), "--workdir", str(workdir), *flags,
                 *corpus, *TINY, *extra])


def _snapshot(workdir: Path) -> dict:
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file() and "tensorboard" not in p.parts}


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("moshax: error: "), err[-3000:]
    return lines[0]


def test_a_changed_config_never_costs_a_checkpoint(corpus, tmp_path, capsys):
    """The report: rerunning a finished workdir with model.transformer.dim changed renamed the valid
    checkpoint to unusable-*, overwrote config.yaml and printed ~420 lines. Now: exit 2, one line
    naming the key, every checkpoint file and config.yaml byte-identical."""
    work = tmp_path / "run"
    assert _train(work, corpus, "train.steps=4") == 0
    capsys.readouterr()
    before = _snapshot(work)
    assert any(k.startswith("checkpoints/4/") for k in before) and "config.yaml" in before

    assert _train(work, corpus, "train.steps=4", "model.transformer.dim=64", "model.transformer.num_heads=2") == 2
    line = _one_line(capsys.readouterr().err)
    assert "model.transformer.dim 32 -> 64" in line and "new --workdir" in line
    assert _snapshot(work) == before and not list((work / "checkpoints").glob("unusable-*"))

    # a safe change (learning rate) needs --allow-config-change; without it nothing moves either
    assert _train(work, corpus, "train.steps=6", "optim.learning_rate=1e-4") == 2
    line = _one_line(capsys.readouterr().err)
    assert "optim.learning_rate 0.003 -> 0.0001" in line and "--allow-config-change" in line
    assert _snapshot(work) == before
    # not even the flag lets a shape change through
    assert _train(work, corpus, "train.steps=6", "model.transformer.hidden_dim=64",
                  flags=["--allow-config-change"]) == 2
    assert "model.transformer.hidden_dim 48 -> 64" in _one_line(capsys.readouterr().err)
    assert _snapshot(work) == before

    # with the flag: trains on from step 4, and config.yaml records the change with its step
    assert _train(work, corpus, "train.steps=6", "optim.learning_rate=1e-4", flags=["--allow-config-change"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from step 4 (checkpoint {work / 'checkpoints' / '4'})" in out
    saved = (work / "config.yaml").read_text()
    assert saved.startswith("# config change at step 4: optim.learning_rate 0.003 -> 0.0001\n")
    from moshax.config import load_config

    assert load_config(work / "config.yaml").optim.learning_rate == 1e-4  # still a loadable config
    # extending a run (train.steps) is run control: no flag needed; a finished run says so in a line
    assert _train(work, corpus, "train.steps=6", "optim.learning_rate=1e-4") == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "{}" not in out


def test_checkpoint_written_by_another_model_is_not_set_aside(corpus, tmp_path, capsys):
    """Without config.yaml (an older workdir) the checkpoint itself is compared: a shape mismatch
    is one line, and the checkpoint is neither renamed nor overwritten."""
    work = tmp_path / "run"
    assert _train(work, corpus, "train.steps=2") == 0
    (work / "config.yaml").unlink()
    capsys.readouterr()
    before = _snapshot(work)
    assert _train(work, corpus, "train.steps=2", "model.transformer.hidden_dim=64") == 2
    line = _one_line(capsys.readouterr().err)
    assert "does not match this run's model" in line and "stored (1, 32, 2, 48) vs model (1, 32, 2, 64)" in line
    assert _snapshot(work) == before


def test_metrics_after_a_kill_hold_one_curve(corpus, tmp_path, capsys):
    """The report: after a kill -9, metrics.jsonl had rows for steps 50 and 60 twice. The state a
    kill leaves: rows logged past the last finished checkpoint (here steps 3-4 past step 2, whose
    checkpoint 4 never finalized). The rerun resumes from 2 and drops those rows first."""
    import shutil

    work = tmp_path / "run"
    assert _train(work, corpus, "train.steps=4") == 0
    shutil.rmtree(work / "checkpoints" / "4")  # as if killed before checkpoint 4 was finalized
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss"')  # and a torn last line
    assert _train(work, corpus, "train.steps=4") == 0
    assert "resuming from step 2" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]


def _cut_files(step_dir: Path) -> None:
    """Cut every file of a checkpoint's state item to half its length (a copy cut short)."""
    for p in (step_dir / "state").rglob("*"):
        if p.is_file() and p.stat().st_size > 1:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def test_corrupt_checkpoints_outside_training_are_one_line(tmp_path, capsys):
    """mimi encode / decode, eval, convert to-kyutai and generate on checkpoints whose files are cut short:
    exit 2 and one line naming the checkpoint (the report: 119-419 lines of traceback)."""
    import jax
    from flax import nnx

    from data_pipeline.audio import write_wav
    from moshax.checkpoint.model import save_model_checkpoint
    from moshax.config import from_dict, to_dict
    from moshax.models.mimi.model import Mimi

    mcfg = from_dict({"model": {"kind": "mimi", "seanet": {"dimension": 16, "n_filters": 4},
                                "transformer": {"dim": 16, "num_heads": 2, "num_layers": 1, "hidden_dim": 32,
                                                "gated": False, "activation": "gelu", "norm": "layer_norm",
                                                "norm_eps": 1e-5, "layer_scale": 0.01, "context": 8},
                                "quantizer": {"dimension": 8, "bins": 16, "n_q": 4, "num_codebooks": 2}}}).model
    mimi = nnx.eval_shape(lambda: Mimi(mcfg, rngs=nnx.Rngs(0)))
    _, p, r = nnx.split(mimi, nnx.Param, ...)
    rng = np.random.default_rng(0)
    fill = lambda t: jax.tree.map(lambda v: rng.standard_normal(v.shape).astype(v.dtype), nnx.to_pure_dict(t))  # noqa: E731
    ckpt = save_model_checkpoint(tmp_path / "mimi", fill(p), fill(r), config=to_dict(mcfg), kind="mimi", source="t")
    _cut_files(ckpt / "0")
    write_wav(tmp_path / "in.wav", (0.1 * np.sin(np.arange(4800) / 7.0)).astype(np.float32), 24000)
    np.save(tmp_path / "codes.npy", np.zeros((2, 3), np.int32))
    (tmp_path / "wavs").mkdir()
    commands = [
        ["mimi", "encode", "--checkpoint", str(ckpt), "--input", str(tmp_path / "in.wav"),
         "--output", str(tmp_path / "out.npy")],
        ["mimi", "decode", "--checkpoint", str(ckpt), "--input", str(tmp_path / "codes.npy"),
         "--output", str(tmp_path / "out.wav")],
        ["eval", "--checkpoint", str(ckpt), "--audio", str(tmp_path / "wavs"), "--quiet"],
        ["convert", "to-kyutai", "--model", "mimi", "--checkpoint", str(ckpt), "--output",
         str(tmp_path / "m.safetensors")],
    ]
    # generate: a cut Mimi beside a good LM, and a cut LM
    lcfg = from_dict({"model": {"kind": "moshi", "text_card": 32, "card": 16, "n_q": 4, "dep_q": 2,
                                "delays": [0, 0, 1, 0, 1],
                                "transformer": {"dim": 16, "num_heads": 2, "num_layers": 1, "hidden_dim": 32,
                                                "context": 8},
                                "depformer": {"dim": 16, "num_heads": 2, "num_layers": 1, "hidden_dim": 32,
                                              "context": 4, "positional": "none"}}}).model
    from moshax.models.moshi_lm import MoshiLM

    lm = nnx.eval_shape(lambda: MoshiLM(lcfg, rngs=nnx.Rngs(0)))
    _, lp, lr = nnx.split(lm, nnx.Param, ...)
    good_lm = save_model_checkpoint(tmp_path / "lm", fill(lp), fill(lr), config=to_dict(lcfg), kind="moshi", source="t")
    cut_lm = save_model_checkpoint(tmp_path / "lm_cut", fill(lp), fill(lr), config=to_dict(lcfg), kind="moshi",
                                   source="t")
    _cut_files(cut_lm / "0")
    gen = ["generate", "--input", str(tmp_path / "in.wav"), "--output", str(tmp_path / "moshi.wav")]
    for cmd, where in ((gen + ["--checkpoint", str(good_lm), "--mimi-checkpoint", str(ckpt)], ckpt),
                       (gen + ["--checkpoint", str(cut_lm), "--mimi-checkpoint", str(ckpt)], cut_lm)):
        assert main(cmd) == 2, cmd
        line = _one_line(capsys.readouterr().err)
        assert "checkpoint is unreadable" in line and str(where / "0") in line, (cmd, line)
    for cmd in commands:
        assert main(cmd) == 2, cmd
        line = _one_line(capsys.readouterr().err)
        assert "checkpoint is unreadable" in line and str(ckpt / "0") in line, (cmd, line)
    # a cut meta item (the JSON) is one line too
    meta = next((ckpt / "0" / "meta").rglob("*.json"), None) or next(p for p in (ckpt / "0" / "meta").rglob("*")
                                                                      if p.is_file())
    meta.write_text(meta.read_text()[:5])
    assert main(commands[0]) == 2
    _one_line(capsys.readouterr().err)


def test_compile_says_what_it_is_doing(capsys):
    """`moshax compile` prints its phases with elapsed times instead of minutes of silence."""
    require_module("libtpu", "TPU compile checks need the tpu extra (libtpu)")
    assert main(["compile", "--config", str(ROOT / "configs/helium_tiny.yaml"), "--topology", "v5e:2x2",
                 "model.transformer.num_layers=1"]) == 0
    out = capsys.readouterr().out
    for phase in ("building the abstract train state", "lowering the train step", "lowered the train step",
                  "compiled the train step"):
        assert phase in out, out[:2000]


@pytest.mark.parametrize("extra, message", [
    (["train.stepz=1"], "unknown config key 'train.stepz'"),
    ([f"data.train_sources=[{ROOT / 'README.md'}]", "data.eval_sources=[]", "data.tokenizer=/nonexistent/spm.model"],
     "tokenizer file not found: /nonexistent/spm.model"),
    (["data.train_sources=[/nonexistent/*.txt]"], "data.train_sources: nothing found at /nonexistent/*.txt"),
])
def test_config_only_errors_come_before_jax(extra, message):
    """Mistakes that only need the config print before JAX is imported (well under a second)."""
    code = ("import sys; from moshax.cli import main\n"
            f"rc = main(['train', '--config', {str(ROOT / 'configs/helium_tiny.yaml')!r}, *{extra!r}])\n"
            "print(rc, 'jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stderr[-2000:]
    assert message in out.stderr and out.stderr.count("\n") == 1
