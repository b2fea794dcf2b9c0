"""Files for the fleet job: local paths or any filesystem Apache Beam knows (``gs://``, ``s3://``,
``hdfs://``, through the ``apache-beam[gcp]``/``[aws]`` plugins), behind a handful of calls.

Local paths take the plain ``os`` route (atomic ``os.replace``); a ``scheme://`` path goes through
``apache_beam.io.filesystems.FileSystems``: object stores publish an object whole when its writer
closes, so a reader never sees half a file there either. Libraries that need a local file
(ArrayRecord, audio decoders) get a local copy (:func:`local_copy`) or write into a local
temporary that :func:`publish` moves to its place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def is_remote(path: str) -> bool:
    return "://" in str(path)


def join(base: str, *names: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *names])
    return os.path.join(base, *names)


def _fs():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def exists(path: str) -> bool:
    return _fs().exists(path) if is_remote(path) else os.path.exists(path)


def makedirs(path: str) -> None:
    if not is_remote(path):  # object stores have no directories
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        with _fs().open(path) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Whole or not at all: a temporary renamed into place (locally), one object write (remote)."""
    if is_remote(path):
        with _fs().create(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def delete(path: str) -> None:
    if is_remote(path):
        if _fs().exists(path):
            _fs().delete([path])
    elif os.path.exists(path):
        os.unlink(path)


@contextlib.contextmanager
def local_copy(path: str):
    """A local file with ``path``'s bytes (``path`` itself when it is local)."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="moshax-") as tmp:
        local = os.path.join(tmp, Path(path.split("://", 1)[1]).name)
        with _fs().open(path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        yield local


@contextlib.contextmanager
def local_output(path: str):
    """A local path to write ``path``'s content into; on success it is moved into place whole."""
    if not is_remote(path):
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    with tempfile.TemporaryDirectory(prefix="moshax-") as tmp:
        local = os.path.join(tmp, "out")
        yield local
        with open(local, "rb") as src, _fs().create(path) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
