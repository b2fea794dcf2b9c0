"""The CPU stages of ``moshax data prepare``, one plain function each, and :class:`FileAnalyzer`
that chains them for one file (what a Grain worker process runs; the fleet job calls the same
functions).

decode -> split (stereo channels, or VAD + diarization of a mono mix) -> words (sidecar, forced
alignment or ASR on the main stream) -> text stream -> records (cut at ``record_seconds``).

A file that cannot be used never raises out of :class:`FileAnalyzer`: it returns a
:class:`FileResult` whose ``error`` names the stage and the one-line reason, which ends up in the
manifest's ``errors``.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.audio import read_audio
from data_pipeline.errors import DataError
from data_pipeline.prepare_config import PrepareConfig
from data_pipeline.prepare_plan import FileItem
from data_pipeline.text_stream import FRAME_RATE, Word, encoder_for, talk_time, text_stream

SAMPLE_RATE = 24000
STAGES = ("decode", "vad", "diarize", "transcribe", "align", "tokenize", "write")


class StageError(DataError):
    """A file failed at ``stage`` (one of :data:`STAGES`)."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


@dataclass
class Streams:
    """The two sides of a conversation at the codec's rate: ``main`` (Moshi's voice) and ``other``
    (the user's; None when there is no other side)."""

    main: np.ndarray
    other: np.ndarray | None
    split: str  # "stereo" | "diarized" | "single"
    speech_ratio: float = 1.0
    speakers: dict = field(default_factory=dict)  # speaker -> talk seconds
    main_speaker: str = ""

    @property
    def duration(self) -> float:
        return self.main.shape[-1] / SAMPLE_RATE


@dataclass
class Segment:
    """One record before the codec: audio of ``frames`` frames (zero-padded), its text row, metadata."""

    main: np.ndarray
    other: np.ndarray | None
    text: np.ndarray
    meta: dict


@dataclass
class FileResult:
    item: FileItem
    segments: list[Segment] = field(default_factory=list)
    error: dict | None = None  # {"file", "stage", "reason"}
    duration: float = 0.0
    speech_seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def decode_stage(path: str, cfg: PrepareConfig) -> np.ndarray:
    """``[channels, samples]`` float32 at 24 kHz (stereo kept for ``stereo_split``)."""
    try:
        audio = read_audio(path, SAMPLE_RATE, mono=not cfg.stereo_split)
    except DataError as e:
        raise StageError("decode", str(e)) from None
    duration = audio.shape[-1] / SAMPLE_RATE
    if duration < cfg.min_seconds:
        raise StageError("decode", f"{path}: {duration:.2f} s of audio, shorter than min_seconds={cfg.min_seconds}")
    if cfg.stereo_split and audio.shape[0] != 2:
        raise StageError("decode", f"{path}: {audio.shape[0]} channel(s), but --stereo-split needs stereo "
                                   "(left: main speaker, right: the other side)")
    return audio


def split_stage(audio: np.ndarray, cfg: PrepareConfig, path: str, vad=None, diarizer=None) -> Streams:
    """Stereo: left/right. Mono: voice activity, then (with a diarizer) speakers -> main/other."""
    mono = audio.mean(axis=0)
    regions = None
    speech_ratio = 1.0
    if vad is not None:
        try:
            regions = vad.regions(mono, SAMPLE_RATE)
        except DataError as e:
            raise StageError("vad", f"{path}: {e}") from None
        speech = sum(e - s for s, e in regions)
        speech_ratio = speech / max(mono.shape[-1] / SAMPLE_RATE, 1e-9)
        if not regions or speech_ratio < cfg.min_speech_ratio:
            raise StageError("vad", f"{path}: no speech found (voiced {speech_ratio:.1%} of the audio)")
    if cfg.stereo_split:
        return Streams(audio[0], audio[1], "stereo", speech_ratio)
    if diarizer is None:
        return Streams(mono, None, "single", speech_ratio)
    try:
        result = diarizer.diarize(mono, SAMPLE_RATE, regions)
        main, other = diarizer.split(mono, SAMPLE_RATE, result)
    except DataError as e:
        raise StageError("diarize", f"{path}: {e}") from None
    return Streams(main, other, "diarized", speech_ratio, dict(result.talk_time), result.main_speaker)


def main_speaker_words(words: list[Word]) -> list[Word]:
    """A sidecar with several speakers: the words of the one who talks longest (the main speaker,
    the same rule diarization uses)."""
    from data_pipeline.diarize import DiarizationConfig, pick_main_speaker

    talk = talk_time(words)
    if len(talk) <= 1:
        return words
    main = pick_main_speaker(talk, DiarizationConfig())
    return [w for w in words if w.speaker == main]


def words_stage(path: str, streams: Streams, cfg: PrepareConfig, transcriber=None) -> tuple[list[Word] | None, str]:
    """The main speaker's words with times, and where they came from: a sidecar in
    ``asr.transcripts`` (``STEM.json`` word times; ``STEM.txt`` force-aligned on the main stream),
    else the recognizer on the main stream, else none."""
    from data_pipeline.transcripts import find_sidecar, sidecar_words

    if cfg.asr.transcripts:
        side = find_sidecar(path, cfg.asr.transcripts)
        if side is not None:
            stage = "transcribe" if side.suffix == ".json" else "align"
            try:
                words = sidecar_words(path, cfg.asr.transcripts, streams.duration,
                                      audio=(streams.main, SAMPLE_RATE))
            except DataError as e:
                raise StageError(stage, str(e)) from None
            if side.suffix == ".json":
                return main_speaker_words(words), "sidecar"
            return words, "forced-alignment"
    if transcriber is not None:
        try:
            return transcriber.transcribe(streams.main, SAMPLE_RATE), "asr"
        except DataError as e:
            raise StageError("transcribe", f"{path}: {e}") from None
    return None, "none"


def text_stage(words: list[Word] | None, duration: float, cfg: PrepareConfig, encode) -> np.ndarray:
    if words is not None and encode is None:
        raise StageError("align", "words found but no tokenizer: set --tokenizer to a sentencepiece .model")
    return text_stream(words, duration, encode, no_words=cfg.no_words, audio_delay=cfg.text_delay)


def segment_stage(streams: Streams, text: np.ndarray, cfg: PrepareConfig, meta: dict) -> list[Segment]:
    """Cut at ``record_seconds`` (whole frames); a trailing piece shorter than ``min_seconds`` is
    dropped. Audio is zero-padded to whole frames."""
    frame_size = int(SAMPLE_RATE / FRAME_RATE)
    total = text.shape[0]
    per = max(1, int(cfg.record_seconds * FRAME_RATE))
    min_frames = math.ceil(cfg.min_seconds * FRAME_RATE - 1e-9)
    out = []
    for start in range(0, total, per):
        n = min(per, total - start)
        if out and n < min_frames:
            break
        lo, hi = start * frame_size, (start + n) * frame_size

        def cut(x):
            if x is None:
                return None
            piece = x[lo:hi]
            return np.pad(piece, (0, hi - lo - piece.shape[0])).astype(np.float32)

        out.append(Segment(cut(streams.main), cut(streams.other), text[start:start + n].copy(),
                           {**meta, "offset": round(start / FRAME_RATE, 3), "duration": round(n / FRAME_RATE, 3)}))
    return out


# ---------------------------------------------------------------------------------------------
# One file, all stages
# ---------------------------------------------------------------------------------------------


class FileAnalyzer:
    """``FileItem -> FileResult`` through every CPU stage. Picklable: models load lazily in the
    process that runs it (a Grain worker) via ``components`` (a picklable factory)."""

    def __init__(self, cfg: PrepareConfig, components=None):
        self.cfg = cfg
        self.components = components
        self._loaded = None

    def __getstate__(self):
        return {"cfg": self.cfg, "components": self.components, "_loaded": None}

    def _parts(self) -> dict:
        if self._loaded is None:
            parts = {"vad": None, "diarizer": None, "transcriber": None}
            if self.components is not None:
                parts.update(self.components.build())
            encode = None
            if self.cfg.tokenizer:
                from data_pipeline.tokenizer import load_tokenizer

                encode = encoder_for(load_tokenizer(self.cfg.tokenizer))
            parts["encode"] = encode
            self._loaded = parts
        return self._loaded

    def __call__(self, item: FileItem, local_path: str | None = None) -> FileResult:
        """``local_path``: where the bytes of ``item.path`` are (a local copy of a remote file);
        the results and their messages name ``item.path``."""
        result = FileResult(item)
        try:
            parts = self._parts()
            try:
                audio = decode_stage(local_path or item.path, self.cfg)
            except StageError as e:
                raise StageError(e.stage, str(e).replace(local_path, item.path) if local_path else str(e)) from None
            result.duration = audio.shape[-1] / SAMPLE_RATE
            streams = split_stage(audio, self.cfg, item.path, parts["vad"], parts["diarizer"])
            result.speech_seconds = streams.speech_ratio * result.duration
            words, source = words_stage(item.path, streams, self.cfg, parts["transcriber"])
            text = text_stage(words, streams.duration, self.cfg, parts["encode"])
            meta = {"source": item.path, "split": streams.split, "words": source,
                    "speech_ratio": round(streams.speech_ratio, 4), "main_speaker": streams.main_speaker,
                    "speakers": {k: round(v, 3) for k, v in sorted(streams.speakers.items())}}
            result.segments = segment_stage(streams, text, self.cfg, meta)
        except StageError as e:
            result.error = {"file": item.path, "stage": e.stage, "reason": str(e)}
        except DataError as e:
            result.error = {"file": item.path, "stage": "decode", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - a library failing on one file must not stop the job
            where = traceback.extract_tb(e.__traceback__)[-1]
            result.error = {"file": item.path, "stage": "analyze",
                            "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                      f"({Path(where.filename).name}:{where.lineno})"}
        if result.error is not None:
            result.segments = []
        return result
