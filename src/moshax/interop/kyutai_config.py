"""Kyutai config JSON files: read one, and find the one that travels beside a ``.safetensors``.

``moshax convert to-kyutai --output X.safetensors`` writes the model's Kyutai config as ``X.json``
in the same directory (same stem: one directory can hold a Moshi LM and a Mimi). ``moshax convert
from-kyutai X.safetensors`` and ``moshax mimi encode|decode --checkpoint X.safetensors`` read that
``X.json`` when no ``--kyutai-config`` is given (an explicit ``--kyutai-config`` wins), so a
non-release architecture round-trips without a hand-written JSON. Without either, the released
architecture (moshiko / Mimi) is assumed.

The JSON has the shape of the reference loader's dicts (``moshi.models.loaders._lm_kwargs`` for
the Moshi LM, ``_mimi_config`` for Mimi; a release's ``config.json`` with an ``lm`` section works
too), so Kyutai's own ``loaders.get_moshi_lm(path, lm_kwargs=json)`` / ``get_mimi(path, json)``
read the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

from moshax.config import ConfigError


def config_beside(weights: str | Path) -> Path:
    """``X.safetensors`` -> ``X.json`` (same directory, same stem)."""
    return Path(weights).with_suffix(".json")


def read_kyutai_config(path: str | Path | None) -> dict | None:
    """A Kyutai config JSON (a release's ``config.json`` with an ``lm`` section works too)."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--kyutai-config not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    if "lm" in data and isinstance(data["lm"], dict) and "dim" not in data:  # a release's config.json
        data = data["lm"]
    return data


def resolve_kyutai_config(weights: str | Path, explicit: str | Path | dict | None = None) -> tuple[dict | None, str]:
    """(config dict or None for the release, where it came from) for a Kyutai weights file:
    ``explicit`` (a path or an already-read dict) wins, else ``X.json`` beside ``X.safetensors``."""
    if isinstance(explicit, dict):
        return explicit, "--kyutai-config"
    if explicit:
        return read_kyutai_config(explicit), str(explicit)
    beside = config_beside(weights)
    if beside.is_file():
        return read_kyutai_config(beside), str(beside)
    return None, "the released architecture"


def write_kyutai_config(path: str | Path, config: dict) -> Path:
    p = Path(path)
    p.write_text(json.dumps(config, indent=1) + "\n")
    return p
