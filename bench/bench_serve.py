"""``moshax serve`` under load: N real-time loopback clients on one server with N slots.

    .venv/bin/python bench/bench_serve.py [--clients 1,8,32] [--seconds 6] [--config tiny|b]

Each client streams ``--seconds`` of speech-like audio as Ogg Opus at real-time pace (one 80 ms
frame per 80 ms) over a websocket and decodes what comes back; the server (in this process, on
its own thread and event loop) steps all slots that have a frame in one batched call. Reported
from the server's ``/metrics``: per-frame step time p50/p99 (one batched step: Mimi encode -> LM
step -> Mimi decode, masked slots included), real-time factor (mean step / 80 ms; < 1 keeps up),
mean batch per step (how well the clients' frames were gathered), frames dropped; and from the
clients: the time from the first frame sent to the first audio back.

Config ``tiny``: the test suite's tiny random LM (dim 64, 2 layers) and tiny Mimi. Config ``b``:
bench_generate's config (b) LM (299M params) with the full Mimi architecture (random weights);
slow to compile on a small CPU. The clients share the process (Opus encode/decode under the same
GIL), so on 2 cores the numbers are pessimistic for the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from common import header  # noqa: E402


def models(name: str):
    if name == "tiny":
        from test_generate import _small_model, _tiny_mimi

        return _small_model(seed=1), _tiny_mimi()
    from bench_generate import LM_B
    from flax import nnx

    from moshax.interop.lm_config import moshi_config_from_kyutai
    from moshax.models.mimi.config import MimiConfig
    from moshax.models.mimi.model import Mimi
    from moshax.models.moshi_lm import MoshiLM

    return MoshiLM(moshi_config_from_kyutai(LM_B), rngs=nnx.Rngs(0)), Mimi(MimiConfig(), rngs=nnx.Rngs(1))


def run(lm, mimi, clients: int, seconds: float) -> dict:
    from test_mimi_parity import synth_audio

    from moshax.inference.sampling import Sampling
    from moshax.serve.background import ServerThread
    from moshax.serve.client import converse
    from moshax.serve.server import make_app

    t0 = time.perf_counter()
    srv = ServerThread(make_app(lm, mimi, None, slots=clients, sampling=Sampling.greedy())).start()
    compile_s = time.perf_counter() - t0
    audio = [synth_audio(seconds, seed=i)[0, 0] for i in range(clients)]

    async def crowd():
        return await asyncio.gather(*[converse(srv.ws_url, a, realtime=True, idle_s=2.0) for a in audio])

    results = asyncio.run(crowd())
    m = json.loads(urllib.request.urlopen(srv.url + "/metrics").read())
    srv.stop()
    first = [r.first_audio_s for r in results if r.first_audio_s is not None]
    m.update(clients=clients, compile_s=compile_s, ok=sum(r.handshake and r.pcm.size > 0 for r in results),
             first_audio_ms=1e3 * float(np.median(first)) if first else float("nan"))
    return m


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--config", choices=("tiny", "b"), default="tiny")
    args = ap.parse_args()
    header(f"moshax serve, config {args.config}: N real-time loopback clients, N slots, greedy")
    lm, mimi = models(args.config)
    print("| clients | step p50 ms | step p99 ms | real-time factor | mean batch | frames dropped | "
          "first audio (median) ms | clients answered | startup+compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.clients.split(",")]:
        m = run(lm, mimi, n, args.seconds)
        print(f"| {n} | {m['step_ms_p50']:.1f} | {m['step_ms_p99']:.1f} | {m['real_time_factor']:.3f} | "
              f"{m['mean_batch']:.1f} | {m['frames_dropped']} | {m['first_audio_ms']:.0f} | {m['ok']}/{n} | "
              f"{m['compile_s']:.0f} |", flush=True)
    print(f"{args.seconds:.0f} s of audio per client at real-time pace; step = one batched call (all slots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
