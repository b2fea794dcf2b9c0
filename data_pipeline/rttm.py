"""Speaker turns as RTTM, the standard diarization format (NIST): one line per turn::

    SPEAKER <file-id> 1 <start> <duration> <NA> <NA> <speaker> <NA> <NA>

What ``moshax data diarize`` writes and what scoring tools (``pyannote.metrics``, dscore) read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from data_pipeline.errors import DataError


@dataclass(frozen=True)
class Turn:
    """One speaker's stretch of talk, in seconds from the start of the file."""

    start: float
    end: float
    speaker: str


def format_rttm(file_id: str, turns: Iterable[Turn]) -> str:
    file_id = file_id.replace(" ", "_")
    lines = []
    for t in sorted(turns, key=lambda t: (t.start, t.end, t.speaker)):
        if t.end > t.start:
            lines.append(f"SPEAKER {file_id} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {t.speaker} <NA> <NA>\n")
    return "".join(lines)


def write_rttm(path: str | Path, file_id: str, turns: Iterable[Turn], *, append: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        f.write(format_rttm(file_id, turns))
    return path


def read_rttm(path: str | Path) -> dict[str, list[Turn]]:
    """``{file_id: [Turn, ...]}``; one :class:`DataError` line for a malformed line."""
    out: dict[str, list[Turn]] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts or parts[0] != "SPEAKER":
            continue
        try:
            start, dur = float(parts[3]), float(parts[4])
            out.setdefault(parts[1], []).append(Turn(start, start + dur, parts[7]))
        except (IndexError, ValueError):
            raise DataError(f"{path}:{n}: not an RTTM SPEAKER line: {line.strip()[:120]!r}") from None
    return out
