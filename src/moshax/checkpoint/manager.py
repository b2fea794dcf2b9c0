"""Orbax checkpoints: train state (any mesh), the Grain iterator position, and run metadata.

Restoring takes the *current* shardings as the target, so a checkpoint written on one mesh
(or device count, or number of processes) restores onto another.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


from moshax.checkpoint.errors import CheckpointError, CheckpointMismatch  # noqa: F401  (re-exported)


@contextlib.contextmanager
def quiet_orbax():
    """Orbax looks for the step metadata inside the item dir it is given (it lives one level up,
    in the step dir) and logs a warning that means nothing here: hide absl warnings meanwhile."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def stored_state_tree(step_dir: Path):
    """The metadata tree (leaves with ``shape`` and ``dtype``) of a step's ``state`` item."""
    with quiet_orbax():
        md = ocp.PyTreeCheckpointer().metadata(Path(step_dir) / "state")
    tree = getattr(md, "item_metadata", md)
    return getattr(tree, "tree", tree)


def flat_shapes(tree, is_leaf=None) -> dict[str, tuple]:
    """``"a/b/0/c" -> (shape, dtype name)`` for array-like leaves of a nested dict/list tree."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=is_leaf or (lambda m: hasattr(m, "shape") and not isinstance(m, (dict, list, tuple))))[0]
    out = {}
    for path, leaf in leaves:
        if not hasattr(leaf, "shape"):
            continue
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        out[key] = (tuple(leaf.shape), str(getattr(leaf, "dtype", "")))
    return out


def describe_mismatch(stored: dict, wanted: dict, limit: int = 4) -> list[str]:
    """Lines naming each path whose stored shape/dtype differs from the wanted one (or is missing)."""
    bad = []
    for k, (shape, dtype) in wanted.items():
        if k not in stored:
            bad.append(f"{k}: not in the checkpoint")
        elif stored[k][0] != shape:
            bad.append(f"{k}: stored {stored[k][0]} vs model {shape}")
        elif stored[k][1] and dtype and stored[k][1] != dtype:
            bad.append(f"{k}: stored {stored[k][1]} vs model {dtype}")
    bad += [f"{k}: not in the model" for k in stored if k not in wanted]
    return bad


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),  # one state file per process
            "data_elastic": ocp.JsonCheckpointHandler(),  # one state for any number of processes
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator=None, meta: dict | None = None, force: bool = True) -> bool:
        meta = dict(meta or {}, process_count=jax.process_count())
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            if getattr(data_iterator, "elastic", False):
                items["data_elastic"] = ocp.args.JsonSave(data_iterator.get_state())
            else:
                items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def check_matches(self, step: int, abstract_state: Any) -> None:
        """Raise :class:`CheckpointMismatch` (one line) when the stored params / rest of ``step``
        have other shapes or dtypes than ``abstract_state``'s: the checkpoint is fine, the
        config is another one. An unreadable checkpoint raises whatever reading it raises."""
        step_dir = self.directory / str(step)
        tree = stored_state_tree(step_dir)
        bad = []
        for part in ("params", "rest"):
            if not isinstance(abstract_state, dict) or part not in abstract_state:
                continue
            stored = flat_shapes(dict(tree).get(part, {}) or {})
            bad += [f"{part}/{line}" for line in describe_mismatch(stored, flat_shapes(abstract_state[part]))]
        if bad:
            more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
            raise CheckpointMismatch(f"{step_dir} does not match this run's model: {'; '.join(bad[:4])}{more}; "
                                     "it was written with another config (nothing was changed)")

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> tuple[Any, dict]:
        """Restore ``state`` onto the shardings in ``abstract_state`` (ShapeDtypeStructs), and the
        iterator in place; returns (state, meta)."""
        step_dir = self.directory / str(step)
        self.check_matches(step, abstract_state)
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        elastic = None
        if data_iterator is not None:
            if getattr(data_iterator, "elastic", False):
                if not (step_dir / "data_elastic").exists():
                    raise CheckpointError(f"{step_dir}: the data position was saved by a per-process (text) "
                                          "loader, but this run reads token shards; use the same data settings")
                items["data_elastic"] = ocp.args.JsonRestore()
                elastic = True
            else:
                saved = meta.get("process_count", 1)
                if saved != jax.process_count():
                    raise CheckpointError(
                        f"{step_dir}: the text loader's position was saved by {saved} processes and this run has "
                        f"{jax.process_count()}; a per-process text position cannot move to another process "
                        "count: tokenize the data into shards (`moshax data tokenize`) for elastic restores")
                if not (step_dir / "data").exists():
                    raise CheckpointError(f"{step_dir}: no per-process data position saved (token shards were "
                                          "used); use the same data settings")
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if elastic:
            data_iterator.set_state(out["data_elastic"])
        return out["state"], meta

    def restore_latest(self, abstract_state: Any, data_iterator=None) -> tuple[int, Any, dict] | None:
        """Restore the newest checkpoint that reads back whole; an unreadable one (e.g. cut off
        mid-write on a filesystem without atomic renames) is skipped with a warning. Orbax never
        lists a checkpoint whose write did not finalize. Returns (step, state, meta) or None."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                state, meta = self.restore(step, abstract_state, data_iterator)
                return step, state, meta
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means "not usable"
                if i == len(steps) - 1:
                    raise CheckpointError(f"no usable checkpoint in {self.directory}: step {step}: "
                                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
                aside = self._set_aside(step)
                logging.warning("checkpoint %d in %s is unreadable (%s); moved it to %s, falling back to step %d",
                                step, self.directory, str(e).splitlines()[0] if str(e) else type(e).__name__,
                                aside.name, steps[i + 1])
        return None

    def _set_aside(self, step: int) -> Path:
        """Rename an unusable step out of Orbax's view (kept for inspection, never deleted)."""
        aside = self.directory / f"unusable-{step}-{int(time.time())}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"moshax_set_aside_{step}")
        self.manager.reload()
        return aside

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
