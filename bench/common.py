"""Shared helpers for the bench/ scripts (figures only; nothing here is a test)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time


def cpu_model() -> str:
    """The CPU's name, family and model from /proc/cpuinfo (AMD family 25 is Zen 3/4, 26 is Zen 5):
    these VMs land on hosts of different generations, and the figures differ with them."""
    try:
        fields = {}
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if not line.strip():
                break
            fields.setdefault(key.strip(), value.strip())
        return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"
    except OSError:
        return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, as the benches print them beside their figures."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def header(title: str) -> None:
    import jax

    print(f"== {title}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()} "
          f"({jax.devices()[0].device_kind}), {cpu_model()}, cpus {os.cpu_count()}")


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


def add_json_option(ap) -> None:
    """``--json PATH``: the bench's headline figures as one JSON object (what ``bench/targets.py``
    reads to put every figure beside its target)."""
    ap.add_argument("--json", metavar="PATH", help="also write the headline figures to PATH as JSON")


def write_figures(path: str | None, figures: dict, load_start: tuple[float, float, float]) -> None:
    """Write ``figures`` (name -> number) with the 1-minute load average at the start and the end."""
    if not path:
        return
    out = {"figures": {k: float(v) for k, v in figures.items()}, "cpu": cpu_model(),
           "load_start": round(load_start[0], 2), "load_end": round(os.getloadavg()[0], 2)}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
