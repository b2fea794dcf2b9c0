"""The training-task protocol: what the generic trainer (and ``moshax eval``) asks of a model kind.

A task owns everything kind-specific — the model it builds, the loss (as sums, so gradient
accumulation and data sharding stay exact), the batch layout and the data iterators — and the
trainer owns everything else (mesh, shardings, optimizer, accumulation, metrics, checkpoints).
Subclasses override what they need; the defaults here are the common case, so the trainer never
probes with ``hasattr``.
"""

from __future__ import annotations

from typing import Any

import jax

from moshax import registry


class Task:
    """Base class of the training tasks (one per model kind, named in :mod:`moshax.registry`).

    * ``cfg``: the run :class:`~moshax.config.Config`; ``model_cfg``, ``task_cfg`` and
      ``data_cfg`` are its ``model``, ``task`` and ``data`` sections (typed per kind).
    * ``token_losses``: True when ``loss`` is a token cross-entropy (the trainer then reports
      perplexity next to the eval loss).
    * ``shard_kind``: the manifest kind of the token shards ``moshax eval --shards`` evaluates it
      on (``text``, ``multistream``), None when it has none.
    """

    token_losses: bool = False
    shard_kind: str | None = None  # the token-shard kind ``moshax eval --shards`` reads (None: none)

    def __init__(self, cfg):
        self.cfg = cfg
        self.model_cfg = cfg.model
        self.task_cfg = cfg.task
        self.data_cfg = cfg.data

    # ---------------------------------------------------------------- model

    def build_model(self, rngs):
        """The model to train (the registry's model class by default)."""
        return registry.build_model(self.model_cfg, rngs)

    def init_params(self, params: dict, rest: dict, trainer) -> tuple[dict, dict]:
        """Change freshly initialized params before training starts (warm starts); default: keep."""
        return params, rest

    @staticmethod
    def say(line: str) -> None:
        """A status line for the user (process 0 only), e.g. what a warm start loaded."""
        if jax.process_index() == 0:
            print(line, flush=True)

    # ---------------------------------------------------------------- batches + loss

    def example_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Per batch field: (shape of one example, dtype)."""
        raise NotImplementedError

    def batch_axes(self) -> dict[str, tuple]:
        """Per batch field: logical axis names of its leading dims (default: batch only)."""
        return {name: ("act_batch",) for name in self.example_spec()}

    def loss(self, model, batch: dict, rng) -> tuple[jax.Array, jax.Array, dict]:
        """(loss sum, weight, aux): the trainer optimizes ``sum / weight``; aux maps a metric name
        to a (sum, weight) pair. ``rng`` None means evaluation (no augmentation, no dropout)."""
        raise NotImplementedError

    def eval_metrics(self, model, batch: dict) -> dict[str, tuple[jax.Array, jax.Array]]:
        """Metric name -> (sum, weight) over one eval batch; ``"loss"`` is the training objective.
        The one eval path: ``moshax train``'s periodic eval and ``moshax eval`` both sum these."""
        loss_sum, weight, aux = self.loss(model, batch, None)
        return {"loss": (loss_sum, weight), **aux}

    def eval_report(self, totals: dict[str, tuple]) -> dict[str, float]:
        """Final eval figures from the summed ``eval_metrics`` (``sum / weight`` each, plus
        perplexity for token losses)."""
        import math

        out = {}
        for name, (s, w) in totals.items():
            if getattr(s, "ndim", 0):
                continue  # vector metrics (e.g. per codebook) are for the task's own report
            out[name] = float(s) / max(float(w), 1e-9)
        if self.token_losses and "loss" in out:
            out["perplexity"] = float(math.exp(min(out["loss"], 50.0)))
        return out

    # ---------------------------------------------------------------- data

    def check_eval_record(self, shards: str, shape: list[int]) -> None:
        """Raise one line when records of ``shape`` cannot feed this model (``moshax eval``)."""

    def data_iterator(self, split: str, *, global_batch_size: int, process_index: int, process_count: int):
        """A checkpointable iterator of per-process numpy batches, or None when ``split`` has no data."""
        raise NotImplementedError

    def check_inputs(self) -> None:
        """Fail early, in one line, on inputs the config names but that are missing or wrong."""

    # ---------------------------------------------------------------- accounting

    def flops_per_example(self) -> float:
        """Training FLOPs (forward + backward) of one example, for MFU and the compile report."""
        return 0.0

    def tokens_per_example(self) -> int:
        """What ``tokens_per_second`` counts per example."""
        raise NotImplementedError

    def throughput(self) -> tuple[str, float]:
        """(the logged throughput's name, its units per example): ``tokens_per_second`` for the
        LMs; a task whose examples are not tokens names its own unit."""
        return "tokens_per_second", float(self.tokens_per_example())


def make_task(cfg) -> Task:
    """The training task of ``cfg.model.kind``."""
    return registry.get(cfg.model.kind).load("task")(cfg)
