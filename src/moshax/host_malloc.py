"""glibc's allocator tuned for XLA:CPU steps: big step buffers stay mapped between steps.

XLA:CPU allocates a step's temporaries with malloc and frees them after the step. glibc hands
blocks above 32 MB out as fresh ``mmap`` regions and returns freed memory to the OS: from the
main heap above ``M_TRIM_THRESHOLD``, and from the per-thread arenas of XLA's worker threads
whatever the threshold (``madvise``). Every step then page-faults its buffers in again; on the
2-core VM this project is measured on, first-touch writes run at ~1-2 GB/s against ~20 GB/s for
memory already mapped, and the Moshi LM config (b) train step faulted in 2 GB per step (527k
minor faults, ~12% of the step). With mmap off, trimming off and one arena, the same step
faults nothing after the first (``docs/performance.md``).

Applied by the ``moshax`` console command when the run is CPU-only (accelerator steps keep
their buffers in device memory); ``MOSHAX_MALLOC=default`` leaves glibc alone. The cost: the
process keeps its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters


def tune_host_malloc(arenas: int = 1) -> bool:
    """mallopt: no mmap for large blocks, never trim, ``arenas`` arenas (<= 0: glibc's default).
    Call before the threads that allocate start (before JAX's first computation). Returns
    whether glibc took every setting (False elsewhere, e.g. musl or macOS); ValueError for
    an unknown ``MOSHAX_MALLOC``."""
    setting = os.environ.get("MOSHAX_MALLOC", "tuned")
    if setting not in ("tuned", "default"):
        raise ValueError(f"MOSHAX_MALLOC={setting!r}: expected 'tuned' or 'default'")
    if setting == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    return ok and (arenas <= 0 or bool(libc.mallopt(M_ARENA_MAX, arenas)))
