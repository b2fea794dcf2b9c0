"""GKE launch: a JobSet manifest (one Job per slice, one pod per TPU host) rendered from the template
``launch/templates/jobset.yaml``, or an xpk command; the run directory on shared storage (a Cloud
Storage bucket through the GCS FUSE CSI driver, or a PersistentVolumeClaim such as Filestore) so a
restarted pod resumes from the latest checkpoint."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import yaml

from moshax.config import ConfigError
from moshax.launch.render import SharedStorage, render, resolve_storage
from moshax.launch.slices import Slice, parse_slice

GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"
# implicit-dirs: see directories that exist only as object prefixes; rename-dir-limit: Orbax finalizes a
# checkpoint by renaming its temporary directory, which FUSE refuses on a flat bucket without it.
GCSFUSE_MOUNT_OPTIONS = "implicit-dirs,rename-dir-limit=200000"
VOLUME_NAME = "shared"


def train_command(config: str, workdir: str, overrides: list[str]) -> list[str]:
    return ["moshax", "train", "--multihost", "--config", config, "--workdir", workdir, *overrides]


def gke_slice(accelerator_type: str) -> Slice:
    s = parse_slice(accelerator_type)
    if s.gke_accelerator is None:
        raise ConfigError(f"accelerator type {accelerator_type}: GKE has no TPU {s.family.name} node pools "
                          "(use `moshax launch tpu-vm`)")
    return s


def storage_spec(storage: SharedStorage) -> tuple[dict, list, list]:
    """(pod annotations, volumes, container volumeMounts) for the shared storage."""
    if storage.kind == "gcs":
        volume = {"name": VOLUME_NAME, "csi": {"driver": GCSFUSE_DRIVER, "volumeAttributes": {
            "bucketName": storage.source, "mountOptions": GCSFUSE_MOUNT_OPTIONS}}}
        annotations = {"gke-gcsfuse/volumes": "true"}  # asks GKE to inject the GCS FUSE sidecar
    elif storage.kind == "pvc":
        volume = {"name": VOLUME_NAME, "persistentVolumeClaim": {"claimName": storage.source}}
        annotations = {}
    else:
        return {}, [], []
    return annotations, [volume], [{"name": VOLUME_NAME, "mountPath": storage.mount_path}]


def _drop_nulls(x):
    if isinstance(x, dict):
        return {k: _drop_nulls(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_nulls(v) for v in x]
    return x


def jobset_manifest(name: str, image: str, accelerator_type: str, config: str, workdir: str,
                    overrides: list[str], num_slices: int = 1, max_restarts: int = 10, *,
                    gcs_bucket: str | None = None, pvc: str | None = None, mount_path: str | None = None,
                    service_account: str | None = None, template: str | None = None) -> dict:
    """A JobSet (jobset.x-k8s.io/v1alpha2) running `moshax train --multihost` on every TPU host, its
    workdir on shared storage (``resolve_storage``)."""
    s = gke_slice(accelerator_type)
    storage = resolve_storage(workdir, gcs_bucket, pvc, mount_path)
    annotations, volumes, mounts = storage_spec(storage)
    values = {
        "NAME": name, "MAX_RESTARTS": max_restarts, "NUM_SLICES": num_slices, "HOSTS": s.hosts,
        "GKE_ACCELERATOR": s.gke_accelerator, "TOPOLOGY": s.topology, "CHIPS_PER_HOST": s.chips_per_host,
        "IMAGE": image, "COMMAND": train_command(config, storage.workdir, overrides),
        "SERVICE_ACCOUNT": service_account, "POD_ANNOTATIONS": annotations, "VOLUMES": volumes,
        "VOLUME_MOUNTS": mounts,
    }
    text = render("jobset.yaml", {k: json.dumps(v) for k, v in values.items()}, template)
    try:
        manifest = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"JobSet template {template or 'templates/jobset.yaml'}: not YAML after filling in: "
                          f"{str(e).splitlines()[0]}") from None
    return _drop_nulls(manifest)


def xpk_command(cluster: str, name: str, image: str, accelerator_type: str, config: str, workdir: str,
                overrides: list[str], num_slices: int = 1) -> list[str]:
    """An `xpk workload create` command. xpk mounts storage itself (`xpk storage attach`), so the workdir
    is a path on that storage here, never gs:// (see launch/examples/xpk.sh)."""
    gke_slice(accelerator_type)
    if workdir.startswith("gs://") or not workdir.startswith("/"):
        raise ConfigError(f"workdir {workdir}: with xpk give the absolute path where the storage you attached to the "
                          "cluster (`xpk storage attach`) is mounted in the pods")
    return ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={name}",
            f"--tpu-type={accelerator_type}", f"--num-slices={num_slices}", f"--docker-image={image}",
            f"--command={shlex.join(train_command(config, workdir, overrides))}"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True)
    p.add_argument("--image", required=True, help="container image with moshax installed ('.[tpu]')")
    p.add_argument("--accelerator-type", required=True, help="e.g. v5p-64, v5litepod-16, v6e-32, v4-16")
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument("--max-restarts", type=int, default=10, help="JobSet restarts (each resumes from the workdir)")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True,
                   help="gs://BUCKET/PATH (mounted with Cloud Storage FUSE at /gcs/BUCKET) or a path under the "
                        "--pvc / --gcs-bucket mount")
    p.add_argument("--gcs-bucket",
                   help="mount this bucket in every pod (GCS FUSE CSI driver); implied by a gs:// workdir")
    p.add_argument("--pvc", help="mount this PersistentVolumeClaim (e.g. a Filestore share) in every pod")
    p.add_argument("--mount-path",
                   help="where the storage is mounted (default: /gcs/BUCKET, or /mnt/shared for --pvc)")
    p.add_argument("--service-account",
                   help="the pods' Kubernetes service account (Workload Identity access to the bucket)")
    p.add_argument("--template", help="a JobSet template to render instead of launch/templates/jobset.yaml")
    p.add_argument("--xpk-cluster", help="print an xpk command for this cluster instead of a JobSet manifest")
    p.add_argument("--output", help="write the manifest here (default: stdout)")
    p.add_argument("overrides", nargs="*")


def run(args: argparse.Namespace) -> int:
    if args.xpk_cluster:
        if args.gcs_bucket or args.pvc or args.template:
            raise ConfigError("--gcs-bucket, --pvc and --template shape the JobSet manifest; with --xpk-cluster attach "
                              "storage through xpk (`xpk storage attach`)")
        print(shlex.join(xpk_command(args.xpk_cluster, args.name, args.image, args.accelerator_type, args.config,
                                     args.workdir, args.overrides, args.num_slices)))
        return 0
    manifest = jobset_manifest(args.name, args.image, args.accelerator_type, args.config, args.workdir,
                               args.overrides, args.num_slices, args.max_restarts, gcs_bucket=args.gcs_bucket,
                               pvc=args.pvc, mount_path=args.mount_path, service_account=args.service_account,
                               template=args.template)
    text = yaml.safe_dump(manifest, sort_keys=False)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}; apply with: kubectl apply -f {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0
