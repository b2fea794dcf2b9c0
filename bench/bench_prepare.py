"""Data preparation throughput per stage, in hours of audio per CPU-core-hour.

    .venv/bin/python bench/bench_prepare.py [--dialogues 16] [--input DIR] [--skip-asr] [--skip-reference]

Input: eSpeak NG two-voice dialogues (mono mixes, ~20-40 s each; or --input DIR). Each stage is the
pipeline's own function (data_pipeline/analyze.py), timed in this process with
``time.process_time()`` (CPU seconds over all threads), so "per CPU-core-hour" is audio hours /
CPU hours. Rows: decode + resample, VAD (Silero ONNX), diarization (GE2E windows + clustering +
split), text stream (sidecar words -> tokens), ASR (pocketsphinx, main stream), Mimi tokenization
(full released architecture, random weights, both streams, batched), end to end without codec and
ASR (``run_prepare`` with a codec that returns zeros: decode, resample, VAD, diarization,
interleave, write), and the reference's Mimi batch encode (PyTorch, 2 threads) on 10 s, in a child
process. Targets: ../shared/targets.md (>= 50 h per core-hour without codec and ASR; tokenization
>= 1.5x the reference's batch encode).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu may be installed: this bench is for the CPU
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

REF_SCRIPT = r"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
import reference as rc, torch
mimi, _ = rc.build_full_mimi()
x = rc.synth_audio(10.0, seed=3)
with torch.no_grad():
    ts = rc.timeit(lambda: mimi.encode(x), repeats=3, warmup=1)
    t0 = time.process_time(); mimi.encode(x); cpu = time.process_time() - t0
print(json.dumps({"wall": sorted(ts)[1], "cpu": cpu}))
"""


def rate(audio_seconds: float, cpu_seconds: float) -> float:
    return (audio_seconds / 3600) / max(cpu_seconds / 3600, 1e-12)


class ZeroCodec:
    """Codes of zeros: prepare end to end without the codec's cost."""

    sample_rate, frame_rate, num_codebooks, card = 24000, 12.5, 8, 2048

    def encode_batch(self, audios, batch_size=4):
        return [np.zeros((8, -(-a.shape[-1] // 1920)), np.int32) for a in audios]

    def identity(self):
        return {"name": "zeros"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dialogues", type=int, default=16)
    ap.add_argument("--input")
    ap.add_argument("--skip-asr", action="store_true")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-codec", action="store_true")
    args = ap.parse_args()

    from common import header
    from data_pipeline.analyze import decode_stage, split_stage, text_stage, words_stage
    from data_pipeline.audio import list_audio_files
    from data_pipeline.dialogue_synth import synthesize_dialogues
    from data_pipeline.prepare import run_prepare
    from data_pipeline.prepare_config import PrepareConfig
    from data_pipeline.stage_models import StageModels

    header("data preparation: hours of audio per CPU-core-hour, per stage")
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    src = Path(args.input) if args.input else tmp / "dialogues"
    if not args.input:
        synthesize_dialogues(src, args.dialogues, seed=11, turns=10)
    files = list_audio_files([str(src)])
    from data_pipeline.asr import AsrConfig

    cfg = PrepareConfig(inputs=[str(src)], output=str(tmp / "out"), mimi_checkpoint="-",
                        asr=AsrConfig(transcripts=str(src / "truth") if (src / "truth").is_dir() else ""))
    cfg.diarization.num_speakers = 2
    parts = StageModels(cfg).build()
    rows = []

    def stage(name, fn, items, seconds=None):
        """Time ``fn`` over ``items`` (``seconds``: their audio, when not all the files)."""
        t0 = time.process_time()
        out = [fn(x) for x in items]
        rows.append((name, rate(total if seconds is None else seconds, time.process_time() - t0)))
        return out

    audio = [decode_stage(f, cfg) for f in files[:1]]  # warm up imports
    t0 = time.process_time()
    audio = [decode_stage(f, cfg) for f in files]
    total = sum(a.shape[-1] for a in audio) / 24000
    rows.append(("decode + resample (24 kHz)", rate(total, time.process_time() - t0)))
    parts["vad"].regions(audio[0][0], 24000)  # session start-up outside the timing
    stage("VAD (Silero ONNX)", lambda a: parts["vad"].regions(a[0], 24000), audio)
    streams = stage("VAD + diarization + split", lambda a: split_stage(a, cfg, "x", parts["vad"], parts["diarizer"]),
                    audio)
    words = [words_stage(f, s, cfg)[0] for f, s in zip(files, streams)]
    if cfg.asr.transcripts:
        from data_pipeline.tokenizer import train_tokenizer
        from data_pipeline.corpus import write_corpus
        from data_pipeline.text_stream import encoder_for
        from data_pipeline.tokenizer import load_tokenizer

        corpus = write_corpus(tmp / "corpus", train_docs=4000, eval_docs=2)
        train_tokenizer([corpus["train"]], tmp / "spm", vocab_size=256)
        enc = encoder_for(load_tokenizer(tmp / "spm.model"))
        stage("text stream (sidecar words -> tokens)", lambda ws: text_stage(ws[0], ws[1], cfg, enc),
              [(w, s.duration) for w, s in zip(words, streams)])
    if not args.skip_asr:
        try:
            from data_pipeline.asr import AsrConfig, make_transcriber

            tr = make_transcriber(AsrConfig(engine="pocketsphinx"))
            some = streams[: max(2, len(streams) // 4)]  # the slow stage: a quarter of the files
            stage("ASR with word times (pocketsphinx, main stream)", lambda s: tr.transcribe(s.main, 24000), some,
                  seconds=sum(s.duration for s in some))
        except ImportError as e:
            print(f"(ASR skipped: {e})")
    t0 = time.process_time()
    run_prepare(PrepareConfig(**{**cfg.__dict__, "output": str(tmp / "out0")}), ZeroCodec(), progress=False,
                log=lambda m: None)
    rows.append(("end to end without codec and ASR (run_prepare, 0 workers)", rate(total, time.process_time() - t0)))
    if not args.skip_codec:
        from flax import nnx

        from moshax.inference.codec import CodecRunner
        from moshax.models.mimi.config import MimiConfig
        from moshax.models.mimi.model import Mimi

        runner = CodecRunner(Mimi(MimiConfig(), rngs=nnx.Rngs(0)), num_codebooks=8)
        both = [x for s in streams for x in (s.main, s.other)]
        runner.encode_batch(both[:4], batch_size=4)  # compile
        t0, w0 = time.process_time(), time.perf_counter()
        runner.encode_batch(both, batch_size=4)
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        rows.append(("Mimi tokenization (full Mimi, both streams, batch 4)", rate(2 * total, cpu)))
        print(f"Mimi tokenization: {2 * total / wall:.1f} s of audio per wall second (both streams)")
    if not args.skip_reference:
        r = subprocess.run([sys.executable, "-c", REF_SCRIPT, str(ROOT / "bench")], capture_output=True, text=True,
                           env=dict(os.environ, NO_TORCH_COMPILE="1"))
        if r.returncode == 0:
            import json

            ref = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(("reference Mimi batch encode (PyTorch, 10 s, 2 threads)", rate(10.0, ref["cpu"])))
            print(f"reference batch encode: {10.0 / ref['wall']:.1f} s of audio per wall second")
        else:
            print(f"(reference skipped: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode})")
    print(f"\n{len(files)} files, {total / 60:.1f} min of audio\n")
    print("| stage | hours of audio per CPU-core-hour |")
    print("|---|---|")
    for name, v in rows:
        print(f"| {name} | {v:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
