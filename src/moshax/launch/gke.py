"""GKE launch: a JobSet manifest (one Job per slice, one pod per TPU host) or an xpk command, both
generated from the run's config and the slice type."""

from __future__ import annotations

import argparse
import shlex
import sys

import yaml

from moshax.launch.slices import parse_slice


def train_command(config: str, workdir: str, overrides: list[str]) -> list[str]:
    return ["moshax", "train", "--multihost", "--config", config, "--workdir", workdir, *overrides]


def jobset_manifest(name: str, image: str, accelerator_type: str, config: str, workdir: str,
                    overrides: list[str], num_slices: int = 1, max_restarts: int = 10) -> dict:
    """A JobSet (jobset.x-k8s.io/v1alpha2) running `moshax train --multihost` on every TPU host."""
    s = parse_slice(accelerator_type)
    container = {
        "name": "moshax",
        "image": image,
        "command": train_command(config, workdir, overrides),
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": s.chips_per_host}},
    }
    pod = {
        "restartPolicy": "Never",
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": s.gke_accelerator,
                         "cloud.google.com/gke-tpu-topology": s.topology},
        "terminationGracePeriodSeconds": 60,  # time for the SIGTERM checkpoint
        "containers": [container],
    }
    job = {
        "backoffLimit": 0,
        "completions": s.hosts,
        "parallelism": s.hosts,
        "completionMode": "Indexed",
        "template": {"spec": pod},
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology":
                                                   "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts},  # preemption -> restart -> resume from checkpoint
            "replicatedJobs": [{"name": "slice", "replicas": num_slices, "template": {"spec": job}}],
        },
    }


def xpk_command(cluster: str, name: str, image: str, accelerator_type: str, config: str, workdir: str,
                overrides: list[str], num_slices: int = 1) -> list[str]:
    parse_slice(accelerator_type)
    return ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={name}",
            f"--tpu-type={accelerator_type}", f"--num-slices={num_slices}", f"--docker-image={image}",
            f"--command={shlex.join(train_command(config, workdir, overrides))}"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True)
    p.add_argument("--image", required=True, help="container image with moshax installed ('.[tpu]')")
    p.add_argument("--accelerator-type", required=True)
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--xpk-cluster", help="print an xpk command for this cluster instead of a JobSet manifest")
    p.add_argument("--output", help="write the manifest here (default: stdout)")
    p.add_argument("overrides", nargs="*")


def run(args: argparse.Namespace) -> int:
    if args.xpk_cluster:
        print(shlex.join(xpk_command(args.xpk_cluster, args.name, args.image, args.accelerator_type, args.config,
                                     args.workdir, args.overrides, args.num_slices)))
        return 0
    text = yaml.safe_dump(jobset_manifest(args.name, args.image, args.accelerator_type, args.config, args.workdir,
                                          args.overrides, args.num_slices), sort_keys=False)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}; apply with: kubectl apply -f {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0
