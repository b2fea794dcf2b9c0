"""Multi-host setup: ``jax.distributed`` from the environment (TPU VMs, GKE, SLURM) or explicit
coordinator flags, before any other JAX call.

- TPU VM pods / GKE / SLURM: ``--multihost`` (or ``MOSHAX_MULTIHOST=1``) lets JAX detect the
  cluster (coordinator, process count and id come from the platform's metadata/env).
- Elsewhere (several processes on one machine, bare VMs): ``--coordinator HOST:PORT
  --num-processes N --process-id I`` (or ``MOSHAX_COORDINATOR``, ``MOSHAX_NUM_PROCESSES``,
  ``MOSHAX_PROCESS_ID``). On CPUs the gloo collectives are switched on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from moshax.config import ConfigError


@dataclass
class DistributedSpec:
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @classmethod
    def from_env(cls, coordinator=None, num_processes=None, process_id=None, auto=False) -> "DistributedSpec":
        env = os.environ
        spec = cls(
            coordinator=coordinator or env.get("MOSHAX_COORDINATOR") or None,
            num_processes=num_processes if num_processes is not None else _int_env("MOSHAX_NUM_PROCESSES"),
            process_id=process_id if process_id is not None else _int_env("MOSHAX_PROCESS_ID"),
            auto=auto or env.get("MOSHAX_MULTIHOST", "") in ("1", "true", "yes"),
        )
        explicit = [spec.coordinator is not None, spec.num_processes is not None, spec.process_id is not None]
        if any(explicit) and not all(explicit):
            raise ConfigError("multi-host: give all of --coordinator, --num-processes and --process-id (or none)")
        if spec.num_processes is not None and not 0 <= spec.process_id < spec.num_processes:
            raise ConfigError(f"multi-host: --process-id {spec.process_id} is outside 0..{spec.num_processes - 1}")
        return spec

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator is not None


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected an integer") from None


_initialized = False


def initialize(spec: DistributedSpec) -> None:
    """Start ``jax.distributed`` once (no-op for a single process)."""
    global _initialized
    if _initialized or not spec.enabled:
        return
    import jax

    if spec.coordinator is not None:
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or _cpu_only():
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                                   process_id=spec.process_id)
    else:
        jax.distributed.initialize()
    _initialized = True


def _cpu_only() -> bool:
    """True when no accelerator plugin is installed (decided without initializing a backend)."""
    import importlib.util

    return not any(importlib.util.find_spec(m) for m in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin"))
