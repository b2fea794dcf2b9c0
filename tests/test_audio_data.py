"""Audio I/O (read/resample/validate), the Grain crop loader (sharding, resume, teacher features)
and the eSpeak NG speech corpus."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from data_pipeline.audio import AudioError, list_audio_files, read_audio, write_wav
from data_pipeline.audio_loader import AudioDataConfig, Features, make_audio_iterator
from data_pipeline.errors import DataError

from requirements import require_binary

SR = 24000


def tone(seconds, sr, freq=440.0, channels=1):
    t = np.arange(int(round(seconds * sr))) / sr
    return np.stack([0.5 * np.sin(2 * np.pi * freq * t) * (1 - 0.5 * c) for c in range(channels)]).astype(np.float32)


def test_read_any_rate_and_channels(tmp_path):
    write_wav(tmp_path / "s.wav", tone(0.5, 44100, channels=2), 44100)
    x = read_audio(tmp_path / "s.wav", SR)
    assert x.shape == (1, 12000) and x.dtype == np.float32
    want = 0.75 * tone(0.5, SR)[0]  # mean of the two channels, resampled
    np.testing.assert_allclose(x[0, 200:-200], want[200:-200], atol=2e-3)
    assert read_audio(tmp_path / "s.wav", None, mono=False).shape == (2, 22050)
    full = read_audio(tmp_path / "s.wav", SR)
    win = read_audio(tmp_path / "s.wav", SR, start_sec=0.1, duration_sec=0.2)
    assert win.shape == (1, 4800)
    np.testing.assert_allclose(win[0], full[0, 2400:7200], atol=2e-3)
    tail = read_audio(tmp_path / "s.wav", SR, start_sec=0.45, duration_sec=0.2)  # past the end: zero-padded
    assert tail.shape == (1, 4800) and np.all(tail[0, 1300:] == 0)


def test_bad_files_raise_one_line_naming_the_file(tmp_path):
    from scipy.io import wavfile

    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.mp3").write_bytes(b"not audio" * 50)
    (tmp_path / "trunc.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")
    wavfile.write(tmp_path / "nan.wav", SR, np.array([0.0, np.nan, 0.1], np.float32))
    wavfile.write(tmp_path / "nosamples.wav", SR, np.zeros(0, np.int16))
    expect = {"empty.wav": "empty audio file", "junk.mp3": "cannot decode", "trunc.wav": "truncated wav",
              "nan.wav": "NaN", "nosamples.wav": "no audio samples", "missing.flac": "not found"}
    for name, msg in expect.items():
        with pytest.raises(AudioError) as e:
            read_audio(tmp_path / name, SR)
        text = str(e.value)
        assert text.startswith(str(tmp_path / name)) and msg in text and "\n" not in text, text


def _cut(src, dst, keep: int):
    dst.write_bytes(src.read_bytes()[:keep])
    return dst


def test_truncated_files_are_caught_against_the_header(tmp_path):
    """The issue: a wav whose header promises 150,400 data bytes with 956 present decoded to 0.02 s
    without complaint. Reads, windowed reads and durations all check the header now."""
    from data_pipeline.audio import audio_info, durations

    whole = tmp_path / "whole.wav"
    write_wav(whole, tone(75200 / SR, SR), SR)  # 150,400 data bytes after a 44-byte header
    cut = _cut(whole, tmp_path / "cut.wav", 1000)
    for read in (lambda p: read_audio(p, SR), lambda p: read_audio(p, SR, start_sec=0.0, duration_sec=0.5),
                 audio_info, lambda p: durations([str(whole), str(p)])):
        with pytest.raises(AudioError) as e:
            read(cut)
        text = str(e.value)
        assert text == f"{cut}: truncated wav: the header declares 150400 data bytes, 956 are present (0.6%)", text
    header_only = _cut(whole, tmp_path / "header_only.wav", 44)
    with pytest.raises(AudioError, match="declares 150400 data bytes, 0 are present"):
        read_audio(header_only, SR)
    no_data = _cut(whole, tmp_path / "no_data.wav", 36)  # ends after the fmt chunk
    with pytest.raises(AudioError, match="no_data.wav: truncated wav: the file ends before its data chunk"):
        read_audio(no_data, SR)
    # a whole file, with an odd trailing chunk after the data, still reads
    extra = tmp_path / "extra.wav"
    extra.write_bytes(whole.read_bytes() + b"LIST\x04\x00\x00\x00abcd")
    assert read_audio(extra, SR).shape == (1, 75200)
    assert read_audio(whole, SR).shape == (1, 75200) and durations([str(whole)]) == [75200 / SR]


def _crc8(data):
    crc = 0
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc

def _crc16(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc

def write_flac(path, samples, sample_rate, block=4096):
    """Mono 16-bit FLAC with verbatim subframes (no encoder needed)."""
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype(">i2")
    n = len(pcm)
    info = bytearray()
    info += block.to_bytes(2, "big") + block.to_bytes(2, "big") + bytes(6)
    packed = (sample_rate << 44) | (0 << 41) | (15 << 36) | n
    info += packed.to_bytes(8, "big") + bytes(16)
    out = bytearray(b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info)
    for i, start in enumerate(range(0, n, block)):
        chunk = pcm[start:start + block]
        full = len(chunk) == block
        hdr = bytearray([0xFF, 0xF8, (0b1100 if full else 0b0111) << 4, 0b0000_1000, i])
        if not full:
            hdr += (len(chunk) - 1).to_bytes(2, "big")
        hdr.append(_crc8(hdr))
        frame = hdr + bytes([0x02]) + chunk.tobytes()
        out += frame + _crc16(frame).to_bytes(2, "big")
    open(path, "wb").write(bytes(out))


def test_truncated_flac_is_caught_against_streaminfo(tmp_path):
    x = tone(1.25, SR)[0]
    whole = tmp_path / "a.flac"
    write_flac(whole, x, SR)
    np.testing.assert_allclose(read_audio(whole, SR)[0], x, atol=1e-4)
    cut = _cut(whole, tmp_path / "cut.flac", len(whole.read_bytes()) // 2)
    with pytest.raises(AudioError) as e:
        read_audio(cut, SR)
    assert str(e.value) == f"{cut}: truncated flac: the header declares 30000 samples, 12288 decode"


def test_list_audio_files(tmp_path):
    for p in ("a/1.wav", "a/b/2.flac", "a/notes.txt", "c/3.wav"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(b"x")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "c/3.wav", "duration": 1.0}) + "\n")
    got = list_audio_files([str(tmp_path / "a"), str(tmp_path / "c/*.wav"), str(tmp_path / "m.jsonl")])
    assert got == [str(tmp_path / "a/1.wav"), str(tmp_path / "a/b/2.flac"), str(tmp_path / "c/3.wav")]
    with pytest.raises(DataError, match="not found"):
        list_audio_files([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no audio files"):
        list_audio_files([str(tmp_path / "empty")])


@pytest.fixture(scope="module")
def ramps(tmp_path_factory):
    """Files whose sample values encode their position (x[n] = n / SR * 0.4) and whose 50 Hz
    teacher features encode the frame index, so crops can be checked for alignment."""
    from scipy.io import wavfile

    root = tmp_path_factory.mktemp("ramps")
    for i in range(6):
        n = int((1.0 + 0.25 * i) * SR)
        x = (np.arange(n) / SR * 0.4).astype(np.float32)
        wavfile.write(root / f"f{i}.wav", SR, x)  # float32 wav: positions survive exactly
        frames = n // 480
        feats = np.stack([np.arange(frames), np.full(frames, i)], axis=1).astype(np.float32)
        np.save(root / f"f{i}.npy", feats)
    return root


def _iter(root, **kw):
    cfg = AudioDataConfig(train_sources=[str(root)], eval_sources=[str(root)], crop_seconds=0.24)
    args = dict(split="train", global_batch_size=4, seed=0, sample_rate=SR, frame_size=1920)
    args.update(kw)
    return make_audio_iterator(cfg, **args)


def test_crops_are_aligned_with_teacher_features(ramps):
    it = _iter(ramps, features=Features(".npy", 50.0))
    for _ in range(3):
        b = next(it)
        assert b["audio"].shape == (4, 1, 5760) and b["teacher"].shape == (4, 12, 2)
        for audio, feats in zip(b["audio"][:, 0], b["teacher"]):
            start = int(round(audio[0] / 0.4 * SR))
            assert start % 480 == 0  # crops start on teacher frames
            np.testing.assert_allclose(audio[100], (start + 100) / SR * 0.4, atol=1e-6)
            np.testing.assert_array_equal(feats[:, 0], start // 480 + np.arange(12))
            assert len(set(feats[:, 1])) == 1  # one file


def test_resume_and_process_sharding(ramps):
    it = _iter(ramps)
    next(it)
    state = it.get_state()
    want = [next(it)["audio"] for _ in range(4)]
    again = _iter(ramps)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again)["audio"], w)
    # two processes: half the global batch each, disjoint shares (eval: one crop per file, in order)
    files = []
    for pi in range(2):
        it = _iter(ramps, split="eval", global_batch_size=2, process_index=pi, process_count=2,
                   features=Features(".npy", 50.0))
        batches = list(it)
        assert all(b["audio"].shape == (1, 1, 5760) for b in batches)
        files.append([int(b["teacher"][0, 0, 1]) for b in batches])
    assert files == [[0, 2, 4], [1, 3, 5]]


def test_eval_is_one_deterministic_pass(ramps):
    a = [b["audio"] for b in _iter(ramps, split="eval", global_batch_size=2)]
    b = [b["audio"] for b in _iter(ramps, split="eval", global_batch_size=2)]
    assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(x[i, 0, 0] == 0.0 for x in a for i in range(2))  # eval crops start at 0


def test_bad_training_files_fail_early_naming_them(ramps, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(ramps, root)
    (root / "f3.npy").unlink()
    with pytest.raises(DataError, match="f3.npy: teacher feature file missing"):
        _iter(root, features=Features(".npy", 50.0))
    np.save(root / "f3.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(DataError, match="f3.npy: 3 teacher frames"):
        _iter(root, features=Features(".npy", 50.0))
    (root / "f2.wav").write_bytes(b"RIFF garbage")
    with pytest.raises(DataError, match="f2.wav"):
        _iter(root)
    # a truncated wav fails the index (its header duration would have been used for crops)
    _cut(ramps / "f2.wav", root / "f2.wav", 200)
    with pytest.raises(DataError, match="f2.wav: truncated wav: the header declares"):
        _iter(root)
    with pytest.raises(DataError, match="do not tile"):
        _iter(ramps, features=Features(".npy", 7.0))


def test_speech_corpus_is_deterministic(tmp_path):
    require_binary("espeak-ng", "speech synthesis needs espeak-ng (apt-get install espeak-ng)")
    from data_pipeline.speech_synth import synthesize_corpus

    out = synthesize_corpus(tmp_path / "a", train=3, eval=1, seed=5)
    rows = [json.loads(line) for line in out["train"].read_text().splitlines()]
    assert len(rows) == 3 and len({r["voice"] for r in rows}) >= 2
    for r in rows:
        x = read_audio(tmp_path / "a/train" / r["path"], None)
        assert x.shape[1] / SR == pytest.approx(r["duration"], abs=1e-3) and r["duration"] > 0.5
        assert 0.05 < np.abs(x).max() <= 1.0
    again = synthesize_corpus(tmp_path / "b", train=3, eval=0, seed=5)
    digest = [hashlib.md5((p.parent / f"{i:05d}.wav").read_bytes()).hexdigest()
              for p in (out["train"], again["train"]) for i in range(3)]
    assert digest[:3] == digest[3:]
