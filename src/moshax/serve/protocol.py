"""Kyutai's chat protocol (moshi 0.2.13 ``moshi.server``): binary websocket messages whose first
byte is the kind. Kept apart so the server, the tests and the bench speak it the same way."""

from __future__ import annotations

HANDSHAKE = 0x00  # server -> client once the conversation's slot is reset and ready
AUDIO = 0x01  # Ogg Opus bytes at 24 kHz mono, both ways
TEXT = 0x02  # UTF-8 text piece, server -> client
ERROR = 0x05  # moshax: a UTF-8 reason, sent before the server closes (e.g. all slots busy)

SAMPLE_RATE = 24000


def handshake() -> bytes:
    return bytes([HANDSHAKE])


def audio(ogg: bytes) -> bytes:
    return bytes([AUDIO]) + ogg


def text(piece: str) -> bytes:
    return bytes([TEXT]) + piece.encode("utf-8")


def error(reason: str) -> bytes:
    return bytes([ERROR]) + reason.encode("utf-8")


class TextPieces:
    """Text token id -> the piece a client shows (sentencepiece ``▁`` -> space), or None for the
    padding tokens (PAD, EPAD) the reference never sends. Without a tokenizer: ``<id>``."""

    def __init__(self, sp, pad_ids):
        self.sp = sp
        self.pad_ids = frozenset(int(i) for i in pad_ids)
        self.vocab = sp.get_piece_size() if sp is not None else 0

    def __call__(self, token: int) -> str | None:
        token = int(token)
        if token in self.pad_ids or token < 0:
            return None
        if self.sp is None or token >= self.vocab:
            return f"<{token}>"
        return self.sp.id_to_piece(token).replace("\u2581", " ")
