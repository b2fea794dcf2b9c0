"""Launch `moshax train` on every worker of a Cloud TPU VM slice with gcloud.

Steps: create (or reuse) the slice -> ship the code (a `git archive` tarball, or a git clone on the
workers) -> install into a venv -> run on all workers with `--multihost`, streaming their logs.
``--dry-run`` prints every command instead of running it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass

from moshax.launch.slices import parse_slice


@dataclass
class TpuVmPlan:
    name: str
    zone: str
    accelerator_type: str
    runtime_version: str
    project: str | None
    spot: bool
    reuse: bool
    code: str  # "copy" | "git"
    repo: str | None
    ref: str
    config: str
    workdir: str
    overrides: list[str]

    def _gcloud(self, *args: str) -> list[str]:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", *args, f"--zone={self.zone}"]
        if self.project:
            cmd.append(f"--project={self.project}")
        return cmd

    def _ssh_all(self, command: str) -> list[str]:
        return self._gcloud("ssh", self.name, "--worker=all", f"--command={command}")

    def commands(self) -> list[list[str]]:
        parse_slice(self.accelerator_type)  # validate early
        cmds: list[list[str]] = []
        if not self.reuse:
            create = self._gcloud("create", self.name, f"--accelerator-type={self.accelerator_type}",
                                  f"--version={self.runtime_version}")
            if self.spot:
                create.append("--spot")
            cmds.append(create)
        if self.code == "copy":
            cmds.append(["git", "archive", "--format=tar.gz", "-o", "/tmp/moshax.tar.gz", self.ref])
            cmds.append(self._gcloud("scp", "/tmp/moshax.tar.gz", f"{self.name}:~/moshax.tar.gz", "--worker=all"))
            cmds.append(self._ssh_all("rm -rf ~/moshax && mkdir -p ~/moshax && tar -xzf ~/moshax.tar.gz -C ~/moshax"))
        else:
            if not self.repo:
                raise ValueError("--code git needs --repo")
            cmds.append(self._ssh_all(f"rm -rf ~/moshax && git clone {shlex.quote(self.repo)} ~/moshax && "
                                      f"cd ~/moshax && git checkout {shlex.quote(self.ref)}"))
        cmds.append(self._ssh_all("cd ~/moshax && python3 -m venv .venv && .venv/bin/pip install -q -U pip && "
                                  ".venv/bin/pip install -q -e '.[tpu]'"))
        train = ["cd ~/moshax &&", ".venv/bin/moshax", "train", "--multihost", "--config", shlex.quote(self.config),
                 "--workdir", shlex.quote(self.workdir), *map(shlex.quote, self.overrides)]
        cmds.append(self._ssh_all(" ".join(train)))
        return cmds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="TPU VM (slice) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator-type", required=True, help="e.g. v5p-64, v5litepod-16, v6e-32")
    p.add_argument("--version", default="v2-alpha-tpuv5", help="TPU VM runtime (software) version")
    p.add_argument("--project")
    p.add_argument("--spot", action="store_true", help="preemptible capacity (the run resumes after preemption)")
    p.add_argument("--reuse", action="store_true", help="use an existing slice instead of creating one")
    p.add_argument("--code", choices=["copy", "git"], default="copy",
                   help="copy: ship `git archive REF` from here; git: clone --repo on every worker")
    p.add_argument("--repo")
    p.add_argument("--ref", default="HEAD")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True, help="run directory every worker can reach (e.g. gs://bucket/run)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("overrides", nargs="*")


def run(args: argparse.Namespace) -> int:
    plan = TpuVmPlan(args.name, args.zone, args.accelerator_type, args.version, args.project, args.spot, args.reuse,
                     args.code, args.repo, args.ref, args.config, args.workdir, args.overrides)
    s = parse_slice(args.accelerator_type)
    print(f"# {args.accelerator_type}: {s.chips} chips on {s.hosts} host(s), topology {s.topology}; check the fit "
          f"first: moshax compile --config {args.config} --topology {s.compile_topology}")
    for cmd in plan.commands():
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            rc = subprocess.call(cmd)
            if rc != 0:
                print(f"moshax: error: command failed with exit code {rc}: {shlex.join(cmd[:6])} ...", file=sys.stderr)
                return rc
    return 0
