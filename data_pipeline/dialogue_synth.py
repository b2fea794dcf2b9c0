"""Synthetic spoken dialogues with exact truth, for tests, measurements and ``make data-quickstart``.

Two or three eSpeak NG voices take turns; every word is synthesized alone, trimmed of silence and
placed on the timeline, so each word's start/end and speaker are known exactly (no aligner in the
loop). For each dialogue ``NAME`` under ``OUT``::

    OUT/NAME.wav             the conversation (mono mix, or stereo: left = main speaker, right = others)
    OUT/truth/NAME.json      moshi-finetune alignments: {"alignments": [[word, [start, end], speaker], ...]}
    OUT/truth/NAME.rttm      the speaker turns (RTTM)
    OUT/truth/NAME.txt       the main speaker's words as plain text (for forced alignment)

The main speaker is the one with the most talk time (sum of word durations). Same arguments, same files.
``moshax data synth-dialogues --output data/dialogues --dialogues 8``.
"""

from __future__ import annotations

import json
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.audio import write_wav
from data_pipeline.errors import DataError
from data_pipeline.rttm import Turn, write_rttm
from data_pipeline.speech_synth import _sentences, espeak_binary, speak
from data_pipeline.diarize import DiarizationConfig, pick_main_speaker
from data_pipeline.text_stream import Word, talk_time, write_words

# Voices far apart in timbre (language x variant, pitch): diarization has something to find.
VOICES = ({"voice": "en-us+m3", "pitch": 35, "speed": 165},
          {"voice": "en-gb+f2", "pitch": 70, "speed": 175},
          {"voice": "en-029+m7", "pitch": 50, "speed": 155})


@dataclass
class Dialogue:
    """A rendered dialogue: audio ``[channels, samples]`` and its truth."""

    audio: np.ndarray
    sample_rate: int
    words: list[Word]
    turns: list[Turn]
    main_speaker: str

    @property
    def duration(self) -> float:
        return self.audio.shape[-1] / self.sample_rate


def speaker_name(i: int) -> str:
    return f"spk{i}"


def dialogue_plan(seed: int, *, speakers: int = 2, turns: int = 6, min_words: int = 3,
                  max_words: int = 10) -> list[tuple[int, list[str]]]:
    """``[(speaker index, words), ...]``: alternating turns of words from the built-in corpus."""
    if not 2 <= speakers <= len(VOICES):
        raise DataError(f"speakers={speakers}: between 2 and {len(VOICES)}")
    rng = random.Random(f"dialogue-{seed}")
    words = " ".join(_sentences(8, seed, "dialogue")).split()
    plan, pos, who = [], rng.randrange(len(words)), 0
    for _ in range(turns):
        n = rng.randint(min_words, max_words)
        turn = [words[(pos + k) % len(words)] for k in range(n)]
        pos += n
        plan.append((who, turn))
        who = (who + rng.randint(1, speakers - 1)) % speakers
    return plan


def _trim(audio: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    loud = np.flatnonzero(np.abs(audio) > threshold)
    return audio[loud[0]: loud[-1] + 1] if loud.size else audio[:0]


class _WordCache:
    """Each (word, voice) synthesized once; eSpeak runs in a few threads."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self._cache: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def get(self, word: str, voice: int) -> np.ndarray:
        key = (word, voice)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        v = VOICES[voice]
        audio = _trim(speak(word, voice=v["voice"], speed=v["speed"], pitch=v["pitch"],
                            sample_rate=self.sample_rate).reshape(-1))
        with self._lock:
            self._cache[key] = audio
        return audio

    def prefetch(self, keys, workers: int) -> None:
        todo = sorted({k for k in keys if k not in self._cache})
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(lambda k: self.get(*k), todo))


def _speakable(word: str) -> str:
    return re.sub(r"[^\w'-]", "", word) or word


def render_dialogue(plan, *, seed: int, sample_rate: int = 24000, stereo: bool = False, overlap: float = 0.0,
                    cache: _WordCache | None = None, workers: int = 2) -> Dialogue:
    """Place each word of ``plan`` on the timeline: 60-160 ms between words of a turn, 300-800 ms
    between turns (or, with probability ``overlap``, the next turn starts 300 ms before the last
    word ends: overlapped speech)."""
    rng = random.Random(f"render-{seed}")
    cache = cache or _WordCache(sample_rate)
    cache.prefetch([(_speakable(w), s) for s, turn in plan for w in turn], workers)
    placed: list[tuple[float, np.ndarray, int, str]] = []
    t = round(rng.uniform(0.2, 0.5), 3)
    words, turns = [], []
    for speaker, turn in plan:
        if turns and rng.random() < overlap:
            t = max(turns[-1].start + 0.1, t - 0.3 - rng.uniform(0.3, 0.6))
        turn_start = t
        for w in turn:
            audio = cache.get(_speakable(w), speaker)
            if audio.size == 0:
                continue
            start = round(t, 3)
            end = round(start + audio.size / sample_rate, 3)
            placed.append((start, audio, speaker, w))
            words.append(Word(w, start, end, speaker_name(speaker)))
            t = end + rng.uniform(0.06, 0.16)
        turns.append(Turn(round(turn_start, 3), words[-1].end, speaker_name(speaker)))
        t = words[-1].end + rng.uniform(0.3, 0.8)
    total = int((t + 0.3) * sample_rate)
    main = pick_main_speaker(talk_time(words), DiarizationConfig())  # most talk: sum of word durations
    channels = np.zeros((2 if stereo else 1, total), np.float32)
    for start, audio, speaker, _ in placed:
        i = int(round(start * sample_rate))
        row = (0 if speaker_name(speaker) == main else 1) if stereo else 0
        channels[row, i: i + audio.size] += audio[: total - i]
    peak = float(np.abs(channels).max())
    if peak > 0.99:
        channels *= 0.99 / peak
    words.sort(key=lambda w: (w.start, w.end))
    return Dialogue(channels, sample_rate, words, turns, main)


def synthesize_dialogues(output: str | Path, num: int, *, seed: int = 0, speakers: int = 2, turns: int = 6,
                         stereo: bool = False, overlap: float = 0.0, sample_rate: int = 24000,
                         workers: int = 2, progress: bool = False) -> list[Path]:
    """Write ``num`` dialogues (see the module docstring); returns the wav paths."""
    espeak_binary()
    output = Path(output)
    (output / "truth").mkdir(parents=True, exist_ok=True)
    cache = _WordCache(sample_rate)
    it = range(num)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="dialogues", unit="file")
    paths = []
    for i in it:
        name = f"dialogue-{seed:03d}-{i:04d}"
        plan = dialogue_plan(seed * 100003 + i, speakers=speakers, turns=turns)
        d = render_dialogue(plan, seed=seed * 100003 + i, sample_rate=sample_rate, stereo=stereo, overlap=overlap,
                            cache=cache, workers=workers)
        path = output / f"{name}.wav"
        write_wav(path, d.audio if stereo else d.audio[0], sample_rate)
        write_words(output / "truth" / f"{name}.json", d.words)
        write_rttm(output / "truth" / f"{name}.rttm", name, d.turns)
        (output / "truth" / f"{name}.txt").write_text(
            " ".join(w.text for w in d.words if w.speaker == d.main_speaker) + "\n", encoding="utf-8")
        (output / "truth" / f"{name}.meta.json").write_text(json.dumps(
            {"main_speaker": d.main_speaker, "duration": round(d.duration, 3), "stereo": stereo,
             "speakers": sorted({t.speaker for t in d.turns})}))
        paths.append(path)
    return paths


def add_dialogue_arguments(p) -> None:
    """Flags of ``moshax data synth-dialogues``."""
    p.add_argument("--output", required=True)
    p.add_argument("--dialogues", type=int, default=8)
    p.add_argument("--speakers", type=int, default=2, help="voices per dialogue (2 or 3)")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--stereo", action="store_true", help="left = main speaker, right = the others")
    p.add_argument("--overlap", type=float, default=0.0, help="probability that a turn overlaps the previous one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-rate", type=int, default=24000)
    p.add_argument("--workers", type=int, default=2)


def dialogue_command(args) -> int:
    paths = synthesize_dialogues(args.output, args.dialogues, seed=args.seed, speakers=args.speakers, turns=args.turns,
                                 stereo=args.stereo, overlap=args.overlap, sample_rate=args.sample_rate,
                                 workers=args.workers, progress=True)
    print(f"wrote {len(paths)} dialogues to {args.output} (truth: word times, RTTM, text under {args.output}/truth)")
    return 0
