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


def stack_matmul_params(t) -> int:
    """Matmul params of one transformer stack (one weight set): attention + (gated) MLP."""
    mlp = (3 if t.gated else 2) * t.dim * t.hidden_dim
    return t.num_layers * (4 * t.dim * t.dim + mlp)


def training_flops_per_token(matmul_params: float, attention: tuple = ()) -> float:
    """The one training-FLOPs formula (forward + backward, PaLM appendix B): ``6 N`` for the N
    matmul params a token goes through, plus ``12 L d T`` for each attention stack
    ``(layers L, dim d, keys attended T)`` in ``attention``."""
    return 6.0 * matmul_params + sum(12.0 * layers * dim * keys for layers, dim, keys in attention)


class MetricsWriter:
    """Writes metrics from process 0 only; everything is also kept in memory (``history``)."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True, enabled: bool = True,
                 resume_step: int | None = None):
        """``resume_step``: the step a resumed run restarts from; rows of ``metrics.jsonl`` past it
        (logged by a run killed after its last checkpoint) are dropped, so a plot shows one curve."""
        self.enabled = enabled
        self.history: list[dict] = []
        self._tb = None
        self._file = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "metrics.jsonl"
        if path.is_file():
            _drop_rows_after(path, resume_step or 0)
        self._file = open(path, "a")
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


def _drop_rows_after(path: Path, step: int) -> None:
    """Rewrite ``path`` without the rows whose step is past ``step`` (and any torn last line)."""
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(row.get("step", 0)) > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        tmp.replace(path)
