"""Ahead-of-time compile checks for TPU topologies, from any machine (libtpu compiles for abstract
TPU devices): per-chip memory, FLOPs, the sharding of the largest arrays, the collectives used.

Nothing is allocated: params, optimizer state and batches are ``ShapeDtypeStruct``s with the
shardings the rules table gives on the target mesh.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from moshax.config import Config, ConfigError
from moshax.parallel.tpu_facts import hbm_bytes_per_device

GiB = 1024**3

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


class DoesNotFit(ConfigError):
    """The step compiled (or failed to) with more memory per chip than the chip has."""


def _quiet_libtpu_env() -> None:
    """libtpu probes GCE metadata on start; these stop it on a machine that is not a TPU VM."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: several checks may run at once


def hbm_per_chip(topology: str) -> int | None:
    """HBM of one device of the topology (``parallel/tpu_facts.py``), None when unknown."""
    return hbm_bytes_per_device(topology)


def topology_devices(topology: str):
    _quiet_libtpu_env()
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # noqa: BLE001 - libtpu missing or unknown topology name
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        import importlib.util

        if importlib.util.find_spec("libtpu") is None:
            raise ConfigError(f"cannot compile for TPU here: libtpu is not installed (pip install -e '.[tpu]'): {msg}") from None
        if "lockfile" in msg:
            raise ConfigError(f"cannot compile for TPU here: {msg}") from None
        raise ConfigError(f"topology {topology!r}: {msg} (names look like v5p:2x2x2, v5e:4x4, v6e:2x2)") from None
    return list(topo.devices)


@dataclass
class CompileReport:
    name: str
    topology: str
    num_devices: int
    mesh: dict
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    hbm_bytes: int | None
    flops: float | None
    compile_seconds: float
    collectives: dict
    largest: list = field(default_factory=list)
    model_flops: float | None = None  # analytic training FLOPs per chip per step (6N + 12LdT)
    roofline: object | None = None  # moshax.parallel.roofline.Roofline (TPU topologies)

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def fits(self) -> bool:
        return self.hbm_bytes is None or self.total_bytes <= self.hbm_bytes

    def format(self) -> str:
        hbm = f"{self.hbm_bytes / GiB:.1f} GiB" if self.hbm_bytes else "unknown"
        lines = [
            f"== {self.name} on {self.topology} ({self.num_devices} chips), mesh "
            + " ".join(f"{k}={v}" for k, v in self.mesh.items()),
            f"compiled in {self.compile_seconds:.1f}s",
            "per-chip memory:",
            f"  arguments   {_size(self.argument_bytes)}",
            f"  outputs     {_size(self.output_bytes)} (aliased with arguments: {_size(self.alias_bytes).strip()})",
            f"  temporaries {_size(self.temp_bytes)}",
            f"  total       {_size(self.total_bytes)} of {hbm} HBM -> {'fits' if self.fits else 'DOES NOT FIT'}",
        ]
        if self.flops is not None:
            lines.append(f"FLOPs per step per chip (XLA cost analysis; a scanned layer counts once): {self.flops:.3e}")
        if self.model_flops is not None:
            lines.append(f"model FLOPs per step per chip (6N + 12LdT): {self.model_flops:.3e}")
        lines.append("collectives: " + (", ".join(f"{k} x{v}" for k, v in self.collectives.items() if v) or "none"))
        if self.roofline is not None:
            lines.extend(self.roofline.format())
        if self.largest:
            lines.append("largest arrays (global shape, sharding, bytes per chip):")
            for path, shape, spec, per_chip in self.largest:
                lines.append(f"  {path:<48} {str(shape):<22} {spec:<36} {per_chip / 2**20:10.1f} MiB")
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / GiB:9.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:9.2f} MiB"


def count_collectives(hlo_text: str) -> dict:
    counts = {}
    for op in COLLECTIVES:
        counts[op] = len(re.findall(rf"\b{op}(?:-start)?\(", hlo_text))
    return counts


def _largest_arrays(tree, limit: int = 8) -> list:
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(leaf, "sharding") or leaf.sharding is None:
            continue
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        per_chip = int(np.prod(shard_shape)) * jnp.dtype(leaf.dtype).itemsize
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        rows.append((name, tuple(leaf.shape), str(leaf.sharding.spec), per_chip))
    rows.sort(key=lambda r: -r[3])
    return rows[:limit]


def _memory(compiled) -> tuple[int, int, int, int]:
    m = compiled.memory_analysis()
    if m is None:
        return 0, 0, 0, 0
    return (int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
            int(m.alias_size_in_bytes))


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _phases(log):
    """``log(line)`` with the seconds since the first call prefixed (None: silent)."""
    t0 = time.perf_counter()
    return (lambda line: log(f"[{time.perf_counter() - t0:6.1f} s] {line}")) if log else None


def compile_train_step(cfg: Config, task, topology: str, log=None) -> CompileReport:
    """Compile ``task``'s real train step for ``topology`` and report on it; ``log`` (e.g.
    ``print``) hears of each phase: abstract state, lowering, compiling."""
    from moshax.parallel.mesh import build_mesh
    from moshax.training.trainer import Trainer

    say = _phases(log)
    devices = topology_devices(topology)
    mesh = build_mesh(cfg.mesh, devices)
    if say:
        say(f"building the abstract train state on {topology} (mesh {dict(mesh.shape)})")
    trainer = Trainer(cfg, task, mesh=mesh, workdir="/nonexistent")
    if say:
        say(f"{trainer.handle.num_params() / 1e9:.2f}B params; lowering the train step")
    t0 = time.perf_counter()
    try:
        compiled = trainer.compile_train_step(trainer.abstract_batch(), say)
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        if "RESOURCE_EXHAUSTED" in msg or "exceeds available" in msg.lower():
            line = next((x for x in msg.splitlines() if "RESOURCE_EXHAUSTED" in x or "exceeds" in x), msg.splitlines()[0])
            raise DoesNotFit(f"{cfg.name} train step does not fit on {topology} with mesh "
                             f"{dict(mesh.shape)}: {line.strip()[:300]}") from None
        raise
    args, out, temp, alias = _memory(compiled)
    seconds = time.perf_counter() - t0
    from moshax.parallel.roofline import roofline
    from moshax.parallel.tpu_facts import tpu_family

    model_flops = task.flops_per_example() * cfg.train.batch_size / len(devices)
    tokens = tokens_per_example(cfg)
    return CompileReport(
        name=f"{cfg.name} train step", topology=topology, num_devices=len(devices), mesh=dict(mesh.shape),
        argument_bytes=args, output_bytes=out, temp_bytes=temp, alias_bytes=alias, hbm_bytes=hbm_per_chip(topology),
        flops=_flops(compiled), compile_seconds=seconds,
        collectives=count_collectives(compiled.as_text()), largest=_largest_arrays(trainer.abstract_state),
        model_flops=model_flops,
        roofline=roofline(compiled, tpu_family(topology), len(devices), model_flops,
                          tokens * cfg.train.batch_size / len(devices) if tokens else None))


def tokens_per_example(cfg: Config) -> int | None:
    """Time steps one example trains on: text tokens (Helium), 12.5 Hz frames (Moshi, Mimi)."""
    data = cfg.data
    if getattr(data, "seq_len", None):
        return int(data.seq_len)
    if getattr(data, "frames", None):
        return int(data.frames)
    if getattr(data, "crop_seconds", None):
        return int(round(data.crop_seconds * getattr(cfg.model, "frame_rate", 12.5)))
    return None


def compile_decode_step(cfg: Config, topology: str, batch: int = 1, log=None) -> CompileReport:
    """Compile the model kind's streaming step (:mod:`moshax.registry`, ``decode_step``) for
    ``topology``; a kind without one is a one-line error."""
    from moshax import registry

    kind = registry.get(cfg.model.kind)
    if kind.decode_step is None:
        raise ConfigError(f"model.kind={cfg.model.kind!r} has no streaming decode step to compile yet")
    say = _phases(log)
    if say:
        say(f"lowering and compiling the {cfg.model.kind} decode step (batch {batch}) on {topology}")
    return kind.load("decode_step")(cfg, topology, batch)


def helium_decode_step(cfg: Config, topology: str, batch: int = 1) -> CompileReport:
    """Compile one Helium decode step (one new token per sequence against a full KV ring cache)
    for ``topology``; params are held in the compute dtype, as a server would."""
    from flax import nnx

    from moshax.layers.attention import KVCache
    from moshax.parallel.mesh import build_mesh
    from moshax.parallel.partition import ModelHandle
    from moshax.parallel.sharding import named_sharding

    devices = topology_devices(topology)
    mesh = build_mesh(cfg.mesh, devices)
    from moshax import registry

    handle = ModelHandle.from_constructor(lambda rngs: registry.build_model(cfg.model, rngs))
    model_abs = nnx.eval_shape(lambda: registry.build_model(cfg.model, nnx.Rngs(0)))
    dtype = jnp.dtype(cfg.model.dtype)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh), handle.shapes(),
                          handle.shardings(mesh))
    cache_shape = jax.eval_shape(lambda: model_abs.init_state(batch))
    cache_axes = KVCache(("layers", "act_batch", None, "act_heads", None), ("layers", "act_batch", None, "act_heads", None),
                         ("layers", "act_batch", None))
    cache = jax.tree.map(lambda s, a: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=named_sharding(mesh, a, s.shape)),
                         cache_shape, cache_axes, is_leaf=lambda x: isinstance(x, tuple) and not isinstance(x, KVCache))
    token_sharding = named_sharding(mesh, ("act_batch", None), (batch, 1))
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=token_sharding)

    def step(params, tokens, positions, cache):
        model = handle.merge(params)
        logits, cache = model(tokens, positions, cache)
        return logits[:, -1], cache

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=(3,)).lower(params, tokens, tokens, cache).compile()
    args, out, temp, alias = _memory(compiled)
    return CompileReport(
        name=f"{cfg.name} decode step (batch {batch})", topology=topology, num_devices=len(devices),
        mesh=dict(mesh.shape), argument_bytes=args, output_bytes=out, temp_bytes=temp, alias_bytes=alias,
        hbm_bytes=hbm_per_chip(topology), flops=_flops(compiled), compile_seconds=time.perf_counter() - t0,
        collectives=count_collectives(compiled.as_text()), largest=_largest_arrays({"params": params, "cache": cache}))


def _abstract_state(mesh, state_shape, batch: int):
    """ShapeDtypeStructs for a streaming state: KV caches sharded as Helium's (batch, heads),
    every other leaf split over the batch when it leads with it, else replicated."""
    from moshax.layers.attention import KVCache
    from moshax.parallel.sharding import named_sharding

    def leaf(s, axes):
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=named_sharding(mesh, axes, s.shape))

    def one(x):
        if isinstance(x, KVCache):
            lead = ("layers",) if x.k.ndim == 5 else ()
            kv = lead + ("act_batch", None, "act_heads", None)
            return KVCache(leaf(x.k, kv), leaf(x.v, kv), leaf(x.pos, lead + ("act_batch", None)))
        batch_major = x.ndim >= 1 and x.shape[0] == batch
        return leaf(x, (("act_batch",) if batch_major else (None,)) + (None,) * (x.ndim - 1) if x.ndim else ())

    return jax.tree.map(one, state_shape, is_leaf=lambda x: isinstance(x, KVCache))


def _compile_stream_step(cfg: Config, topology: str, batch: int, name: str, make_inputs, step_fn,
                         donate=(2,)) -> CompileReport:
    """Shared by the Moshi and Mimi decode steps: params (compute dtype) + rest sharded by the
    rules table, ``make_inputs(model_abs, mesh) -> (state, inputs...)``, ``step_fn(model, ...)``."""
    from flax import nnx

    from moshax import registry
    from moshax.parallel.mesh import build_mesh
    from moshax.parallel.partition import ModelHandle, replicated

    devices = topology_devices(topology)
    mesh = build_mesh(cfg.mesh, devices)
    build = lambda rngs: registry.build_model(cfg.model, rngs)  # noqa: E731 - the model alone (no discriminator)
    handle = ModelHandle.from_constructor(build)
    model_abs = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    dtype = jnp.dtype(cfg.model.dtype)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh), handle.shapes(),
                          handle.shardings(mesh))
    rest = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated(mesh)),
                        nnx.to_pure_dict(handle.abstract_rest))
    args = make_inputs(model_abs, mesh)

    def step(params, rest, *a):
        return step_fn(handle.merge(params, rest), *a)

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=donate).lower(params, rest, *args).compile()
    a_bytes, out, temp, alias = _memory(compiled)
    return CompileReport(
        name=f"{cfg.name} {name} (batch {batch})", topology=topology, num_devices=len(devices),
        mesh=dict(mesh.shape), argument_bytes=a_bytes, output_bytes=out, temp_bytes=temp, alias_bytes=alias,
        hbm_bytes=hbm_per_chip(topology), flops=_flops(compiled), compile_seconds=time.perf_counter() - t0,
        collectives=count_collectives(compiled.as_text()),
        largest=_largest_arrays({"params": params, "state": args[0]}))


def moshi_decode_step(cfg: Config, topology: str, batch: int = 1) -> CompileReport:
    """Compile one streaming Moshi frame (:func:`moshax.inference.moshi_stream.step`: temporal
    step against the full KV ring of ``context`` steps, text sampling, the ``dep_q`` depth steps
    with top-k sampling) for ``topology``, the state donated."""
    from moshax.inference.moshi_stream import init_state, step
    from moshax.inference.sampling import Sampling
    from moshax.parallel.sharding import named_sharding

    n_user = cfg.model.num_streams - 1 - cfg.model.dep_q

    def inputs(model_abs, mesh):
        state = _abstract_state(mesh, jax.eval_shape(lambda: init_state(model_abs, batch)), batch)
        codes = jax.ShapeDtypeStruct((batch, n_user, 1), jnp.int32,
                                     sharding=named_sharding(mesh, ("act_batch", None, None), (batch, n_user, 1)))
        return state, codes

    return _compile_stream_step(cfg, topology, batch, "decode step (LM frame: temporal + depth + sampling)", inputs,
                                lambda m, s, c: step(m, s, c, Sampling()))


def mimi_decode_step(cfg: Config, topology: str, batch: int = 1) -> CompileReport:
    """Compile one streaming Mimi frame: encode 80 ms of audio to codes and decode codes back to
    80 ms (the codec's share of a full-duplex step), the state donated."""
    from moshax.parallel.sharding import named_sharding

    fs = cfg.model.frame_size
    k = cfg.model.quantizer.num_codebooks

    def inputs(model_abs, mesh):
        state = _abstract_state(mesh, jax.eval_shape(lambda: model_abs.init_state(batch)), batch)
        pcm = jax.ShapeDtypeStruct((batch, 1, fs), jnp.float32, sharding=named_sharding(mesh, ("act_batch", None, None),
                                                                                         (batch, 1, fs)))
        codes = jax.ShapeDtypeStruct((batch, k, 1), jnp.int32, sharding=named_sharding(mesh, ("act_batch", None, None),
                                                                                        (batch, k, 1)))
        return state, pcm, codes

    def run(m, state, pcm, codes):
        enc, state = m.encode_step(pcm, state, k)
        audio, state = m.decode_step(codes, state)
        return enc, audio, state

    return _compile_stream_step(cfg, topology, batch, "decode step (codec frame: encode + decode)", inputs, run)


# ----------------------------------------------------------------------------- layout sweep


@dataclass
class SweepRow:
    label: str
    report: CompileReport | None
    error: str = ""

    @property
    def step_s(self) -> float:
        r = self.report.roofline if self.report is not None else None
        return r.step_s if r is not None else float("inf")


def _with_layout(cfg: Config, tensor: int, fsdp: int, remat: str, accum: int) -> Config:
    import dataclasses

    model = cfg.model
    for name in ("transformer", "depformer"):
        sub = getattr(model, name, None)
        if sub is not None and hasattr(sub, "remat"):
            model = dataclasses.replace(model, **{name: dataclasses.replace(sub, remat=remat)})
    return dataclasses.replace(cfg, model=model, mesh=dataclasses.replace(cfg.mesh, data=1, fsdp=fsdp, tensor=tensor),
                               train=dataclasses.replace(cfg.train, grad_accum_steps=accum))


def sweep_layouts(cfg: Config, make_task, topology: str, *, tensors=(1, 2, 4, 8), remats=("full", "dots"),
                  accums=(1, 2), log=None) -> list[SweepRow]:
    """Compile the train step for each (fsdp x tensor, remat policy, micro-batches) that divides the
    slice; rows ranked by predicted step time (layouts that do not fit or do not divide last, with
    the reason)."""
    n = len(topology_devices(topology))
    rows = []
    for tensor in tensors:
        if tensor > n or n % tensor:
            continue
        for remat in dict.fromkeys(remats):
            for accum in accums:
                label = f"fsdp={n // tensor} tensor={tensor} remat={remat} micro-batches={accum}"
                if cfg.train.batch_size % accum:
                    rows.append(SweepRow(label, None, f"batch {cfg.train.batch_size} not divisible by {accum}"))
                    continue
                if log:
                    log(f"sweep: {label}")
                try:
                    variant = _with_layout(cfg, tensor, n // tensor, remat, accum)
                    variant.validate() if hasattr(variant, "validate") else None
                    report = compile_train_step(variant, make_task(variant), topology)
                    rows.append(SweepRow(label, report, "" if report.fits else "does not fit"))
                except (ConfigError, ValueError) as e:
                    rows.append(SweepRow(label, None, str(e).splitlines()[0][:160]))
    rows.sort(key=lambda r: (bool(r.error), r.step_s))
    return rows


def format_sweep(rows: list[SweepRow], topology: str) -> str:
    out = [f"layouts on {topology}, ranked by predicted step time (roofline; fits only first):",
           f"{'layout':<52} {'step ms':>9} {'bound':>8} {'compute/HBM/ICI ms':>22} {'tokens/s/chip':>14} "
           f"{'MFU bound':>9} {'GiB/chip':>9}"]
    for r in rows:
        if r.report is not None and r.report.roofline is not None and not r.error:
            rf = r.report.roofline
            tps = rf.tokens_per_step_per_chip / rf.step_s if rf.tokens_per_step_per_chip else float("nan")
            mfu = f"{rf.mfu_bound:.1%}" if rf.mfu_bound is not None else "-"
            parts = "/".join(f"{t * 1e3:.0f}" if t >= 0.1 else f"{t * 1e3:.2f}"
                             for t in (rf.compute_s, rf.memory_s, rf.comm_s))
            out.append(f"{r.label:<52} {rf.step_s * 1e3:9.2f} {rf.bound:>8} {parts:>22} {tps:14,.0f} {mfu:>9} "
                       f"{r.report.total_bytes / GiB:9.2f}")
        else:
            mem = f" ({r.report.total_bytes / GiB:.1f} GiB/chip)" if r.report is not None else ""
            out.append(f"{r.label:<52} {'-':>9} skipped: {r.error}{mem}")
    return "\n".join(out)
