"""The models the CPU stages use (VAD, speaker diarization, ASR / forced alignment), described by
the prepare config and loaded lazily where they run: the object travels to Grain worker processes
as its settings only, each process loads its own models once."""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline.prepare_config import PrepareConfig


class Diarizer:
    """Speaker turns of a mono mix and the main/other split (:mod:`data_pipeline.diarize`) behind
    the two calls the split stage makes."""

    def __init__(self, cfg):
        from data_pipeline.speaker_embedding import SpeakerEncoder

        self.cfg = cfg
        self.encoder = SpeakerEncoder()

    def diarize(self, audio: np.ndarray, sample_rate: int, regions):
        from data_pipeline.diarize import diarize

        return diarize(audio, sample_rate, regions, self.cfg, self.encoder)

    def split(self, audio: np.ndarray, sample_rate: int, result):
        from data_pipeline.diarize import split_streams

        return split_streams(audio, sample_rate, result)


class StageModels:
    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: PrepareConfig) -> "StageModels":
        return cls(cfg)

    def _uses_diarizer(self) -> bool:
        return self.cfg.diarize and not self.cfg.stereo_split

    def build(self) -> dict:
        """``{"vad", "diarizer", "transcriber"}`` (None where a stage is off)."""
        from data_pipeline.asr import make_transcriber

        parts = {"vad": None, "diarizer": None, "transcriber": make_transcriber(self.cfg.asr)}
        if self.cfg.voice_activity:
            from data_pipeline.vad import SileroVad

            parts["vad"] = SileroVad(self.cfg.vad)
        if self._uses_diarizer():
            parts["diarizer"] = Diarizer(self.cfg.diarization)
        return parts

    def identity(self) -> dict:
        """What made the shards, for the manifest (model files by sha256, their settings)."""
        out = {"vad": None, "diarizer": None, "asr": None}
        if self.cfg.voice_activity:
            from data_pipeline.vad import SileroVad

            out["vad"] = SileroVad(self.cfg.vad).identity()
        if self._uses_diarizer():
            from data_pipeline.speaker_embedding import wheel_weights_path
            from data_pipeline.token_shards import sha256_file

            out["diarizer"] = {"name": "resemblyzer-ge2e (numpy)", "weights_sha256": sha256_file(wheel_weights_path()),
                               **dataclasses.asdict(self.cfg.diarization)}
        from data_pipeline.asr import make_transcriber

        transcriber = make_transcriber(self.cfg.asr)  # None for engine "none"; models load lazily
        out["asr"] = {"engine": transcriber.identity() if transcriber is not None else "none",
                      "transcripts": self.cfg.asr.transcripts or None}
        return out
