"""Metrics: one JSON object per logged step in ``metrics.jsonl``, TensorBoard events, MFU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax

from moshax.parallel import tpu_facts


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
    """Peak FLOP/s of one device (``parallel/tpu_facts.py``), or None where no honest number exists (e.g. CPUs)."""
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    return tpu_facts.peak_flops_per_device(kind)


def transformer_flops_per_token(num_matmul_params: int, num_layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 L d T (PaLM appendix B)."""
    return 6.0 * num_matmul_params + 12.0 * num_layers * dim * seq_len


class MetricsWriter:
    """Writes metrics from process 0 only; everything is also kept in memory (``history``)."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.history: list[dict] = []
        self._tb = None
        self._file = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._file = open(workdir / "metrics.jsonl", "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": int(step)}
        for k, v in metrics.items():
            v = None if v is None else float(v)
            record[k] = None if v is not None and not math.isfinite(v) and k == "mfu" else v
        self.history.append(record)
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
