"""`moshax data prepare`: recordings -> multi-stream shards (stereo split + sidecar word times here;
VAD, diarization and ASR stages in their own tests), resume, hosts, bad inputs, loader crops."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from requirements import require_binary

from data_pipeline.prepare_config import PrepareConfig
from data_pipeline.text_stream import encoder_for, read_words, text_stream


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny random Mimi checkpoint, a tokenizer, and 5 stereo dialogues with exact truth."""
    require_binary("espeak-ng")
    from flax import nnx
    import jax

    from test_mimi_cli import tiny_cfg
    from data_pipeline.corpus import write_corpus
    from data_pipeline.dialogue_synth import synthesize_dialogues
    from data_pipeline.tokenizer import train_tokenizer
    from moshax.checkpoint.model import save_model_checkpoint
    from moshax.config import to_dict
    from moshax.models.mimi.random_init import random_mimi

    root = tmp_path_factory.mktemp("prepare")
    cfg = dataclasses.replace(tiny_cfg(), quantizer=dataclasses.replace(tiny_cfg().quantizer, n_q=8, num_codebooks=8))
    model = random_mimi(cfg, seed=0)
    _, p, r = nnx.split(model, nnx.Param, ...)
    to_np = lambda t: jax.tree.map(np.asarray, nnx.to_pure_dict(t))  # noqa: E731
    mimi = save_model_checkpoint(root / "mimi", to_np(p), to_np(r), config=to_dict(cfg), kind="mimi")
    corpus = write_corpus(root / "corpus", train_docs=60, eval_docs=4)
    train_tokenizer([corpus["train"]], root / "spm", vocab_size=256)
    paths = synthesize_dialogues(root / "dialogues", 5, stereo=True, turns=4)
    return {"root": root, "mimi": str(mimi), "spm": str(root / "spm.model"), "dialogues": root / "dialogues",
            "paths": paths}


@pytest.fixture(scope="module")
def codec(env):
    from moshax.commands.data_prepare import MimiTokenizer

    return MimiTokenizer(env["mimi"], 8, chunk_seconds=4.0)


def _cfg(env, out, **kw):
    from data_pipeline.asr import AsrConfig

    transcripts = kw.pop("transcripts", str(env["dialogues"] / "truth"))
    base = dict(inputs=[str(env["dialogues"])], output=str(out), mimi_checkpoint=env["mimi"], tokenizer=env["spm"],
                stereo_split=True, asr=AsrConfig(transcripts=transcripts), record_seconds=8.0,
                files_per_shard=2, codec_batch_size=2, codec_chunk_seconds=4.0)
    base.update(kw)
    return PrepareConfig(**base)


def _run(cfg, codec):
    from data_pipeline.prepare import run_prepare

    return run_prepare(cfg, codec, progress=False, log=lambda m: None)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(env, codec):
    out = env["root"] / "prepared"
    summary = _run(_cfg(env, out), codec)
    assert summary["manifest"]
    return out


def test_records_hold_the_right_streams(env, codec, prepared):
    """Each record: the text stream of the main speaker's words (reference placement, word onsets in
    their frames) and Mimi codes of the left (main) and right (other) channels at that offset."""
    from data_pipeline.audio import read_audio
    from data_pipeline.token_shards import iter_records, read_manifest
    from data_pipeline.tokenizer import load_tokenizer

    manifest = read_manifest(prepared, verify=True)
    assert manifest["kind"] == "multistream" and manifest["record"]["shape"] == [17, None]
    assert manifest["stats"]["files"] == 5 and manifest["stats"]["files_failed"] == 0 and not manifest["errors"]
    assert len(manifest["shards"]) == 3  # 5 files, 2 per shard
    metas = [json.loads(line) for s in manifest["shards"] for line in (prepared / s["metadata"]).read_text().splitlines()]
    records = list(iter_records(prepared))
    assert len(records) == len(metas) == manifest["total_records"]
    encode = encoder_for(load_tokenizer(env["spm"]))
    checked = 0
    for rec, meta in zip(records, metas):
        assert rec.dtype == np.int32 and rec.shape[0] == 17 and rec.shape[1] <= 100
        src = Path(meta["source"])
        truth = json.loads((env["dialogues"] / "truth" / f"{src.stem}.meta.json").read_text())
        words = [w for w in read_words(env["dialogues"] / "truth" / f"{src.stem}.json")
                 if w.speaker == truth["main_speaker"]]
        audio = read_audio(src, 24000, mono=False)
        full_text = text_stream(words, audio.shape[-1] / 24000, encode)
        f0 = int(round(meta["offset"] * 12.5))
        np.testing.assert_array_equal(rec[0], full_text[f0:f0 + rec.shape[1]])
        if meta["offset"] == 0:  # the first record of a file: codes of each channel alone
            n = rec.shape[1] * 1920
            for row, ch in ((slice(1, 9), 0), (slice(9, 17), 1)):
                want = codec.runner.encode(np.pad(audio[ch, :n], (0, max(0, n - audio.shape[-1]))))
                np.testing.assert_array_equal(rec[row], want[:, : rec.shape[1]])
            checked += 1
        # word onsets land in the frame of their start time (or the next free one)
        onsets = [int(np.floor(w.start * 12.5)) - f0 for w in words if f0 <= w.start * 12.5 < f0 + rec.shape[1]]
        for t in onsets:
            assert rec[0, t] not in (0, 3) or rec[0, t + 1] not in (0, 3)
    assert checked == 5
    stats = manifest["stats"]
    assert 0 < stats["pad_ratio"] < 1 and stats["hours_out"] > 0.9 * stats["hours_in"]
    assert manifest["pipeline"]["stereo_split"] and manifest["codec"]["name"] == "mimi"


def test_rerun_skips_and_resumes_byte_identical(env, codec, prepared, tmp_path):
    """A rerun of a finished job writes nothing; a job interrupted mid-way (a shard's temporaries
    left, a later shard never written) resumes to the same bytes."""
    before = _files(prepared)
    summary = _run(_cfg(env, prepared), codec)
    assert summary["shards_written"] == 0 and summary["shards_skipped"] == 3
    assert _files(prepared) == before
    partial = tmp_path / "partial"
    shutil.copytree(prepared, partial)
    (partial / "manifest.json").unlink()
    (partial / "tokens-00002.json").unlink()  # the summary is the commit marker: shard 2 is unfinished
    (partial / "tokens-00001.json").rename(partial / "tokens-00001.json.tmp")
    (partial / "tokens-00001.array_record").rename(partial / "tokens-00001.array_record.tmp")
    summary = _run(_cfg(env, partial), codec)
    assert summary["shards_written"] == 2
    assert _files(partial) == before


def test_two_hosts_write_disjoint_shards_whose_union_is_one_hosts(env, codec, prepared, tmp_path):
    out = tmp_path / "hosts"
    s1 = _run(_cfg(env, out, worker_index=1, num_worker_hosts=2), codec)
    assert not s1["manifest"] and not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.array_record")) == ["tokens-00001.array_record"]
    s0 = _run(_cfg(env, out, worker_index=0, num_worker_hosts=2), codec)
    assert s0["manifest"] and s0["shards_written"] == 2
    assert _files(out) == _files(prepared)


def test_other_settings_into_the_same_output_are_refused(env, codec, prepared):
    from data_pipeline.errors import DataError

    with pytest.raises(DataError, match="prepared with other settings.*record_seconds"):
        _run(_cfg(env, prepared, record_seconds=5.0), codec)


def _bad_inputs(env, folder: Path) -> dict[str, str]:
    """Every kind of bad input beside two good files; returns {file name: expected stage}."""
    from scipy.io import wavfile

    from data_pipeline.audio import read_audio, write_wav

    folder.mkdir()
    truth = folder / "truth"
    truth.mkdir()
    good = [env["paths"][0], env["paths"][1]]
    for p in good:
        shutil.copy(p, folder / p.name)
        shutil.copy(env["dialogues"] / "truth" / f"{p.stem}.json", truth / f"{p.stem}.json")
    audio = read_audio(good[0], 24000, mono=False)
    expected = {}
    raw = (folder / good[0].name).read_bytes()
    (folder / "truncated.wav").write_bytes(raw[: len(raw) // 2])
    expected["truncated.wav"] = "decode"
    (folder / "empty.wav").write_bytes(b"")
    expected["empty.wav"] = "decode"
    (folder / "text.wav").write_text("this is not audio\n" * 100)
    expected["text.wav"] = "decode"
    write_wav(folder / "one-second.wav", np.stack([audio[0, :24000], audio[1, :24000]]), 24000)
    expected["one-second.wav"] = None  # short but usable: one record of 13 frames
    write_wav(folder / "short.wav", audio[:, :12000], 24000)
    expected["short.wav"] = "decode"  # 0.5 s < min_seconds
    from data_pipeline.audio import resample

    write_wav(folder / "hi-rate.wav", resample(audio, 24000, 48000), 48000)  # 48 kHz stereo: resampled
    expected["hi-rate.wav"] = None
    write_wav(folder / "mono.wav", audio[0], 24000)
    expected["mono.wav"] = "decode"  # --stereo-split needs two channels
    nan = audio.T.copy()
    nan[100:200] = np.nan
    wavfile.write(folder / "nans.wav", 24000, nan.astype(np.float32))
    expected["nans.wav"] = "decode"
    write_wav(folder / "silent.wav", np.zeros((2, 24000 * 3), np.float32), 24000)
    expected["silent.wav"] = "vad"
    shutil.copy(good[0], folder / "badjson.wav")
    (truth / "badjson.json").write_text("{not json")
    expected["badjson.wav"] = "transcribe"
    shutil.copy(good[0], folder / "late.wav")
    (truth / "late.json").write_text(json.dumps({"alignments": [["hello", [900.0, 901.0], "A"]]}))
    expected["late.wav"] = "transcribe"
    for p in good:
        expected[p.name] = None
    return expected


def test_bad_inputs_end_in_errors_good_ones_in_shards(env, codec, tmp_path):
    from data_pipeline.token_shards import read_manifest

    expected = _bad_inputs(env, tmp_path / "in")
    cfg = _cfg(env, tmp_path / "out", inputs=[str(tmp_path / "in")], transcripts=str(tmp_path / "in" / "truth"),
               files_per_shard=4)
    summary = _run(cfg, codec)
    assert summary["manifest"]
    manifest = read_manifest(tmp_path / "out", verify=True)
    errors = {Path(e["file"]).name: e for e in manifest["errors"]}
    for name, stage in expected.items():
        if stage is None:
            assert name not in errors, errors.get(name)
        else:
            assert errors[name]["stage"] == stage, errors[name]
            assert "\n" not in errors[name]["reason"] and Path(name).stem in errors[name]["reason"]
    sources = set()
    for s in manifest["shards"]:
        sources |= {Path(json.loads(line)["source"]).name for line in (tmp_path / "out" / s["metadata"]).read_text().splitlines()}
    assert sources == {n for n, st in expected.items() if st is None}
    assert manifest["stats"]["files"] == len(expected)
    assert manifest["stats"]["failed_by_stage"] == {"decode": 6, "transcribe": 2, "vad": 1}
    # --retry-errors redoes the shards with failures; fixed inputs then land in the shards
    (tmp_path / "in" / "truth" / "badjson.json").write_text(json.dumps({"alignments": []}))
    summary = _run(dataclasses.replace(cfg, retry_errors=True), codec)
    manifest = read_manifest(tmp_path / "out", verify=True)
    assert "badjson.wav" not in {Path(e["file"]).name for e in manifest["errors"]}
    assert manifest["stats"]["failed_by_stage"] == {"decode": 6, "transcribe": 1, "vad": 1}


def test_loader_crops_deterministic_and_resumable(prepared):
    from data_pipeline.shard_loader import make_shard_iterator

    def batches(it, n):
        return [next(it)["codes"].copy() for _ in range(n)]

    kw = dict(split="train", global_batch_size=4, seed=3, field="codes", crop_frames=40)
    a = make_shard_iterator(prepared, **kw)
    first = batches(a, 3)
    assert all(b.shape == (4, 17, 40) for b in first)
    b = make_shard_iterator(prepared, **kw)
    np.testing.assert_array_equal(np.stack(batches(b, 3)), np.stack(first))
    state = a.get_state()
    nxt = batches(a, 2)
    c = make_shard_iterator(prepared, **kw)
    c.set_state(state)
    np.testing.assert_array_equal(np.stack(batches(c, 2)), np.stack(nxt))
    # windows are crops of real records; records shorter than the window are padded with -1
    long = make_shard_iterator(prepared, **{**kw, "crop_frames": 120})
    x = next(long)["codes"]
    assert (x[:, :, -1] == -1).all() and (x[:, 1:, 0] >= 0).all()
    # per-process shares of a global batch are disjoint and cover it
    p0 = make_shard_iterator(prepared, **kw, process_index=0, process_count=2)
    p1 = make_shard_iterator(prepared, **kw, process_index=1, process_count=2)
    got = np.concatenate([next(p0)["codes"], next(p1)["codes"]])
    assert sorted(map(bytes, got)) == sorted(map(bytes, first[0]))


def test_cli_prepare_inspect_and_one_line_errors(env, prepared, tmp_path, capsys):
    """The commands: prepare from the YAML + flags + key=value (2 worker processes), inspect (hashes, stats, --decode to wav + text),
    and user mistakes as one line with exit 2."""
    from moshax.cli import main

    out = tmp_path / "cli"
    config = str(Path(__file__).resolve().parents[1] / "configs" / "data" / "prepare.yaml")  # num_workers: 2
    rc = main(["data", "prepare", "--config", config, "--input", str(env["dialogues"]), "--output", str(out),
               "--mimi-checkpoint",
               env["mimi"], "--tokenizer", env["spm"], "--stereo-split", "--transcripts",
               str(env["dialogues"] / "truth"), "--files-per-shard", "2", "--no-progress", "record_seconds=8",
               "codec_batch_size=2", "codec_chunk_seconds=4"])
    assert rc == 0
    # same settings through the CLI (and 2 Grain worker processes) as through the API: same bytes
    assert _files(out) == {k: v for k, v in _files(prepared).items()}
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--decode", "2", "--output", str(tmp_path / "listen")]) == 0
    text = capsys.readouterr().out
    assert "sha256 verified" in text and "files: 5 in, 0 failed" in text
    wav = tmp_path / "listen" / "record-00000.wav"
    from data_pipeline.audio import read_audio

    assert read_audio(wav, None, mono=False).shape[0] == 2
    assert "words: " in (tmp_path / "listen" / "record-00000.txt").read_text()
    # corrupt a shard: inspect says which one, in one line
    shard = out / "tokens-00001.array_record"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    assert main(["data", "inspect", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokens-00001.array_record: sha256 does not match" in err[0]
    for argv, msg in (
        (["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"), "--mimi-checkpoint", env["mimi"]],
         "audio source not found"),
        (["--input", str(env["dialogues"]), "--output", str(tmp_path / "o"), "--mimi-checkpoint",
          str(tmp_path / "no-ckpt")], "mimi-checkpoint: not found"),
        (["--input", str(env["dialogues"]), "--output", str(tmp_path / "o"), "--mimi-checkpoint", env["mimi"],
          "record_seconds=-1"], "record_seconds=-1.0"),
        (["--input", str(env["dialogues"]), "--output", str(tmp_path / "o"), "--mimi-checkpoint", env["mimi"],
          "bogus=1"], "unknown config key 'bogus'"),
    ):
        assert main(["data", "prepare", "--no-progress", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


@pytest.mark.slow  # ~40 s: CI's slow suite runs it
def test_training_on_prepared_shards_lowers_the_losses(prepared, tmp_path):
    """What `make data-quickstart` does, small: a Moshi LM trains from prepared shards (whole
    recordings, cropped by the loader) and its text, semantic and acoustic losses fall."""
    from test_moshi_training import moshi_config, trainer_for

    cfg = moshi_config(prepared, data={"frames": 24, "eval_shards": str(prepared)},
                       model={"text_card": 256, "card": 64},
                       train={"steps": 60, "log_every": 10, "batch_size": 8},
                       optim={"learning_rate": 3e-3, "warmup_steps": 5}, checkpoint={"every": 1000})
    summary = trainer_for(cfg, tmp_path / "run", (1, 1, 1)).run()
    hist = [h for h in summary["history"] if "text" in h]
    first, last = hist[0], hist[-1]
    print({k: (round(first[k], 3), round(last[k], 3)) for k in ("text", "semantic", "acoustic")})
    for key in ("text", "semantic", "acoustic"):
        assert last[key] < 0.8 * first[key], key


def test_mono_mix_is_diarized_into_main_and_other_streams(env):
    """A mono conversation: VAD + diarization put the main speaker's voice in the main stream and
    the other voice in the other stream (truth: the same dialogue rendered in stereo)."""
    from data_pipeline.analyze import split_stage
    from data_pipeline.dialogue_synth import dialogue_plan, render_dialogue
    from data_pipeline.stage_models import StageModels

    d = render_dialogue(dialogue_plan(7, turns=6), seed=7, stereo=True)
    mix = d.audio.sum(axis=0, keepdims=True)
    cfg = PrepareConfig(inputs=["x"], output="x", mimi_checkpoint="x")
    cfg.diarization.num_speakers = 2
    parts = StageModels(cfg).build()
    streams = split_stage(mix, cfg, "dialogue", parts["vad"], parts["diarizer"])
    assert streams.split == "diarized" and len(streams.speakers) == 2 and 0.5 < streams.speech_ratio < 1.0
    left, right = d.audio  # truth: left = the main speaker alone

    def share(stream, truth):  # fraction of the stream's energy that is that voice
        return float(np.sum(stream * truth) / max(np.sum(stream * stream), 1e-9))

    assert share(streams.main, left) > 0.9 and share(streams.other, right) > 0.9
    assert np.sum(streams.main ** 2) > 0.8 * np.sum(left ** 2)  # and most of that voice is kept


def test_words_from_asr_and_forced_alignment(env, codec, tmp_path):
    """No word times given: a plain-text sidecar is force-aligned on the main stream; a file without
    a sidecar is transcribed (pocketsphinx). The records say where their words came from; the
    manifest names the recognizer."""
    from data_pipeline.asr import AsrConfig
    from data_pipeline.token_shards import iter_records, read_manifest

    src, side = tmp_path / "in", tmp_path / "txt"
    src.mkdir()
    side.mkdir()
    a, b = env["paths"][2], env["paths"][3]
    shutil.copy(a, src / a.name)
    shutil.copy(b, src / b.name)
    truth = env["dialogues"] / "truth"
    shutil.copy(truth / f"{a.stem}.txt", side / f"{a.stem}.txt")  # plain text, no times
    cfg = _cfg(env, tmp_path / "out", inputs=[str(src)], files_per_shard=4)
    cfg.asr = AsrConfig(engine="pocketsphinx", transcripts=str(side))
    _run(cfg, codec)
    manifest = read_manifest(tmp_path / "out", verify=True)
    assert not manifest["errors"] and manifest["asr"]["engine"]["engine"] == "pocketsphinx"
    metas = [json.loads(line) for line in (tmp_path / "out" / manifest["shards"][0]["metadata"]).read_text().splitlines()]
    by_file = {Path(m["source"]).name: m["words"] for m in metas}
    assert by_file == {a.name: "forced-alignment", b.name: "asr"}
    records = list(iter_records(tmp_path / "out"))
    for rec, meta in zip(records, metas):
        assert ((rec[0] != 3) & (rec[0] != 0)).any(), meta  # words were placed
    # forced alignment: the first word's first token lands within 2 frames of its true onset
    truth_meta = json.loads((truth / f"{a.stem}.meta.json").read_text())
    first = next(w for w in read_words(truth / f"{a.stem}.json") if w.speaker == truth_meta["main_speaker"])
    rec = records[[i for i, m in enumerate(metas) if Path(m["source"]).name == a.name][0]]
    onset = int(np.flatnonzero((rec[0] != 3) & (rec[0] != 0))[0])
    assert abs(onset - int(first.start * 12.5)) <= 2, (onset, first)
