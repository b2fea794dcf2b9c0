"""TPU slice shapes: accelerator type -> chips, hosts, topology, and GKE node labels."""

from __future__ import annotations

from dataclasses import dataclass

from moshax.config import ConfigError


@dataclass(frozen=True)
class Slice:
    accelerator_type: str  # gcloud name, e.g. v5p-64
    chips: int
    hosts: int
    topology: str  # e.g. 4x4x2
    gke_accelerator: str  # node label cloud.google.com/gke-tpu-accelerator
    chips_per_host: int

    @property
    def compile_topology(self) -> str:
        """The name `moshax compile --topology` takes."""
        family = self.accelerator_type.split("-")[0].replace("litepod", "e")
        return f"{family}:{self.topology}"


# (family, counts cores?, chips per host, gke label, topology by chip count)
_FAMILIES = {
    "v4": (True, 4, "tpu-v4-podslice"),
    "v5p": (True, 4, "tpu-v5p-slice"),
    "v5litepod": (False, 4, "tpu-v5-lite-podslice"),
    "v6e": (False, 4, "tpu-v6e-slice"),
}
_TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
                512: "8x8x8", 1024: "8x8x16"}
_TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def parse_slice(accelerator_type: str) -> Slice:
    """``v5p-64`` -> 32 chips on 8 hosts, topology 2x4x4 (v4/v5p names count TensorCores, two per chip;
    v5e/v6e names count chips)."""
    try:
        family, count = accelerator_type.rsplit("-", 1)
        count = int(count)
    except ValueError:
        raise ConfigError(f"accelerator type {accelerator_type!r}: expected e.g. v5p-64, v5litepod-16, v6e-32") from None
    if family not in _FAMILIES:
        raise ConfigError(f"accelerator type {accelerator_type!r}: family must be one of {', '.join(_FAMILIES)}")
    counts_cores, per_host, label = _FAMILIES[family]
    chips = count // 2 if counts_cores else count
    table = _TOPOLOGY_3D if counts_cores else _TOPOLOGY_2D
    if chips not in table:
        raise ConfigError(f"accelerator type {accelerator_type!r}: {chips} chips is not a known slice size")
    hosts = max(1, chips // per_host)
    return Slice(accelerator_type, chips, hosts, table[chips], label, min(per_host, chips))
