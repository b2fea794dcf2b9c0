"""Errors a user can cause in the data pipeline (missing file, bad tokenizer, bad source)."""

from __future__ import annotations


class DataError(ValueError):
    """A data problem the user can fix; the message is one line that says what and where."""

    def __init__(self, message: str):
        # Keep the message to one line so the CLI can print it as is.
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        super().__init__(" ".join(lines))
