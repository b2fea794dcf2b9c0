"""The reference side of the benchmarks: Kyutai's PyTorch ``moshi`` package (0.2.13, the
installed one; `make install` puts it in the venv), built and fed by this project's code.

Loaded by path (``bench/common.py`` holds the moshax-side helpers) by bench_mimi.py and
bench_mimi_train.py, in a child process that times the reference alone (2 torch threads).
"""
import copy
import os
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi is imported (otherwise ~20 s per first call)

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

from moshi.models import loaders  # noqa: E402

SR = 24000
FRAME = 1920  # one Mimi frame = 80 ms at 24 kHz


def synth_audio(seconds, seed=0, batch=1):
    """Deterministic speech-like test signal, [batch, 1, n] float32 in [-0.5, 0.5]: gliding
    harmonic tones with a ~4 Hz syllable envelope plus a little noise."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    out = []
    for _ in range(batch):
        f0 = 110 + 80 * rng.random() + 30 * np.sin(2 * np.pi * (0.3 + 0.4 * rng.random()) * t)
        phase = 2 * np.pi * np.cumsum(f0) / SR
        y = sum((0.6 ** k) * np.sin(k * phase + rng.random() * 6.28) for k in range(1, 12))
        env = np.clip(np.sin(2 * np.pi * (3 + 2 * rng.random()) * t + rng.random() * 6.28), 0, None) ** 2
        y = y * env + 0.02 * rng.standard_normal(n)
        out.append(0.5 * y / (np.abs(y).max() + 1e-6))
    return torch.from_numpy(np.stack(out).astype(np.float32))[:, None]


def fill_codebooks(mimi, train_audio, seed=99):
    """A freshly built Mimi has all-zero codebooks: fill every level of both RVQ branches with
    random picks of the residual latents that reach it (+ noise)."""
    seen = {}
    hooks = [getattr(mimi.quantizer, name).input_proj.register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, o)) for name in ("rvq_first", "rvq_rest")]
    was_training = mimi.training
    mimi.eval()
    with torch.no_grad():
        mimi.encode(train_audio)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("rvq_first", "rvq_rest"):
            z = seen[name].transpose(1, 2).reshape(-1, seen[name].shape[1])
            residual = z.clone()
            for layer in getattr(mimi.quantizer, name).vq.layers:
                cb = layer._codebook
                pick = torch.randint(0, residual.shape[0], (cb.codebook_size,), generator=g)
                emb = residual[pick] + 0.3 * residual.std(0) * torch.randn(cb.codebook_size, cb.dim, generator=g)
                cb.embedding_sum.copy_(emb)
                cb.cluster_usage.fill_(1.0)
                cb._initialized.fill_(1.0)
                cb._embedding = None
                dist = torch.cdist(residual, emb)
                residual = residual - emb[dist.argmin(-1)]
    mimi.train(was_training)
    return mimi


def build_full_mimi(seed=1234):
    """The released Mimi architecture (``loaders._mimi_config``), random weights, 8 active
    codebooks, codebooks filled from synthetic audio."""
    torch.manual_seed(seed)
    cfg = copy.deepcopy(loaders._mimi_config)
    mimi = loaders.get_mimi(None, cfg, device="cpu", num_codebooks=8)
    fill_codebooks(mimi, synth_audio(4.8, seed=100, batch=2))
    mimi.eval()
    return mimi, cfg


def nparams(module):
    return sum(p.numel() for p in module.parameters())


def timeit(fn, repeats=5, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def fmt_m(n):
    return f"{n / 1e6:.2f}M"
