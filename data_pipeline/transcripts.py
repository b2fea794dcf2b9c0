"""Word times for an audio file: its sidecar transcript when there is one, else a recognizer.

Sidecars live in a transcripts directory, named after the audio's stem (``a/b/AUDIO.wav`` ->
``DIR/AUDIO.json`` or ``DIR/AUDIO.txt``):

* ``STEM.json``: moshi-finetune ``alignments`` or Whisper-style ``segments[].words[]`` (word times
  given; :func:`~data_pipeline.text_stream.read_words`);
* ``STEM.txt``: plain text without times; the words are force-aligned to the audio with
  PocketSphinx (:func:`~data_pipeline.asr_pocketsphinx.align_text`), so the audio is read then.

A sidecar that does not parse, cannot be aligned, or has words outside the audio is a
one-line :class:`DataError` (it belongs to another file, or is broken): never silently dropped.

``moshax data transcribe AUDIO... --output DIR`` writes ``DIR/STEM.json`` (alignments) per file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from data_pipeline.asr import AsrConfig, make_transcriber
from data_pipeline.transcriber import Transcriber
from data_pipeline.errors import DataError
from data_pipeline.text_stream import Word, check_words_in_audio, read_words, write_words

SIDECAR_SUFFIXES = (".json", ".txt")
CHANNELS = ("mix", "left", "right")
ASR_SAMPLE_RATE = 16000


def find_sidecar(audio_path: str | Path, transcripts_dir: str | Path) -> Path | None:
    """``DIR/STEM.json`` or else ``DIR/STEM.txt`` for ``audio_path``; None when neither exists."""
    stem = Path(audio_path).stem
    for suffix in SIDECAR_SUFFIXES:
        path = Path(transcripts_dir) / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def load_channel(audio_path: str | Path, channel: str = "mix", sample_rate: int = ASR_SAMPLE_RATE) -> np.ndarray:
    """Mono float32 ``[samples]`` of one channel (``left`` / ``right``) or the mean of all (``mix``).
    A mono file is its own left, right and mix."""
    from data_pipeline.audio import read_audio

    if channel not in CHANNELS:
        raise DataError(f"channel {channel!r}: expected one of {', '.join(CHANNELS)}")
    audio = read_audio(audio_path, sample_rate, mono=False)
    if channel == "mix" or audio.shape[0] == 1:
        return audio.mean(axis=0)
    return audio[0 if channel == "left" else 1]


def sidecar_words(audio_path: str | Path, transcripts_dir: str | Path, duration: float, *,
                  audio: tuple[np.ndarray, int] | None = None, channel: str = "mix") -> list[Word] | None:
    """The words of ``audio_path``'s sidecar in ``transcripts_dir`` (None: no sidecar).

    A ``.txt`` sidecar is force-aligned against ``audio`` (``(mono samples, sample rate)``), or,
    when not given, against ``channel`` of the file read at 16 kHz. ``duration`` (seconds) bounds
    the words of a ``.json`` sidecar."""
    path = find_sidecar(audio_path, transcripts_dir)
    if path is None:
        return None
    if path.suffix == ".json":
        words = read_words(path)
    else:
        from data_pipeline.asr_pocketsphinx import align_text

        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read the transcript ({type(e).__name__})") from None
        samples, rate = audio if audio is not None else (load_channel(audio_path, channel), ASR_SAMPLE_RATE)
        words = align_text(samples, rate, text, source=str(path))
    check_words_in_audio(words, duration, str(path))
    return sorted(words, key=lambda w: (w.start, w.end))


def words_for_file(audio_path: str | Path, cfg: AsrConfig, transcriber: Transcriber | None = None, *,
                   channel: str = "mix") -> list[Word]:
    """Sidecar words when ``cfg.transcripts`` has one for this file, else the recognizer's."""
    samples = load_channel(audio_path, channel)
    duration = samples.size / ASR_SAMPLE_RATE
    if cfg.transcripts:
        words = sidecar_words(audio_path, cfg.transcripts, duration, audio=(samples, ASR_SAMPLE_RATE))
        if words is not None:
            return words
    if transcriber is None:
        where = f"in {cfg.transcripts} " if cfg.transcripts else ""
        raise DataError(f"{audio_path}: no transcript {where}and no recognizer (--asr pocketsphinx|whisper:DIR)")
    return transcriber.transcribe(samples, ASR_SAMPLE_RATE)


# ---------------------------------------------------------------------------------------------
# moshax data transcribe
# ---------------------------------------------------------------------------------------------


def add_transcribe_arguments(p) -> None:
    """Flags of ``moshax data transcribe``."""
    p.add_argument("audio", nargs="+", help="audio files, directories, globs or .jsonl manifests")
    p.add_argument("--output", required=True, help="directory for STEM.json word-time sidecars (alignments)")
    p.add_argument("--asr", default="pocketsphinx", help="none | pocketsphinx | whisper:DIR (default pocketsphinx)")
    p.add_argument("--transcripts", default="", help="directory of STEM.json / STEM.txt sidecars: used (and .txt "
                                                      "force-aligned) instead of recognition where present")
    p.add_argument("--language", default="en")
    p.add_argument("--channel", choices=CHANNELS, default="mix", help="which channel to transcribe (stereo files)")


def transcribe_command(args) -> int:
    from data_pipeline.audio import list_audio_files

    cfg = AsrConfig(engine=args.asr, transcripts=args.transcripts, language=args.language).validate()
    transcriber = make_transcriber(cfg)
    files, failed = [], 0
    for item in args.audio:  # a missing input is one line, like a bad file; the rest still run
        try:
            files.extend(list_audio_files(item))
        except DataError as e:
            print(f"moshax: error: {e}", file=sys.stderr)
            failed += 1
    files = list(dict.fromkeys(files))
    from tqdm.auto import tqdm

    out, written, words_total = Path(args.output), 0, 0
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--output {out}: cannot create the directory ({e.strerror or type(e).__name__})") from None
    stems: dict[str, str] = {}
    for path in tqdm(files, desc="transcribe", unit="file"):
        try:
            stem = Path(path).stem
            if stems.setdefault(stem, path) != path:  # both would write DIR/STEM.json
                raise DataError(f"{path}: same name as {stems[stem]} (both would write {stem}.json); rename one")
            words = words_for_file(path, cfg, transcriber, channel=args.channel)
        except DataError as e:
            tqdm.write(f"moshax: error: {e}", file=sys.stderr)
            failed += 1
            continue
        write_words(out / f"{stem}.json", words)
        written, words_total = written + 1, words_total + len(words)
    print(f"wrote {written} transcript(s), {words_total} words, to {out}"
          + (f"; {failed} failed (see above)" if failed else ""))
    return 1 if failed else 0
