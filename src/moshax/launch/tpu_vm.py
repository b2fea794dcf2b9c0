"""Launch `moshax train` on every worker of a Cloud TPU VM slice with gcloud.

Steps: create (or reuse) the slice with the family's runtime image -> ship the code (a `git archive`
tarball, or a git clone on the workers) and the set-up script (``launch/templates/tpu_vm_setup.sh``:
code, venv + install, Cloud Storage FUSE mount of the workdir's bucket) -> run it on all workers ->
`moshax train --multihost` on all workers, streaming their logs.
``--dry-run`` prints every command (and the rendered set-up script) instead of running it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moshax.config import ConfigError
from moshax.launch.render import render, resolve_storage
from moshax.launch.slices import parse_slice

TARBALL = "/tmp/moshax.tar.gz"
SETUP_NAME = "moshax-setup.sh"  # on the workers: ~/moshax-setup.sh


@dataclass
class TpuVmPlan:
    name: str
    zone: str
    accelerator_type: str
    runtime_version: str | None  # None: the family's image (moshax.parallel.tpu_facts)
    project: str | None
    spot: bool
    reuse: bool
    code: str  # "copy" | "git"
    repo: str | None
    ref: str
    config: str
    workdir: str  # gs://BUCKET/PATH (mounted with gcsfuse on every worker) or an absolute shared path
    overrides: list[str]
    gcs_bucket: str | None = None
    service_account: str | None = None
    setup_template: str | None = None  # a user's copy of templates/tpu_vm_setup.sh

    def __post_init__(self):
        self.slice = parse_slice(self.accelerator_type)  # validate early
        self.storage = resolve_storage(self.workdir, self.gcs_bucket, allow_plain_path=True)
        if self.code == "git" and not self.repo:
            raise ConfigError("--code git needs --repo URL")

    @property
    def image(self) -> str:
        return self.runtime_version or self.slice.runtime_version

    def _gcloud(self, *args: str) -> list[str]:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", *args, f"--zone={self.zone}"]
        if self.project:
            cmd.append(f"--project={self.project}")
        return cmd

    def _ssh_all(self, command: str) -> list[str]:
        return self._gcloud("ssh", self.name, "--worker=all", f"--command={command}")

    def setup_script(self) -> str:
        bucket = self.storage.source if self.storage.kind == "gcs" else ""
        values = {"CODE": self.code, "REPO": self.repo or "", "REF": self.ref, "GCS_BUCKET": bucket or "",
                  "MOUNT_PATH": self.storage.mount_path or ""}
        return render("tpu_vm_setup.sh", {k: shlex.quote(v) for k, v in values.items()}, self.setup_template)

    def train_command(self) -> str:
        train = ["cd ~/moshax &&", ".venv/bin/moshax", "train", "--multihost", "--config", shlex.quote(self.config),
                 "--workdir", shlex.quote(self.storage.workdir), *map(shlex.quote, self.overrides)]
        return " ".join(train)

    def commands(self, setup_path: str) -> list[list[str]]:
        """Every command, in order; ``setup_path`` is the rendered set-up script on this machine (its file
        name is SETUP_NAME)."""
        cmds: list[list[str]] = []
        if not self.reuse:
            create = self._gcloud("create", self.name, f"--accelerator-type={self.accelerator_type}",
                                  f"--version={self.image}")
            if self.service_account:
                create.append(f"--service-account={self.service_account}")
            if self.spot:
                create.append("--spot")
            cmds.append(create)
        shipped = [setup_path]
        if self.code == "copy":
            cmds.append(["git", "archive", "--format=tar.gz", "-o", TARBALL, self.ref])
            shipped.insert(0, TARBALL)
        cmds.append(self._gcloud("scp", *shipped, f"{self.name}:~/", "--worker=all"))
        cmds.append(self._ssh_all(f"bash ~/{SETUP_NAME}"))
        cmds.append(self._ssh_all(self.train_command()))
        return cmds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="TPU VM (slice) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator-type", required=True, help="e.g. v5p-64, v5litepod-16, v6e-32, v4-16")
    p.add_argument("--runtime-version", "--version", dest="runtime_version",
                   help="TPU VM runtime image (default: the family's: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, "
                        "v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)")
    p.add_argument("--project")
    p.add_argument("--spot", action="store_true", help="preemptible capacity (the run resumes after preemption)")
    p.add_argument("--reuse", action="store_true", help="use an existing slice instead of creating one")
    p.add_argument("--service-account", help="the TPU VM's service account (it reads and writes the bucket)")
    p.add_argument("--code", choices=["copy", "git"], default="copy",
                   help="copy: ship `git archive REF` from here; git: clone --repo on every worker")
    p.add_argument("--repo")
    p.add_argument("--ref", default="HEAD")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True,
                   help="gs://BUCKET/PATH (mounted with gcsfuse at /gcs/BUCKET on every worker) or an absolute path "
                        "every worker shares (e.g. a Filestore NFS mount)")
    p.add_argument("--gcs-bucket", help="also mount this bucket at /gcs/BUCKET (implied by a gs:// workdir)")
    p.add_argument("--setup-script", help="a set-up script template to use instead of launch/templates/tpu_vm_setup.sh")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("overrides", nargs="*")


def run(args: argparse.Namespace) -> int:
    plan = TpuVmPlan(args.name, args.zone, args.accelerator_type, args.runtime_version, args.project, args.spot,
                     args.reuse, args.code, args.repo, args.ref, args.config, args.workdir, args.overrides,
                     gcs_bucket=args.gcs_bucket, service_account=args.service_account,
                     setup_template=args.setup_script)
    s = plan.slice
    script = plan.setup_script()
    setup_path = Path(tempfile.mkdtemp(prefix="moshax-launch-")) / SETUP_NAME
    setup_path.write_text(script)
    print(f"# {args.accelerator_type}: {s.chips} chips on {s.hosts} host(s), topology {s.topology}, runtime "
          f"{plan.image}; check the fit first: moshax compile --config {args.config} --topology {s.compile_topology}")
    if plan.storage.kind == "gcs":
        print(f"# workdir {args.workdir} -> {plan.storage.workdir} (bucket {plan.storage.source} mounted with gcsfuse "
              f"at {plan.storage.mount_path} on every worker)")
    print(f"# set-up script for every worker: {setup_path}")
    if args.dry_run:
        print("\n".join(f"#   | {line}" for line in script.splitlines()))
    for cmd in plan.commands(str(setup_path)):
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            rc = subprocess.call(cmd)
            if rc != 0:
                print(f"moshax: error: command failed with exit code {rc}: {shlex.join(cmd[:6])} ...", file=sys.stderr)
                return rc
    return 0
