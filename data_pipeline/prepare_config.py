"""Settings of ``moshax data prepare`` (a typed dataclass; YAML in ``configs/data/prepare.yaml``,
``key=value`` overrides, flags for the common ones). Stage settings nest: ``vad.*``,
``diarization.*``, ``asr.*``. Everything that changes the shards' bytes is written into the
manifest (``pipeline``), so a shard directory says how it was made."""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.asr import AsrConfig
from data_pipeline.diarize import DiarizationConfig
from data_pipeline.errors import DataError
from data_pipeline.vad import VadConfig


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list)  # dirs, globs, files, moshi-finetune .jsonl manifests
    output: str = ""
    mimi_checkpoint: str = ""  # moshax Mimi checkpoint or Kyutai .safetensors
    tokenizer: str = ""  # sentencepiece .model for the text stream ("" only when no file has words)
    stereo_split: bool = False  # stereo = left: main speaker, right: the other side (skips diarization)
    voice_activity: bool = True  # Silero VAD: speech ratio, no-speech files rejected, regions for diarization
    diarize: bool = True  # mono: find the speakers (off: the whole mix is the main stream, no other stream)
    vad: VadConfig = field(default_factory=VadConfig)
    diarization: DiarizationConfig = field(default_factory=DiarizationConfig)
    # words: asr.transcripts (sidecar dir: STEM.json word times / STEM.txt plain text, force-aligned)
    # wins over asr.engine (none | pocketsphinx | whisper:DIR) on the main stream
    asr: AsrConfig = field(default_factory=AsrConfig)
    no_words: str = "pad"  # a file without words: all-PAD text stream ("pad") or masked (-1, "mask")
    text_delay: float = 0.0  # seconds; positive = text ahead of the audio (the reference's audio_delay)
    record_seconds: float = 120.0  # longer files are cut into records of at most this length
    min_seconds: float = 1.0  # shorter files (or trailing pieces) are not used (an error for a whole file)
    min_speech_ratio: float = 0.0  # a file with less voiced audio (VAD) is an error ("no speech")
    num_codebooks: int = 8  # Mimi codebooks per stream (Moshi's dep_q)
    files_per_shard: int = 64
    codec_batch_size: int = 4  # records per batched Mimi call
    codec_chunk_seconds: float = 10.0  # Mimi runs over fixed chunks (one compile)
    num_workers: int = 0  # Grain worker processes for the CPU stages (0 = in the main process)
    worker_index: int = 0  # this host (multi-host preparation: disjoint shards per host)
    num_worker_hosts: int = 1
    retry_errors: bool = False  # also redo finished shards that recorded failed files
    records_text_card: int = 0  # text vocabulary bound written to the manifest (0: the tokenizer's size)

    def validate(self, *, codec: bool = True) -> None:
        """``codec=False``: the settings of the CPU stages only (``moshax data beam``)."""
        if not self.inputs:
            raise DataError("no inputs: give --input DIR|GLOB|FILE|MANIFEST.jsonl")
        if not self.output:
            raise DataError("no --output directory")
        if codec and not self.mimi_checkpoint:
            raise DataError("no --mimi-checkpoint: the codec that turns audio into tokens")
        if self.no_words not in ("pad", "mask"):
            raise DataError(f"no_words={self.no_words!r}: pad or mask")
        if not self.record_seconds > 0 or self.min_seconds < 0 or self.min_seconds > self.record_seconds:
            raise DataError(f"record_seconds={self.record_seconds}, min_seconds={self.min_seconds}: need "
                            "0 <= min_seconds <= record_seconds")
        for key in ("files_per_shard", "codec_batch_size", "num_codebooks", "num_worker_hosts"):
            if getattr(self, key) < 1:
                raise DataError(f"{key}={getattr(self, key)}: must be >= 1")
        if self.num_workers < 0:
            raise DataError(f"num_workers={self.num_workers}: must be >= 0")
        if not 0 <= self.worker_index < self.num_worker_hosts:
            raise DataError(f"worker_index={self.worker_index}: must be in [0, num_worker_hosts={self.num_worker_hosts})")
        self.vad.validate()
        self.asr.validate()
        self.diarization.validate()
        if self.diarize and not self.stereo_split and not self.voice_activity:
            raise DataError("diarize=true needs voice_activity=true (speaker turns are found in the voiced regions)")
        if not self.codec_chunk_seconds > 0:
            raise DataError(f"codec_chunk_seconds={self.codec_chunk_seconds}: must be > 0")
