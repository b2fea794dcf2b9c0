"""Audio files in and out: read (any sample rate and channel count), validate, resample, write.

* :func:`read_audio` decodes a file with ``sphn`` (wav, flac, mp3, ogg/vorbis; a ``.wav`` sphn cannot
  parse is retried with ``scipy.io.wavfile``), mixes it down to mono (mean of the channels),
  resamples it to the target rate with a polyphase filter (``scipy.signal.resample_poly``: zero
  phase, exact length ``round(n * sr_out / sr_in)``), and returns float32 ``[channels, samples]``.
  A window (``start_sec``, ``duration_sec``) is decoded with a small margin on each side so the
  resampling filter has context, then cut to the exact number of samples.
* Every failure a user can cause — missing, empty, truncated or non-audio file, no samples,
  NaN/Inf samples — raises :class:`AudioError` (a :class:`~data_pipeline.errors.DataError`)
  whose one-line message starts with the file's path.
* Truncation: decoders read what is there, so a cut file decodes to a short signal without
  complaint. Every read, probe and duration checks a RIFF/WAVE file's chunks against the file
  size first (the ``data`` chunk size the header declares vs the bytes present; a chunk that runs
  past the end). A whole-file read of a FLAC compares the decoded samples with STREAMINFO's total.
  Other formats (ogg, mp3) fail where the decoder reports an error (sphn: ``end of stream``).
* :func:`list_audio_files` expands directories (recursively), globs, single files and
  moshi-finetune ``.jsonl`` manifests (``{"path": ..., "duration": ...}`` per line) into files.
* :func:`write_wav` writes 16-bit PCM (samples clipped to [-1, 1]).
"""

from __future__ import annotations

import glob
import json
import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".oga", ".m4a", ".aac")
_MARGIN_SEC = 0.02  # decoded on each side of a window, for the resampling filter


class AudioError(DataError):
    """An audio file cannot be used; the message names the file."""


def _reason(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # sphn prefixes its messages with the quoted filename; the caller names the file itself.
    if msg.startswith('"') and '": ' in msg:
        msg = msg.split('": ', 1)[1]
    return msg


def _check_file(path: str) -> None:
    """Exists, is a file, not empty, and (RIFF/WAVE) holds every byte its header declares."""
    if not os.path.exists(path):
        raise AudioError(f"{path}: audio file not found")
    if os.path.isdir(path):
        raise AudioError(f"{path}: is a directory, not an audio file")
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise AudioError(f"{path}: cannot read audio file ({_reason(e)})") from None
    if size == 0:
        raise AudioError(f"{path}: empty audio file (0 bytes)")
    problem = _wav_truncation(path, size)
    if problem:
        raise AudioError(f"{path}: {problem}")


_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # streaming writers leave the data size 0 or -1 ("until the end")


def _wav_truncation(path: str, size: int) -> str | None:
    """Why a RIFF/WAVE file is truncated (None when it is whole, or not a plain RIFF/WAVE file).

    Walks the chunks: a ``data`` chunk that declares more bytes than the file has left, a chunk
    header cut short, or a file that ends before any ``data`` chunk. RF64 files and data sizes of
    0 or 0xFFFFFFFF (written while streaming, length unknown) are left to the decoder."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
                return None
            order = "little" if head[:4] == b"RIFF" else "big"
            pos = 12
            while True:
                if pos >= size:
                    return "truncated wav: the file ends before its data chunk"
                f.seek(pos)
                hdr = f.read(8)
                if len(hdr) < 8:
                    return f"truncated wav: the file ends inside a chunk header (byte {pos} of {size})"
                chunk, declared = hdr[:4], int.from_bytes(hdr[4:8], order)
                present = size - pos - 8
                if chunk == b"data":
                    if declared in _UNKNOWN_SIZES or present >= declared:
                        return None
                    return (f"truncated wav: the header declares {declared} data bytes, {present} are present "
                            f"({100.0 * present / declared:.1f}%)")
                if declared > present:
                    name = chunk.decode("latin-1")
                    return (f"corrupt or truncated wav: the {name!r} chunk declares {declared} bytes, "
                            f"{present} are present")
                pos += 8 + declared + (declared & 1)
    except OSError as e:
        raise AudioError(f"{path}: cannot read audio file ({_reason(e)})") from None


def _flac_total_samples(path: str) -> int | None:
    """STREAMINFO's total samples per channel (None: not FLAC, or the total is unknown/0)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4 + 4 + 34)
    except OSError:
        return None
    if len(head) < 42 or head[:4] != b"fLaC" or head[4] & 0x7F != 0:  # STREAMINFO is the first block
        return None
    info = head[8:42]
    total = int.from_bytes(info[13:18], "big") & ((1 << 36) - 1)
    return total or None


def _decode(path: str, start_sec: float | None, duration_sec: float | None) -> tuple[np.ndarray, int]:
    """float32 [channels, samples] at the file's own rate."""
    import sphn

    try:
        if start_sec is None and duration_sec is None:
            data, sr = sphn.read(path)
        else:
            data, sr = sphn.read(path, start_sec=start_sec, duration_sec=duration_sec)
        return np.asarray(data, np.float32), int(sr)
    except Exception as e:  # noqa: BLE001 - sphn raises ValueError/OSError with a reason
        first = e
    if path.lower().endswith(".wav"):
        try:
            return _decode_wav_scipy(path, start_sec, duration_sec)
        except Exception:  # noqa: BLE001
            pass
    raise AudioError(f"{path}: cannot decode audio ({_reason(first)})") from None


def _decode_wav_scipy(path: str, start_sec, duration_sec) -> tuple[np.ndarray, int]:
    from scipy.io import wavfile

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr, data = wavfile.read(path, mmap=True)
    data = np.asarray(data)
    if data.ndim == 1:
        data = data[:, None]
    if start_sec is not None or duration_sec is not None:
        start = int(round((start_sec or 0.0) * sr))
        stop = data.shape[0] if duration_sec is None else start + int(round(duration_sec * sr))
        data = data[start:stop]
    if data.dtype.kind == "i":
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    elif data.dtype.kind == "u":  # 8-bit PCM is unsigned, centred on 128
        data = (data.astype(np.float32) - 128.0) / 128.0
    return np.ascontiguousarray(data.T, np.float32), int(sr)


def resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Polyphase resampling along the last axis (zero phase; length ``round(n * dst / src)``)."""
    if src_rate == dst_rate:
        return np.asarray(audio, np.float32)
    from scipy.signal import resample_poly

    ratio = Fraction(int(dst_rate), int(src_rate))
    return resample_poly(audio, ratio.numerator, ratio.denominator, axis=-1).astype(np.float32)


def _seek_sample(t: float, sr: int) -> int:
    """The first sample sphn (symphonia) decodes for ``start_sec=t``: whole seconds and the
    fraction are converted separately (``floor(t * sr)`` differs when ``t * sr`` rounds up)."""
    whole = math.floor(t)
    return whole * sr + math.floor((t - whole) * sr)


def read_audio(path: str | os.PathLike, sample_rate: int | None = 24000, *, mono: bool = True,
               start_sec: float | None = None, duration_sec: float | None = None,
               num_samples: int | None = None) -> np.ndarray:
    """Decode ``path`` to float32 ``[channels, samples]`` (``[1, samples]`` when ``mono``) at
    ``sample_rate`` (None: the file's own rate).

    With ``start_sec`` / ``duration_sec`` only that window is returned; ``num_samples`` fixes the
    output length (zero-padded at the end if the file is shorter). Raises :class:`AudioError`
    naming the file for anything unreadable, empty or non-finite.
    """
    path = os.fspath(path)
    _check_file(path)
    windowed = start_sec is not None or duration_sec is not None
    margin = 0.0
    if windowed:
        start_sec = max(0.0, float(start_sec or 0.0))
        margin = min(_MARGIN_SEC, start_sec)
        dur = None if duration_sec is None else float(duration_sec) + margin + _MARGIN_SEC
        t_req = start_sec - margin
        try:
            data, sr = _decode(path, t_req, dur)
        except AudioError:
            # e.g. a seek past the end of a file whose header lies about its length: decode it
            # all and cut (raises again, with the reason, if the file itself is bad)
            data, sr = _decode(path, None, None)
            data = data[:, _seek_sample(t_req, sr):]
            if duration_sec is not None:
                data = data[:, : int(round(dur * sr))]
        # cut the output from the exact time the decoder started at
        offset = start_sec - _seek_sample(t_req, sr) / sr
    else:
        data, sr = _decode(path, None, None)
        declared = _flac_total_samples(path)
        if declared and data.ndim == 2 and data.shape[1] < declared:
            raise AudioError(f"{path}: truncated flac: the header declares {declared} samples, "
                             f"{data.shape[1]} decode")
    if data.ndim != 2 or data.shape[1] == 0:
        if windowed and data.ndim == 2 and data.shape[0] > 0:
            data = np.zeros((data.shape[0], 0), np.float32)  # window past the end: silence
        else:
            raise AudioError(f"{path}: no audio samples")
    if sr <= 0:
        raise AudioError(f"{path}: invalid sample rate {sr}")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    if mono and data.shape[0] > 1:
        data = data.mean(axis=0, keepdims=True)
    out_rate = sr if sample_rate is None else int(sample_rate)
    if data.shape[1]:
        data = resample(data, sr, out_rate)
    if windowed:
        data = data[:, int(round(offset * out_rate)):]
        if num_samples is None and duration_sec is not None:
            num_samples = int(round(float(duration_sec) * out_rate))
    if num_samples is not None:
        data = data[:, :num_samples]
        if data.shape[1] < num_samples:
            data = np.pad(data, ((0, 0), (0, num_samples - data.shape[1])))
    return np.ascontiguousarray(data, np.float32)


def audio_info(path: str | os.PathLike) -> float:
    """Duration in seconds (from the header when possible); :class:`AudioError` if unreadable or empty."""
    import sphn

    path = os.fspath(path)
    _check_file(path)
    try:
        (duration,) = sphn.durations([path])
    except Exception:  # noqa: BLE001
        duration = None
    if duration is None:  # sphn could not probe it: decode (raises with the reason)
        data, sr = _decode(path, None, None)
        duration = data.shape[-1] / sr if data.ndim == 2 else 0.0
    if not duration or duration <= 0 or not math.isfinite(duration):
        raise AudioError(f"{path}: no audio samples (duration {duration})")
    return float(duration)


def durations(paths: list[str]) -> list[float]:
    """Durations of many files (one sphn call); the first unusable file raises :class:`AudioError`."""
    import sphn

    paths = [os.fspath(p) for p in paths]
    for p in paths:
        _check_file(p)
    try:
        out = list(sphn.durations(paths)) if paths else []
    except Exception:  # noqa: BLE001
        out = [None] * len(paths)
    result = []
    for p, d in zip(paths, out):
        if d is None or not d > 0:
            d = audio_info(p)  # raises naming the file
        result.append(float(d))
    return result


def list_audio_files(specs: list[str] | str, extensions: tuple[str, ...] = AUDIO_EXTENSIONS) -> list[str]:
    """Files named by ``specs``: directories (searched recursively for ``extensions``), globs,
    single files, or ``.jsonl`` manifests with a ``path`` per line (relative to the manifest).
    Sorted within each spec, specs in order, duplicates dropped; :class:`DataError` if a spec
    matches nothing."""
    if isinstance(specs, str):
        specs = [specs]
    out: list[str] = []
    for spec in specs:
        spec = os.path.expanduser(str(spec))
        found: list[str]
        if os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        elif spec.endswith(".jsonl") and os.path.isfile(spec):
            found = _manifest_paths(spec)
        elif os.path.isfile(spec):
            found = [spec]
        elif any(c in spec for c in "*?["):
            found = sorted(p for p in glob.glob(spec, recursive=True)
                           if os.path.isfile(p) and Path(p).suffix.lower() in extensions)
        else:
            raise DataError(f"audio source not found: {spec}")
        if not found:
            raise DataError(f"audio source {spec} has no audio files ({', '.join(extensions)})")
        out.extend(found)
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _manifest_paths(manifest: str) -> list[str]:
    root = Path(manifest).parent
    paths = []
    with open(manifest) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                p = item["path"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{manifest}:{n}: expected a JSON object with a \"path\"") from None
            paths.append(str(p if os.path.isabs(p) else root / p))
    return paths


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono ``[samples]`` / ``[1, samples]`` (or ``[channels, samples]``) as 16-bit PCM."""
    from scipy.io import wavfile

    a = np.asarray(audio, np.float32)
    if a.ndim == 1:
        a = a[None]
    pcm = np.round(np.clip(a, -1.0, 1.0) * 32767.0).astype(np.int16)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    wavfile.write(os.fspath(path), int(sample_rate), pcm.T if pcm.shape[0] > 1 else pcm[0])
