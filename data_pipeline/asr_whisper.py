"""openai-whisper from a local checkpoint, with word times (``--asr whisper:DIR``).

The checkpoint is openai-whisper's own ``*.pt`` (``{"dims": ..., "model_state_dict": ...}``),
loaded with ``torch.load(weights_only=True)`` (tensors and plain containers only: no code runs
from the file). Decoding is deterministic and offline: the language is given (no detection
pass), temperature 0 with no fallback, and the tokenizer reads the vocabulary files inside the
``whisper`` package (``whisper/assets/*.tiktoken``), so nothing is fetched. Word times come from
whisper's cross-attention DTW (``word_timestamps=True``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.transcriber import Transcriber
from data_pipeline.errors import DataError
from data_pipeline.text_stream import Word
from data_pipeline.token_shards import sha256_file


def load_whisper(path: str | Path):
    """A ``whisper.model.Whisper`` on the CPU from an openai-whisper checkpoint file."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of every kind: not a checkpoint
        raise DataError(f"{path}: not a loadable openai-whisper checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise DataError(f"{path}: not an openai-whisper checkpoint (expected 'dims' and 'model_state_dict')")
    try:
        model = Whisper(ModelDimensions(**ckpt["dims"]))
        model.load_state_dict(ckpt["model_state_dict"])
    except (TypeError, RuntimeError) as e:
        raise DataError(f"{path}: checkpoint does not match its dims ({str(e).splitlines()[0][:200]})") from None
    return model.eval()


class WhisperTranscriber(Transcriber):
    """Whisper transcription of ``language`` speech; the model loads on first use."""

    sample_rate = 16000

    def __init__(self, checkpoint: str, language: str = "en", max_tokens: int | None = None):
        self.checkpoint = str(checkpoint)
        self.language = language
        self.max_tokens = max_tokens  # tokens per 30 s window (None: the model's n_text_ctx // 2)
        self._model = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_model"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = load_whisper(self.checkpoint)
        return self._model

    def _transcribe(self, audio16k: np.ndarray) -> list[Word]:
        import torch
        import whisper

        with torch.no_grad():
            result = whisper.transcribe(self.model, audio16k.astype(np.float32), language=self.language,
                                        task="transcribe", temperature=0.0, word_timestamps=True, fp16=False,
                                        condition_on_previous_text=False, verbose=None,
                                        sample_len=self.max_tokens)
        return [Word(w["word"].strip(), float(w["start"]), float(w["end"]))
                for seg in result["segments"] for w in seg.get("words", []) if w["word"].strip()]

    def identity(self) -> dict:
        from importlib.metadata import version

        return {"engine": "whisper", "version": version("openai-whisper"), "model": Path(self.checkpoint).name,
                "model_path": str(Path(self.checkpoint).resolve()), "sha256_16": sha256_file(self.checkpoint)[:16],
                "language": self.language}
