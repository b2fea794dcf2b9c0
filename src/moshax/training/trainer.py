"""The generic trainer: sharded state, a jitted train step (pjit), eval, logging, Orbax resume.

A *task* supplies the model constructor, the loss (as sums, so gradient accumulation and data
sharding are exact), the batch's logical axes and a checkpointable data iterator. Everything
else — mesh, shardings, optimizer, accumulation, metrics, checkpoints — lives here, once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipeline.errors import DataError
from moshax.config import Config, ConfigError, dump_yaml, to_dict
from moshax.parallel.mesh import build_mesh, check_batch
from moshax.parallel.partition import ModelHandle, replicated
from moshax.parallel.sharding import logical_to_spec
from moshax.training.checkpointing import Checkpointer, abstract_like
from moshax.training.metrics import MetricsWriter, peak_flops_per_device
from moshax.training.optimizer import make_optimizer
from moshax.training.preemption import PreemptionWatcher


class DataExhausted(DataError):
    """The training iterator ended before ``train.steps`` (a finite source); a user-fixable error."""


@dataclass
class StepTimes:
    compile_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    eval_seconds: float = 0.0


class Trainer:
    """Builds everything for ``cfg`` + ``task`` on ``mesh`` (default: from ``cfg.mesh``)."""

    def __init__(self, cfg: Config, task: Any, mesh: Mesh | None = None, workdir: str | Path | None = None):
        self.cfg = cfg
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
        if hasattr(self.task, "init_params"):  # e.g. warm start from another model's checkpoint
            params, rest = self.task.init_params(params, rest, self)
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
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": self.schedule(state["step"]),
        }
        for name, (s, w) in aux.items():
            metrics[name] = s / jnp.maximum(w, 1e-9)
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rest": rest, "rng": rng}
        return new_state, metrics

    def _eval_step_fn(self, state: dict, batch: dict):
        """Loss of one eval batch: ``task.eval_loss(model, batch)`` when the task has one (no
        augmentations, no dropout), else ``task.loss`` with a fixed key."""
        model = self.handle.merge(state["params"], state["rest"])
        micro = jax.tree.map(lambda x: x[0], batch)
        eval_loss = getattr(self.task, "eval_loss", None)
        if eval_loss is not None:
            loss_sum, weight, aux = eval_loss(model, micro)
        else:
            loss_sum, weight, aux = self.task.loss(model, micro, jax.random.PRNGKey(0))
        return {"loss": (loss_sum, weight), **aux}

    def compile_train_step(self, abstract_batch: dict) -> Callable:
        """Lower + compile the train step ahead of time (timed), keyed to this batch shape."""
        rep = replicated(self.mesh)
        jitted = jax.jit(self._train_step_fn, in_shardings=(self.state_shardings, None),
                         out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh):
            compiled = jitted.lower(self.abstract_state, abstract_batch).compile()
        self.times.compile_seconds += time.perf_counter() - t0
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
        tc = self.cfg.train
        it = self.task.data_iterator("eval", global_batch_size=tc.batch_size // self.accum,
                                     process_index=self.process_index, process_count=self.process_count)
        if it is None:
            return None
        t0 = time.perf_counter()
        totals: dict[str, list[float]] = {}
        for _ in range(tc.eval_batches):
            try:
                local = next(it)
            except StopIteration:
                break
            out = jax.device_get(self.eval_step(state, self.to_global(local, 1)))
            for name, (s, w) in out.items():
                acc = totals.setdefault(name, [0.0, 0.0])
                acc[0] += float(s)
                acc[1] += float(w)
        self.times.eval_seconds += time.perf_counter() - t0
        if not totals:
            return None
        result = {f"eval_{k}": s / max(w, 1e-9) for k, (s, w) in totals.items()}
        result["eval_perplexity"] = float(np.exp(min(result["eval_loss"], 50.0)))
        return result

    def run(self, max_steps: int | None = None) -> dict:
        """Train until ``train.steps`` (or ``max_steps`` more steps in this call), resuming from the
        latest checkpoint in ``workdir``. Returns a summary dict."""
        run_start = time.perf_counter()
        cfg, tc = self.cfg, self.cfg.train
        main = self.process_index == 0
        if main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "config.yaml").write_text(dump_yaml(cfg))
        writer = MetricsWriter(self.workdir, enabled=main)
        ckpt = Checkpointer(self.workdir / "checkpoints", max_to_keep=cfg.checkpoint.max_to_keep,
                            async_save=cfg.checkpoint.async_save)
        train_iter = self.task.data_iterator("train", global_batch_size=tc.batch_size,
                                             process_index=self.process_index, process_count=self.process_count)
        t0 = time.perf_counter()
        restored = ckpt.restore_latest(self.abstract_state, train_iter)
        self.times.checkpoint_seconds += time.perf_counter() - t0
        previous = {"productive_seconds": 0.0, "wall_seconds": 0.0}
        if restored is not None:
            start, state, meta = restored
            previous.update(meta.get("goodput", {}))
            resumed_from = start
        else:
            state, start, resumed_from = self.init_state(), 0, None
        end = tc.steps if max_steps is None else min(tc.steps, start + max_steps)

        peak = peak_flops_per_device()
        n_params = self.handle.num_params()
        flops_per_example = self.task.flops_per_example(n_params, self.task.embedding_params())
        pbar = None
        if tc.progress and main:
            from tqdm.auto import tqdm

            pbar = tqdm(total=tc.steps, initial=start, desc=f"train {cfg.name}", unit="step", dynamic_ncols=True)
        last_metrics: dict = {}
        window_start, window_steps = None, 0
        productive = 0.0  # seconds spent in train steps (goodput numerator)
        profile = list(tc.profile_steps)
        profiling = False
        step = start
        preempted = False
        watcher = PreemptionWatcher()
        try:
            while step < end:
                try:
                    local = next(train_iter)
                except StopIteration:
                    raise DataExhausted("training data ran out before train.steps; add sources") from None
                batch = self.to_global(local, self.accum)
                if self._train_step is None:  # compile outside the timed window
                    self._train_step = self.compile_train_step(_abstract(batch))
                if window_start is None:
                    window_start = time.perf_counter()
                if profile and step == profile[0] and main:
                    jax.profiler.start_trace(str(self.workdir / "profile"))
                    profiling = True
                state, metrics = self._train_step(state, batch)
                step += 1
                window_steps += 1
                if pbar is not None:
                    pbar.update(1)
                is_last = step == end
                if profiling and step > profile[-1]:
                    jax.block_until_ready(metrics)
                    jax.profiler.stop_trace()
                    profiling = False
                if step % tc.log_every == 0 or is_last:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - window_start
                    productive += elapsed
                    examples_per_s = window_steps * tc.batch_size / elapsed
                    metrics["tokens_per_second"] = examples_per_s * self.task.tokens_per_example()
                    metrics["step_time"] = elapsed / window_steps
                    achieved = examples_per_s * flops_per_example / jax.device_count()
                    metrics["tokens_per_second_per_device"] = metrics["tokens_per_second"] / jax.device_count()
                    metrics["mfu"] = achieved / peak if peak else None
                    wall = time.perf_counter() - run_start
                    metrics["goodput"] = productive / wall
                    metrics["goodput_total"] = ((previous["productive_seconds"] + productive)
                                                / (previous["wall_seconds"] + wall))
                    metrics["compile_seconds"] = self.times.compile_seconds
                    metrics["checkpoint_seconds"] = self.times.checkpoint_seconds
                    writer.write(step, metrics)
                    last_metrics = metrics
                    if pbar is not None:
                        pbar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['learning_rate']:.2e}",
                                         tok_s=f"{metrics['tokens_per_second']:.0f}")
                    window_start, window_steps = time.perf_counter(), 0
                if tc.eval_every and step % tc.eval_every == 0 and not is_last:
                    ev = self.evaluate(state)
                    if ev:
                        writer.write(step, ev)
                        last_metrics.update(ev)
                    window_start, window_steps = time.perf_counter(), 0
                if watcher.should_stop(step) and not is_last:
                    preempted = True
                if step % cfg.checkpoint.every == 0 or is_last or preempted:
                    t0 = time.perf_counter()
                    wall = time.perf_counter() - run_start
                    goodput = {"productive_seconds": previous["productive_seconds"] + productive,
                               "wall_seconds": previous["wall_seconds"] + wall}
                    ckpt.save(step, state, train_iter, {"config": to_dict(cfg), "step": step, "goodput": goodput})
                    self.times.checkpoint_seconds += time.perf_counter() - t0
                    window_start, window_steps = time.perf_counter(), 0
                if preempted:
                    if pbar is not None:
                        pbar.write(f"preemption notice: saved a checkpoint at step {step}; exiting")
                    break
            if step == tc.steps and step > start:
                ev = self.evaluate(state)
                if ev:
                    writer.write(step, ev)
                    last_metrics.update(ev)
        finally:
            if profiling:
                jax.profiler.stop_trace()
            watcher.close()
            if pbar is not None:
                pbar.close()
            t0 = time.perf_counter()
            ckpt.close()
            self.times.checkpoint_seconds += time.perf_counter() - t0
            writer.close()
        self.state = state
        return {
            "start_step": start,
            "end_step": step,
            "resumed_from": resumed_from,
            "preempted": preempted,
            "num_params": n_params,
            "metrics": last_metrics,
            "history": writer.history,
            "compile_seconds": self.times.compile_seconds,
            "checkpoint_seconds": self.times.checkpoint_seconds,
            "eval_seconds": self.times.eval_seconds,
            "peak_flops_per_device": peak,
        }


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
