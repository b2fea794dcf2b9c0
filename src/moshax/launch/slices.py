"""TPU slice shapes: accelerator type -> chips, hosts, topology, GKE node labels and runtime image,
all read from the one table of TPU facts (``moshax.parallel.tpu_facts``)."""

from __future__ import annotations

from dataclasses import dataclass

from moshax.config import ConfigError
from moshax.parallel.tpu_facts import TOPOLOGY_BY_CHIPS, TPU_FAMILIES, TpuFamily, tpu_family_by_gcloud_prefix


@dataclass(frozen=True)
class Slice:
    accelerator_type: str  # gcloud name, e.g. v5p-64
    chips: int
    hosts: int
    topology: str  # e.g. 4x4x2
    chips_per_host: int
    family: TpuFamily

    @property
    def gke_accelerator(self) -> str | None:
        """Node label cloud.google.com/gke-tpu-accelerator (None: GKE has no TPUs of this family)."""
        return self.family.gke_accelerator

    @property
    def runtime_version(self) -> str:
        """The TPU VM runtime image for JAX (`gcloud compute tpus tpu-vm create --version`)."""
        return self.family.runtime_version

    @property
    def compile_topology(self) -> str:
        """The name `moshax compile --topology` takes."""
        return f"{self.family.compile_prefix}:{self.topology}"


def parse_slice(accelerator_type: str) -> Slice:
    """``v5p-64`` -> 32 chips on 8 hosts, topology 2x4x4 (v3/v4/v5p names count TensorCores, two per
    chip; v5e/v6e names count chips, and their 8-chip slices are one host)."""
    try:
        prefix, count = accelerator_type.rsplit("-", 1)
        count = int(count)
    except ValueError:
        raise ConfigError(f"accelerator type {accelerator_type!r}: expected e.g. v5p-64, v5litepod-16, "
                          "v6e-32") from None
    family = tpu_family_by_gcloud_prefix(prefix)
    if family is None:
        known = ", ".join(f.gcloud_prefix for f in TPU_FAMILIES.values())
        raise ConfigError(f"accelerator type {accelerator_type!r}: family must be one of {known}")
    chips = count // 2 if family.counts_cores else count
    table = TOPOLOGY_BY_CHIPS[family.torus_dims]
    if chips not in table or (family.counts_cores and count % 2):
        raise ConfigError(f"accelerator type {accelerator_type!r}: {chips} chips is not a known slice size")
    if chips <= family.single_host_chips:
        hosts, per_host = 1, chips
    else:
        hosts, per_host = chips // family.chips_per_host, family.chips_per_host
    return Slice(accelerator_type, chips, hosts, table[chips], per_host, family)
