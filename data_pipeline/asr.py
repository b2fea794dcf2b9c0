"""Speech recognition with word times: which engine, and the one interface every engine has.

``AsrConfig.engine`` picks it:

* ``"none"``: no recognizer (transcripts come from sidecars only, see :mod:`data_pipeline.transcripts`);
* ``"pocketsphinx"``: CMU PocketSphinx with the en-us model its wheel ships (CPU, no download);
* ``"whisper:DIR"``: an openai-whisper checkpoint (``DIR/*.pt``, or the ``.pt`` file itself).

A :class:`Transcriber` maps mono float32 audio to sorted :class:`~data_pipeline.text_stream.Word`
lists (seconds from the start of the audio) and names itself for manifests (:meth:`identity`).
Transcribers travel to Grain worker processes by pickle: each loads its model on first use and
drops it when pickled. Importing this module loads no engine (no torch, no pocketsphinx).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.text_stream import Word

ENGINES = ("none", "pocketsphinx", "whisper:DIR")


@dataclass
class AsrConfig:
    """Which recognizer makes word times, and where sidecar transcripts are (they win over it)."""

    engine: str = "none"
    transcripts: str = ""  # directory of STEM.json / STEM.txt sidecars
    language: str = "en"

    def validate(self) -> "AsrConfig":
        engine = self.engine.strip()
        if engine in ("none", "pocketsphinx"):
            if engine == "pocketsphinx" and self.language != "en":
                raise DataError(f"asr engine pocketsphinx: only language 'en' is shipped, got {self.language!r}")
        elif engine.startswith("whisper:"):
            whisper_checkpoint(engine.split(":", 1)[1])
        else:
            raise DataError(f"asr engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.transcripts and not Path(self.transcripts).is_dir():
            raise DataError(f"transcripts directory not found: {self.transcripts}")
        return self


def whisper_checkpoint(where: str) -> Path:
    """The one ``*.pt`` file in directory ``where`` (or ``where`` itself when it is a file)."""
    if not where:
        raise DataError("asr engine 'whisper:': name the checkpoint directory, e.g. whisper:models/whisper-tiny")
    path = Path(where)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"whisper checkpoint directory not found: {where}")
    found = sorted(path.glob("*.pt"))
    if len(found) != 1:
        what = "no *.pt file" if not found else f"{len(found)} *.pt files ({', '.join(p.name for p in found)})"
        raise DataError(f"{where}: expected one openai-whisper checkpoint (*.pt), found {what}")
    return found[0]


class Transcriber:
    """Audio -> words with times. Subclasses implement :meth:`_transcribe` and :meth:`identity`."""

    #: the rate the engine works at; :meth:`transcribe` resamples to it
    sample_rate = 16000

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> list[Word]:
        """Words in ``audio`` (mono float32 ``[samples]``), sorted by start, times in seconds."""
        from data_pipeline.audio import resample

        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1:
            raise DataError(f"transcribe: expected mono audio [samples], got shape {audio.shape}")
        audio = resample(audio, int(sample_rate), self.sample_rate)
        words = self._transcribe(audio)
        duration = audio.size / self.sample_rate
        clipped = [Word(w.text, min(max(w.start, 0.0), duration), min(max(w.end, w.start, 0.0), duration), w.speaker)
                   for w in words]
        return sorted(clipped, key=lambda w: (w.start, w.end))

    def _transcribe(self, audio16k: np.ndarray) -> list[Word]:
        raise NotImplementedError

    def identity(self) -> dict:
        raise NotImplementedError


def make_transcriber(cfg: AsrConfig) -> Transcriber | None:
    """The configured engine (None for ``engine="none"``); nothing heavy loads until first use."""
    cfg.validate()
    engine = cfg.engine.strip()
    if engine == "none":
        return None
    if engine == "pocketsphinx":
        from data_pipeline.asr_pocketsphinx import PocketsphinxTranscriber

        return PocketsphinxTranscriber()
    from data_pipeline.asr_whisper import WhisperTranscriber

    return WhisperTranscriber(str(whisper_checkpoint(engine.split(":", 1)[1])), language=cfg.language)
