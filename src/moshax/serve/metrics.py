"""Operator numbers for ``/metrics``: step times (a bounded window), frame counters, real-time
factor (step time / 80 ms of audio; < 1 keeps up)."""

from __future__ import annotations

import collections
import time

import numpy as np


class ServeMetrics:
    def __init__(self, slots: int, frame_seconds: float, window: int = 2000):
        self.slots = slots
        self.frame_seconds = frame_seconds
        self.step_seconds = collections.deque(maxlen=window)
        self.batch_sizes = collections.deque(maxlen=window)
        self.steps = 0
        self.frames_stepped = 0  # conversation-frames (one per active slot per step)
        self.output_frames_dropped = 0  # Moshi frames not sent: a client's send queue was full
        self.input_frames_dropped = 0  # user frames beyond a conversation's input bound
        self.connections_refused = 0
        self.active = 0
        self.started = time.time()

    def record_step(self, seconds: float, batch: int) -> None:
        self.steps += 1
        self.frames_stepped += batch
        self.step_seconds.append(seconds)
        self.batch_sizes.append(batch)

    def snapshot(self) -> dict:
        times = np.asarray(self.step_seconds) * 1e3
        p50 = float(np.percentile(times, 50)) if len(times) else None
        p99 = float(np.percentile(times, 99)) if len(times) else None
        rtf = float(times.mean() / 1e3 / self.frame_seconds) if len(times) else None
        return {"slots": self.slots, "active_slots": self.active, "steps": self.steps,
                "frames_stepped": self.frames_stepped,
                "step_ms_p50": p50, "step_ms_p99": p99, "real_time_factor": rtf,
                "mean_batch": float(np.mean(self.batch_sizes)) if self.batch_sizes else None,
                "frames_dropped": self.output_frames_dropped + self.input_frames_dropped,
                "output_frames_dropped": self.output_frames_dropped,
                "input_frames_dropped": self.input_frames_dropped,
                "connections_refused": self.connections_refused,
                "uptime_s": time.time() - self.started}
