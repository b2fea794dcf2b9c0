"""VAD and diarization on eSpeak NG dialogues with exact truth: DER and speed, on CPU, one thread.

    PYTHONPATH=src:. .venv/bin/python bench/bench_vad_diarize.py [--dialogues 6] [--turns 6]

Prints, for 2- and 3-voice dialogues: the diarization error rate (pyannote.metrics, collar 0.25 s,
overlap scored), with the speaker count automatic and given; the VAD's cover of the truth words;
and speed as hours of audio per CPU-core-hour (process CPU time, BLAS and onnxruntime on one
thread), for the VAD alone and for diarization (embeddings + clustering, VAD excluded).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from data_pipeline.audio import read_audio  # noqa: E402
from data_pipeline.dialogue_synth import synthesize_dialogues  # noqa: E402
from data_pipeline.diarize import DiarizationConfig, diarize  # noqa: E402
from data_pipeline.rttm import read_rttm  # noqa: E402
from data_pipeline.speaker_embedding import SpeakerEncoder  # noqa: E402
from data_pipeline.text_stream import read_words  # noqa: E402
from data_pipeline.vad import SileroVad  # noqa: E402


def annotation(turns):
    from pyannote.core import Annotation, Segment

    ann = Annotation()
    for i, t in enumerate(turns):
        ann[Segment(t.start, t.end), i] = t.speaker
    return ann


def whole(duration: float):
    """The scored extent: the whole file."""
    from pyannote.core import Segment, Timeline

    return Timeline([Segment(0.0, duration)])


def word_cover(words, regions) -> float:
    """Fraction of the truth words' time inside the regions."""
    total = sum(w.end - w.start for w in words)
    inside = sum(max(0.0, min(w.end, e) - max(w.start, s)) for w in words for s, e in regions)
    return inside / total if total else 1.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dialogues", type=int, default=6)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--threshold", type=float, default=DiarizationConfig.cluster_threshold)
    ap.add_argument("--min-share", type=float, default=DiarizationConfig.min_cluster_share)
    ap.add_argument("--split", type=float, default=DiarizationConfig.split_threshold)
    ap.add_argument("--seed", type=int, default=10)
    args = ap.parse_args()
    from pyannote.metrics.diarization import DiarizationErrorRate

    vad, encoder = SileroVad(), SpeakerEncoder()
    automatic = DiarizationConfig(cluster_threshold=args.threshold, min_cluster_share=args.min_share,
                                  split_threshold=args.split)
    encoder.weights  # noqa: B018 - load outside the timing
    with tempfile.TemporaryDirectory() as tmp:
        for speakers in (2, 3):
            paths = synthesize_dialogues(Path(tmp) / f"v{speakers}", args.dialogues, seed=args.seed + speakers,
                                         speakers=speakers, turns=args.turns)
            der_auto = DiarizationErrorRate(collar=0.25)
            der_known = DiarizationErrorRate(collar=0.25)
            audio_s = vad_cpu = dia_cpu = 0.0
            covers, counts = [], []
            for p in paths:
                truth_dir = p.parent / "truth"
                truth = read_rttm(truth_dir / f"{p.stem}.rttm")[p.stem]
                audio = read_audio(p, 16000)[0]
                audio_s += audio.size / 16000
                t0 = time.process_time()
                regions = vad.regions(audio, 16000)
                vad_cpu += time.process_time() - t0
                covers.append(word_cover(read_words(truth_dir / f"{p.stem}.json"), regions))
                t0 = time.process_time()
                d = diarize(audio, 16000, regions, automatic, encoder)
                dia_cpu += time.process_time() - t0
                counts.append(len(d.talk_time))
                uem = whole(audio.size / 16000)
                der_auto(annotation(truth), annotation(d.turns), uem=uem)
                given = DiarizationConfig(num_speakers=len({t.speaker for t in truth}))
                d2 = diarize(audio, 16000, regions, given, encoder)
                der_known(annotation(truth), annotation(d2.turns), uem=uem)
            print(f"{speakers} voices, {len(paths)} dialogues, {audio_s:.0f} s of audio:")
            print(f"  DER (collar 0.25) automatic count {abs(der_auto):.3f}  (speakers found {counts}), "
                  f"count given {abs(der_known):.3f}")
            print(f"  VAD word cover: min {min(covers):.3f} mean {np.mean(covers):.3f}")
            print(f"  speed: VAD {audio_s / vad_cpu:.0f} h audio per CPU-core-hour, "
                  f"diarization (no VAD) {audio_s / dia_cpu:.0f} h per CPU-core-hour")


if __name__ == "__main__":
    main()
