"""Many conversations, one batched streaming step.

Each conversation owns a slot of one :class:`~moshax.inference.moshi_stream.DuplexLoop`. One
asyncio task (:meth:`BatchedEngine.run`) steps every slot that has an 80 ms input frame waiting,
in one jitted call on a worker thread; slots without a frame that tick are masked (their state
does not move), so a conversation's output depends only on its own input, never on who else is
connected or how fast they send. Batching rule: once a frame is waiting, the step waits until
every active conversation has one or ``gather_seconds`` passed, whichever comes first.

The step never waits on a client: outputs go to each conversation's bounded queue and are
dropped (and counted) when it is full.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Callable

import logging

import numpy as np

from moshax.serve.metrics import ServeMetrics

log = logging.getLogger("moshax.serve")


@dataclass
class Conversation:
    """One connection's view of its slot: input frames waiting, and where outputs go."""

    slot: int
    deliver: Callable  # (pcm [frame] float32 | None, text token int | None) -> None, on the event loop
    max_pending: int
    frames: collections.deque = field(default_factory=collections.deque)
    stepped: int = 0  # frames of this conversation already stepped
    closed: bool = False


class BatchedEngine:
    def __init__(self, loop, *, max_pending_frames: int = 250, gather_seconds: float = 0.02):
        self.loop = loop
        self.batch = loop.batch
        self.frame_size = loop.frame_size
        self.metrics = ServeMetrics(loop.batch, loop.frame_size / loop.sample_rate)
        self.max_pending = int(max_pending_frames)
        self.gather_seconds = float(gather_seconds)
        self._free = list(range(loop.batch))
        self._conversations: dict[int, Conversation] = {}
        self._wake = asyncio.Event()
        self._device = asyncio.Lock()  # steps and resets take turns on the donated state
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moshax-step")
        self._stopping = False
        self._worker_closed = False

    # --- slots -----------------------------------------------------------------------------

    def open(self, deliver) -> Conversation | None:
        """A free slot for a new connection, or None when all are taken."""
        if not self._free or self._stopping:
            self.metrics.connections_refused += 1
            return None
        conv = Conversation(self._free.pop(0), deliver, self.max_pending)
        self._conversations[conv.slot] = conv
        self.metrics.active = len(self._conversations)
        return conv

    async def reset(self, conv: Conversation) -> None:
        """Restart the slot's LM and Mimi state (before the handshake)."""
        await self._on_device(self.loop.reset, self._mask([conv.slot]))

    async def close(self, conv: Conversation) -> None:
        """Give the slot back, reset, so nothing of this conversation is left in the batch."""
        if conv.closed:
            return
        conv.closed = True
        conv.frames.clear()
        self._conversations.pop(conv.slot, None)
        self.metrics.active = len(self._conversations)
        if not self._stopping:
            await self._on_device(self.loop.reset, self._mask([conv.slot]))
        self._free.append(conv.slot)

    def push(self, conv: Conversation, frame: np.ndarray) -> None:
        """Queue one 80 ms input frame [frame_size] float32 (dropped and counted past the bound)."""
        if conv.closed:
            return
        if len(conv.frames) >= conv.max_pending:
            self.metrics.input_frames_dropped += 1
            return
        conv.frames.append(frame)
        self._wake.set()

    # --- the step task -----------------------------------------------------------------------

    async def run(self) -> None:
        """Step until :meth:`stop`: the current step always finishes."""
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                break
            await self._gather()
            ready = [c for c in self._conversations.values() if c.frames]
            if not ready:
                continue
            await self._step(ready)
            if any(c.frames for c in self._conversations.values()):
                self._wake.set()

    async def _gather(self) -> None:
        deadline = time.monotonic() + self.gather_seconds
        while time.monotonic() < deadline and not self._stopping:
            if all(c.frames for c in self._conversations.values()):
                return
            await asyncio.sleep(0.002)

    async def _step(self, ready: list[Conversation]) -> None:
        pcm = np.zeros((self.batch, 1, self.frame_size), np.float32)
        active = np.zeros(self.batch, bool)
        for c in ready:
            pcm[c.slot, 0] = c.frames.popleft()
            active[c.slot] = True
        first = [c.slot for c in ready if c.stepped == 0]

        def work():
            t0 = time.perf_counter()
            out_pcm, out = self.loop.step(pcm, active=active)
            if first:  # the reference resets Mimi after a connection's first frame (left padding)
                self.loop.reset_mimi(self._mask(first))
            out_pcm, text, valid = np.asarray(out_pcm), np.asarray(out.text), np.asarray(out.valid)
            return out_pcm, text, valid, time.perf_counter() - t0

        async with self._device:
            out_pcm, text, valid, seconds = await asyncio.get_running_loop().run_in_executor(self._worker, work)
        self.metrics.record_step(seconds, len(ready))
        for c in ready:
            c.stepped += 1
            if c.closed:
                continue
            try:
                if valid[c.slot]:
                    c.deliver(out_pcm[c.slot, 0], int(text[c.slot]))
                else:
                    c.deliver(None, None)
            except Exception:  # one client's output path must not stop the others
                log.exception("slot %d: delivering a frame failed", c.slot)

    async def _on_device(self, fn, *args):
        async with self._device:
            if self._worker_closed:  # shutting down: the state is about to go anyway
                return None
            return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _mask(self, slots) -> np.ndarray:
        m = np.zeros(self.batch, bool)
        m[list(slots)] = True
        return m

    async def warmup(self) -> None:
        """Compile the step, the masked step and the resets before the first client."""
        pcm = np.zeros((self.batch, 1, self.frame_size), np.float32)

        def work():
            # twice: the fresh initial state and a reset one can differ in weak types, and each
            # would otherwise compile on a client's first frame
            for _ in range(2):
                np.asarray(self.loop.step(pcm, active=np.ones(self.batch, bool))[0])  # every slot: the plain step
                np.asarray(self.loop.step(pcm, active=np.zeros(self.batch, bool))[0])  # the masked one (no slot moves)
                self.loop.reset_mimi(self._mask([0]))
                self.loop.reset()

        await self._on_device(work)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def shutdown(self) -> None:
        self._worker_closed = True
        self._worker.shutdown(wait=True)
