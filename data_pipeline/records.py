"""Numpy arrays <-> bytes as ``.npy`` (header + raw data), never pickled."""

from __future__ import annotations

import io

import numpy as np

from data_pipeline.errors import DataError


def encode_array(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_array(record: bytes) -> np.ndarray:
    try:
        return np.lib.format.read_array(io.BytesIO(record), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"not a numpy record: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
