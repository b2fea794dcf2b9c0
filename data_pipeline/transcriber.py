"""The interface every speech recognizer has: mono audio in, sorted words with times out.

Kept apart from :mod:`data_pipeline.asr` (which picks an engine) so the engines can implement it
without importing the module that imports them.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.text_stream import Word


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
