"""Mimi train step on this CPU, full released architecture, B=4 x 2 s crops: moshax (JAX, jitted)
vs the PyTorch reference (moshi 0.2.13 in train mode, 2 threads) in one run, same weights and crops.

    NO_TORCH_COMPILE=1 .venv/bin/python bench/bench_mimi_train.py [--repeats 5] [--gan]

Both sides run the same work (the reference through bench/reference.py and the installed moshi): forward in train mode (EMA
codebook updates, commitment penalty), loss = L1 + MSE reconstruction + penalty, backward; no
optimizer step. ``--gan`` adds moshax's whole codec training step (the Trainer's jitted step:
generator + EnCodec-size MS-STFT discriminator, hinge + feature matching + commitment + mel-teacher
distillation, AdamW update) on the same crops, which has no counterpart in the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mimi import REF, ref_common  # noqa: E402
from common import header, median  # noqa: E402

B, CROP_S = 4, 2.0


REF_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
import torch.nn.functional as F
from safetensors.torch import load_file
rc_path, weights, crops_path, out = sys.argv[1:5]
import importlib.util
spec = importlib.util.spec_from_file_location("bench_ref_common", rc_path)
rc = importlib.util.module_from_spec(spec); spec.loader.exec_module(rc)
ref, _ = rc.build_full_mimi()
ref.load_state_dict(load_file(weights))
ref.train()
crops = torch.from_numpy(np.load(crops_path))
ts = []
for i, xb in enumerate(crops):
    t = time.perf_counter()
    ref.zero_grad(set_to_none=True)
    q = ref(xb)
    loss = F.l1_loss(q.x, xb) + F.mse_loss(q.x, xb) + q.penalty
    loss.backward()
    if i:
        ts.append(time.perf_counter() - t)
json.dump({"steps": ts, "loss": loss.item(), "threads": torch.get_num_threads()}, open(out, "w"))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gan", action="store_true", help="also time moshax's full GAN train step (Trainer)")
    args = ap.parse_args()
    header(f"Mimi train step (forward + L1/MSE/commitment + backward), B={B} x {CROP_S:.0f} s: moshax vs reference")
    rc = ref_common()
    import torch

    from moshax.interop.mimi_weights import mimi_from_kyutai_state_dict
    from moshax.models.mimi.config import MimiConfig
    from moshax.models.mimi.model import Mimi
    from moshax.parallel.partition import ModelHandle

    ref, _ = rc.build_full_mimi()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    cfg = MimiConfig()
    cfg.quantizer.num_codebooks = 8
    model = mimi_from_kyutai_state_dict(sd, cfg)
    print(f"params {rc.fmt_m(rc.nparams(ref))}; reference torch {torch.__version__}, threads {torch.get_num_threads()}")

    pool = rc.synth_audio(30.0, seed=21, batch=4)  # [4, 1, 720000]
    n = int(CROP_S * rc.SR)
    g = torch.Generator().manual_seed(0)

    def batch():
        starts = torch.randint(0, pool.shape[-1] - n, (B,), generator=g)
        return torch.stack([pool[i % pool.shape[0], :, s:s + n] for i, s in enumerate(starts.tolist())])

    crops = [batch() for _ in range(1 + args.repeats)]

    # reference side first, in its own process (thread pools of torch and XLA slow each other down
    # when they share one), same weights and crops
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in ref.state_dict().items()}, f"{tmp}/w.safetensors")
        np.save(f"{tmp}/crops.npy", np.stack([c.numpy() for c in crops]))
        r = subprocess.run([sys.executable, "-c", REF_SCRIPT, str(REF), f"{tmp}/w.safetensors",
                            f"{tmp}/crops.npy", f"{tmp}/out.json"], capture_output=True, text=True,
                           env=dict(os.environ, NO_TORCH_COMPILE="1"))
        if r.returncode != 0:
            raise SystemExit(f"reference side failed:\n{r.stderr[-3000:]}")
        theirs = json.loads(Path(f"{tmp}/out.json").read_text())
    del ref

    # ---- moshax: same loss, value_and_grad over the params, EMA buffers carried as state
    handle = ModelHandle.from_constructor(lambda r: Mimi(cfg, rngs=r))
    _, p_state, r_state = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(p_state), nnx.to_pure_dict(r_state)
    params = jax.tree.map(jnp.asarray, params)
    rest = jax.tree.map(jnp.asarray, rest)

    def step(params, rest, x, key, step_i):
        def loss_fn(p):
            m = handle.merge(p, rest)
            out = m.train_forward(x, key, step=step_i)
            y = out.audio
            loss = jnp.mean(jnp.abs(y - x)) + jnp.mean(jnp.square(y - x)) + out.penalty
            return loss, nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, new_rest

    jstep = jax.jit(step)
    t0 = time.perf_counter()
    loss, grads, rest = jstep(params, rest, jnp.asarray(crops[0].numpy()), jax.random.key(0), 0)
    jax.block_until_ready(grads)
    print(f"moshax compile + first step {time.perf_counter() - t0:.1f}s, loss {float(loss):.4f}")
    ours = []
    for i, xb in enumerate(crops[1:], 1):
        x = jnp.asarray(xb.numpy())
        t = time.perf_counter()
        loss, grads, rest = jstep(params, rest, x, jax.random.key(i), i)
        jax.block_until_ready(grads)
        ours.append(time.perf_counter() - t)

    audio_s = B * CROP_S
    mo, mt = median(ours), median(theirs["steps"])
    print()
    print("| forward+backward, 4 x 2 s, train mode | median s | min s | audio s / wall s |")
    print("|---|---|---|---|")
    print(f"| moshax (jax.jit) | {mo:.3f} | {min(ours):.3f} | {audio_s / mo:.2f} |")
    print(f"| reference (torch, {theirs['threads']} threads, own process) | {mt:.3f} | {min(theirs['steps']):.3f} | "
          f"{audio_s / mt:.2f} |")
    print(f"moshax / reference: {mt / mo:.2f}x (target >= 1.5x); last losses moshax {float(loss):.4f}, "
          f"reference {theirs['loss']:.4f}; {args.repeats} timed steps after 1 warm-up, same crops, fp32")

    if args.gan:
        from moshax.config import from_dict
        from moshax.training.mimi_task import MimiTask
        from moshax.training.trainer import Trainer

        with tempfile.TemporaryDirectory() as tmp:
            from data_pipeline.audio import write_wav

            for i in range(4):
                write_wav(Path(tmp) / "a" / f"{i}.wav", pool[i, 0].numpy(), rc.SR)
            d = {"model": {"kind": "mimi", "train": {"train_sources": [f"{tmp}/a"], "crop_seconds": CROP_S,
                                                     "teacher": {"kind": "mel", "frame_rate": 50, "n_mels": 64}}},
                 "train": {"batch_size": B, "steps": 100, "progress": False},
                 "optim": {"param_groups": [{"pattern": "^discriminator/", "learning_rate": 3e-4}]}}
            tcfg = from_dict(d)
            task = MimiTask(tcfg)
            tr = Trainer(tcfg, task, workdir=f"{tmp}/run")
            it = task.data_iterator("train", global_batch_size=B, process_index=0, process_count=1)
            state = tr.init_state()
            b = tr.to_global(next(it), 1)
            t0 = time.perf_counter()
            state, m = tr.train_step(state, b)
            jax.block_until_ready(m)
            print(f"\nGAN train step: compile + first step {time.perf_counter() - t0:.1f}s "
                  f"(params {tr.handle.num_params() / 1e6:.2f}M incl. discriminator)")
            ts = []
            for _ in range(args.repeats):
                b = tr.to_global(next(it), 1)
                t = time.perf_counter()
                state, m = tr.train_step(state, b)
                jax.block_until_ready(m)
                ts.append(time.perf_counter() - t)
            print(f"| moshax full GAN step (G + D fwd/bwd + AdamW), 4 x 2 s | {median(ts):.3f} s | "
                  f"{audio_s / median(ts):.2f} audio s / s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
