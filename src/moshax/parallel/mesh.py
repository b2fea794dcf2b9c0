"""Build the (data, fsdp, tensor) device mesh from config, with clear errors."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from moshax.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Fill a -1 axis with the remaining devices and check the product equals ``num_devices``."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}: the fixed axes ({fixed}) "
                f"do not divide the {num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices, "
            f"but {num_devices} are available (use -1 on one axis to take the rest)"
        )
    return tuple(sizes)


def build_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A mesh over ``devices`` (default: all) with axes data, fsdp, tensor (tensor innermost, so
    tensor-parallel groups sit on neighbouring devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(cfg, len(devices))
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU / abstract devices: plain ordering
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_axis_size(mesh: Mesh) -> int:
    """Number of ways the batch is split (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(mesh: Mesh, global_batch: int, grad_accum_steps: int = 1) -> None:
    ways = batch_axis_size(mesh)
    micro = global_batch // grad_accum_steps
    if micro % ways:
        raise ConfigError(
            f"train.batch_size={global_batch} (micro-batch {micro} with grad_accum_steps={grad_accum_steps}) "
            f"is not divisible by the data x fsdp mesh axes ({mesh.shape['data']} x {mesh.shape['fsdp']} = {ways})"
        )
