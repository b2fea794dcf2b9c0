"""Mimi train step on this CPU, full released architecture, B=4 x 2 s crops: moshax (JAX, jitted)
vs the PyTorch reference (moshi 0.2.13 in train mode, 2 threads) in one run, same weights and crops.

    NO_TORCH_COMPILE=1 .venv/bin/python bench/bench_mimi_train.py [--repeats 8] [--gan] [--malloc default]

Both sides run the same work (the reference through bench/reference.py and the installed moshi):

* fwd+bwd: forward in train mode (EMA codebook updates, commitment penalty), loss = L1 + MSE
  reconstruction + penalty, backward (the reference zeroes its grads with ``set_to_none``);
* full step: the same + AdamW (reference: ``torch.optim.AdamW(foreach=True).step()``, lr 1e-4,
  weight decay 0.1, as bench_lm_train.py; moshax: the trainer's optimizer from
  ``training/optimizer.py`` (clipping + fused AdamW), params and optimizer state donated).

The reference runs in a child process (the two runtimes' thread pools slow each other down in
one); the four measurements are interleaved step by step after 0.5 s pauses, so a change in the
machine's load hits them alike. Target (../shared/targets.md): full step vs full step >= 1.2x.
``--malloc tuned`` (default) applies bench_lm_train.py's glibc setting to both sides.

``--gan`` adds moshax's whole codec training step (the Trainer's jitted step: generator +
EnCodec-size MS-STFT discriminator, hinge + feature matching + commitment + mel-teacher
distillation, AdamW update) on the same crops, which has no counterpart in the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mimi import REF, ref_common  # noqa: E402
from bench_lm_train import PAUSE, tune_malloc  # noqa: E402
from common import LineWorker, add_json_option, header, load_average, median, write_figures  # noqa: E402

B, CROP_S = 4, 2.0
# Both sides k-means-initialize one more codebook level per training step (Kyutai's rule: a level
# starts once the one before it has), so the first 8 steps of a run (1 semantic + 7 acoustic
# levels, the acoustic ones one after the other) each carry a 50-iteration k-means: the warm-up
# runs past them and the timed steps are the steady state of a training run.
STEADY_STATE_AFTER = 8


def reference_worker(rc_path: str, weights: str, crops_path: str) -> None:
    """Child process: for each line "step I" / "full I" on stdin, time one reference step on crop I."""
    import importlib.util

    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    if os.environ.get("MOSHAX_BENCH_MALLOC") == "tuned":
        tune_malloc()
    spec = importlib.util.spec_from_file_location("bench_ref_common", rc_path)
    rc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rc)
    ref, _ = rc.build_full_mimi()
    ref.load_state_dict(load_file(weights))
    ref.train()
    crops = torch.from_numpy(np.load(crops_path))
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)

    def step(i):
        ref.zero_grad(set_to_none=True)
        q = ref(crops[i])
        loss = F.l1_loss(q.x, crops[i]) + F.mse_loss(q.x, crops[i]) + q.penalty
        loss.backward()
        return loss.item()

    for _ in range(STEADY_STATE_AFTER):  # every codebook level k-means-initialized (one level a step)
        loss = step(0)
    opt.step()  # warm-up: AdamW allocates its state on the first step
    inited = [bool(b.item()) for n, b in ref.named_buffers() if n.endswith("_initialized")]
    assert inited and all(inited), "a reference codebook level is not initialized after the warm-up"
    print(json.dumps({"loss": loss, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        what, i = line.split()
        t0 = time.perf_counter()
        loss = step(int(i))
        if what == "full":
            opt.step()
        print(json.dumps({"seconds": time.perf_counter() - t0, "loss": loss}), flush=True)


def moshax_side(model, cfg, crops):
    """Returns (fwd_bwd(i), full_step(i), info) for the jitted moshax steps on crop i."""
    from moshax.config import OptimConfig
    from moshax.models.mimi.model import Mimi
    from moshax.parallel.partition import ModelHandle
    from moshax.training.optimizer import make_optimizer

    handle = ModelHandle.from_constructor(lambda r: Mimi(cfg, rngs=r))
    _, p_state, r_state = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(p_state))
    rest = jax.tree.map(jnp.asarray, nnx.to_pure_dict(r_state))
    tx, _ = make_optimizer(OptimConfig(learning_rate=1e-4, warmup_steps=0), 1000, handle.axes())
    state = {"params": params, "rest": rest, "opt": tx.init(params)}

    def loss_and_grads(params, rest, x, key, step_i):
        def loss_fn(p):
            m = handle.merge(p, rest)
            out = m.train_forward(x, key, step=step_i)
            y = out.audio
            loss = jnp.mean(jnp.abs(y - x)) + jnp.mean(jnp.square(y - x)) + out.penalty
            return loss, nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, new_rest

    def train_step(params, opt, rest, x, key, step_i):
        loss, grads, new_rest = loss_and_grads(params, rest, x, key, step_i)
        updates, opt = tx.update(grads, opt, params)
        return loss, optax.apply_updates(params, updates), opt, new_rest

    fb = jax.jit(loss_and_grads)
    st = jax.jit(train_step, donate_argnums=(0, 1, 2))
    xs = [jnp.asarray(c) for c in crops]
    info = {}

    def fwd_bwd(i):
        loss, grads, state["rest"] = fb(state["params"], state["rest"], xs[i], jax.random.key(i), i)
        jax.block_until_ready(grads)
        return float(loss)

    def full(i):
        loss, state["params"], state["opt"], state["rest"] = st(state["params"], state["opt"], state["rest"],
                                                               xs[i], jax.random.key(i), i)
        jax.block_until_ready(state["params"])
        return float(loss)

    for name, fn in (("compile_fwd_bwd", fwd_bwd), ("compile_step", full)):
        t0 = time.perf_counter()
        info["loss"] = fn(0)
        info[name] = time.perf_counter() - t0
    for _ in range(STEADY_STATE_AFTER - 2):  # the rest of the k-means warm-up (see STEADY_STATE_AFTER)
        fwd_bwd(0)
    initialized = [np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state["rest"])
                   if "initialized" in jax.tree_util.keystr(k)]
    assert initialized and all(a.all() for a in initialized), "a codebook level is not initialized after the warm-up"
    return fwd_bwd, full, info


def paired_ratios(times: dict) -> str:
    """The ratio of each round's steps (they ran seconds apart, so a change in the machine's load
    hits both): its median and range say how far one run's ratio of medians can be trusted."""
    parts = []
    for label, ours, theirs in (("full step", "full", "ref_full"), ("fwd+bwd", "fb", "ref_fb")):
        r = [t / o for o, t in zip(times[ours], times[theirs])]
        parts.append(f"{label} median {median(r):.2f}x, range {min(r):.2f}-{max(r):.2f}x")
    return f"per-round ratios ({len(times['full'])} rounds): " + "; ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--gan", action="store_true", help="also time moshax's full GAN train step (Trainer)")
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned")
    ap.add_argument("--reference-worker", nargs=3, help=argparse.SUPPRESS)
    add_json_option(ap)
    args = ap.parse_args()
    load_start = os.getloadavg()
    if args.reference_worker:
        reference_worker(*args.reference_worker)
        return 0
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.malloc == "tuned":
        tune_malloc()
    header(f"Mimi train step (forward + L1/MSE/commitment + backward [+ AdamW]), B={B} x {CROP_S:.0f} s: "
           "moshax vs reference")
    print(f"load average {load_average()}")
    rc = ref_common()
    import torch

    from moshax.interop.mimi_weights import mimi_from_kyutai_state_dict
    from moshax.models.mimi.config import MimiConfig

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

    crops = np.stack([batch().numpy() for _ in range(1 + args.repeats)])
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in ref.state_dict().items()}, f"{tmp}/w.safetensors")
        np.save(f"{tmp}/crops.npy", crops)
        del ref
        theirs = LineWorker([sys.executable, __file__, "--reference-worker", str(REF), f"{tmp}/w.safetensors",
                             f"{tmp}/crops.npy"], args.malloc)
        fwd_bwd, full, info = moshax_side(model, cfg, crops)
        print(f"moshax compile + first step: fwd+bwd {info['compile_fwd_bwd']:.1f}s, full step "
              f"{info['compile_step']:.1f}s")
        times = {k: [] for k in ("ref_fb", "ref_full", "fb", "full")}
        losses = {}
        for i in range(1, 1 + args.repeats):
            for key, fn in (("ref_fb", lambda i: theirs.request(f"step {i}")), ("ref_full", lambda i: theirs.request(f"full {i}")),
                            ("fb", fwd_bwd), ("full", full)):
                time.sleep(PAUSE)
                t0 = time.perf_counter()
                out = fn(i)
                dt = time.perf_counter() - t0
                if key.startswith("ref"):
                    dt, out = out["seconds"], out["loss"]
                times[key].append(dt)
                losses[key] = out
        theirs.close()

    audio_s = B * CROP_S
    m = {k: median(v) for k, v in times.items()}
    print()
    print(f"| Mimi train step, {B} x {CROP_S:.0f} s, train mode | median s | min s | audio s / wall s |")
    print("|---|---|---|---|")
    for key, label in (("fb", "moshax fwd+bwd (jax.jit)"), ("ref_fb", "reference fwd+bwd (torch, own process)"),
                       ("full", "moshax full step (+ clip + fused AdamW, donated)"),
                       ("ref_full", "reference full step (+ AdamW foreach)")):
        print(f"| {label} | {m[key]:.3f} | {min(times[key]):.3f} | {audio_s / m[key]:.2f} |")
    print(f"moshax / reference: full step {m['ref_full'] / m['full']:.2f}x (target >= 1.2x), fwd+bwd "
          f"{m['ref_fb'] / m['fb']:.2f}x; last losses moshax {losses['full']:.4f}, reference {losses['ref_full']:.4f}; "
          f"{args.repeats} timed steps of each after warm-up, same crops, fp32, reference threads "
          f"{theirs.info['threads']}, malloc {args.malloc}")
    print(paired_ratios(times))
    print(f"load average at the end {load_average()}")
    full_rounds = [t / o for o, t in zip(times["full"], times["ref_full"])]
    write_figures(args.json, {"full_step_s": m["full"], "fwd_bwd_s": m["fb"], "reference_full_step_s": m["ref_full"],
                              "reference_fwd_bwd_s": m["ref_fb"], "full_step_ratio": m["ref_full"] / m["full"],
                              "fwd_bwd_ratio": m["ref_fb"] / m["fb"], "full_step_round_ratio_min": min(full_rounds),
                              "full_step_round_ratio_max": max(full_rounds)}, load_start)

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
