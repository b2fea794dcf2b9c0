"""Moshi LM train-step throughput vs Kyutai's PyTorch reference, same config, batch and machine.

    .venv/bin/python bench/bench_lm_train.py [--quick] [--configs tiny,b]

Configs: ``tiny`` = configs/moshi_tiny.yaml, ``b`` = ``LM_B`` below
(dim 768, 12 layers, depformer 512 x 4, full vocabularies: 299M params). Batch B=2 x 125 frames
(10 s at 12.5 Hz), fp32, random codes. Each side:
median of N steps after a warm-up step; the three measurements are interleaved step by step,
each after a 0.5 s pause (the other runtime's idle worker threads spin for a while after a step;
on 2 cores that alone made the tiny reference step 8x slower).

* reference fwd+bwd: ``LMModel.forward`` + text CE + audio CE + ``backward``
  (``zero_grad(set_to_none=True)`` first), torch with 2 threads, in a child process (one process
  with both runtimes makes their thread pools fight: a 0.1 s reference step took 8 s right after
  a JAX step);
* reference full step: the same + ``torch.optim.AdamW(params, foreach=True).step()`` (what a
  PyTorch training run pays per step; no gradient clipping);
* moshax fwd+bwd: the task loss (moshi-finetune's objective) and its gradient, jitted (the same
  work as the reference's fwd+bwd);
* moshax train step: the trainer's full step (fwd + bwd + clipping + AdamW update, state donated);
* moshax update: the trainer's optimizer part alone (``Trainer._update_fn``: grads / weight,
  global-norm clipping, AdamW, apply; params and optimizer state donated), jitted on its own.

Ratios: moshax full step vs reference full step (target >= 1.1x), fwd+bwd vs fwd+bwd (target
>= 1.0x); moshax's full step is split into fwd+bwd, update and other (the rest: step - fwd+bwd -
update, i.e. what the fused step costs beyond its two parts, negative when fusing saves).

frames/s = B x T / step time; tokens/s = frames/s x 17 streams (1 text + 16 audio), as the
reference benchmark counts them.

``--malloc tuned`` (the default) applies the ``moshax`` command's CPU allocator setting
(:mod:`moshax.host_malloc`: glibc ``mallopt`` with no mmap for large blocks, no trimming, one
arena) to both sides: XLA:CPU and PyTorch allocate their step buffers with malloc, and with
glibc's defaults the freed blocks go back to the OS and fault in again on the next step (first
touch writes ~8x slower than resident memory on this VM; config (b)'s step faulted 2 GB in per
step). ``MOSHAX_BENCH_ARENAS=0`` keeps glibc's per-thread arenas (the setting before
2026-12-02: no mmap, trim threshold 2 GiB); ``--malloc default`` leaves glibc alone.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LineWorker, add_json_option, header, load_average, median, timed, write_figures  # noqa: E402

from moshax.config import from_dict, load_config, to_dict  # noqa: E402
from moshax.interop.lm_config import moshi_config_from_kyutai, moshi_config_to_kyutai  # noqa: E402
from moshax.training.moshi_task import MoshiTask  # noqa: E402
from moshax.training.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
B, T = 2, 125
PAUSE = 0.5  # s of idle before each timed step: the other side's spinning worker threads go to sleep

# config (b), over the installed moshi's loaders._lm_kwargs (moshiko's values)
LM_B = dict(dim=768, num_layers=12, num_heads=12, text_card=32000, card=2048, context=3000, depformer_dim=512,
            depformer_dim_feedforward=int(4.125 * 512), depformer_num_heads=8, depformer_num_layers=4)


def tune_malloc() -> bool:
    """The ``moshax`` command's CPU allocator setting (:mod:`moshax.host_malloc`: no mmap, no
    trim, one arena), for both sides; ``MOSHAX_BENCH_ARENAS=0`` keeps glibc's arenas."""
    from moshax.host_malloc import tune_host_malloc

    return tune_host_malloc(int(os.environ.get("MOSHAX_BENCH_ARENAS", "1")))


def model_configs(names):
    out = {}
    if "tiny" in names:
        cfg = load_config(ROOT / "configs/moshi_tiny.yaml").model
        cfg.init_from = ""
        out["moshi_tiny"] = cfg
    if "b" in names:
        out["b (LM_B, 299M)"] = moshi_config_from_kyutai(LM_B)
    return out


def random_codes(mcfg, seed=0):
    g = np.random.default_rng(seed)
    text = g.integers(0, mcfg.text_card, (B, 1, T))
    audio = g.integers(0, mcfg.card, (B, mcfg.n_q, T))
    return np.concatenate([text, audio], 1).astype(np.int32)


def moshax_side(mcfg, codes):
    """Returns (fwd_bwd, train_step, update, info): callables and a dict, moshax on one device."""
    cfg = from_dict({"model": to_dict(mcfg), "data": {"seq_len": T}, "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
                     "train": {"batch_size": B, "steps": 1000, "progress": False}})
    trainer = Trainer(cfg, MoshiTask(cfg), workdir="/tmp/moshax-bench")
    state = {"s": trainer.init_state()}
    batch = trainer.to_global({"codes": codes}, 1)
    task = trainer.task

    def loss_fn(params, rest, codes):
        total, _, _ = task.loss(trainer.handle.merge(params, rest), {"codes": codes}, None)
        return total

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    codes_dev = batch["codes"][0]
    info = {"params": trainer.handle.num_params()}
    t0 = time.perf_counter()
    info["loss"] = float(grad_fn(state["s"]["params"], state["s"]["rest"], codes_dev)[0])
    info["compile_fwd_bwd"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    state["s"], m = trainer.train_step(state["s"], batch)  # compile + 1 step
    m["loss"].block_until_ready()
    info["compile_step"] = time.perf_counter() - t0

    # the optimizer update alone, applied to the train state itself (params and optimizer state
    # donated, as in the step; no second copy of 3.6 GB): one more AdamW step on fixed gradients
    update_fn = jax.jit(lambda p, o, g: trainer._update_fn(p, o, g, 1.0), donate_argnums=(0, 1))
    grads = grad_fn(state["s"]["params"], state["s"]["rest"], codes_dev)[1]

    def update():
        s = state["s"]
        p, o, n = update_fn(s["params"], s["opt_state"], grads)
        state["s"] = dict(s, params=p, opt_state=o)
        jax.block_until_ready((p, o, n))

    t0 = time.perf_counter()
    update()
    info["compile_update"] = time.perf_counter() - t0

    def fwd_bwd():
        jax.block_until_ready(grad_fn(state["s"]["params"], state["s"]["rest"], codes_dev))

    def step():
        state["s"], m = trainer.train_step(state["s"], batch)
        m["loss"].block_until_ready()

    return fwd_bwd, step, update, info


def reference_worker(kw_json: str, codes_path: str) -> None:
    """Child process: build Kyutai's LMModel with the installed moshi package, then for each line
    on stdin print the time of one step: "step" = forward + text/audio CE + backward, "full" = the
    same + ``torch.optim.AdamW(foreach=True).step()``.
    In its own process: PyTorch's OpenMP threads and XLA's thread pool slow each other down
    badly when they share one (a 0.1 s reference step took 8 s after a JAX step)."""
    import json

    import torch
    import torch.nn.functional as F
    from moshi.models import loaders

    if os.environ.get("MOSHAX_BENCH_MALLOC") == "tuned":
        tune_malloc()
    torch.set_num_threads(2)
    kw = dict(copy.deepcopy(loaders._lm_kwargs), **json.loads(kw_json))
    torch.manual_seed(4321)
    lm = loaders.get_moshi_lm(None, kw, device="cpu", dtype=torch.float32)
    lm.train()
    c = torch.from_numpy(np.load(codes_path).astype(np.int64))
    tgt_audio = c[:, lm.audio_offset:lm.audio_offset + lm.dep_q]

    # the reference benchmark's optimizer (bench-ref bench_lm_train.py: lr 1e-4, weight decay 0.1)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)

    def step():
        lm.zero_grad(set_to_none=True)
        out = lm(c)
        text_loss = F.cross_entropy(out.text_logits[out.text_mask], c[:, :1][out.text_mask])
        audio_loss = F.cross_entropy(out.logits[out.mask], tgt_audio[out.mask])
        loss = text_loss + audio_loss
        loss.backward()
        return loss.detach().item()

    def full():
        loss = step()
        opt.step()
        return loss

    loss = step()  # warm-up
    full()  # warm-up: AdamW allocates its state on the first step
    print(json.dumps({"params": sum(p.numel() for p in lm.parameters()), "loss": loss}), flush=True)
    for line in sys.stdin:
        what = line.strip()
        if what not in ("step", "full"):
            break
        t0 = time.perf_counter()
        (step if what == "step" else full)()
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


class ReferenceProcess(LineWorker):
    def __init__(self, mcfg, codes, malloc: str):
        import json
        import tempfile

        self._tmp = tempfile.NamedTemporaryFile(suffix=".npy", delete=False)
        np.save(self._tmp.name, codes)
        super().__init__([sys.executable, __file__, "--reference-worker", json.dumps(moshi_config_to_kyutai(mcfg)),
                          self._tmp.name], malloc)

    def step(self, what: str = "step") -> float:
        """Seconds of one reference step: "step" (fwd+bwd) or "full" (+ AdamW)."""
        return self.request(what)["seconds"]

    def close(self) -> None:
        super().close()
        os.unlink(self._tmp.name)


def run_config(mcfg, repeats, reference=True, malloc="tuned"):
    """Build both sides (the reference in a child process), warm up, then time them interleaved
    step by step (reference fwd+bwd, reference full step, moshax fwd+bwd, moshax train step,
    moshax update, ...) so that a change in the machine's load hits all of them alike."""
    codes = random_codes(mcfg)
    ref = ReferenceProcess(mcfg, codes, malloc) if reference else None
    fb, st, up, ours = moshax_side(mcfg, codes)
    fb()
    st()
    up()
    sides = [("fwd_bwd", fb), ("step", st), ("update", up)]
    if ref is not None:
        sides = [("ref_fwd_bwd", lambda: ref.step("step")), ("ref_full", lambda: ref.step("full"))] + sides
    times = {name: [] for name, _ in sides}
    for _ in range(repeats):
        for name, fn in sides:
            time.sleep(PAUSE)
            t0 = time.perf_counter()
            out = fn()
            # the reference's own timing (inside the child, without the pipe's round trip)
            times[name].append(out if name.startswith("ref") else time.perf_counter() - t0)
    ours.update(fwd_bwd=median(times["fwd_bwd"]), step=median(times["step"]), update=median(times["update"]))
    info = None
    if ref is not None:
        ref.close()
        info = dict(ref.info, fwd_bwd=median(times["ref_fwd_bwd"]), full=median(times["ref_full"]),
                    fwd_bwd_min=min(times["ref_fwd_bwd"]), full_min=min(times["ref_full"]))
    del fb, st, up, sides
    gc.collect()
    return ours, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="3 timed steps instead of 5")
    ap.add_argument("--configs", default="tiny,b", help="comma-separated: tiny, b")
    ap.add_argument("--no-reference", action="store_true", help="skip the PyTorch side")
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                    help="glibc allocator settings for both sides (see the module docstring)")
    add_json_option(ap)
    args = ap.parse_args()
    load_start = os.getloadavg()
    reps = 3 if args.quick else 5
    tuned = args.malloc == "tuned" and tune_malloc()
    header(f"Moshi LM train step, B={B} x T={T} frames, fp32 (moshax vs PyTorch moshi 0.2.13 in the same run)")
    print(f"malloc: {'tuned (no mmap, no trim, arenas ' + os.environ.get('MOSHAX_BENCH_ARENAS', '1') + ')' if tuned else 'glibc defaults'}; "
          f"load average {load_average()}")
    rows = []
    for name, mcfg in model_configs(args.configs.split(",")).items():
        ours, ref = run_config(mcfg, reps, reference=not args.no_reference, malloc=args.malloc)
        rows.append((name, mcfg, ours, ref))
        print(f"{name}: moshax fwd+bwd {ours['fwd_bwd']:.3f}s, step {ours['step']:.3f}s, update {ours['update']:.3f}s"
              + ("" if ref is None else f"; reference fwd+bwd {ref['fwd_bwd']:.3f}s, full step {ref['full']:.3f}s"),
              flush=True)

    frames = B * T
    print("\n| config | params | side | median s | frames/s | tokens/s (x17) | moshax vs reference (same work) |")
    print("|---|---|---|---|---|---|---|")
    for name, mcfg, ours, ref in rows:
        k = mcfg.num_streams
        n_ref = "" if ref is None else f"{ref['params'] / 1e6:.2f}M"
        lines = []
        if ref is not None:
            lines += [("PyTorch fwd+bwd", ref["fwd_bwd"], "", n_ref),
                      ("PyTorch full step (+AdamW foreach)", ref["full"], "", n_ref)]
        lines += [("moshax fwd+bwd", ours["fwd_bwd"], "" if ref is None else f"{ref['fwd_bwd'] / ours['fwd_bwd']:.2f}x",
                   f"{ours['params'] / 1e6:.2f}M"),
                  ("moshax full step (trainer: +clip +AdamW)", ours["step"],
                   "" if ref is None else f"{ref['full'] / ours['step']:.2f}x", f"{ours['params'] / 1e6:.2f}M")]
        for side, t, ratio, n in lines:
            print(f"| {name} | {n} | {side} | {t:.3f} | {frames / t:.1f} | {frames * k / t:.0f} | {ratio} |")

    print("\n| config | moshax full step s | fwd+bwd s | update alone s | other s (step - fwd+bwd - update) |")
    print("|---|---|---|---|---|")
    for name, _, ours, _ in rows:
        other = ours["step"] - ours["fwd_bwd"] - ours["update"]
        print(f"| {name} | {ours['step']:.3f} | {ours['fwd_bwd']:.3f} ({100 * ours['fwd_bwd'] / ours['step']:.0f}%) "
              f"| {ours['update']:.3f} ({100 * ours['update'] / ours['step']:.0f}%) | {other:.3f} |")
    print(f"\n{reps} timed steps each, interleaved with 0.5 s pauses, after 1 warm-up; compile s "
          "(fwd+bwd / train step / update): "
          + ", ".join(f"{n} {o['compile_fwd_bwd']:.1f} / {o['compile_step']:.1f} / {o['compile_update']:.1f}"
                      for n, _, o, _ in rows))
    print(f"load average at the end {load_average()}")
    print("targets (config b): full step vs full step >= 1.1x; fwd+bwd vs fwd+bwd >= 1.0x; update alone <= 0.4 s")
    figures = {}
    for name, _, ours, ref in rows:
        key = name.split()[0].removeprefix("moshi_")  # "tiny" or "b"
        figures |= {f"{key}_full_step_s": ours["step"], f"{key}_fwd_bwd_s": ours["fwd_bwd"], f"{key}_update_s": ours["update"]}
        if ref is not None:
            figures |= {f"{key}_full_step_ratio": ref["full"] / ours["step"], f"{key}_fwd_bwd_ratio": ref["fwd_bwd"] / ours["fwd_bwd"]}
    write_figures(args.json, figures, load_start)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--reference-worker":
        reference_worker(sys.argv[2], sys.argv[3])
    else:
        main()
