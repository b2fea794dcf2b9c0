"""The models the CPU stages use (VAD, speaker diarization, ASR / forced alignment), described by
the prepare config and loaded lazily where they run: the object travels to Grain worker processes
as its settings only, each process loads its own models once."""

from __future__ import annotations

from data_pipeline.prepare_config import PrepareConfig


class StageModels:
    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: PrepareConfig) -> "StageModels":
        return cls(cfg)

    def build(self) -> dict:
        """``{"vad", "diarizer", "transcriber", "aligner"}`` (None where a stage is off)."""
        return {"vad": None, "diarizer": None, "transcriber": None, "aligner": None}

    def identity(self) -> dict:
        return {"vad": None, "diarizer": None, "asr": None}
