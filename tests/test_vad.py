"""Silero VAD (the wheel's ONNX model, onnxruntime) on an eSpeak NG dialogue with exact word times."""

import importlib.util
import pickle

import numpy as np
import pytest

from requirements import require_binary, require_module

from data_pipeline.errors import DataError
from data_pipeline.vad import VadConfig, regions_from_probabilities, speech_ratio


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory):
    require_binary("espeak-ng")
    from data_pipeline.audio import read_audio
    from data_pipeline.dialogue_synth import synthesize_dialogues
    from data_pipeline.text_stream import read_words

    (path,) = synthesize_dialogues(tmp_path_factory.mktemp("vad"), 1, seed=5, speakers=2, turns=4)
    return read_audio(path, None)[0], 24000, read_words(path.parent / "truth" / f"{path.stem}.json")


@pytest.fixture(scope="module")
def vad():
    require_module("onnxruntime")
    if importlib.util.find_spec("silero_vad") is None:  # found, not imported (its __init__ imports torch)
        require_module("silero_vad", "the silero-vad wheel ships the ONNX model")
    from data_pipeline.vad import SileroVad

    return SileroVad()


def _inside(words, regions) -> float:
    total = sum(w.end - w.start for w in words)
    return sum(max(0.0, min(w.end, e) - max(w.start, s)) for w in words for s, e in regions) / total


def test_regions_cover_the_spoken_words(vad, dialogue):
    audio, sr, words = dialogue
    regions = vad.regions(audio, sr)
    cover = _inside(words, regions)
    print(f"VAD: {len(regions)} regions cover {cover:.3f} of the truth word time")
    assert cover >= 0.9
    assert all(0 <= s < e <= audio.size / sr + 1e-3 for s, e in regions)
    assert all(a[1] <= b[0] for a, b in zip(regions, regions[1:]))
    ratio = speech_ratio(regions, audio.size / sr)
    assert 0.3 < ratio < 1.0


def test_silence_and_low_noise_have_no_speech(vad):
    rng = np.random.default_rng(0)
    assert vad.regions(np.zeros(16000 * 3, np.float32), 16000) == []
    assert vad.regions((0.002 * rng.standard_normal(24000 * 3)).astype(np.float32), 24000) == []
    probs = vad.speech_probabilities(np.zeros(16000, np.float32), 16000)
    assert probs.shape == (32,) and probs.max() < 0.2


def test_thresholds_change_the_regions(dialogue):
    from data_pipeline.vad import SileroVad

    audio, sr, _ = dialogue
    base = SileroVad().regions(audio, sr)
    strict = SileroVad(VadConfig(threshold=0.97)).regions(audio, sr)
    long_gaps = SileroVad(VadConfig(min_silence_seconds=1.0)).regions(audio, sr)
    long_speech = SileroVad(VadConfig(min_speech_seconds=60.0)).regions(audio, sr)
    assert sum(e - s for s, e in strict) < sum(e - s for s, e in base)
    assert len(long_gaps) < len(base)  # turns' short pauses no longer split regions
    assert long_speech == []


def test_pickles_without_the_session(vad, dialogue):
    audio, sr, _ = dialogue
    before = vad.regions(audio[: sr * 4], sr)
    assert vad._session is not None
    clone = pickle.loads(pickle.dumps(vad))
    assert clone._session is None
    assert clone.regions(audio[: sr * 4], sr) == before


def test_identity_names_the_model(vad):
    ident = vad.identity()
    assert ident["name"] == "silero-vad" and ident["model_file"] == "silero_vad.onnx"
    assert len(ident["model_sha256"]) == 64 and ident["threshold"] == 0.5 and ident["neg_threshold"] == 0.35


def test_post_processing_hysteresis_and_padding():
    """Chunk probabilities -> regions, as silero's get_speech_timestamps does (32 ms chunks)."""
    cfg = VadConfig(min_speech_seconds=0.1, min_silence_seconds=0.1, speech_pad_seconds=0.0)
    p = np.array([0.1] * 5 + [0.9] * 10 + [0.4] * 3 + [0.9] * 5 + [0.1] * 10 + [0.9] * 2 + [0.1] * 10)
    # 0.4 stays above neg_threshold (0.35): one region; the 2-chunk burst (64 ms) is too short
    assert regions_from_probabilities(p, p.size * 512, cfg) == [(5 * 0.032, 23 * 0.032)]
    padded = regions_from_probabilities(p, p.size * 512, VadConfig(min_speech_seconds=0.1))
    assert padded == [(round(5 * 0.032 - 0.03, 3), round(23 * 0.032 + 0.03, 3))]


@pytest.mark.parametrize("field, value", [("threshold", 1.5), ("min_silence_seconds", -1.0),
                                          ("neg_threshold", 0.9), ("model_path", "/nonexistent.onnx")])
def test_bad_config_is_one_line(field, value):
    with pytest.raises(DataError, match=field):
        VadConfig(**{field: value}).validate()


def test_missing_onnxruntime_is_one_line(monkeypatch):
    import sys

    from data_pipeline.vad import SileroVad

    vad = SileroVad()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(DataError, match="pip install onnxruntime"):
        vad.regions(np.zeros(1600, np.float32), 16000)
