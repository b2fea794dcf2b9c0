"""One table of accelerator facts: every TPU family's names, per-chip HBM, peak bf16 FLOP/s, HBM and
ICI bandwidth, host shape, GKE label and TPU VM runtime image; and the GPU peaks MFU uses.

Everything that needs one of these reads it from here: `moshax compile` (HBM per chip,
``training/aot.py``), MFU (peak FLOP/s, ``training/metrics.py``), the slice shapes and launchers
(``launch/``). Pure data, no jax import, so the launchers stay light.

Figures per chip from Google Cloud's TPU pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e; v3 from
the v3 page); ICI is the bidirectional inter-chip bandwidth per chip where the page gives it (the v3
and v4 pages do not: None). Runtime images from Cloud's "TPU software versions" page (JAX).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
GB = 1000**3


@dataclass(frozen=True)
class TpuFamily:
    name: str  # the family, as this project writes it: v5p, v5e, v6e, v4, v3
    gcloud_prefix: str  # accelerator-type prefix for gcloud / GKE / xpk: v5p-64, v5litepod-16, v6e-32
    device_kind: str  # jax `Device.device_kind` prefix: "TPU v5 lite"
    compile_prefix: str  # `moshax compile --topology` prefix (jax topology names): v5e:4x4
    hbm_bytes: int  # HBM per chip
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    ici_bandwidth: float | None  # bidirectional inter-chip interconnect bytes/s per chip
    chips_per_host: int  # chips per host in multi-host slices
    single_host_chips: int  # slices up to this many chips run on one host (v5e/v6e: 8-chip VMs)
    counts_cores: bool  # accelerator-type numbers count TensorCores (two per chip), not chips
    torus_dims: int  # 2 (2D torus: topology AxB) or 3 (AxBxC)
    gke_accelerator: str | None  # node label cloud.google.com/gke-tpu-accelerator (None: no GKE TPUs)
    runtime_version: str  # `gcloud compute tpus tpu-vm create --version=...` for JAX
    devices_per_chip: int = 1  # JAX devices per chip (v3: one per TensorCore; v4+: one per chip)
    aliases: tuple[str, ...] = ()  # other spellings seen (device kinds, shorthands)

    @property
    def hbm_bytes_per_device(self) -> int:
        return self.hbm_bytes // self.devices_per_chip

    @property
    def peak_flops_per_device(self) -> float:
        return self.peak_bf16_flops / self.devices_per_chip

    def names(self) -> tuple[str, ...]:
        return (self.name, self.gcloud_prefix, self.device_kind, self.compile_prefix, *self.aliases)


TPU_FAMILIES: dict[str, TpuFamily] = {f.name: f for f in (
    TpuFamily("v6e", gcloud_prefix="v6e", device_kind="TPU v6 lite", compile_prefix="v6e",
              hbm_bytes=32 * GiB, peak_bf16_flops=918e12, hbm_bandwidth=1638 * GB, ici_bandwidth=800 * GB,
              chips_per_host=4, single_host_chips=8, counts_cores=False, torus_dims=2,
              gke_accelerator="tpu-v6e-slice", runtime_version="v2-alpha-tpuv6e",
              aliases=("TPU v6e", "TPU v6", "v6")),
    TpuFamily("v5p", gcloud_prefix="v5p", device_kind="TPU v5p", compile_prefix="v5p",
              hbm_bytes=95 * GiB, peak_bf16_flops=459e12, hbm_bandwidth=2765 * GB, ici_bandwidth=1200 * GB,
              chips_per_host=4, single_host_chips=4, counts_cores=True, torus_dims=3,
              gke_accelerator="tpu-v5p-slice", runtime_version="v2-alpha-tpuv5",
              aliases=("TPU v5", "v5")),
    TpuFamily("v5e", gcloud_prefix="v5litepod", device_kind="TPU v5 lite", compile_prefix="v5e",
              hbm_bytes=16 * GiB, peak_bf16_flops=197e12, hbm_bandwidth=819 * GB, ici_bandwidth=400 * GB,
              chips_per_host=4, single_host_chips=8, counts_cores=False, torus_dims=2,
              gke_accelerator="tpu-v5-lite-podslice", runtime_version="v2-alpha-tpuv5-lite",
              aliases=("TPU v5e", "v5 lite")),
    TpuFamily("v4", gcloud_prefix="v4", device_kind="TPU v4", compile_prefix="v4",
              hbm_bytes=32 * GiB, peak_bf16_flops=275e12, hbm_bandwidth=1200 * GB, ici_bandwidth=None,
              chips_per_host=4, single_host_chips=4, counts_cores=True, torus_dims=3,
              gke_accelerator="tpu-v4-podslice", runtime_version="tpu-ubuntu2204-base"),
    TpuFamily("v3", gcloud_prefix="v3", device_kind="TPU v3", compile_prefix="v3",
              hbm_bytes=32 * GiB, peak_bf16_flops=123e12, hbm_bandwidth=900 * GB, ici_bandwidth=None,
              chips_per_host=4, single_host_chips=4, counts_cores=True, torus_dims=2,
              gke_accelerator=None, runtime_version="tpu-ubuntu2204-base", devices_per_chip=2),
)}

# Dense bf16 peak FLOP/s per GPU, by `device_kind` prefix (vendor data sheets, without sparsity).
GPU_PEAK_FLOPS: dict[str, float] = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}

# Slice topologies by chip count (the shapes gcloud / GKE create for an accelerator type).
TOPOLOGY_BY_CHIPS: dict[int, dict[int, str]] = {
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
        512: "8x8x8", 1024: "8x8x16"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}


def _by_prefix() -> list[tuple[str, TpuFamily]]:
    pairs = [(n.lower(), f) for f in TPU_FAMILIES.values() for n in f.names()]
    return sorted(pairs, key=lambda p: -len(p[0]))  # longest first: "tpu v5 lite" before "tpu v5"


_PREFIXES = _by_prefix()


def tpu_family(name: str) -> TpuFamily | None:
    """The family of any of its names: a device kind ("TPU v5 lite"), a compile topology ("v5p:4x4x4"),
    an accelerator type ("v5litepod-16") or a family ("v6e"). None for anything else (CPUs, GPUs)."""
    key = name.lower()
    for prefix, family in _PREFIXES:
        if key.startswith(prefix):
            return family
    return None


def tpu_family_by_gcloud_prefix(prefix: str) -> TpuFamily | None:
    """Exact accelerator-type prefix (``v5litepod`` of ``v5litepod-16``)."""
    return next((f for f in TPU_FAMILIES.values() if f.gcloud_prefix == prefix), None)


def hbm_bytes_per_device(name: str) -> int | None:
    family = tpu_family(name)
    return family.hbm_bytes_per_device if family else None


def peak_flops_per_device(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of one JAX device of this kind (a TPU v3 device is one TensorCore: half a
    chip), or None where no honest figure exists (CPUs, unknown accelerators)."""
    family = tpu_family(device_kind)
    if family is not None:
        return family.peak_flops_per_device
    return next((flops for prefix, flops in GPU_PEAK_FLOPS.items() if device_kind.startswith(prefix)), None)
