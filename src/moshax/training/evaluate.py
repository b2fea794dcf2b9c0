"""The one eval path: sum a task's ``eval_metrics`` over batches.

``moshax train``'s periodic eval (:meth:`moshax.training.trainer.Trainer.evaluate`, the first
``train.eval_batches`` batches of the eval iterator) and ``moshax eval`` on token shards
(:func:`evaluate_shards`, every record in order) both call :func:`sum_metrics` with the task's
``eval_metrics``, so the two report the same numbers on the same records.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.errors import DataError
from moshax import registry
from moshax.config import Config, ConfigError, MeshConfig


def sum_metrics(eval_step: Callable, batches: Iterable, *, max_batches: int | None = None,
                progress=None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Sum ``eval_step(batch) -> {name: (sum, weight)}`` over ``batches`` (float64 on the host);
    returns (totals, batches used). ``progress``: a tqdm bar to advance, or None."""
    totals: dict[str, list] = {}
    used = 0
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)
    for batch in batches:
        out = jax.device_get(eval_step(batch))
        for name, (s, w) in out.items():
            acc = totals.setdefault(name, [0.0, 0.0])
            acc[0] = acc[0] + np.asarray(s, np.float64)
            acc[1] = acc[1] + np.asarray(w, np.float64)
        used += 1
        if progress is not None:
            progress.update(1)
    return {k: (v[0], v[1]) for k, v in totals.items()}, used


def _shard_batches(shards: str, batch: int, shape: list[int], pad_value: int = -1):
    """Every record of ``shards`` in order, ``batch`` at a time; the last batch padded with
    ``pad_value`` rows (which carry no loss). Yields (rows, real row count)."""
    from data_pipeline.token_shards import iter_records

    rows = []
    for rec in iter_records(shards):
        rows.append(rec)
        if len(rows) == batch:
            yield np.stack(rows), batch
            rows = []
    if rows:
        n = len(rows)
        rows += [np.full(shape, pad_value, np.int32)] * (batch - n)
        yield np.stack(rows), n


def evaluate_shards(ckpt, run_cfg: Config | None, shards: str, batch_size: int = 8, max_batches: int | None = None,
                    progress: bool = True) -> dict:
    """Eval figures of a checkpointed LM (Helium on text token shards, the Moshi LM on
    multi-stream shards) over every record of ``shards``, through its task's ``eval_metrics``
    and ``eval_report``. The batch is rounded up to a multiple of the mesh's batch axes."""
    from flax import nnx
    from jax.sharding import NamedSharding

    from data_pipeline.token_shards import read_manifest
    from moshax.checkpoint.model import build_model_from_checkpoint
    from moshax.parallel.mesh import batch_axis_size, build_mesh
    from moshax.parallel.sharding import logical_to_spec
    from moshax.training.task import make_task

    model_cfg = run_cfg.model if run_cfg is not None else ckpt.model_config()
    cfg = run_cfg if run_cfg is not None else Config(model=model_cfg,
                                                       task=registry.get(model_cfg.kind).load("task_config")(),
                                                       data=registry.get(model_cfg.kind).load("data_config")())
    task = make_task(cfg)
    if task.shard_kind is None:
        raise ConfigError(f"{ckpt.step_dir} holds a {model_cfg.kind} model: use --audio DIR for a codec")
    manifest = read_manifest(shards)
    if manifest.get("kind") != task.shard_kind:
        raise DataError(f"{shards}: a {model_cfg.kind} model needs {task.shard_kind} shards, "
                        f"these are {manifest.get('kind')!r}")
    shape = manifest["record"]["shape"]
    task.check_eval_record(shards, shape)
    field = next(iter(task.example_spec()))
    mesh = build_mesh(cfg.mesh if run_cfg is not None else MeshConfig(), jax.devices())
    per = batch_axis_size(mesh)
    batch_size = -(-batch_size // per) * per
    with jax.set_mesh(mesh):
        model, _ = build_model_from_checkpoint(ckpt, model_cfg, mesh)
    sharding = NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * len(shape), mesh.axis_names))
    step = nnx.jit(lambda m, x: task.eval_metrics(m, {field: x}))
    records = 0

    def batches():
        nonlocal records
        for rows, n in _shard_batches(shards, batch_size, shape):
            records += n
            yield jax.device_put(jnp.asarray(rows, jnp.int32), sharding)

    total = math.ceil(manifest["total_records"] / batch_size)
    if max_batches:
        total = min(total, max_batches)
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total, desc="eval", unit="batch", dynamic_ncols=True)
    try:
        with jax.set_mesh(mesh):
            totals, _ = sum_metrics(lambda x: step(model, x), batches(), max_batches=max_batches, progress=pbar)
    finally:
        if pbar is not None:
            pbar.close()
    if not totals:
        raise DataError(f"{shards}: no records to evaluate")
    return {"checkpoint": str(ckpt.step_dir), "kind": model_cfg.kind, "shards": str(shards), "records": records,
            **task.eval_report(totals)}
