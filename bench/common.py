"""Shared helpers for the bench/ scripts (figures only; nothing here is a test)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
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


class LineWorker:
    """A child process that answers each request line on its stdin with one JSON line on its
    stdout (the benches' reference sides: in their own process, as torch's and XLA's thread
    pools slow each other down in one). Its first JSON line is ``info``; other output lines
    (warnings) are skipped. ``malloc`` reaches the child as ``MOSHAX_BENCH_MALLOC``."""

    def __init__(self, argv: list[str], malloc: str):
        env = dict(os.environ, MOSHAX_BENCH_MALLOC=malloc, NO_TORCH_COMPILE="1")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit("the reference worker died (its error is above)")
            if line.startswith("{"):
                return json.loads(line)

    def request(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
