"""PocketSphinx (CPU, the en-us model inside the wheel): recognition and forced alignment.

* Input is 16 kHz int16. A seeded noise floor (Gaussian, RMS 1e-3 of full scale, about -60 dBFS)
  is added first: PocketSphinx's features break on digital silence (exact zeros, as between the
  words of synthesized or channel-separated audio) — measured, alignment of such a file fails
  outright and recognition degrades; real recordings already have a noise floor far above it.
* Every file starts from fresh feature state (cepstral mean, noise estimate): results do not
  depend on which file a worker decoded before.
* Recognition cuts long audio into utterances of at most ``MAX_UTTERANCE_SEC`` at the quietest
  10 ms frame near each cut, feeds each in chunks, and reads the word segments (100 frames/s);
  silences and fillers (``<s>``, ``</s>``, ``<sil>``, ``[NOISE]``, ``[SPEECH]``) are dropped and
  alternate pronunciations (``the(2)``) become the word.
* :func:`align_text` aligns a known transcript (PocketSphinx's alignment search). Words the
  dictionary does not know (no grapheme-to-phoneme model ships) are aligned as ``[SPEECH]``,
  the model's "some spoken word" filler, so they still get times from the audio and keep their
  text; a hyphenated word the dictionary lacks is said as its parts when it knows them
  (``thirty-six``). Punctuation-only tokens stick to the word before them. The whole text is one search
  (default beams, then wider ones when the path is lost, as on files of minutes). A transcript
  that does not fit the audio fails both: one :class:`DataError` line.
"""

from __future__ import annotations

import re
import threading

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.text_stream import Word
from data_pipeline.transcriber import Transcriber

SAMPLE_RATE = 16000
FRAMES_PER_SEC = 100
NOISE_FLOOR = 1e-3
MAX_UTTERANCE_SEC = 30.0
CHUNK_SAMPLES = 8192
UNKNOWN_WORD = "[SPEECH]"
_ALTERNATE = re.compile(r"\(\d+\)$")


def _decoder():
    import pocketsphinx

    return pocketsphinx.Decoder(loglevel="FATAL")


def _reset(decoder):
    """Fresh feature state (cepstral mean, noise estimate): the same audio gives the same words
    whatever the decoder heard before (they otherwise carry over from file to file)."""
    decoder.reinit_feat()
    return decoder


def _pcm16(audio: np.ndarray) -> np.ndarray:
    """int16 samples with the noise floor added (same audio, same noise: results repeat)."""
    noise = np.random.default_rng(0).standard_normal(audio.size, dtype=np.float32) * NOISE_FLOOR
    return (np.clip(audio + noise, -1.0, 1.0) * 32767.0).astype(np.int16)


def _utterance_bounds(audio: np.ndarray, max_sec: float = MAX_UTTERANCE_SEC) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` samples covering ``audio``, each at most ``max_sec``, cut at the
    quietest 10 ms frame of the last quarter of each window (not inside a word when there is a pause)."""
    hop, size = SAMPLE_RATE // FRAMES_PER_SEC, int(max_sec * SAMPLE_RATE)
    bounds, start = [], 0
    while audio.size - start > size:
        lo, hi = start + size * 3 // 4, start + size
        frames = audio[lo:hi][: (hi - lo) // hop * hop].reshape(-1, hop)
        cut = lo + int(np.argmin((frames ** 2).sum(axis=1))) * hop + hop // 2
        bounds.append((start, cut))
        start = cut
    bounds.append((start, audio.size))
    return bounds


def _segment_words(decoder, offset: float) -> list[Word]:
    """The decoder's word segments as Words (fillers dropped, ``word(2)`` -> ``word``)."""
    out = []
    for seg in decoder.seg() or ():
        word = _ALTERNATE.sub("", seg.word)
        if not word or word[0] in "<[":
            continue
        out.append(Word(word, offset + seg.start_frame / FRAMES_PER_SEC, offset + (seg.end_frame + 1) / FRAMES_PER_SEC))
    return out


def _decode(decoder, pcm: np.ndarray) -> None:
    decoder.start_utt()
    for i in range(0, pcm.size, CHUNK_SAMPLES):
        decoder.process_raw(pcm[i: i + CHUNK_SAMPLES].tobytes(), False, False)
    decoder.end_utt()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pocketsphinx")
    except PackageNotFoundError:
        return "unknown"


class PocketsphinxTranscriber(Transcriber):
    """Recognition with the wheel's en-us acoustic model, language model and dictionary."""

    sample_rate = SAMPLE_RATE

    def __init__(self, max_utterance_sec: float = MAX_UTTERANCE_SEC):
        if not max_utterance_sec >= 1.0:
            raise DataError(f"max_utterance_sec={max_utterance_sec}: at least 1 s")
        self.max_utterance_sec = float(max_utterance_sec)
        self._decoder = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_decoder"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._decoder = None

    @property
    def decoder(self):
        if self._decoder is None:
            self._decoder = _decoder()
        return self._decoder

    def _transcribe(self, audio16k: np.ndarray) -> list[Word]:
        pcm = _pcm16(audio16k)
        _reset(self.decoder)
        words: list[Word] = []
        for start, stop in _utterance_bounds(audio16k, self.max_utterance_sec):
            _decode(self.decoder, pcm[start:stop])
            words.extend(_segment_words(self.decoder, start / SAMPLE_RATE))
        return words

    def identity(self) -> dict:
        import pocketsphinx

        return {"engine": "pocketsphinx", "version": _version(), "model": "en-us (bundled)",
                "model_path": pocketsphinx.get_model_path("en-us")}


# ---------------------------------------------------------------------------------------------
# Forced alignment
# ---------------------------------------------------------------------------------------------


def dictionary_form(token: str) -> str:
    """How ``token`` is spelled in the CMU dictionary: lower case; letters, digits, apostrophes
    and inner hyphens only."""
    return re.sub(r"[^\w'-]", "", token.lower()).strip("'-_")


def _tokens(text: str) -> list[tuple[str, str]]:
    """``[(text as written, dictionary form), ...]``; punctuation-only tokens join the word before."""
    out: list[list[str]] = []
    for token in text.split():
        form = dictionary_form(token)
        if not form:
            if out:
                out[-1][0] += " " + token
            continue
        out.append([token, form])
    return [(t, f) for t, f in out]


def _spoken_as(form: str, decoder) -> list[str]:
    """The dictionary words that say ``form``: itself; else its hyphen-separated parts when the
    dictionary knows each (``thirty-six``); else ``[SPEECH]``."""
    if decoder.lookup_word(form) is not None:
        return [form]
    parts = [p for p in form.split("-") if p]
    if len(parts) > 1 and all(decoder.lookup_word(p) is not None for p in parts):
        return parts
    return [UNKNOWN_WORD]


# Alignment tries the default beams first, then these wide ones: the default search loses the
# path on long files (measured: 70 s aligned, 140 s failed; with these 215 s aligned, 5x slower).
WIDE_BEAMS = {"beam": 1e-80, "wbeam": 1e-60, "pbeam": 1e-80}
_aligners = threading.local()  # per thread, per process: decoders are not shared or pickled


def _aligner(wide: bool):
    key = "wide" if wide else "default"
    if getattr(_aligners, key, None) is None:
        import pocketsphinx

        setattr(_aligners, key, pocketsphinx.Decoder(loglevel="FATAL", **(WIDE_BEAMS if wide else {})))
    return _reset(getattr(_aligners, key))


def _align_once(decoder, forms: list[str], pcm: np.ndarray, source: str):
    """The aligned word segments (fillers and silences out), or None when the search failed."""
    try:
        decoder.set_align_text(" ".join(forms))
    except RuntimeError as e:
        raise DataError(f"{source}: cannot set up the alignment ({e})") from None
    _decode(decoder, pcm)
    if decoder.hyp() is None:
        return None
    aligned = [s for s in (decoder.seg() or ()) if _ALTERNATE.sub("", s.word) not in ("<s>", "</s>", "<sil>")]
    return aligned if len(aligned) == len(forms) else None


def align_text(audio: np.ndarray, sample_rate: int, text: str, *, source: str = "transcript") -> list[Word]:
    """Times for the words of ``text`` spoken in ``audio`` (mono float32): one Word per
    whitespace token that has a letter or digit, with its written text (case, punctuation).

    Unknown words are aligned as ``[SPEECH]`` (module docstring). Raises a one-line
    :class:`DataError` naming ``source`` when the text cannot be aligned to the audio."""
    from data_pipeline.audio import resample

    tokens = _tokens(text)
    if not tokens:
        return []
    audio = resample(np.asarray(audio, np.float32).reshape(-1), int(sample_rate), SAMPLE_RATE)
    pcm = _pcm16(audio)
    decoder = _aligner(wide=False)
    spoken = [_spoken_as(f, decoder) for _, f in tokens]
    forms = [word for words in spoken for word in words]
    aligned = _align_once(decoder, forms, pcm, source) or _align_once(_aligner(wide=True), forms, pcm, source)
    if aligned is None:
        raise DataError(f"{source}: forced alignment failed ({len(tokens)} words in {audio.size / SAMPLE_RATE:.1f} s "
                        f"of audio; does the text match the audio?)")
    duration = audio.size / SAMPLE_RATE
    out, i = [], 0
    for (written, _), words in zip(tokens, spoken):  # a token said as several words spans them all
        first, last = aligned[i], aligned[i + len(words) - 1]
        i += len(words)
        out.append(Word(written, min(first.start_frame / FRAMES_PER_SEC, duration),
                        min((last.end_frame + 1) / FRAMES_PER_SEC, duration)))
    return out


def unknown_words(text: str) -> list[str]:
    """The words of ``text`` (dictionary form) the bundled dictionary does not know: aligned as ``[SPEECH]``."""
    decoder = _aligner(wide=False)
    return [f for _, f in _tokens(text) if _spoken_as(f, decoder) == [UNKNOWN_WORD]]
