"""Voice activity detection: Silero VAD's ONNX model run with onnxruntime, post-processed in numpy.

Why not ``silero_vad.get_speech_timestamps``: that imports torch and works on torch tensors; the
data pipeline runs in Grain workers where a light, picklable object is wanted. The model file is
the one shipped in the ``silero-vad`` wheel (``silero_vad/data/silero_vad.onnx``), found without
importing the package (its ``__init__`` imports torch).

Model contract (from the wheel's ``OnnxWrapper``): 16 kHz mono float32, chunks of 512 samples, each
fed with the last 64 samples of the previous chunk in front (576 in all), a recurrent ``state``
``[2, batch, 128]`` carried from chunk to chunk, and ``sr`` as an int64 scalar; the output is one
speech probability per 32 ms chunk.

Post-processing (same behaviour as ``get_speech_timestamps`` without a maximum speech length): a
region starts at a chunk whose probability is >= ``threshold``; it ends where the probability stays
below ``neg_threshold`` (default ``threshold - 0.15``) for ``min_silence_seconds``; regions not
longer than ``min_speech_seconds`` are dropped; each region is padded by ``speech_pad_seconds``
(a gap shorter than two pads is split in the middle).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.token_shards import sha256_file

VAD_RATE = 16000
CHUNK = 512  # samples per probability at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous chunk the model sees in front of each chunk
_INSTALL = "pip install onnxruntime silero-vad"


@dataclass
class VadConfig:
    """Thresholds of the speech/non-speech decision; ``model_path=""`` means the wheel's model."""

    threshold: float = 0.5
    neg_threshold: float | None = None  # None: max(threshold - 0.15, 0.01), as silero does
    min_speech_seconds: float = 0.25
    min_silence_seconds: float = 0.1
    speech_pad_seconds: float = 0.03
    model_path: str = ""
    threads: int = 1

    def validate(self) -> "VadConfig":
        if not 0.0 < self.threshold < 1.0:
            raise DataError(f"vad threshold={self.threshold}: must be between 0 and 1")
        if self.neg_threshold is not None and not 0.0 < self.neg_threshold <= self.threshold:
            raise DataError(f"vad neg_threshold={self.neg_threshold}: must be in (0, threshold={self.threshold}]")
        for name in ("min_speech_seconds", "min_silence_seconds", "speech_pad_seconds"):
            if getattr(self, name) < 0:
                raise DataError(f"vad {name}={getattr(self, name)}: must be >= 0")
        if self.threads < 1:
            raise DataError(f"vad threads={self.threads}: must be >= 1")
        if self.model_path and not os.path.isfile(self.model_path):
            raise DataError(f"vad model_path={self.model_path}: file not found")
        return self

    @property
    def exit_threshold(self) -> float:
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)


def wheel_model_path() -> Path:
    """``silero_vad/data/silero_vad.onnx`` in the installed wheel (the package is not imported)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"silero-vad is not installed (its ONNX model file is needed): {_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise DataError(f"{path}: Silero VAD model file missing from the silero-vad wheel; reinstall: {_INSTALL}")
    return path


class SileroVad:
    """Speech regions of mono audio. Picklable: the onnxruntime session is opened on first use and
    dropped when pickled (Grain workers reopen it)."""

    def __init__(self, cfg: VadConfig | None = None):
        self.cfg = (cfg or VadConfig()).validate()
        self.model_path = Path(self.cfg.model_path) if self.cfg.model_path else wheel_model_path()
        self._session = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_session"] = None
        return state

    def _open(self):
        if self._session is None:
            try:
                import onnxruntime
            except ImportError:
                raise DataError(f"onnxruntime is not installed (needed for voice activity detection): "
                                f"{_INSTALL}") from None
            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = self.cfg.threads
            opts.inter_op_num_threads = 1
            self._session = onnxruntime.InferenceSession(str(self.model_path), sess_options=opts,
                                                         providers=["CPUExecutionProvider"])
        return self._session

    def identity(self) -> dict:
        """What produced the regions, for manifests: the model file (name, sha256) and the thresholds."""
        return {"name": "silero-vad", "model_file": self.model_path.name, "model_sha256": sha256_file(self.model_path),
                **{k: v for k, v in asdict(self.cfg).items() if k not in ("model_path", "threads")},
                "neg_threshold": self.cfg.exit_threshold}

    def speech_probabilities(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """One speech probability per 32 ms chunk (512 samples at 16 kHz), float32 ``[chunks]``."""
        wav = _mono_16k(audio, sample_rate)
        n = wav.size
        chunks = -(-n // CHUNK)
        if chunks == 0:
            return np.zeros(0, np.float32)
        padded = np.zeros(CONTEXT + chunks * CHUNK, np.float32)
        padded[CONTEXT:CONTEXT + n] = wav
        session = self._open()
        state = np.zeros((2, 1, 128), np.float32)
        sr = np.array(VAD_RATE, np.int64)
        probs = np.empty(chunks, np.float32)
        for i in range(chunks):
            x = padded[None, i * CHUNK: i * CHUNK + CONTEXT + CHUNK]
            out, state = session.run(None, {"input": x, "state": state, "sr": sr})
            probs[i] = out[0, 0]
        return probs

    def regions(self, audio: np.ndarray, sample_rate: int) -> list[tuple[float, float]]:
        """Speech regions ``[(start, end), ...]`` in seconds, sorted, not overlapping."""
        probs = self.speech_probabilities(audio, sample_rate)
        n = int(round(np.asarray(audio).shape[-1] * VAD_RATE / sample_rate))
        return regions_from_probabilities(probs, n, self.cfg)


def _mono_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    from data_pipeline.audio import resample

    a = np.asarray(audio, np.float32)
    if a.ndim == 2:
        a = a.mean(axis=0)
    if a.ndim != 1:
        raise DataError(f"vad: expected mono audio [samples] or [channels, samples], got shape {a.shape}")
    if sample_rate <= 0:
        raise DataError(f"vad: invalid sample rate {sample_rate}")
    return resample(a, int(sample_rate), VAD_RATE)


def regions_from_probabilities(probs: np.ndarray, num_samples: int, cfg: VadConfig) -> list[tuple[float, float]]:
    """Silero's hysteresis + minimum durations + padding, on chunk probabilities at 16 kHz."""
    min_speech = VAD_RATE * cfg.min_speech_seconds
    min_silence = VAD_RATE * cfg.min_silence_seconds
    pad = VAD_RATE * cfg.speech_pad_seconds
    low = cfg.exit_threshold
    spans: list[list[int]] = []
    start = None
    silence_from = 0  # 0: no silence running (silero's temp_end)
    for i, p in enumerate(np.asarray(probs, np.float64)):
        t = i * CHUNK
        if p >= cfg.threshold:
            silence_from = 0
            if start is None:
                start = t
                continue
        if start is not None and p < low:
            if not silence_from:
                silence_from = t
            if t - silence_from >= min_silence:
                if silence_from - start > min_speech:
                    spans.append([start, silence_from])
                start, silence_from = None, 0
    if start is not None and num_samples - start > min_speech:
        spans.append([start, num_samples])
    for i, span in enumerate(spans):
        if i == 0:
            span[0] = int(max(0, span[0] - pad))
        if i + 1 < len(spans):
            gap = spans[i + 1][0] - span[1]
            if gap < 2 * pad:
                span[1] += int(gap // 2)
                spans[i + 1][0] = int(max(0, spans[i + 1][0] - gap // 2))
            else:
                span[1] = int(min(num_samples, span[1] + pad))
                spans[i + 1][0] = int(max(0, spans[i + 1][0] - pad))
        else:
            span[1] = int(min(num_samples, span[1] + pad))
    return [(round(s / VAD_RATE, 3), round(e / VAD_RATE, 3)) for s, e in spans]


def speech_ratio(regions: list[tuple[float, float]], duration: float) -> float:
    """Fraction of ``duration`` seconds covered by ``regions`` (0 for an empty file)."""
    if duration <= 0:
        return 0.0
    return min(1.0, sum(max(0.0, e - s) for s, e in regions) / duration)
