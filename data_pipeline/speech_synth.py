"""A small synthetic speech corpus for codec training tests, made with eSpeak NG (no downloads).

Sentences come from the built-in text corpus (:func:`data_pipeline.corpus.generate_documents`);
each utterance gets a voice (language x variant), a speed and a pitch drawn from a seeded RNG, is
synthesized by ``espeak-ng`` (Debian/Ubuntu package ``espeak-ng``: ``apt-get install -y
espeak-ng``), resampled from eSpeak's 22.05 kHz to ``sample_rate`` and written as 16-bit mono wav::

    OUT/train/00000.wav ... OUT/train/manifest.jsonl   # {"path", "duration", "text", "voice", "speed", "pitch"}
    OUT/eval/00000.wav  ... OUT/eval/manifest.jsonl

The same arguments give the same files (eSpeak NG is deterministic for a given version).
``moshax data speech --output data/speech --train 200 --eval 20``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from data_pipeline.audio import read_audio, write_wav
from data_pipeline.corpus import generate_documents
from data_pipeline.errors import DataError

ESPEAK_PACKAGE = "espeak-ng"  # the Debian/Ubuntu package (and binary) name
LANGUAGES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "Alex", "Andy",
            "Annie", "david", "ed", "linda", "steph", "max", "john", "paul", "robert")


def espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError(f"espeak-ng not found on PATH: install it (Debian/Ubuntu: apt-get install -y {ESPEAK_PACKAGE})")
    return exe


def _sentences(n_docs: int, seed: int, stream: str) -> list[str]:
    out = []
    for doc in generate_documents(n_docs, seed=seed, stream=stream):
        out.extend(s.strip() for s in re.split(r"(?<=[.?!])\s+", doc) if len(s.split()) >= 3)
    return out


def utterance_plan(num: int, *, seed: int = 0, stream: str = "train", min_words: int = 6,
                   max_words: int = 30) -> list[dict]:
    """``num`` utterances: text (1-3 consecutive sentences), voice, speed (words/min), pitch."""
    rng = random.Random(f"speech-{stream}-{seed}")
    sentences = _sentences(max(8, num), seed, stream)
    plan = []
    for i in range(num):
        k = rng.randrange(len(sentences))
        words: list[str] = []
        while len(words) < min_words or (len(words) < max_words and rng.random() < 0.4):
            words.extend(sentences[k % len(sentences)].split())
            k += 1
        text = " ".join(words[:max_words])
        plan.append({
            "text": text,
            "voice": f"{rng.choice(LANGUAGES)}+{rng.choice(VARIANTS)}",
            "speed": rng.randint(120, 220),
            "pitch": rng.randint(20, 80),
        })
    return plan


def speak(text: str, *, voice: str = "en-us", speed: int = 175, pitch: int = 50,
          sample_rate: int = 24000) -> "np.ndarray":
    """``text`` spoken by eSpeak NG as a float32 mono array ``[1, samples]`` at ``sample_rate``."""
    exe = espeak_binary()
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.wav")
        cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", raw, "--", text]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(raw):
            raise DataError(f"espeak-ng failed for voice {voice}: {proc.stderr.strip() or proc.returncode}")
        return read_audio(raw, sample_rate)


def synthesize(text: str, path: str | Path, *, voice: str = "en-us", speed: int = 175, pitch: int = 50,
               sample_rate: int = 24000) -> float:
    """Speak ``text`` into a mono 16-bit wav at ``sample_rate``; returns its duration (seconds)."""
    audio = speak(text, voice=voice, speed=speed, pitch=pitch, sample_rate=sample_rate)
    peak = float(abs(audio).max())
    if peak > 0.99:
        audio = audio * (0.99 / peak)
    write_wav(path, audio, sample_rate)
    return audio.shape[-1] / sample_rate


def synthesize_corpus(output: str | Path, *, train: int = 200, eval: int = 20, seed: int = 0,
                      sample_rate: int = 24000, workers: int = 2, progress: bool = False) -> dict[str, Path]:
    """Write ``train`` and ``eval`` utterances under ``output``; returns {split: manifest path}.
    Existing files with the same plan are kept (re-running is cheap)."""
    espeak_binary()
    output = Path(output)
    manifests = {}
    for split, n in (("train", train), ("eval", eval)):
        if n <= 0:
            continue
        folder = output / split
        folder.mkdir(parents=True, exist_ok=True)
        plan = utterance_plan(n, seed=seed, stream=split)

        def one(i_item):
            i, item = i_item
            path = folder / f"{i:05d}.wav"
            meta = folder / f".{i:05d}.json"
            if path.exists() and meta.exists() and json.loads(meta.read_text()).get("plan") == item:
                return json.loads(meta.read_text())["row"]
            duration = synthesize(item["text"], path, voice=item["voice"], speed=item["speed"], pitch=item["pitch"],
                                  sample_rate=sample_rate)
            row = {"path": path.name, "duration": round(duration, 4), **item}
            meta.write_text(json.dumps({"plan": item, "row": row}))
            return row

        items = list(enumerate(plan))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            rows_iter = pool.map(one, items)
            if progress:
                from tqdm.auto import tqdm

                rows_iter = tqdm(rows_iter, total=len(items), desc=f"espeak {split}", unit="utt")
            rows = list(rows_iter)
        manifest = folder / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        manifests[split] = manifest
    return manifests


def add_speech_arguments(p) -> None:
    """Flags of ``moshax data speech`` (an argparse parser)."""
    p.add_argument("--output", required=True)
    p.add_argument("--train", type=int, default=200, help="train utterances")
    p.add_argument("--eval", type=int, default=20, help="eval utterances")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-rate", type=int, default=24000)
    p.add_argument("--workers", type=int, default=2)


def speech_command(args) -> int:
    """``moshax data speech --output DIR``: an eSpeak NG corpus (``train/``, ``eval/`` + manifests)."""
    out = synthesize_corpus(args.output, train=args.train, eval=args.eval, seed=args.seed,
                            sample_rate=args.sample_rate, workers=args.workers, progress=True)
    for split, manifest in out.items():
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        hours = sum(r["duration"] for r in rows) / 3600
        print(f"{split}: {len(rows)} files, {hours * 60:.1f} min -> {manifest}")
    return 0
