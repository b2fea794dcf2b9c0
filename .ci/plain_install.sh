#!/usr/bin/env bash
# The package alone: `pip install .` (no extras, no torch, no libtpu) into a fresh venv, then the
# commands a user runs first, from a directory outside the checkout (so only the installed
# package is importable): --help, the built-in corpus + tokenizer + a few helium_tiny steps, and
# `moshax mimi encode` with a Mimi trained for 2 steps on wav files written here.
# Catches a third-party import that pyproject.toml does not declare.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-python3.11}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/moshax-plain.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
VENV="$WORK/venv"
t0=$SECONDS
step() { echo "plain install: $* ($((SECONDS - t0)) s)"; }

"$PY" -m venv "$VENV"
# pip's output only when it fails. ~2.5 min on 2 busy cores (~860 MB of wheels unpacked: jaxlib,
# scipy, tensorstore, ...); the venv's own pip (no upgrade: one network round trip less).
if ! "$VENV/bin/pip" install -q "$ROOT" >"$WORK/pip.log" 2>&1; then
  cat "$WORK/pip.log" >&2
  echo "plain install: pip install . failed" >&2
  exit 1
fi
step "installed"
for mod in torch moshi libtpu tensorflow_datasets; do
  if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)"; then
    echo "plain install: '$mod' came with a plain 'pip install .' (it must stay optional)" >&2
    exit 1
  fi
done

cd "$WORK"
M="$VENV/bin/moshax"
export JAX_PLATFORMS=cpu
"$M" --help >/dev/null
"$M" mimi --help >/dev/null

# Helium: corpus -> tokenizer -> 3 train steps
"$M" data corpus --output data/corpus
"$M" tokenizer train --input data/corpus/train.txt --vocab-size 512 --output data/tokenizer/spm
"$M" train --config "$ROOT/configs/helium_tiny.yaml" --workdir runs/helium \
  train.steps=3 train.log_every=1 train.eval_every=3 train.eval_batches=1 checkpoint.every=3 train.progress=false
test -f runs/helium/metrics.jsonl
step "helium_tiny trained"

# Mimi: a few wav files (16 kHz, stdlib wave) -> 2 train steps of mimi_tiny -> encode a wav
"$VENV/bin/python" - <<'EOF'
import math, os, wave
import numpy as np

rng = np.random.default_rng(0)
os.makedirs("audio", exist_ok=True)
for i in range(4):
    sr = 16000
    t = np.arange(int(1.5 * sr)) / sr
    f0 = 120 + 40 * i
    x = 0.3 * np.sin(2 * math.pi * f0 * t) * (0.6 + 0.4 * np.sin(2 * math.pi * 3 * t)) + 0.02 * rng.standard_normal(t.size)
    with wave.open(f"audio/clip{i}.wav", "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
EOF
"$M" train --config "$ROOT/configs/mimi_tiny.yaml" --workdir runs/mimi \
  "data.train_sources=[$WORK/audio]" "data.eval_sources=[]" \
  train.steps=2 train.batch_size=2 train.log_every=1 checkpoint.every=2 train.progress=false
step "mimi_tiny trained"
"$M" mimi encode --checkpoint runs/mimi --input audio/clip0.wav --output codes/clip0.npy
"$VENV/bin/python" -c "
import numpy as np
c = np.load('codes/clip0.npy')
assert c.dtype.kind == 'i' and c.shape == (6, 19), (c.dtype, c.shape)  # 1.5 s -> 36000 samples at 24 kHz -> ceil(36000 / 1920) frames
"
step "mimi encode ok; done"
