"""`moshax mimi encode/decode` and codec evaluation on a tiny random Mimi checkpoint."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline.audio import read_audio, write_wav
from moshax.cli import main
from moshax.config import TransformerConfig, to_dict
from moshax.models.mimi.config import MimiConfig, QuantizerConfig, SEANetConfig
from moshax.checkpoint.model import load_codec
from moshax.models.mimi.model import Mimi

from helpers import draw_codebooks

SR = 24000


def tiny_cfg() -> MimiConfig:
    return MimiConfig(
        seanet=SEANetConfig(dimension=32, n_filters=4),
        transformer=TransformerConfig(dim=32, num_heads=2, num_layers=1, hidden_dim=64, gated=False,
                                      activation="gelu", norm="layer_norm", norm_eps=1e-5, layer_scale=0.01,
                                      context=8, positional="rope", causal=True),
        quantizer=QuantizerConfig(dimension=16, bins=64, n_q=6, num_codebooks=4))


def tone(seconds, sr=SR, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.3 * np.sin(2 * np.pi * (180 + 40 * np.sin(3 * t)) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    x = x + 0.01 * rng.standard_normal(t.shape)
    return np.stack([x * (1 - 0.2 * c) for c in range(channels)]).astype(np.float32)


def random_codec(cfg, seed=0) -> Mimi:
    """Random weights, codebooks drawn at the scale of the latents (many distinct codes)."""
    model = Mimi(cfg, rngs=nnx.Rngs(seed))
    return draw_codebooks(model, tone(1.6, seed=seed)[None], np.random.default_rng(seed))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from moshax.checkpoint.model import save_model_checkpoint

    cfg = tiny_cfg()
    model = random_codec(cfg)
    _, p, r = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(p))
    rest = jax.tree.map(np.asarray, nnx.to_pure_dict(r))
    root = tmp_path_factory.mktemp("mimi_cli")
    path = save_model_checkpoint(root / "ckpt", params, rest, config=to_dict(cfg), kind="mimi")
    return {"root": root, "path": path, "model": model, "cfg": cfg}


def test_encode_decode_any_rate_and_channels(ckpt, tmp_path, capsys):
    src = tmp_path / "stereo44k.wav"
    audio = tone(1.3, sr=44100, channels=2)  # 57330 samples -> 31200 at 24 kHz: not a multiple of 1920
    write_wav(src, audio, 44100)
    codes_path = tmp_path / "codes.npy"
    assert main(["mimi", "encode", "--checkpoint", str(ckpt["path"]), "--input", str(src), "--output",
                 str(codes_path), "--num-codebooks", "3"]) == 0
    codes = np.load(codes_path)
    n24 = read_audio(src, SR).shape[-1]
    assert codes.dtype == np.int32 and codes.shape == (3, -(-n24 // 1920))
    side = json.loads(codes_path.with_suffix(".json").read_text())
    assert side["num_samples"] == n24 and side["sample_rate"] == SR
    # same codes as one batch encode of the mono 24 kHz signal (zero-padded to whole frames)
    model = load_codec(ckpt["path"])
    want = nnx.jit(lambda m, x: m.encode(x, 3))(model, jnp.asarray(read_audio(src, SR)[None]))
    np.testing.assert_array_equal(codes, np.asarray(want[0]))
    assert min(len(np.unique(c)) for c in codes) > 1

    out = tmp_path / "out.wav"
    assert main(["mimi", "decode", "--checkpoint", str(ckpt["path"]), "--input", str(codes_path),
                 "--output", str(out)]) == 0
    decoded = read_audio(out, None)
    assert decoded.shape == (1, n24)  # trimmed to the original length (sidecar)
    assert "wrote" in capsys.readouterr().out


def test_chunked_runner_equals_batch(ckpt):
    from moshax.inference.codec import CodecRunner

    model = ckpt["model"]
    x = tone(1.9, seed=3)[0]
    runner = CodecRunner(model, 4, chunk_frames=3)  # 3 full chunks + a partial one
    codes = runner.encode(x)
    want = nnx.jit(lambda m, a: m.encode(a, 4))(model, jnp.asarray(x[None, None]))
    np.testing.assert_array_equal(codes, np.asarray(want[0]))
    audio = runner.decode(codes)
    ref = np.asarray(nnx.jit(lambda m, c: m.decode(c))(model, jnp.asarray(codes[None])))[0, 0]
    np.testing.assert_allclose(audio, ref, rtol=1e-4, atol=1e-5)


def _truncated_wav(tmp_path) -> bytes:
    """The issue's file: a header promising 150,400 data bytes with 956 present."""
    whole = tmp_path / "whole.wav"
    write_wav(whole, tone(75200 / SR), SR)
    return whole.read_bytes()[:1000]


@pytest.mark.parametrize("content, expect", [
    (b"", "empty audio file (0 bytes)"),
    ("truncated", "truncated wav: the header declares 150400 data bytes, 956 are present"),
    (b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk", "corrupt or truncated wav"),
    (b"this is not audio at all" * 20, "cannot decode audio"),
])
def test_encode_bad_audio_is_one_line_naming_the_file(ckpt, tmp_path, capsys, content, expect):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(_truncated_wav(tmp_path) if content == "truncated" else content)
    rc = main(["mimi", "encode", "--checkpoint", str(ckpt["path"]), "--input", str(bad), "--output",
               str(tmp_path / "c.npy")])
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(f"moshax: error: {bad}: ")
    assert expect in err and "wrote" not in cap.out
    assert not (tmp_path / "c.npy").exists()


def test_eval_audio_fails_naming_a_truncated_file(ckpt, tmp_path, capsys):
    folder = tmp_path / "audio"
    folder.mkdir()
    (folder / "0.wav").write_bytes(_truncated_wav(tmp_path))
    write_wav(folder / "1.wav", tone(0.5), SR)
    rc = main(["eval", "--checkpoint", str(ckpt["path"]), "--audio", str(folder)])
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    err = [ln for ln in err if ln.strip() and "eval codec" not in ln]  # tqdm's progress lines
    assert rc == 2 and err == [f"moshax: error: {folder / '0.wav'}: truncated wav: the header declares "
                               "150400 data bytes, 956 are present (0.6%)"], err


def test_encode_truncated_file_in_a_process(ckpt, tmp_path):
    """The command as a user runs it: exit 2, one line on stderr, no traceback, nothing written."""
    import os
    import subprocess
    import sys

    bad = tmp_path / "cut.wav"
    bad.write_bytes(_truncated_wav(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "moshax.cli", "mimi", "encode", "--checkpoint", str(ckpt["path"]),
                           "--input", str(bad), "--output", str(tmp_path / "c.npy")],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("moshax") or "Traceback" in ln]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines == [f"moshax: error: {bad}: truncated wav: the header declares 150400 data bytes, "
                     "956 are present (0.6%)"], proc.stderr
    assert not (tmp_path / "c.npy").exists() and proc.stdout == ""


def test_cli_errors(ckpt, tmp_path, capsys):
    src = tmp_path / "a.wav"
    write_wav(src, tone(0.5), SR)
    cases = [
        (["encode", "--input", str(tmp_path / "missing.wav"), "--output", str(tmp_path / "c.npy")], "missing.wav"),
        (["encode", "--input", str(src), "--output", str(tmp_path / "c.npy"), "--num-codebooks", "9"],
         "--num-codebooks 9"),
    ]
    bad_codes = tmp_path / "bad.npy"
    np.save(bad_codes, np.full((2, 5), 999, np.int32))
    cases.append((["decode", "--input", str(bad_codes), "--output", str(tmp_path / "o.wav")], "0..63"))
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros((2, 5), np.float32))
    cases.append((["decode", "--input", str(floats), "--output", str(tmp_path / "o.wav")], "integer codes"))
    cases.append((["encode", "--input", str(src), "--output", str(tmp_path / "c.npy")], "no moshax checkpoint"))
    for i, (args, expect) in enumerate(cases):
        checkpoint = str(tmp_path) if expect == "no moshax checkpoint" else str(ckpt["path"])
        rc = main(["mimi", args[0], "--checkpoint", checkpoint, *args[1:]])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and expect in err, (i, err)


def test_load_codec_from_kyutai_safetensors(ckpt, tmp_path):
    from moshax.interop.mimi_weights import save_mimi

    path = tmp_path / "mimi.safetensors"
    save_mimi(ckpt["model"], path)
    model = load_codec(path, ckpt["cfg"])
    x = jnp.asarray(tone(0.4)[None])
    enc = nnx.jit(lambda m, a: m.encode(a))
    np.testing.assert_array_equal(np.asarray(enc(model, x)), np.asarray(enc(ckpt["model"], x)))


def test_evaluate_codec(ckpt, tmp_path):
    from moshax.evaluation.codec import evaluate_codec

    folder = tmp_path / "audio"
    for i, sec in enumerate((0.7, 1.1)):
        write_wav(folder / f"{i}.wav", tone(sec, sr=16000, seed=i), 16000)
    report = evaluate_codec(ckpt["model"], folder, num_codebooks=4)
    assert report["files"] == 2 and report["num_codebooks"] == 4
    assert report["bitrate_bps"] == pytest.approx(4 * 6 * 12.5)  # 64 bins = 6 bits
    assert np.isfinite(report["si_sdr_db"]) and report["mel_distance"] > 0
    assert abs(report["seconds"] - 1.8) < 0.01
    # a perfect codec: SI-SDR very high, mel distance 0
    from moshax.evaluation.codec import mel_distance_np, si_sdr_np

    x = tone(0.5)[0]
    assert si_sdr_np(x, 3.0 * x) > 60 and mel_distance_np(x, x, SR) == 0.0
