"""Full released Mimi on this CPU, moshax (JAX, jitted) vs the PyTorch reference (moshi 0.2.13,
2 threads), same weights and the same input, in one run.

    NO_TORCH_COMPILE=1 .venv/bin/python bench/bench_mimi.py [--repeats 5] [--frames 100]

1. batch encode / decode of 10 s of 24 kHz mono (B=1): seconds of audio per wall second, ratio;
2. streaming, one 80 ms frame (1920 samples) at a time, B=1: encode / decode / encode+decode
   latency p50 / p99 against the 80 ms real-time budget.

The reference side is bench/reference.py (the installed moshi package; random weights, codebooks
filled from synthetic audio), timed in a child process before the JAX side runs (the two runtimes' thread
pools slow each other down when they share a process); its state dict is loaded into moshax with
moshax.interop.mimi_weights, and the codes of both sides are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
REF = Path(__file__).resolve().parent / "reference.py"  # the reference side: the installed moshi package

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_json_option, header, median, write_figures  # noqa: E402


def ref_common():
    """bench/reference.py (torch, 2 threads), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_reference", REF)
    rc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rc)
    return rc


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


# The reference side runs in its own process (torch, 2 threads), before the JAX side computes
# anything: run in one process, the two runtimes' thread pools slow each other down (torch's batch
# encode took 4.9 s instead of 0.75 s next to XLA's threads). Same weights (saved by the parent),
# same inputs.
REF_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
from safetensors.torch import load_file
rc_path, weights, wav_path, swav_path, out, repeats, warm, frames = sys.argv[1:9]
import importlib.util
spec = importlib.util.spec_from_file_location("bench_ref_common", rc_path)
rc = importlib.util.module_from_spec(spec); spec.loader.exec_module(rc)
ref, _ = rc.build_full_mimi()
ref.load_state_dict(load_file(weights))
ref.eval()
wav = torch.from_numpy(np.load(wav_path)); swav = torch.from_numpy(np.load(swav_path))
res = {}
with torch.no_grad():
    codes = ref.encode(wav)
    res["encode"] = rc.timeit(lambda: ref.encode(wav), repeats=int(repeats), warmup=1)
    res["decode"] = rc.timeit(lambda: ref.decode(codes), repeats=int(repeats), warmup=1)
np.save(out + ".codes.npy", codes.numpy())
enc, dec = [], []
frame = rc.FRAME
with torch.no_grad(), ref.streaming(1):
    for i in range(int(warm) + int(frames)):
        chunk = swav[:, :, i * frame:(i + 1) * frame]
        t0 = time.perf_counter(); c = ref.encode(chunk); t1 = time.perf_counter(); ref.decode(c); t2 = time.perf_counter()
        if i >= int(warm):
            enc.append(1e3 * (t1 - t0)); dec.append(1e3 * (t2 - t1))
res["stream_encode"], res["stream_decode"] = enc, dec
res["threads"] = torch.get_num_threads()
json.dump(res, open(out, "w"))
"""


def run_reference(rc_path: Path, weights: Path, wav: np.ndarray, swav: np.ndarray, tmp: Path, args) -> dict:
    import subprocess

    np.save(tmp / "wav.npy", wav)
    np.save(tmp / "swav.npy", swav)
    out = tmp / "ref.json"
    cmd = [sys.executable, "-c", REF_SCRIPT, str(rc_path), str(weights), str(tmp / "wav.npy"), str(tmp / "swav.npy"),
           str(out), str(args.repeats), str(args.warmup_frames), str(args.frames)]
    env = dict(os.environ, NO_TORCH_COMPILE="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"reference side failed:\n{r.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["codes"] = np.load(str(out) + ".codes.npy")
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--warmup-frames", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    add_json_option(ap)
    args = ap.parse_args()
    load_start = os.getloadavg()

    header("Mimi (full released architecture, random weights, 8 codebooks): moshax vs PyTorch reference")
    rc = ref_common()
    import tempfile

    import torch
    from safetensors.torch import save_file

    from moshax.inference.bound import BoundModel
    from moshax.interop.mimi_weights import mimi_from_kyutai_state_dict
    from moshax.models.mimi.config import MimiConfig

    t0 = time.perf_counter()
    ref, _ = rc.build_full_mimi()
    sd = {k: v.detach().contiguous() for k, v in ref.state_dict().items()}
    cfg = MimiConfig()
    model = mimi_from_kyutai_state_dict({k: v.numpy() for k, v in sd.items()}, cfg)
    params = rc.nparams(ref)
    frame = cfg.frame_size
    wav = rc.synth_audio(args.seconds, seed=7).numpy()  # [1, 1, 240000]
    n_total = args.warmup_frames + args.frames
    swav = rc.synth_audio(n_total * frame / cfg.sample_rate, seed=8).numpy()
    del ref
    print(f"built in {time.perf_counter() - t0:.1f}s; params {rc.fmt_m(params)}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file(sd, str(tmp / "ref.safetensors"))
        t0 = time.perf_counter()
        theirs = run_reference(REF, tmp / "ref.safetensors", wav, swav, tmp, args)
        print(f"reference side (separate process, torch {torch.__version__}, {theirs['threads']} threads): "
              f"{time.perf_counter() - t0:.1f}s")

    # moshax: weights bound once, transformers in the unstacked inference layout
    bound = BoundModel(model)
    encode = bound.jit(lambda m, a: m.encode(a, 8))
    decode = bound.jit(lambda m, c: m.decode(c))
    x = jnp.asarray(wav)
    t0 = time.perf_counter()
    codes = encode(x).block_until_ready()
    c_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode(codes).block_until_ready()
    print(f"moshax compile + first call: encode {c_enc:.1f}s, decode {time.perf_counter() - t0:.1f}s")

    def timeit(fn):
        fn()
        out = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    ours = {"encode": timeit(lambda: encode(x).block_until_ready()),
            "decode": timeit(lambda: decode(codes).block_until_ready())}
    equal = float(np.mean(np.asarray(codes) == theirs["codes"]))

    print()
    print(f"| batch op (B=1, {args.seconds:.0f} s audio) | moshax median s | moshax audio s/s | reference median s "
          f"| reference audio s/s | moshax / reference |")
    print("|---|---|---|---|---|---|")
    for name in ("encode", "decode"):
        o, t = median(ours[name]), median(theirs[name])
        print(f"| {name} | {o:.3f} | {args.seconds / o:.2f} | {t:.3f} | {args.seconds / t:.2f} | {t / o:.2f}x |")
    print(f"codes equal to the reference's: {100 * equal:.2f}%")

    # streaming, one frame at a time
    enc_step = bound.jit(lambda m, a, s: m.encode_step(a, s, 8), donate_argnums=(1,))
    dec_step = bound.jit(lambda m, c, s: m.decode_step(c, s), donate_argnums=(1,))
    sstate = bound.model.init_state(1)
    ours_enc, ours_dec, s_codes = [], [], []
    for i in range(n_total):
        chunk = jnp.asarray(swav[:, :, i * frame:(i + 1) * frame])
        t0 = time.perf_counter()
        c, sstate = enc_step(chunk, sstate)
        c.block_until_ready()
        t1 = time.perf_counter()
        a, sstate = dec_step(c, sstate)
        a.block_until_ready()
        t2 = time.perf_counter()
        s_codes.append(np.asarray(c))
        if i >= args.warmup_frames:
            ours_enc.append(1e3 * (t1 - t0))
            ours_dec.append(1e3 * (t2 - t1))
    batch_codes = np.asarray(encode(jnp.asarray(swav)))
    s_codes = np.concatenate(s_codes, -1)
    match = float(np.mean(s_codes == batch_codes[..., :s_codes.shape[-1]]))
    ref_enc, ref_dec = theirs["stream_encode"], theirs["stream_decode"]
    both, ref_both = [a + b for a, b in zip(ours_enc, ours_dec)], [a + b for a, b in zip(ref_enc, ref_dec)]

    print()
    print(f"| streaming (B=1, 1 frame = {frame} samples = 80 ms) | moshax p50 ms | moshax p99 ms | reference p50 ms "
          f"| reference p99 ms | moshax / reference (p50) |")
    print("|---|---|---|---|---|---|")
    for name, o, t in (("encode frame", ours_enc, ref_enc), ("decode frame", ours_dec, ref_dec),
                       ("encode+decode", both, ref_both)):
        print(f"| {name} | {pct(o, 50):.2f} | {pct(o, 99):.2f} | {pct(t, 50):.2f} | {pct(t, 99):.2f} | "
              f"{pct(t, 50) / pct(o, 50):.2f}x |")
    print(f"\n{args.frames} frames timed after {args.warmup_frames} warm-up frames; budget 80 ms/frame: moshax p50 "
          f"{pct(both, 50):.1f} ms ({'within' if pct(both, 50) <= 80 else 'over'} budget; target <= 40 ms); "
          f"streaming codes == batch codes on {100 * match:.2f}% of entries")
    write_figures(args.json, {
        "batch_encode_ratio": median(theirs["encode"]) / median(ours["encode"]),
        "batch_encode_audio_s_per_s": args.seconds / median(ours["encode"]),
        "batch_codes_equal_reference": equal,
        "stream_p50_ms": pct(both, 50), "stream_reference_p50_ms": pct(ref_both, 50),
        "stream_codes_equal_batch": match}, load_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
