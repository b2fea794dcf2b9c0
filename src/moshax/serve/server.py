"""Models -> a ready aiohttp app (the one place that wires the loop, the engine and the app)."""

from __future__ import annotations

from moshax.inference.moshi_stream import DuplexLoop
from moshax.inference.sampling import Sampling
from moshax.serve.app import build_app
from moshax.serve.engine import BatchedEngine
from moshax.serve.protocol import TextPieces


def make_app(lm, mimi, sp=None, *, slots: int = 4, sampling: Sampling | None = None, seed: int = 0,
             auth_token: str | None = None, allow_origins=frozenset(), max_message_bytes: int = 1 << 20,
             outbox_frames: int = 64, gather_seconds: float = 0.02, max_pending_frames: int = 250):
    loop = DuplexLoop(lm, mimi, batch=slots, sampling=sampling, seed=seed)
    engine = BatchedEngine(loop, max_pending_frames=max_pending_frames, gather_seconds=gather_seconds)
    pieces = TextPieces(sp, (lm.cfg.existing_text_padding_id, lm.cfg.existing_text_end_padding_id))
    return build_app(engine, pieces, auth_token=auth_token, allow_origins=allow_origins,
                     max_message_bytes=max_message_bytes, outbox_frames=outbox_frames)
