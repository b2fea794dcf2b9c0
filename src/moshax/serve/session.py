"""One websocket conversation: Ogg Opus in -> 80 ms frames -> its engine slot; Moshi's frames
-> Ogg Opus and text pieces -> a bounded send queue drained by its own task (a client that does
not read loses frames, counted, and never slows the batched step)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import numpy as np
import sphn

from moshax.serve import protocol

log = logging.getLogger("moshax.serve")


class ChatSession:
    def __init__(self, ws, engine, pieces, outbox_frames: int):
        self.ws = ws
        self.engine = engine
        self.pieces = pieces
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=outbox_frames)
        self.reader = sphn.OpusStreamReader(protocol.SAMPLE_RATE)
        self.writer = sphn.OpusStreamWriter(protocol.SAMPLE_RATE)
        self.pending = np.zeros(0, np.float32)
        self.conv = None
        self.ignored = 0  # messages of other kinds / types (logged, like the reference)

    def deliver(self, pcm, text_token) -> None:
        """Engine callback (event loop thread): one stepped frame of this conversation."""
        if pcm is None:
            return
        m = self.engine.metrics
        if self.outbox.full():
            m.output_frames_dropped += 1
            return
        ogg = self.writer.append_pcm(np.ascontiguousarray(pcm, np.float32))
        if ogg:
            self.outbox.put_nowait(protocol.audio(ogg))
        piece = self.pieces(text_token)
        if piece is not None:
            if self.outbox.full():
                m.output_frames_dropped += 1
            else:
                self.outbox.put_nowait(protocol.text(piece))

    async def _send_loop(self) -> None:
        try:
            while True:
                msg = await self.outbox.get()
                await self.ws.send_bytes(msg)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass

    async def run(self) -> None:
        conv = self.engine.open(self.deliver)
        if conv is None:
            await self.ws.send_bytes(protocol.error(f"busy: all {self.engine.batch} conversation slots are taken"))
            await self.ws.close(code=aiohttp.WSCloseCode.TRY_AGAIN_LATER, message=b"busy")
            return
        self.conv = conv
        sender = None
        try:
            await self.engine.reset(conv)
            await self.ws.send_bytes(protocol.handshake())
            sender = asyncio.create_task(self._send_loop())
            await self._receive_loop()
        finally:
            await self.engine.close(conv)
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            if not self.ws.closed:
                await self.ws.close()

    async def _receive_loop(self) -> None:
        fs = self.engine.frame_size
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                if msg.type == aiohttp.WSMsgType.ERROR:
                    return
                self.ignored += 1
                continue
            data = msg.data
            if not data:
                self.ignored += 1
                continue
            if data[0] != protocol.AUDIO:
                self.ignored += 1  # unknown kind: ignored, as the reference does
                continue
            try:
                pcm = self.reader.append_bytes(data[1:])
            except Exception as e:  # a corrupt Ogg stream cannot recover: end this conversation
                log.warning("slot %d: bad Ogg Opus input (%s); closing", self.conv.slot, e)
                await self.ws.send_bytes(protocol.error(f"bad audio: {e}"))
                await self.ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA, message=b"bad audio")
                return
            if pcm.shape[-1] == 0:
                continue
            self.pending = np.concatenate([self.pending, pcm.astype(np.float32)])
            while self.pending.shape[0] >= fs:
                self.engine.push(self.conv, self.pending[:fs].copy())
                self.pending = self.pending[fs:]
