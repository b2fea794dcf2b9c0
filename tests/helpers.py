"""Small shared builders for the tests."""

import numpy as np

from moshax.config import from_dict


def draw_codebooks(model, audio, rng: np.random.Generator):
    """A Mimi's codebooks drawn at the scale of the latents of ``audio`` [B, 1, T] (the library's
    :func:`moshax.models.mimi.random_init.draw_codebooks`)."""
    from moshax.models.mimi.random_init import draw_codebooks as draw

    return draw(model, audio, rng)


def tiny_lm_config(**sections):
    """A tiny Helium config; pass section dicts to override, e.g. train={"steps": 4}."""
    data = {
        "model": {"kind": "helium", "vocab_size": 64,
                  "transformer": {"dim": 32, "num_heads": 4, "num_layers": 2, "hidden_dim": 48, "context": 16}},
        "data": {"seq_len": 16},
        "train": {"batch_size": 8, "steps": 4, "log_every": 1, "progress": False},
        "optim": {"learning_rate": 1e-2, "warmup_steps": 1},
        "checkpoint": {"every": 2, "async_save": True},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            merged = dict(data.get(name, {}))
            for k, v in values.items():
                if isinstance(v, dict) and isinstance(merged.get(k), dict):
                    merged[k] = {**merged[k], **v}
                else:
                    merged[k] = v
            data[name] = merged
        else:
            data[name] = values
    return from_dict(data)
