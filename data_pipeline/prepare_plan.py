"""Which file goes into which shard, and which host writes which shard: static and deterministic.

The input list is sorted once; shard ``k`` holds files ``[k * files_per_shard, (k + 1) *
files_per_shard)``; host ``i`` of ``M`` writes the shards ``k`` with ``k % M == i``. The same
inputs and settings give the same plan on every host and every rerun, so hosts need no
coordination and a rerun knows which shards are already finished.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from data_pipeline.errors import DataError


@dataclass(frozen=True)
class FileItem:
    """One input file: its position in the sorted input list and its shard."""

    index: int
    path: str
    shard: int


@dataclass(frozen=True)
class ShardPlan:
    index: int
    files: tuple[FileItem, ...]

    @property
    def name(self) -> str:
        return shard_name(self.index)


def shard_name(index: int) -> str:
    return f"tokens-{index:05d}"


def plan_shards(paths: list[str], files_per_shard: int) -> list[ShardPlan]:
    if files_per_shard <= 0:
        raise DataError(f"files_per_shard={files_per_shard}: must be > 0")
    ordered = sorted(dict.fromkeys(p if "://" in p else os.path.abspath(p) for p in paths))
    shards = []
    for k in range(0, len(ordered), files_per_shard):
        idx = k // files_per_shard
        shards.append(ShardPlan(idx, tuple(FileItem(k + j, p, idx)
                                           for j, p in enumerate(ordered[k:k + files_per_shard]))))
    return shards


def host_shards(plan: list[ShardPlan], worker_index: int, num_worker_hosts: int) -> list[ShardPlan]:
    """The shards host ``worker_index`` of ``num_worker_hosts`` writes."""
    if num_worker_hosts < 1 or not 0 <= worker_index < num_worker_hosts:
        raise DataError(f"--worker-index {worker_index} --num-worker-hosts {num_worker_hosts}: need "
                        "0 <= index < hosts")
    return [s for s in plan if s.index % num_worker_hosts == worker_index]
