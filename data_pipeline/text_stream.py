"""Word timestamps -> Moshi's 12.5 Hz text stream ("inner monologue"), and the sidecars that hold them.

The placement follows the reference interleaver (moshi-finetune), so shards made here train the
same thing as Kyutai's:

* ``frames = ceil(duration * frame_rate)``, every frame PAD (3) to start with;
* frame by frame, every word whose ``start * frame_rate < t + 1`` (not yet placed) becomes the
  word being written: its tokens (the word tokenized alone, no BOS) go into consecutive frames
  from ``t`` on. A word that starts while the previous one is still being written replaces the
  previous word's unwritten tokens (``keep_and_shift=True`` queues them instead);
* the frame just before each written token becomes EPAD (0) when it held PAD: the model learns
  that a word starts next; every other frame stays PAD.

Audio with no words gets an all-PAD stream (speech without text is still "Moshi says nothing")
or, with ``no_words="mask"``, all -1 (no input, no loss). Words with a non-positive duration are
dropped, as the reference does; ``audio_delay`` (seconds, positive = text ahead of the audio)
shifts the words as its ``audio_delay`` does.

Sidecars (:func:`read_words`): moshi-finetune's ``{"alignments": [[word, [start, end], speaker],
...]}`` and the Whisper family's ``{"segments": [{"words": [{"word" | "text", "start", "end"}]}]}``
(whisper-timestamped, faster-whisper, WhisperX).
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from data_pipeline.errors import DataError

PAD_ID, EPAD_ID, ZERO_TOKEN = 3, 0, -1
FRAME_RATE = 12.5


@dataclass(frozen=True)
class Word:
    """One word with its times in seconds (from the start of the audio) and its speaker label."""

    text: str
    start: float
    end: float
    speaker: str = ""


def encoder_for(tokenizer) -> Callable[[str], list[int]]:
    """``word -> token ids`` with a sentencepiece processor: the word stripped, no BOS, new lines
    kept as the newline piece (as the reference tokenizes words)."""
    newline = tokenizer.encode("\n")[-1] if tokenizer.encode("\n") else None

    def encode(word: str) -> list[int]:
        parts = tokenizer.encode(word.strip().split("\n"))
        out: list[int] = []
        for i, ids in enumerate(parts):
            if i and newline is not None:
                out.append(newline)
            out.extend(ids)
        return out

    return encode


def text_stream(words: Iterable[Word] | None, duration: float, encode: Callable[[str], Sequence[int]], *,
                frame_rate: float = FRAME_RATE, pad: int = PAD_ID, epad: int = EPAD_ID,
                main_speaker: str | None = None, keep_and_shift: bool = False, audio_delay: float = 0.0,
                no_words: str = "pad") -> np.ndarray:
    """The int32 text stream ``[ceil(duration * frame_rate)]`` for ``words`` (see the module
    docstring). ``main_speaker``: keep only that speaker's words. ``words=None`` (no transcript):
    all PAD, or all -1 with ``no_words="mask"``."""
    if no_words not in ("pad", "mask"):
        raise ValueError(f"no_words={no_words!r}: expected pad or mask")
    frames = math.ceil(duration * frame_rate - 1e-9)
    if words is None:
        return np.full(frames, pad if no_words == "pad" else ZERO_TOKEN, np.int32)
    kept = sorted((w for w in words if main_speaker is None or w.speaker == main_speaker), key=lambda w: w.start)
    kept = [w for w in kept if w.start < w.end]
    if audio_delay:
        kept = [Word(w.text, w.start - audio_delay, w.end - audio_delay, w.speaker) for w in kept
                if w.end > audio_delay]
    out = np.full(frames, pad, np.int32)
    queue: deque[int] = deque()
    nxt = 0
    for t in range(frames):
        while nxt < len(kept) and kept[nxt].start * frame_rate < t + 1:
            ids = list(encode(kept[nxt].text))
            queue = queue + deque(ids) if keep_and_shift else deque(ids)
            nxt += 1
        if queue:
            if t > 0 and out[t - 1] == pad:
                out[t - 1] = epad
            out[t] = queue.popleft()
    if audio_delay < 0:
        out[: int(frame_rate * -audio_delay)] = ZERO_TOKEN
    return out


def talk_time(words: Iterable[Word]) -> dict[str, float]:
    """Seconds each speaker talks: the sum of their word durations."""
    talk: dict[str, float] = {}
    for w in words:
        talk[w.speaker] = talk.get(w.speaker, 0.0) + max(0.0, w.end - w.start)
    return talk


def word_onset_frames(words: Iterable[Word], frame_rate: float = FRAME_RATE) -> list[int]:
    """The frame each word's first token lands in when no word overlaps the one before."""
    return [max(0, math.floor(w.start * frame_rate)) for w in words]


# ---------------------------------------------------------------------------------------------
# Sidecars
# ---------------------------------------------------------------------------------------------


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: expected a number of seconds, got {value!r}")
    return float(value)


def parse_words(data, source: str = "transcript") -> list[Word]:
    """Words from a parsed sidecar (moshi-finetune alignments or Whisper-style segments)."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a JSON object with 'alignments' or 'segments'")
    out: list[Word] = []
    if "alignments" in data:
        items = data["alignments"]
        if not isinstance(items, list):
            raise DataError(f"{source}: 'alignments' must be a list of [word, [start, end], speaker]")
        for i, item in enumerate(items):
            where = f"{source}: alignments[{i}]"
            if not (isinstance(item, (list, tuple)) and len(item) >= 2 and isinstance(item[1], (list, tuple))
                    and len(item[1]) == 2):
                raise DataError(f"{where}: expected [word, [start, end], speaker], got {item!r}"[:300])
            speaker = str(item[2]) if len(item) > 2 and item[2] is not None else ""
            out.append(Word(str(item[0]), _number(item[1][0], where), _number(item[1][1], where), speaker))
        return out
    if "segments" in data:
        segments = data["segments"]
        if not isinstance(segments, list):
            raise DataError(f"{source}: 'segments' must be a list")
        for i, seg in enumerate(segments):
            words = seg.get("words") if isinstance(seg, dict) else None
            if not isinstance(words, list):
                raise DataError(f"{source}: segments[{i}] has no 'words' list (transcribe with word timestamps)")
            speaker = str(seg.get("speaker", "")) if isinstance(seg, dict) else ""
            for j, w in enumerate(words):
                where = f"{source}: segments[{i}].words[{j}]"
                if not isinstance(w, dict) or not ({"word", "text"} & set(w)) or "start" not in w or "end" not in w:
                    raise DataError(f"{where}: expected {{word, start, end}}, got {w!r}"[:300])
                text = w.get("word", w.get("text"))
                out.append(Word(str(text), _number(w["start"], where), _number(w["end"], where),
                                str(w.get("speaker", speaker))))
        return out
    raise DataError(f"{source}: no 'alignments' or 'segments' in the transcript")


def read_words(path: str | Path) -> list[Word]:
    """Words of a transcript sidecar file; one :class:`DataError` line for a file that does not parse."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: transcript not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the transcript ({type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return parse_words(data, str(path))


def check_words_in_audio(words: Sequence[Word], duration: float, source: str, tolerance: float = 0.5) -> None:
    """A transcript whose words end past the audio (by more than ``tolerance`` s) belongs to other
    audio: one line saying which word, instead of silently dropping text."""
    late = [w for w in words if w.end > duration + tolerance or w.start < -tolerance]
    if late:
        w = late[0]
        raise DataError(f"{source}: {len(late)} word(s) outside the {duration:.2f} s of audio, e.g. {w.text!r} at "
                        f"{w.start:.2f}-{w.end:.2f} s (transcript of another file?)")


def write_words(path: str | Path, words: Sequence[Word]) -> Path:
    """Write words as a moshi-finetune alignments sidecar (what ``moshax data transcribe`` writes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"alignments": [[w.text, [round(w.start, 3), round(w.end, 3)], w.speaker]
                                               for w in words]}, ensure_ascii=False, indent=1))
    return path
