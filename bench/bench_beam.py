"""The fleet path (``moshax data beam`` + ``moshax data tokenize-audio``) against the local
``moshax data prepare`` on the same input, in hours of audio per CPU-core-hour.

    .venv/bin/python bench/bench_beam.py [--dialogues 12] [--workers 2] [--skip-codec] [--skip-reference]

Input: eSpeak NG two-voice dialogues (mono mixes with sidecar word times): VAD + diarization (2
speakers) + sidecar words + text stream, records of 120 s. Rows:

* local ``run_prepare`` with a codec of zeros, in this process (decode ... write, no codec);
* ``run_beam`` on the DirectRunner in this process (the same stage functions, Beam's scheduling
  and the segments written to disk);
* ``run_beam`` on the DirectRunner with ``--workers`` worker processes (CPU time of this process and
  its reaped children; the wall time is printed too);
* ``run_tokenize`` of those segments with the full Mimi (random weights, both streams, batch 4)
  on one process: hours of audio per CPU-core-hour and per wall-hour, beside the reference's batch
  encode (PyTorch, 2 threads, 10 s) in a child process.

CPU time is ``time.process_time()`` (all threads) plus ``RUSAGE_CHILDREN`` for worker processes.
The machine's load average is printed: on a shared machine compare the rows of one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

from bench_prepare import REF_SCRIPT, ZeroCodec, rate  # noqa: E402


def cpu_now() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


class FullMimi:
    """The full released Mimi (random weights) behind the prepare codec interface."""

    sample_rate, frame_rate, num_codebooks, card = 24000, 12.5, 8, 2048

    def __init__(self):
        from flax import nnx

        from moshax.inference.codec import CodecRunner
        from moshax.models.mimi.config import MimiConfig
        from moshax.models.mimi.model import Mimi

        self.runner = CodecRunner(Mimi(MimiConfig(), rngs=nnx.Rngs(0)), num_codebooks=8)

    def encode_batch(self, audios, batch_size=4):
        return self.runner.encode_batch(audios, batch_size=batch_size)

    def identity(self):
        return {"name": "mimi-full-random"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dialogues", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-codec", action="store_true")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()

    from common import header
    from data_pipeline.asr import AsrConfig
    from data_pipeline.beam_prepare import run_beam
    from data_pipeline.corpus import write_corpus
    from data_pipeline.dialogue_synth import synthesize_dialogues
    from data_pipeline.prepare import run_prepare
    from data_pipeline.prepare_config import PrepareConfig
    from data_pipeline.tokenize_segments import run_tokenize
    from data_pipeline.tokenizer import train_tokenizer

    header("fleet path vs local prepare: hours of audio per CPU-core-hour")
    tmp = Path(tempfile.mkdtemp(prefix="bench-beam-"))
    src = tmp / "dialogues"
    synthesize_dialogues(src, args.dialogues, seed=11, turns=10)
    corpus = write_corpus(tmp / "corpus", train_docs=4000, eval_docs=2)
    train_tokenizer([corpus["train"]], tmp / "spm", vocab_size=256)
    cfg = PrepareConfig(inputs=[str(src)], output="", mimi_checkpoint="-", tokenizer=str(tmp / "spm.model"),
                        asr=AsrConfig(transcripts=str(src / "truth")), files_per_shard=4)
    cfg.diarization.num_speakers = 2
    quiet = lambda m: None  # noqa: E731
    rows = []

    def timed(name, fn):
        c0, w0 = cpu_now(), time.perf_counter()
        out = fn()
        cpu, wall = cpu_now() - c0, time.perf_counter() - w0
        rows.append((name, cpu, wall))
        return out

    def with_output(name):
        return PrepareConfig(**{**cfg.__dict__, "output": str(tmp / name)})

    # one whole untimed pass first: the first run in a process pays ~15 s of imports and model loads
    # (torch for the GE2E weights, onnxruntime, scikit-learn) that a long job pays once
    run_prepare(with_output("warm"), ZeroCodec(), progress=False, log=quiet)
    timed("local prepare (run_prepare, in process, codec of zeros)",
          lambda: run_prepare(with_output("local"), ZeroCodec(), progress=False, log=quiet))
    manifest = timed("beam, DirectRunner in process",
                     lambda: run_beam(with_output("seg1"), runner="DirectRunner", log=quiet))
    hours = manifest["stats"]["hours_in"]
    timed(f"beam, DirectRunner, {args.workers} worker processes",
          lambda: run_beam(with_output("seg2"), runner="DirectRunner", log=quiet,
                           beam_args=[f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]))
    tok = None
    if not args.skip_codec:
        codec = FullMimi()
        codec.encode_batch([np.zeros(24000 * 10, np.float32)] * 4)  # compile the 10 s chunk
        tok = timed("tokenize-audio: full Mimi, both streams, batch 4, 1 process",
                    lambda: run_tokenize(str(tmp / "seg1"), str(tmp / "tokens"), codec, settings={"mimi_checkpoint": "-"},
                                         progress=False, log=quiet))
    ref = None
    if not args.skip_codec and not args.skip_reference:
        r = subprocess.run([sys.executable, "-c", REF_SCRIPT, str(ROOT / "bench")], capture_output=True, text=True,
                           env=dict(os.environ, NO_TORCH_COMPILE="1"))
        if r.returncode == 0:
            import json

            ref = json.loads(r.stdout.strip().splitlines()[-1])
        else:
            print(f"(reference skipped: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode})")

    print(f"\n{args.dialogues} files, {hours * 60:.1f} min of audio; load average {os.getloadavg()[0]:.2f} "
          f"(1 min) at the end\n")
    print("| path | CPU s | wall s | hours of audio per CPU-core-hour | per wall-hour |")
    print("|---|---|---|---|---|")
    for name, cpu, wall in rows:
        audio = hours * 3600 * (2 if name.startswith("tokenize") else 1)
        print(f"| {name} | {cpu:.1f} | {wall:.1f} | {rate(audio, cpu):,.1f} | {rate(audio, wall):,.1f} |")
    if ref is not None:
        print(f"| reference Mimi batch encode (PyTorch, 10 s, 2 threads) | {ref['cpu']:.2f} | {ref['wall']:.2f} | "
              f"{rate(10.0, ref['cpu']):,.1f} | {rate(10.0, ref['wall']):,.1f} |")
    print("\n(tokenize rows count both streams' audio; the beam rows write float32 segments: "
          f"{sum(p.stat().st_size for p in (tmp / 'seg1').rglob('*') if p.is_file()) / 2**20:.1f} MiB here)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if tok is None or tok["manifest"] else 1


if __name__ == "__main__":
    sys.exit(main())
