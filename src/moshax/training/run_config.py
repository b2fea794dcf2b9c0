"""A workdir's ``config.yaml`` against the config of a run that resumes it.

Rerunning a workdir with another config must never cost its checkpoints: before anything in the
workdir is touched, the saved config is compared with the new one, key by key.

* Run control (how long, how often to log/eval/save, the mesh, loader workers) may change freely:
  ``train.steps=N`` extends a run.
* Keys that change the state's shapes or dtypes (``model.*``, the optimizer's param groups, the
  codec's discriminator and distillation teacher) can never continue from these checkpoints: one
  line names them and nothing is touched (start a new ``--workdir``, or warm-start one with
  ``task.init_from``).
* Everything else (learning rate, schedule, batch size, data, loss weights, ...) is safe to change
  but changes the run: it needs ``--allow-config-change``, and ``config.yaml`` then records each
  change with the step it took effect at (comment lines at its top, so it still loads).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from moshax.checkpoint.manager import CheckpointMismatch
from moshax.config import ConfigError, dump_yaml, migrate_legacy, to_dict

RUN_CONTROL = ("name", "workdir", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
               "train.progress", "train.profile_steps", "checkpoint.", "mesh.", "data.num_workers",
               "data.num_threads", "data.eval_sources", "data.eval_shards")
STATE_SHAPES = ("model.", "optim.param_groups", "task.discriminator.", "task.teacher.")
HISTORY_MARK = "# config change at step "


def _flat(tree, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".") for p in patterns)


def _changes_state(key: str, old, new) -> bool:
    if key == "optim.param_groups":  # new patterns regroup the optimizer state; new rates do not
        return [g.get("pattern") for g in old or []] != [g.get("pattern") for g in new or []]
    return _matches(key, STATE_SHAPES)


def config_changes(saved: dict, cfg) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every key that differs, run control left out."""
    old, new = _flat(migrate_legacy(saved)[0]), _flat(to_dict(cfg))
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not _matches(k, RUN_CONTROL)]


def _show(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def check_resume_config(workdir: Path, cfg, *, allow_change: bool) -> list[str]:
    """Compare ``workdir/config.yaml`` (when the workdir has checkpoints) with ``cfg``; raise one
    line for a change the checkpoints cannot take or that ``allow_change`` does not allow. Returns
    the accepted changes as ``"key old -> new"`` lines (empty for a fresh or unchanged run)."""
    saved_path = workdir / "config.yaml"
    ckpts = workdir / "checkpoints"
    if not saved_path.is_file() or not ckpts.is_dir() or not any(p.name.isdigit() for p in ckpts.iterdir()):
        return []
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{saved_path}: not valid YAML; fix it or move it away to resume from the checkpoints") from None
    changes = config_changes(saved, cfg)
    if not changes:
        return []
    lines = [f"{k} {_show(a)} -> {_show(b)}" for k, a, b in changes]
    fatal = [line for (k, a, b), line in zip(changes, lines) if _changes_state(k, a, b)]
    if fatal:
        more = f" (+{len(fatal) - 4} more)" if len(fatal) > 4 else ""
        raise CheckpointMismatch(
            f"{workdir} was trained with another model: {'; '.join(fatal[:4])}{more} changes the checkpoints' "
            "shapes; start a new --workdir (task.init_from=... warm-starts one). Nothing was changed")
    if not allow_change:
        more = f" (+{len(lines) - 4} more)" if len(lines) > 4 else ""
        raise CheckpointMismatch(
            f"{workdir} was trained with another config: {'; '.join(lines[:4])}{more}; rerun with "
            "--allow-config-change to continue with it (recorded in config.yaml), or use the saved config. "
            "Nothing was changed")
    return lines


def write_run_config(workdir: Path, cfg, changes: list[str], step: int) -> None:
    """Write ``config.yaml``: the earlier change records, this run's changes at ``step``, the config."""
    path = workdir / "config.yaml"
    history = []
    if path.is_file():
        history = [ln for ln in path.read_text().splitlines() if ln.startswith(HISTORY_MARK)]
    history += [f"{HISTORY_MARK}{step}: {line}" for line in changes]
    path.write_text("".join(h + "\n" for h in history) + dump_yaml(cfg))
