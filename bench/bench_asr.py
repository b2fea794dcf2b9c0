"""PocketSphinx recognition and forced alignment speed (and accuracy) on eSpeak NG dialogues.

    .venv/bin/python bench/bench_asr.py [--dialogues 4] [--turns 6]

Each dialogue is synthesized in stereo (left = the main speaker alone, exact word times), and its
left channel is transcribed, then force-aligned to the main speaker's text. Speed is hours of audio
per CPU-core-hour (process CPU time: both run on one core), so the figure does not depend on what
else the machine runs; wall time is printed too. Accuracy: WER of recognition (case and punctuation
off), median / p90 |start error| of alignment against the exact times; last, all dialogues as
one long file (alignment's wide-beam retry).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SR = 16000


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w' ]", " ", text.lower()).split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dialogues", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    from importlib.metadata import version

    import jiwer

    from data_pipeline.asr import AsrConfig, make_transcriber
    from data_pipeline.asr_pocketsphinx import align_text
    from data_pipeline.audio import read_audio
    from data_pipeline.dialogue_synth import synthesize_dialogues
    from data_pipeline.text_stream import read_words

    print(f"== ASR bench: pocketsphinx {version('pocketsphinx')}, {args.dialogues} dialogues, "
          f"{args.turns} turns each")
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthesize_dialogues(tmp, args.dialogues, seed=args.seed, turns=args.turns, stereo=True,
                                     sample_rate=SR)
        items = []
        for path in paths:
            main_speaker = json.loads((Path(tmp) / "truth" / f"{path.stem}.meta.json").read_text())["main_speaker"]
            truth = [w for w in read_words(Path(tmp) / "truth" / f"{path.stem}.json") if w.speaker == main_speaker]
            items.append((read_audio(path, SR, mono=False)[0], truth))
    audio_sec = sum(left.size for left, _ in items) / SR

    transcriber = make_transcriber(AsrConfig(engine="pocketsphinx"))
    transcriber.transcribe(items[0][0][:SR], SR)  # model loaded before the clock starts
    cpu, wall = time.process_time(), time.perf_counter()
    recognized = [transcriber.transcribe(left, SR) for left, _ in items]
    rec_cpu, rec_wall = time.process_time() - cpu, time.perf_counter() - wall

    cpu, wall = time.process_time(), time.perf_counter()
    aligned = [align_text(left, SR, " ".join(w.text for w in truth)) for left, truth in items]
    ali_cpu, ali_wall = time.process_time() - cpu, time.perf_counter() - wall

    # One long file: every dialogue end to end (the default beams lose the path past ~1-2 min;
    # align_text retries with wide ones).
    long_audio = np.concatenate([left for left, _ in items])
    offsets = np.cumsum([0] + [left.size / SR for left, _ in items])
    long_truth = [t.start + off for (_, truth), off in zip(items, offsets) for t in truth]
    cpu, wall = time.process_time(), time.perf_counter()
    long_aligned = align_text(long_audio, SR, " ".join(w.text for _, truth in items for w in truth))
    long_cpu, long_wall = time.process_time() - cpu, time.perf_counter() - wall
    long_errors = [abs(a.start - t) for a, t in zip(long_aligned, long_truth)]

    ref = " ".join(normalize(" ".join(w.text for w in truth)) for _, truth in items)
    hyp = " ".join(normalize(" ".join(w.text for w in words)) for words in recognized)
    errors = [abs(a.start - t.start) for words, (_, truth) in zip(aligned, items) for a, t in zip(words, truth)]
    print(f"audio: {audio_sec:.1f} s (main-speaker channels, {len(ref.split())} words)")
    print(f"recognition: {audio_sec / rec_cpu:.2f} h audio per CPU-core-hour ({rec_cpu:.1f} s CPU, "
          f"{rec_wall:.1f} s wall), WER {jiwer.wer(ref, hyp):.3f}")
    print(f"forced alignment: {audio_sec / ali_cpu:.1f} h audio per CPU-core-hour ({ali_cpu:.1f} s CPU, "
          f"{ali_wall:.1f} s wall), |start error| median {np.median(errors) * 1000:.0f} ms, "
          f"p90 {np.quantile(errors, 0.9) * 1000:.0f} ms")
    print(f"forced alignment of one {long_audio.size / SR:.0f} s file: {audio_sec / long_cpu:.1f} h audio per "
          f"CPU-core-hour ({long_cpu:.1f} s CPU, {long_wall:.1f} s wall), |start error| median "
          f"{np.median(long_errors) * 1000:.0f} ms, p90 {np.quantile(long_errors, 0.9) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
