"""Shared helpers for the bench/ scripts (figures only; nothing here is a test)."""

from __future__ import annotations

import os
import platform
import statistics
import time


def header(title: str) -> None:
    import jax

    print(f"== {title}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()} "
          f"({jax.devices()[0].device_kind}), {platform.processor() or platform.machine()}, cpus {os.cpu_count()}")


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs):
    return statistics.median(xs)
