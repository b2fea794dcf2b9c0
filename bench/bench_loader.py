"""Grain loader throughput over prepared multi-stream shards vs what a moshi_7b train step eats.

    python bench/bench_loader.py --shards DIR [--frames 3000] [--batch 16] [--seconds 20]

Prints frames/s the elastic loader delivers here (random crops of --frames, one process), and the
frames/s one host of a TPU pod consumes when moshi_7b trains at a given MFU: 7B-parameter model,
6 N FLOPs per frame (temporal transformer; the depth transformer adds ~10%), per host = chips per
host x peak x MFU / (6 N). Target (../shared/targets.md): loader >= 10x the consumption.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", required=True)
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--mfu", type=float, default=0.5)
    args = ap.parse_args()

    from data_pipeline.shard_loader import make_shard_iterator
    from moshax.parallel.tpu_facts import peak_flops_per_device

    it = make_shard_iterator(args.shards, split="train", global_batch_size=args.batch, seed=0, field="codes",
                             crop_frames=args.frames, num_workers=args.num_workers)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        b = next(it)["codes"]
        n += b.shape[0] * b.shape[-1]
    rate = n / (time.perf_counter() - t0)
    print(f"loader: {rate:,.0f} frames/s ({rate / 12.5:,.0f} s of audio per s), batch {args.batch} x "
          f"{args.frames} frames, {args.num_workers} workers")
    params = 7.7e9
    for topo, chips_per_host in (("v5p:2x2x2", 4), ("v5e:2x2", 4), ("v6e:2x2", 4)):
        peak = peak_flops_per_device(topo)
        need = chips_per_host * peak * args.mfu / (6 * params)
        print(f"moshi_7b on {topo.split(':')[0]} ({chips_per_host} chips/host, MFU {args.mfu:.0%}): {need:,.0f} frames/s "
              f"per host -> loader/need = {rate / need:.1f}x")


if __name__ == "__main__":
    main()
