"""Document sources for the text loader: random-access sequences of strings.

Every source has ``len()`` and ``__getitem__(i) -> str`` (Grain's ``RandomAccessDataSource``
protocol), pickles small (worker processes reopen files lazily), and is safe to read from several
threads.

Source strings (see :func:`open_text_sources`):

- ``path/to/file.txt``: one document per non-empty line;
- ``path/to/file.jsonl``: one JSON object per non-empty line, the document is its ``jsonl_field``;
- a glob of such files (``data/*.jsonl``, ``data/**/*.txt``), read in sorted order;
- ``tfds:NAME[/CONFIG][:VERSION][:SPLIT]``: a TFDS dataset already prepared on disk in the
  ``array_record`` format, read with ``tfds.data_source``; the document is the ``jsonl_field``
  feature (bytes are decoded as UTF-8). Without SPLIT: ``train`` for training,
  ``validation`` (else ``test``) for eval.

Text files are indexed once (byte offsets of the non-empty lines, a numpy array) and lines are
read on demand, so a large file is never held in memory as Python strings.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import DataError

_CHUNK = 1 << 22  # bytes per chunk while indexing lines
# ASCII whitespace that str.strip() removes (newline is handled separately).
_WS = np.zeros(256, dtype=bool)
_WS[[ord(c) for c in " \t\r\x0b\x0c\x1c\x1d\x1e\x1f"]] = True
_NEWLINE = ord("\n")


def index_lines(path: str | Path) -> np.ndarray:
    """``[n, 2]`` int64 array of ``(start, end)`` byte offsets of the non-blank lines of a file.

    ``end`` excludes the newline. A line is blank when it holds only ASCII whitespace.
    """
    starts_parts, ends_parts = [], []
    offset = 0
    line_start = 0
    nonws_before_line = 0  # running count of non-whitespace bytes before `line_start`
    nonws_total = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            a = np.frombuffer(chunk, dtype=np.uint8)
            is_nl = a == _NEWLINE
            nonws = np.cumsum(~(_WS[a] | is_nl), dtype=np.int64) + nonws_total
            nl = np.flatnonzero(is_nl)
            if len(nl):
                ends = nl + offset
                starts = np.concatenate([[line_start], ends[:-1] + 1])
                counts_at_end = nonws[nl]  # non-ws bytes up to each newline
                counts_before = np.concatenate([[nonws_before_line], counts_at_end[:-1]])
                keep = counts_at_end > counts_before
                starts_parts.append(starts[keep])
                ends_parts.append(ends[keep])
                line_start = int(ends[-1]) + 1
                nonws_before_line = int(counts_at_end[-1])
            nonws_total = int(nonws[-1])
            offset += len(chunk)
    if offset > line_start and nonws_total > nonws_before_line:  # last line without newline
        starts_parts.append(np.array([line_start]))
        ends_parts.append(np.array([offset]))
    if not starts_parts:
        return np.zeros((0, 2), dtype=np.int64)
    return np.stack([np.concatenate(starts_parts), np.concatenate(ends_parts)], axis=1).astype(np.int64)


class _LineFile:
    """Random access to the non-blank lines of one file.

    Each read opens the file, ``pread``s one line and closes it: thread-safe, nothing to reopen
    after pickling, and no file descriptor held per file (a glob may match thousands of files).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"text source not found: {self.path}")
        self._index = index_lines(self.path)

    def __len__(self) -> int:
        return len(self._index)

    def line(self, i: int) -> str:
        start, end = self._index[i]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, int(end - start), int(start))
        finally:
            os.close(fd)
        return data.decode("utf-8", errors="replace").strip()

    def lineno(self, i: int) -> int:
        """1-based line number of the ``i``-th non-blank line (for error messages; slow)."""
        start = int(self._index[i][0])
        with open(self.path, "rb") as f:
            return f.read(start).count(b"\n") + 1


class TextFileSource(_LineFile):
    """A ``.txt`` file: one document per non-blank line (stripped)."""

    def __getitem__(self, i: int) -> str:
        return self.line(i)

    def __repr__(self) -> str:
        return f"TextFileSource({str(self.path)!r}, docs={len(self)})"


class JsonlSource(_LineFile):
    """A ``.jsonl`` file: the document is ``record[field]`` of each non-blank line."""

    def __init__(self, path: str | Path, field: str = "text"):
        super().__init__(path)
        self.field = field
        if len(self):
            self[0]  # fail early on a wrong field name or a file that is not JSON lines

    def __getitem__(self, i: int) -> str:
        line = self.line(i)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.path}:{self.lineno(i)}: not valid JSON: {e.msg}") from None
        if not isinstance(record, dict) or self.field not in record:
            raise DataError(f"{self.path}:{self.lineno(i)}: no field '{self.field}' in the JSON record")
        value = record[self.field]
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        return str(value)

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r}, field={self.field!r}, docs={len(self)})"


_TFDS_RE = re.compile(
    r"^(?P<name>[A-Za-z0-9_]+(?:/[^:]+)?(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$"
)


def parse_tfds_spec(spec: str) -> tuple[str, str | None]:
    """``'tfds:NAME[/CONFIG][:VERSION][:SPLIT]'`` -> ``(NAME[/CONFIG][:VERSION], SPLIT or None)``."""
    body = spec[len("tfds:"):] if spec.startswith("tfds:") else spec
    m = _TFDS_RE.match(body)
    if not m:
        raise DataError(f"bad tfds source '{spec}': expected tfds:NAME[/CONFIG][:VERSION][:SPLIT]")
    return m.group("name"), m.group("split")


def _import_tfds(spec: str):
    """``tensorflow_datasets`` (the ``tfds`` extra), imported only when a ``tfds:`` source is used."""
    try:
        import importlib_resources  # noqa: F401 - tfds.data_source needs it, and does not declare it
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core.registered import DatasetNotFoundError
    except ImportError as e:
        raise DataError(f"{spec}: TFDS sources need tensorflow-datasets, which is not installed "
                        f"(pip install 'moshax[tfds]'): {e}") from None
    return tfds, DatasetNotFoundError


class TfdsTextSource:
    """One split of a TFDS dataset prepared on disk (``array_record`` format); documents are the
    text feature ``field`` decoded to ``str``."""

    def __init__(
        self,
        spec: str,
        *,
        field: str = "text",
        data_dir: str | None = None,
        default_splits: Sequence[str] = ("train",),
    ):
        tfds, DatasetNotFoundError = _import_tfds(spec)
        self.spec = spec
        self.field = field
        name, split = parse_tfds_spec(spec)
        where = f"in {data_dir}" if data_dir else "in the default TFDS data dir"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except DatasetNotFoundError:
            raise DataError(f"{spec}: unknown TFDS dataset '{name}' {where}") from None
        except Exception as e:  # bad config or version, unreadable metadata, ...
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{spec}: cannot open TFDS dataset '{name}' {where}: {msg}") from None
        if not builder.is_prepared():
            raise DataError(f"{spec}: TFDS dataset '{name}' is not prepared {where} (run download_and_prepare first)")
        splits = list(builder.info.splits.keys())
        if split is None:
            split = next((s for s in default_splits if s in splits), None)
            if split is None:
                raise DataError(f"{spec}: no split given and none of {', '.join(default_splits)} exists (splits: {', '.join(splits)})")
        features = builder.info.features
        keys = list(features.keys()) if hasattr(features, "keys") else []
        if field not in keys:
            raise DataError(f"{spec}: no feature '{field}' in TFDS dataset '{name}' (features: {', '.join(keys) or 'none'})")
        self.split = split
        try:
            self._ds = builder.as_data_source(split=split)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{spec}: cannot read split '{split}': {msg}") from None

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> str:
        value = self._ds[i][self.field]
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
            value = value.item()
            if isinstance(value, bytes):
                return value.decode("utf-8", errors="replace")
        return str(value)

    def __repr__(self) -> str:
        return f"TfdsTextSource({self.spec!r}, split={self.split!r}, docs={len(self)})"


class ConcatSource:
    """Several sources read one after the other as one random-access sequence."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        self._ends = np.cumsum([len(s) for s in self.sources]).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document index {i} out of range for {len(self)} documents")
        k = bisect.bisect_right(self._ends, i)
        return self.sources[k][i - (self._ends[k - 1] if k else 0)]

    def __repr__(self) -> str:
        return f"ConcatSource({self.sources!r})"


_GLOB_CHARS = re.compile(r"[*?\[]")


def _open_file(path: Path, jsonl_field: str):
    if path.suffix == ".jsonl":
        return JsonlSource(path, jsonl_field)
    if path.suffix == ".txt":
        return TextFileSource(path)
    raise DataError(f"unsupported text source file type: {path} (expected .txt or .jsonl)")


def open_text_source(
    spec: str | Path,
    *,
    jsonl_field: str = "text",
    tfds_data_dir: str | None = None,
    split: str = "train",
):
    """Open one source string (file, glob or ``tfds:...``); ``split`` ('train'|'eval') picks the
    default TFDS split. A glob gives a :class:`ConcatSource` over its files in sorted order."""
    spec_str = str(spec)
    if spec_str.startswith("tfds:"):
        defaults = ("train",) if split == "train" else ("validation", "test")
        return TfdsTextSource(spec_str, field=jsonl_field, data_dir=tfds_data_dir, default_splits=defaults)
    if _GLOB_CHARS.search(spec_str):
        matches = sorted(p for p in glob.glob(os.path.expanduser(spec_str), recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"no files match text source glob: {spec_str}")
        return ConcatSource([_open_file(Path(p), jsonl_field) for p in matches])
    path = Path(os.path.expanduser(spec_str))
    if not path.exists():
        raise DataError(f"text source not found: {path}")
    if path.is_dir():
        raise DataError(f"text source is a directory: {path} (use a glob such as {path}/*.txt)")
    return _open_file(path, jsonl_field)


def open_text_sources(
    specs: Sequence[str | Path],
    *,
    jsonl_field: str = "text",
    tfds_data_dir: str | None = None,
    split: str = "train",
) -> ConcatSource:
    """All ``specs`` concatenated, in order, as one random-access source of documents."""
    return ConcatSource(
        [open_text_source(s, jsonl_field=jsonl_field, tfds_data_dir=tfds_data_dir, split=split) for s in specs]
    )
