"""Speech recognition with word times: which engine a config names, and how to make it.

``AsrConfig.engine`` picks it:

* ``"none"``: no recognizer (transcripts come from sidecars only, see :mod:`data_pipeline.transcripts`);
* ``"pocketsphinx"``: CMU PocketSphinx with the en-us model its wheel ships (CPU, no download);
* ``"whisper:DIR"``: an openai-whisper checkpoint (``DIR/*.pt``, or the ``.pt`` file itself).

A :class:`~data_pipeline.transcriber.Transcriber` maps mono float32 audio to sorted :class:`~data_pipeline.text_stream.Word`
lists (seconds from the start of the audio) and names itself for manifests (:meth:`identity`).
Transcribers travel to Grain worker processes by pickle: each loads its model on first use and
drops it when pickled. Importing this module loads no engine (no torch, no pocketsphinx).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.transcriber import Transcriber

ENGINES = ("none", "pocketsphinx", "whisper:DIR")


@dataclass
class AsrConfig:
    """Which recognizer makes word times, and where sidecar transcripts are (they win over it)."""

    engine: str = "none"
    transcripts: str = ""  # directory of STEM.json / STEM.txt sidecars
    language: str = "en"

    def validate(self) -> "AsrConfig":
        engine = self.engine.strip()
        if engine == "pocketsphinx":
            _require("pocketsphinx", "pocketsphinx")
            if self.language != "en":
                raise DataError(f"asr engine pocketsphinx: only language 'en' is shipped, got {self.language!r}")
        elif engine.startswith("whisper:"):
            whisper_checkpoint(engine.split(":", 1)[1])
            _require("whisper", "openai-whisper (pip install tiktoken more-itertools numba torch; "
                                "pip install --no-deps openai-whisper)")
        elif engine != "none":
            raise DataError(f"asr engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.transcripts and not Path(self.transcripts).is_dir():
            raise DataError(f"transcripts directory not found: {self.transcripts}")
        return self


def _require(module: str, package: str) -> None:
    """A missing engine package is a one-line setup error, not a traceback at the first file."""
    from importlib.util import find_spec

    if find_spec(module) is None:
        raise DataError(f"the {module} engine needs {package}, which is not installed")


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
