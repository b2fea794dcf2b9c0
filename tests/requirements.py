"""What a test needs from outside the library: skip where it is missing, fail under CI.

The parity tests need Kyutai's PyTorch reference (``torch``, ``moshi``), the TPU compile checks
need ``libtpu`` and the speech tests need ``espeak-ng``. On a developer's machine a missing one
skips the test (pytest's ``-rs`` summary says why); with ``MOSHAX_REQUIRE_REFERENCE=1`` (set by
``.ci/run``) it is a failure, so CI never passes while running less than it claims.
"""

from __future__ import annotations

import importlib
import os
import shutil

import pytest

ENV = "MOSHAX_REQUIRE_REFERENCE"
REFERENCE = "Kyutai's PyTorch reference (torch, moshi==0.2.13) is a test-only dependency; `make install` installs it"


def required() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no")


def _missing(what: str, reason: str):
    msg = f"{what} is missing: {reason}"
    if required():
        pytest.fail(f"{msg} ({ENV}=1: a missing test dependency is a failure)", pytrace=False)
    # Reported at the test's location (as a skip mark is), not at this line.
    raise pytest.skip.Exception(msg, _use_item_location=True)


def require_module(name: str, reason: str | None = None):
    """Import and return module ``name``; skip (or fail under ``MOSHAX_REQUIRE_REFERENCE=1``) when
    it cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        error = f"{type(e).__name__}: {e}"
    _missing(f"module {name!r}", reason or error)


def require_binary(name: str, reason: str | None = None) -> str:
    """Path of executable ``name`` on PATH; skip (or fail under ``MOSHAX_REQUIRE_REFERENCE=1``)
    when there is none."""
    path = shutil.which(name)
    if path is None:
        _missing(f"program {name!r}", reason or "not on PATH")
    return path

