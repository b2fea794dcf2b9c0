"""A small client of Kyutai's chat protocol: the tests, the bench and users drive any server
(``moshax serve`` or Kyutai's ``moshi.server``) with the same code.

    result = asyncio.run(converse("ws://127.0.0.1:8998/api/chat", pcm_24k))
    result.text, result.pcm   # Moshi's text pieces and decoded audio
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import sphn

from moshax.serve import protocol

FRAME = 1920


@dataclass
class Conversation:
    handshake: bool = False
    text: list[str] = field(default_factory=list)
    pcm: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    error: str | None = None
    close_code: int | None = None
    first_audio_s: float | None = None  # seconds from the first sent frame to the first audio back
    frames_sent: int = 0


def ogg_chunks(pcm: np.ndarray) -> list[bytes]:
    """The Ogg Opus bytes a microphone client sends, one chunk per 80 ms frame (empty ones dropped)."""
    writer = sphn.OpusStreamWriter(protocol.SAMPLE_RATE)
    out = []
    for i in range(0, len(pcm) - FRAME + 1, FRAME):
        b = writer.append_pcm(np.ascontiguousarray(pcm[i:i + FRAME], np.float32))
        if b:
            out.append(b)
    return out


async def converse(url: str, pcm: np.ndarray | None = None, *, chunks: list[bytes] | None = None,
                   realtime: bool = False, expect_samples: int | None = None, idle_s: float = 3.0,
                   timeout_s: float = 120.0, headers: dict | None = None, extra: list[bytes] = (),
                   connect_only: bool = False) -> Conversation:
    """Send the user's audio (24 kHz mono float) as Ogg Opus and collect what comes back, until
    ``expect_samples`` of audio arrived, nothing came for ``idle_s``, or the server closed.
    ``extra``: raw messages sent right after the handshake (misbehaviour tests)."""
    if chunks is None:
        chunks = ogg_chunks(pcm) if pcm is not None else []
    result = Conversation()
    reader = sphn.OpusStreamReader(protocol.SAMPLE_RATE)
    pieces: list[np.ndarray] = []
    got = 0
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers=headers or {}, max_msg_size=0) as ws:
            msg = await ws.receive(timeout=timeout_s)
            if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == bytes([protocol.HANDSHAKE]):
                result.handshake = True
            elif msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == bytes([protocol.ERROR]):
                result.error = msg.data[1:].decode()
                await ws.receive(timeout=5)
                result.close_code = ws.close_code
                return result
            else:
                result.close_code = ws.close_code
                return result
            if connect_only:
                return result
            t_start = time.monotonic()

            async def send():
                for m in extra:
                    if isinstance(m, str):
                        await ws.send_str(m)
                    else:
                        await ws.send_bytes(m)
                for i, c in enumerate(chunks):
                    await ws.send_bytes(protocol.audio(c))
                    result.frames_sent += 1
                    if realtime:
                        await asyncio.sleep(max(0.0, t_start + (i + 1) * FRAME / protocol.SAMPLE_RATE - time.monotonic()))

            sent_at = [float("inf")]

            async def send_all():
                await send()
                sent_at[0] = time.monotonic()

            sender = asyncio.create_task(send_all())
            deadline = time.monotonic() + timeout_s
            try:
                last = time.monotonic()
                while time.monotonic() < deadline:
                    try:
                        msg = await ws.receive(timeout=0.2)
                    except asyncio.TimeoutError:
                        if sender.done() and time.monotonic() - max(last, sent_at[0]) > idle_s:
                            break
                        continue
                    last = time.monotonic()
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    kind, body = msg.data[0], msg.data[1:]
                    if kind == protocol.AUDIO:
                        a = reader.append_bytes(body)
                        if a.size:
                            if result.first_audio_s is None:
                                result.first_audio_s = time.monotonic() - t_start
                            pieces.append(a)
                            got += a.size
                    elif kind == protocol.TEXT:
                        result.text.append(body.decode())
                    elif kind == protocol.ERROR:
                        result.error = body.decode()
                    if expect_samples is not None and got >= expect_samples and sender.done():
                        break
            finally:
                sender.cancel()
            result.close_code = ws.close_code
    result.pcm = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    return result
