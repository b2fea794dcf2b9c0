"""Templates users edit (``launch/templates/``, shipped in the package as
``moshax/launch/templates/``) rendered with ``string.Template``; and where a run's workdir lives."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from moshax.config import ConfigError

TEMPLATES = ("jobset.yaml", "tpu_vm_setup.sh")


def template_text(name: str, path: str | None = None) -> tuple[str, str]:
    """(text, where): a user's copy at ``path``, else the packaged template ``name``."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"template {path}: no such file")
        return p.read_text(), str(p)
    return resources.files("moshax.launch").joinpath("templates", name).read_text(), f"templates/{name}"


def render(name: str, values: dict[str, str], path: str | None = None) -> str:
    """Fill every ``${FIELD}`` of the template; a field without a value is a one-line error."""
    text, where = template_text(name, path)
    try:
        return Template(text).substitute(values)
    except KeyError as e:
        fields = ", ".join(sorted(values))
        raise ConfigError(f"template {where}: no value for ${{{e.args[0]}}} (fields: {fields})") from None
    except ValueError as e:  # a lone `$`
        raise ConfigError(f"template {where}: {e} (write a literal dollar sign as $$)") from None


@dataclass(frozen=True)
class SharedStorage:
    """Where the run directory lives so that every host sees it and it outlives pods and slices."""

    kind: str  # "gcs" (a bucket through Cloud Storage FUSE) | "pvc" (a PersistentVolumeClaim, e.g. Filestore) | "path"
    source: str | None  # bucket name | claim name | None (a path the user has made shared)
    mount_path: str | None
    workdir: str  # the path `moshax train --workdir` gets


GCS_MOUNT_ROOT = "/gcs"  # a bucket B is mounted at /gcs/B, so gs://B/run is /gcs/B/run
PVC_MOUNT_PATH = "/mnt/shared"


def _under(path: str, root: str) -> bool:
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def split_gs(url: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> (bucket, "a/b")."""
    bucket, _, rest = url[len("gs://"):].partition("/")
    if not bucket:
        raise ConfigError(f"workdir {url!r}: expected gs://BUCKET/PATH")
    return bucket, rest.strip("/")


def resolve_storage(workdir: str, gcs_bucket: str | None = None, pvc: str | None = None,
                    mount_path: str | None = None, *, allow_plain_path: bool = False) -> SharedStorage:
    """Check the workdir against the storage flags and say what to mount.

    ``gs://BUCKET/PATH`` mounts BUCKET with Cloud Storage FUSE at ``/gcs/BUCKET`` (or ``mount_path``) and
    trains in ``/gcs/BUCKET/PATH``: `moshax train` writes its workdir (config.yaml, metrics.jsonl,
    TensorBoard, Orbax checkpoints) through file paths, so a bucket is used through its mount.
    A plain path must lie under the mounted bucket or claim; ``allow_plain_path`` (TPU VMs) accepts any
    absolute path the user has made shared (an NFS/Filestore mount on every worker).
    """
    if gcs_bucket and pvc:
        raise ConfigError("choose one shared storage: --gcs-bucket or --pvc, not both")
    if gcs_bucket and gcs_bucket.startswith("gs://"):
        raise ConfigError(f"--gcs-bucket {gcs_bucket}: give the bucket name, without gs://")
    if workdir.startswith("gs://"):
        bucket, rest = split_gs(workdir)
        if pvc:
            raise ConfigError(f"workdir {workdir} is a bucket but --pvc {pvc} mounts a volume claim: give a workdir "
                              f"under the claim's mount ({mount_path or PVC_MOUNT_PATH}), or drop --pvc")
        if gcs_bucket and gcs_bucket != bucket:
            raise ConfigError(f"workdir {workdir} is in bucket {bucket}, but --gcs-bucket is {gcs_bucket}")
        mount = mount_path or f"{GCS_MOUNT_ROOT}/{bucket}"
        return SharedStorage("gcs", bucket, mount, posixpath.join(mount, rest) if rest else mount)
    if not workdir.startswith("/"):
        raise ConfigError(f"workdir {workdir!r}: give an absolute path on shared storage, or gs://BUCKET/PATH")
    if gcs_bucket or pvc:
        kind, source = ("gcs", gcs_bucket) if gcs_bucket else ("pvc", pvc)
        mount = mount_path or (f"{GCS_MOUNT_ROOT}/{gcs_bucket}" if gcs_bucket else PVC_MOUNT_PATH)
        if not _under(workdir, mount):
            raise ConfigError(f"workdir {workdir} is not under the {kind} mount {mount}: a restarted pod would "
                              f"not find its checkpoints (use a workdir under {mount})")
        return SharedStorage(kind, source, mount, workdir)
    if allow_plain_path:
        return SharedStorage("path", None, None, workdir)
    raise ConfigError(f"workdir {workdir} would be on the pod's own disk and a restarted pod could not resume: "
                      "use gs://BUCKET/PATH (mounted with Cloud Storage FUSE), or --pvc CLAIM with a workdir "
                      f"under {PVC_MOUNT_PATH}")
