"""Graceful preemption: SIGTERM (the TPU/GKE preemption notice) -> save at the next step boundary,
agreed across hosts, then exit cleanly.

Multi-host runs use JAX's preemption sync service (started by ``jax.distributed``), which catches
the signal on any host and picks the same safe step on all of them. A single process uses a plain
signal handler.
"""

from __future__ import annotations

import signal
import threading

import jax


def _sync_service_running() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except Exception:  # pragma: no cover - private API moved
        return False


class PreemptionWatcher:
    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self._previous = {}
        self.distributed = jax.process_count() > 1 and _sync_service_running()
        if not self.distributed and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Call after every step (all hosts, same step ids)."""
        if self.distributed:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.requested = True
        return self.requested

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
