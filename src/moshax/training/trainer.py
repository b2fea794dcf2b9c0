"""The generic trainer: sharded state, a jitted train step (pjit), eval, logging, Orbax resume.

A *task* supplies the model constructor, the loss (as sums, so gradient accumulation and data
sharding are exact), the batch's logical axes and a checkpointable data iterator. Everything
else — mesh, shardings, optimizer, accumulation, metrics, checkpoints — lives here, once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipeline.errors import DataError
from moshax.config import Config, ConfigError, to_dict
from moshax.parallel.mesh import build_mesh, check_batch
from moshax.parallel.partition import ModelHandle, replicated
from moshax.parallel.sharding import logical_to_spec
from moshax.checkpoint.manager import Checkpointer, abstract_like
from moshax.training.evaluate import sum_metrics
from moshax.training.metrics import MetricsWriter, peak_flops_per_device
from moshax.training.optimizer import make_optimizer
from moshax.training.preemption import PreemptionWatcher
from moshax.training.run_config import check_resume_config, write_run_config
from moshax.training.task import Task


class DataExhausted(DataError):
    """The training iterator ended before ``train.steps`` (a finite source); a user-fixable error."""


@dataclass
class StepTimes:
    compile_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    eval_seconds: float = 0.0


class Trainer:
    """Builds everything for ``cfg`` + ``task`` on ``mesh`` (default: from ``cfg.mesh``)."""

    def __init__(self, cfg: Config, task: Task, mesh: Mesh | None = None, workdir: str | Path | None = None,
                 allow_config_change: bool = False):
        self.cfg = cfg
        self.allow_config_change = allow_config_change
        self.task = task
        self.mesh = mesh if mesh is not None else build_mesh(cfg.mesh)
        self.workdir = Path(workdir if workdir is not None else cfg.workdir)
        tc = cfg.train
        self.accum = tc.grad_accum_steps
        check_batch(self.mesh, tc.batch_size, self.accum)
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        if tc.batch_size % self.process_count:
            raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by the {self.process_count} processes")

        self.handle = ModelHandle.from_constructor(task.build_model)
        self.tx, self.schedule = make_optimizer(cfg.optim, tc.steps, self.handle.axes())
        self.param_shardings = self.handle.shardings(self.mesh)
        rep = replicated(self.mesh)
        abstract_params = self.handle.shapes()
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        opt_shardings = optimizer_state_shardings(abstract_opt, abstract_params, self.param_shardings, rep)
        abstract_rest = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                     _pure(self.handle.abstract_rest))
        self.state_shardings = {
            "step": rep,
            "params": self.param_shardings,
            "opt_state": opt_shardings,
            "rest": jax.tree.map(lambda _: rep, abstract_rest),
            "rng": rep,
        }
        abstract_state = {
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "params": abstract_params,
            "opt_state": abstract_opt,
            "rest": abstract_rest,
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
        }
        self.abstract_state = abstract_like(abstract_state, self.state_shardings)
        self._batch_axes = task.batch_axes()
        self._train_step = None
        self._eval_step = None
        self.times = StepTimes()

    # ------------------------------------------------------------------ state

    def init_state(self) -> dict:
        params, rest = self.handle.init(self.task.build_model, self.cfg.seed, self.mesh)
        params, rest = self.task.init_params(params, rest, self)  # e.g. a warm start
        with jax.set_mesh(self.mesh):
            opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        rep = replicated(self.mesh)
        return {
            "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
            "params": params,
            "opt_state": opt_state,
            "rest": rest,
            "rng": jax.device_put(jax.random.PRNGKey(self.cfg.seed + 1), rep),
        }

    # ------------------------------------------------------------------ batches

    def batch_sharding(self, name: str, ndim: int, leading_accum: bool) -> NamedSharding:
        axes = tuple(self._batch_axes.get(name, ("act_batch",)))
        axes = axes + (None,) * (ndim - len(axes) - int(leading_accum))
        if leading_accum:
            axes = (None,) + axes
        return NamedSharding(self.mesh, logical_to_spec(axes, self.mesh.axis_names))

    def abstract_batch(self, eval_batch: bool = False) -> dict:
        """ShapeDtypeStructs (with shardings) of a global train batch [accum, B / accum, ...]."""
        accum = 1 if eval_batch else self.accum
        rows = self.cfg.train.batch_size // self.accum
        out = {}
        for name, (shape, dtype) in self.task.example_spec().items():
            full = (accum, rows) + tuple(shape)
            out[name] = jax.ShapeDtypeStruct(full, dtype, sharding=self.batch_sharding(name, len(full), True))
        return out

    def to_global(self, local_batch: dict, accum: int) -> dict:
        """Per-process numpy rows [local_B, ...] -> global arrays [accum, B / accum, ...]."""
        out = {}
        for name, x in local_batch.items():
            x = np.asarray(x)
            if x.shape[0] % accum:
                raise ConfigError(f"batch of {x.shape[0]} rows does not split into {accum} micro-batches")
            x = x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
            sharding = self.batch_sharding(name, x.ndim, leading_accum=True)
            global_shape = (accum, x.shape[1] * self.process_count) + x.shape[2:]
            out[name] = jax.make_array_from_process_local_data(sharding, x, global_shape)
        return out

    # ------------------------------------------------------------------ steps

    def _loss_and_grad(self, params, rest, micro_batch, key):
        """Gradient of the task's loss sum; non-Param variables the loss updates in place (EMA
        codebooks, batch statistics) come back as the new ``rest``."""

        def f(p):
            model = self.handle.merge(p, rest)
            loss_sum, weight, aux = self.task.loss(model, micro_batch, key)
            new_rest = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
            return loss_sum, (weight, aux, new_rest)

        (loss_sum, (weight, aux, new_rest)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return (loss_sum, weight, aux, grads), new_rest

    def _train_step_fn(self, state: dict, batch: dict):
        rng, step_key = jax.random.split(state["rng"])
        params, rest = state["params"], state["rest"]
        accum = jax.tree.leaves(batch)[0].shape[0]
        keys = jax.random.split(step_key, accum)
        if accum == 1:
            sums, rest = self._loss_and_grad(params, rest, jax.tree.map(lambda x: x[0], batch), keys[0])
        else:
            def body(carry, xs):
                acc, cur_rest = carry
                mb, key = xs
                out, cur_rest = self._loss_and_grad(params, cur_rest, mb, key)
                return (jax.tree.map(jnp.add, acc, out), cur_rest), None

            first = jax.tree.map(lambda x: x[0], batch)
            zero = jax.eval_shape(lambda: self._loss_and_grad(params, rest, first, keys[0])[0])
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
            (sums, rest), _ = jax.lax.scan(body, (zero, rest), (batch, keys))
        loss_sum, weight, aux, grads = sums
        denom = jnp.maximum(weight, 1.0)
        params, opt_state, grad_norm = self._update_fn(params, state["opt_state"], grads, denom)
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": grad_norm,
            "learning_rate": self.schedule(state["step"]),
        }
        for name, (s, w) in aux.items():
            metrics[name] = s / jnp.maximum(w, 1e-9)
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rest": rest, "rng": rng}
        return new_state, metrics

    def _update_fn(self, params, opt_state, grad_sums, denom):
        """The optimizer part of a train step: gradients of the loss sum / ``denom`` (the loss
        weight), clipping + AdamW, applied. Returns (params, opt_state, grad_norm); benches jit it
        alone to time the update."""
        inv = 1.0 / jnp.asarray(denom, jnp.float32)  # a multiply per element (XLA fuses it into every user; a divide it materializes)
        grads = jax.tree.map(lambda g: g * inv.astype(g.dtype), grad_sums)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)

    def _eval_step_fn(self, state: dict, batch: dict):
        """``task.eval_metrics`` of one eval batch (no augmentation, no dropout)."""
        model = self.handle.merge(state["params"], state["rest"])
        return self.task.eval_metrics(model, jax.tree.map(lambda x: x[0], batch))

    def compile_train_step(self, abstract_batch: dict, log: Callable[[str], None] | None = None) -> Callable:
        """Lower + compile the train step ahead of time (timed), keyed to this batch shape;
        ``log`` hears of each phase with its elapsed time."""
        rep = replicated(self.mesh)
        jitted = jax.jit(self._train_step_fn, in_shardings=(self.state_shardings, None),
                         out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh):
            lowered = jitted.lower(self.abstract_state, abstract_batch)
            if log is not None:
                log(f"lowered the train step ({time.perf_counter() - t0:.1f} s); compiling")
            compiled = lowered.compile()
        self.times.compile_seconds += time.perf_counter() - t0
        if log is not None:
            log(f"compiled the train step ({time.perf_counter() - t0:.1f} s)")
        return compiled

    def train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        if self._train_step is None:
            self._train_step = self.compile_train_step(_abstract(batch))
        return self._train_step(state, batch)

    def eval_step(self, state: dict, batch: dict) -> dict:
        if self._eval_step is None:
            with jax.set_mesh(self.mesh):
                self._eval_step = jax.jit(self._eval_step_fn, out_shardings=replicated(self.mesh))
        with jax.set_mesh(self.mesh):
            return self._eval_step(state, batch)

    # ------------------------------------------------------------------ loop

    def evaluate(self, state: dict) -> dict | None:
        """The first ``train.eval_batches`` batches of the eval split, through the one eval path
        (:func:`moshax.training.evaluate.sum_metrics`); ``eval_batches_used`` says how many."""
        tc = self.cfg.train
        it = self.task.data_iterator("eval", global_batch_size=tc.batch_size // self.accum,
                                     process_index=self.process_index, process_count=self.process_count)
        if it is None:
            return None
        t0 = time.perf_counter()
        totals, used = sum_metrics(lambda local: self.eval_step(state, self.to_global(local, 1)), it,
                                   max_batches=tc.eval_batches)
        self.times.eval_seconds += time.perf_counter() - t0
        if not totals:
            return None
        result = {f"eval_{k}": v for k, v in self.task.eval_report(totals).items() if isinstance(v, float)}
        result["eval_batches_used"] = used
        return result

    def run(self, max_steps: int | None = None) -> dict:
        """Train until ``train.steps`` (or ``max_steps`` more steps in this call), resuming from the
        latest checkpoint in ``workdir``. Returns a summary dict."""
        run = RunState(self, max_steps)
        hooks = [ProfileHook(), ProgressHook(), LogHook(), EvalHook(), PreemptionHook(), CheckpointHook()]
        try:
            for h in hooks:
                h.start(run)
            while run.step < run.end:
                try:
                    local = next(run.train_iter)
                except StopIteration:
                    raise DataExhausted("training data ran out before train.steps; add sources") from None
                batch = self.to_global(local, self.accum)
                if self._train_step is None:  # compile outside the timed window
                    log = run.say if run.step == run.start else None
                    self._train_step = self.compile_train_step(_abstract(batch), log)
                if run.window_start is None:
                    run.window_start = time.perf_counter()
                for h in hooks:
                    h.before_step(run)
                run.state, metrics = self._train_step(run.state, batch)
                run.step += 1
                run.window_steps += 1
                for h in hooks:
                    h.after_step(run, metrics)
                if run.stop:
                    break
            if run.step == self.cfg.train.steps and run.step > run.start:
                run.record_eval()
        finally:
            for h in reversed(hooks):
                h.close(run)
            t0 = time.perf_counter()
            run.ckpt.close()
            self.times.checkpoint_seconds += time.perf_counter() - t0
            run.writer.close()
        self.state = run.state
        return run.summary()


class RunState:
    """What one ``Trainer.run`` call shares with its hooks: state, step, the metrics writer, the
    checkpointer, the timing window and the goodput counters."""

    def __init__(self, trainer: Trainer, max_steps: int | None):
        self.trainer = trainer
        self.run_start = time.perf_counter()
        cfg, tc = trainer.cfg, trainer.cfg.train
        self.main = trainer.process_index == 0
        # Before anything in the workdir is touched: a config the checkpoints cannot take is one line.
        changes = check_resume_config(trainer.workdir, cfg, allow_change=trainer.allow_config_change)
        self.ckpt = Checkpointer(trainer.workdir / "checkpoints", max_to_keep=cfg.checkpoint.max_to_keep,
                                 async_save=cfg.checkpoint.async_save)
        self.train_iter = trainer.task.data_iterator("train", global_batch_size=tc.batch_size,
                                                     process_index=trainer.process_index,
                                                     process_count=trainer.process_count)
        t0 = time.perf_counter()
        try:
            restored = self.ckpt.restore_latest(trainer.abstract_state, self.train_iter)
        except BaseException:
            self.ckpt.close()
            raise
        trainer.times.checkpoint_seconds += time.perf_counter() - t0
        self.previous = {"productive_seconds": 0.0, "wall_seconds": 0.0}
        if restored is not None:
            self.start, self.state, meta = restored
            self.previous.update(meta.get("goodput", {}))
            self.resumed_from = self.start
            if self.main:
                print(f"resuming from step {self.start} (checkpoint {self.ckpt.directory / str(self.start)})",
                      flush=True)
        else:
            self.state, self.start, self.resumed_from = trainer.init_state(), 0, None
        if self.main:
            trainer.workdir.mkdir(parents=True, exist_ok=True)
            write_run_config(trainer.workdir, cfg, changes, self.start)
        # metrics.jsonl keeps one curve: rows logged after this checkpoint (a run killed past it) go
        self.writer = MetricsWriter(trainer.workdir, enabled=self.main, resume_step=self.start)
        self.step = self.start
        self.end = tc.steps if max_steps is None else min(tc.steps, self.start + max_steps)
        self.num_params = trainer.handle.num_params()
        self.flops_per_example = trainer.task.flops_per_example()
        self.peak = peak_flops_per_device()
        self.window_start: float | None = None
        self.window_steps = 0
        self.productive = 0.0  # seconds spent in train steps (goodput numerator)
        self.last_metrics: dict = {}
        self.stop = False
        self.preempted = False
        self.pbar = None  # the progress hook's bar, when it shows one

    def say(self, line: str) -> None:
        """A status line from process 0 (above the progress bar when there is one)."""
        if not self.main:
            return
        if self.pbar is not None:
            self.pbar.write(line)
        else:
            print(line, flush=True)

    @property
    def is_last(self) -> bool:
        return self.step == self.end

    def reset_window(self) -> None:
        """Start a new timing window (after work that is not training: eval, checkpoints)."""
        self.window_start, self.window_steps = time.perf_counter(), 0

    def goodput_totals(self) -> dict:
        wall = time.perf_counter() - self.run_start
        return {"productive_seconds": self.previous["productive_seconds"] + self.productive,
                "wall_seconds": self.previous["wall_seconds"] + wall}

    def record_eval(self) -> None:
        ev = self.trainer.evaluate(self.state)
        if ev:
            self.writer.write(self.step, ev)
            self.last_metrics.update(ev)

    def summary(self) -> dict:
        t = self.trainer.times
        return {
            "start_step": self.start,
            "end_step": self.step,
            "resumed_from": self.resumed_from,
            "preempted": self.preempted,
            "num_params": self.num_params,
            "metrics": self.last_metrics,
            "history": self.writer.history,
            "compile_seconds": t.compile_seconds,
            "checkpoint_seconds": t.checkpoint_seconds,
            "eval_seconds": t.eval_seconds,
            "peak_flops_per_device": self.peak,
        }


class Hook:
    """One concern of the training loop; every method is optional."""

    def start(self, run: RunState) -> None:
        pass

    def before_step(self, run: RunState) -> None:
        pass

    def after_step(self, run: RunState, metrics: dict) -> None:
        pass

    def close(self, run: RunState) -> None:
        pass


class ProfileHook(Hook):
    """``train.profile_steps: [first, last]``: a JAX profiler trace of those steps (process 0)."""

    def start(self, run):
        self.steps = list(run.trainer.cfg.train.profile_steps)
        self.active = False

    def before_step(self, run):
        if self.steps and run.step == self.steps[0] and run.main:
            jax.profiler.start_trace(str(run.trainer.workdir / "profile"))
            self.active = True

    def after_step(self, run, metrics):
        if self.active and run.step > self.steps[-1]:
            jax.block_until_ready(metrics)
            jax.profiler.stop_trace()
            self.active = False

    def close(self, run):
        if self.active:
            jax.profiler.stop_trace()


class ProgressHook(Hook):
    """A tqdm bar (process 0, ``train.progress``)."""

    def start(self, run):
        self.pbar = None
        if run.trainer.cfg.train.progress and run.main:
            from tqdm.auto import tqdm

            self.pbar = tqdm(total=run.trainer.cfg.train.steps, initial=run.start,
                             desc=f"train {run.trainer.cfg.name}", unit="step", dynamic_ncols=True)
        run.pbar = self.pbar

    def after_step(self, run, metrics):
        if self.pbar is not None:
            self.pbar.update(1)

    def close(self, run):
        if self.pbar is not None:
            self.pbar.close()


class LogHook(Hook):
    """Every ``train.log_every`` steps (and the last): loss and the step's metrics, throughput,
    MFU, goodput -> metrics.jsonl, TensorBoard, the progress bar."""

    def after_step(self, run, metrics):
        tc, trainer = run.trainer.cfg.train, run.trainer
        if not (run.step % tc.log_every == 0 or run.is_last):
            return
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - run.window_start
        run.productive += elapsed
        examples_per_s = run.window_steps * tc.batch_size / elapsed
        unit, per_example = trainer.task.throughput()
        metrics[unit] = examples_per_s * per_example
        metrics["step_time"] = elapsed / run.window_steps
        achieved = examples_per_s * run.flops_per_example / jax.device_count()
        metrics[f"{unit}_per_device"] = metrics[unit] / jax.device_count()
        metrics["mfu"] = achieved / run.peak if run.peak else None
        totals = run.goodput_totals()
        metrics["goodput"] = run.productive / (time.perf_counter() - run.run_start)
        metrics["goodput_total"] = totals["productive_seconds"] / totals["wall_seconds"]
        metrics["compile_seconds"] = trainer.times.compile_seconds
        metrics["checkpoint_seconds"] = trainer.times.checkpoint_seconds
        run.writer.write(run.step, metrics)
        run.last_metrics = metrics
        if run.pbar is not None:
            run.pbar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['learning_rate']:.2e}",
                                 **{unit.replace("_per_second", "/s"): f"{metrics[unit]:.4g}"})
        run.reset_window()


class EvalHook(Hook):
    """Every ``train.eval_every`` steps (the final eval runs after the loop)."""

    def after_step(self, run, metrics):
        every = run.trainer.cfg.train.eval_every
        if every and run.step % every == 0 and not run.is_last:
            run.record_eval()
            run.reset_window()


class PreemptionHook(Hook):
    """SIGTERM (agreed across hosts): save at this step boundary and stop."""

    def start(self, run):
        self.watcher = PreemptionWatcher()

    def after_step(self, run, metrics):
        if self.watcher.should_stop(run.step) and not run.is_last:
            run.preempted = True

    def close(self, run):
        self.watcher.close()


class CheckpointHook(Hook):
    """Every ``checkpoint.every`` steps, at the last step, and on preemption (then stop)."""

    def after_step(self, run, metrics):
        trainer = run.trainer
        if run.step % trainer.cfg.checkpoint.every == 0 or run.is_last or run.preempted:
            t0 = time.perf_counter()
            run.ckpt.save(run.step, run.state, run.train_iter,
                          {"config": to_dict(trainer.cfg), "step": run.step, "goodput": run.goodput_totals()})
            trainer.times.checkpoint_seconds += time.perf_counter() - t0
            run.reset_window()
        if run.preempted:
            if run.pbar is not None:
                run.pbar.write(f"preemption notice: saved a checkpoint at step {run.step}; exiting")
            run.stop = True


def optimizer_state_shardings(abstract_opt, abstract_params, param_shardings, default):
    """Each optimizer-state leaf whose trailing dict-key path names a param of the same shape (Adam
    moments, also inside multi_transform groups) takes that param's sharding; the rest (counts,
    masked placeholders) get ``default``."""
    by_path = {}
    for path, (shape, sharding) in jax.tree_util.tree_flatten_with_path(
            jax.tree.map(lambda a, s: (a.shape, s), abstract_params, param_shardings),
            is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], NamedSharding))[0]:
        by_path[tuple(k.key for k in path)] = (shape, sharding)

    def pick(path, leaf):
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.append(k.key)
        match = by_path.get(tuple(reversed(keys)))
        return match[1] if match is not None and match[0] == leaf.shape else default

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _pure(state) -> dict:
    from flax import nnx

    return nnx.to_pure_dict(state)
