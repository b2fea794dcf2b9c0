"""Speaker embeddings: Resemblyzer's GE2E voice encoder run in numpy.

Why numpy: the encoder is small (3-layer LSTM, 256 hidden, 40 mel bands in; linear 256->256, ReLU,
L2 norm out) and a batch of windows runs fast on one CPU core, so the pipeline needs neither torch
nor librosa at run time. torch is used once, to read the weights (``resemblyzer/pretrained.pt``
from the installed wheel, ``torch.load(..., weights_only=True)``).

Features are Resemblyzer's (``resemblyzer/audio.py``, ``hparams.py``): 16 kHz, volume raised (never
lowered) to -30 dBFS, then ``librosa.feature.melspectrogram`` with its defaults: 400-sample (25 ms)
periodic Hann window, 160-sample (10 ms) hop, centred frames (zero padding, librosa >= 0.10), power
spectrum, 40 Slaney mel bands with Slaney area normalisation, no log.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError

RATE = 16000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 40
HIDDEN = 256
LAYERS = 3
NORM_DBFS = -30.0
_INSTALL = "pip install torch resemblyzer --no-deps"


# ----------------------------------------------------------------------------- features


def _hz_to_mel(f):
    """Slaney mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mel = f / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mel)


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sample_rate: int = RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` triangles on the Slaney mel scale, area-normalised (librosa's
    ``filters.mel(sr, n_fft, n_mels)`` with its defaults)."""
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2.0), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights.astype(np.float32)


_FILTERS = None


def mel_frames(wav16k: np.ndarray) -> np.ndarray:
    """Resemblyzer's mel spectrogram of a 16 kHz waveform: float32 ``[frames, 40]``,
    ``frames = 1 + len // 160``."""
    global _FILTERS
    if _FILTERS is None:
        _FILTERS = mel_filterbank()
    x = np.pad(np.asarray(wav16k, np.float32), N_FFT // 2)
    n = 1 + (x.size - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n)[:, None]
    window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann
    spec = np.abs(np.fft.rfft(x[idx] * window, axis=-1)) ** 2
    return (spec @ _FILTERS.T).astype(np.float32)


def normalize_volume(wav: np.ndarray, target_dbfs: float = NORM_DBFS) -> np.ndarray:
    """Raise (never lower) the level to ``target_dbfs`` RMS, as Resemblyzer's preprocessing does."""
    wav = np.asarray(wav, np.float32)
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if wav.size else 0.0
    if rms <= 0.0:
        return wav
    change = target_dbfs - 20.0 * np.log10(rms)
    return wav if change < 0 else wav * np.float32(10.0 ** (change / 20.0))


# ----------------------------------------------------------------------------- encoder


def wheel_weights_path() -> Path:
    """``resemblyzer/pretrained.pt`` in the installed wheel (the package itself is not imported:
    it needs librosa and webrtcvad)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"resemblyzer is not installed (its speaker encoder weights are needed): {_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained.pt"
    if not path.is_file():
        raise DataError(f"{path}: speaker encoder weights missing from the resemblyzer wheel; reinstall: {_INSTALL}")
    return path


def load_weights(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """The encoder's state dict as float32 numpy arrays (``lstm.*``, ``linear.*``)."""
    path = Path(path) if path else wheel_weights_path()
    try:
        import torch
    except ImportError:
        raise DataError(f"torch is needed to read the speaker encoder weights {path.name}: {_INSTALL}") from None
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user-fixable problem
        raise DataError(f"{path}: cannot read speaker encoder weights ({type(e).__name__}: {e})") from None
    state = checkpoint.get("model_state", checkpoint)
    weights = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items()
               if k.startswith(("lstm.", "linear."))}
    need = [f"lstm.{w}_l{i}" for i in range(LAYERS) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    missing = [k for k in need + ["linear.weight", "linear.bias"] if k not in weights]
    if missing:
        raise DataError(f"{path}: not a Resemblyzer encoder checkpoint (missing {', '.join(missing[:3])})")
    return weights


def _one_blas_thread():
    """Small matmuls run fastest on one BLAS thread (threads contend on a busy machine); a no-op
    without threadpoolctl (it comes with scikit-learn)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class SpeakerEncoder:
    """GE2E d-vectors (256-d, L2-normalised) of audio windows. Picklable (plain numpy weights,
    loaded on first use)."""

    def __init__(self, weights_path: str | Path | None = None):
        self.weights_path = str(weights_path) if weights_path else ""
        self._w: dict[str, np.ndarray] | None = None

    @property
    def weights(self) -> dict[str, np.ndarray]:
        if self._w is None:
            self._w = load_weights(self.weights_path or None)
        return self._w

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_w"] = None
        return state

    def embed_mels(self, mels: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """``[batch, frames, 40]`` mel frames -> ``[batch, 256]`` embeddings (the LSTM's last hidden
        state of the top layer, linear, ReLU, L2 norm; PyTorch's gate order i, f, g, o).

        ``lengths``: frames of each item when shorter ones are zero-padded at the end; an item's
        embedding is then the top layer's state at its own last frame (exact: a step only sees
        the frames before it), so windows of any lengths share one batch."""
        w = self.weights
        x = np.asarray(mels, np.float32)
        if x.ndim != 3 or x.shape[-1] != N_MELS:
            raise DataError(f"speaker encoder: expected mel frames [batch, frames, {N_MELS}], got {x.shape}")
        batch, frames, _ = x.shape
        last = np.full(batch, frames - 1) if lengths is None else np.asarray(lengths, int) - 1
        if frames == 0 or last.min() < 0:
            raise DataError("speaker encoder: an input has no mel frames")
        final = np.zeros((batch, HIDDEN), np.float32)
        with _one_blas_thread():
            for layer in range(LAYERS):
                top = layer == LAYERS - 1
                w_hh_t = np.ascontiguousarray(w[f"lstm.weight_hh_l{layer}"].T)
                bias = w[f"lstm.bias_ih_l{layer}"] + w[f"lstm.bias_hh_l{layer}"]
                pre = x @ w[f"lstm.weight_ih_l{layer}"].T + bias  # the input part of every step at once
                h = np.zeros((batch, HIDDEN), np.float32)
                c = np.zeros((batch, HIDDEN), np.float32)
                out = None if top else np.empty((batch, frames, HIDDEN), np.float32)
                for t in range(int(last.max()) + 1):
                    g = pre[:, t] + h @ w_hh_t
                    i, f = _sigmoid(g[:, :HIDDEN]), _sigmoid(g[:, HIDDEN:2 * HIDDEN])
                    cell, o = np.tanh(g[:, 2 * HIDDEN:3 * HIDDEN]), _sigmoid(g[:, 3 * HIDDEN:])
                    c = f * c + i * cell
                    h = o * np.tanh(c)
                    if top:
                        done = last == t
                        final[done] = h[done]
                    else:
                        out[:, t] = h
                x = out
            raw = np.maximum(final @ w["linear.weight"].T + w["linear.bias"], 0.0)
        norm = np.linalg.norm(raw, axis=1, keepdims=True)
        return (raw / np.maximum(norm, 1e-12)).astype(np.float32)

    def embed_windows(self, wav16k: np.ndarray, spans: list[tuple[int, int]], batch: int = 32) -> np.ndarray:
        """Embeddings ``[len(spans), 256]`` of sample spans ``(start, end)`` of one 16 kHz waveform
        (already volume-normalised), in batches of similar lengths."""
        out = np.zeros((len(spans), HIDDEN), np.float32)
        mels = [mel_frames(wav16k[int(s):int(e)]) for s, e in spans]
        order = sorted(range(len(spans)), key=lambda k: mels[k].shape[0])
        for b in range(0, len(order), batch):
            part = order[b:b + batch]
            lengths = np.array([mels[k].shape[0] for k in part])
            padded = np.zeros((len(part), int(lengths.max()), N_MELS), np.float32)
            for j, k in enumerate(part):
                padded[j, :lengths[j]] = mels[k]
            out[part] = self.embed_mels(padded, lengths)
        return out

    def embed_utterance(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """One embedding of a whole utterance: the normalised mean of 1.6 s windows, half
        overlapping (Resemblyzer's ``embed_utterance``, roughly)."""
        from data_pipeline.audio import resample

        wav = normalize_volume(resample(np.asarray(audio, np.float32).reshape(-1), int(sample_rate), RATE))
        size, hop = 160 * HOP, 80 * HOP
        if wav.size < size:
            wav = np.pad(wav, (0, size - wav.size))
        spans = [(s, s + size) for s in range(0, wav.size - size + 1, hop)]
        e = self.embed_windows(wav, spans).mean(axis=0)
        return e / max(float(np.linalg.norm(e)), 1e-12)
