"""Launchers, by dry run: the gcloud commands and the GKE manifests they generate."""

import shlex

import pytest
import yaml

from moshax.cli import main
from moshax.config import ConfigError
from moshax.launch.gke import jobset_manifest, xpk_command
from moshax.launch.slices import parse_slice


@pytest.mark.parametrize("name, chips, hosts, topology, compile_name", [
    ("v5p-8", 4, 1, "2x2x1", "v5p:2x2x1"),
    ("v5p-64", 32, 8, "2x4x4", "v5p:2x4x4"),
    ("v5p-128", 64, 16, "4x4x4", "v5p:4x4x4"),
    ("v5litepod-16", 16, 4, "4x4", "v5e:4x4"),
    ("v6e-4", 4, 1, "2x2", "v6e:2x2"),
    ("v4-16", 8, 2, "2x2x2", "v4:2x2x2"),
])
def test_slice_shapes(name, chips, hosts, topology, compile_name):
    s = parse_slice(name)
    assert (s.chips, s.hosts, s.topology, s.compile_topology) == (chips, hosts, topology, compile_name)


@pytest.mark.parametrize("bad", ["v5p", "v9-8", "v5p-6"])
def test_bad_slice_names(bad):
    with pytest.raises(ConfigError):
        parse_slice(bad)


def test_tpu_vm_dry_run_prints_every_step(capsys):
    rc = main(["launch", "tpu-vm", "--name", "helium", "--zone", "us-east5-a", "--accelerator-type", "v5p-64",
               "--project", "proj", "--spot", "--config", "configs/helium_7b.yaml", "--workdir", "gs://b/run",
               "--dry-run", "train.steps=1000"])
    assert rc == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]
    cmds = [shlex.split(line) for line in lines]
    assert cmds[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "helium"]
    assert "--accelerator-type=v5p-64" in cmds[0] and "--spot" in cmds[0] and "--project=proj" in cmds[0]
    assert cmds[1][:2] == ["git", "archive"]
    assert any("--worker=all" in c and "scp" in c for c in cmds)
    install = [c for c in cmds if any("pip install" in a for a in c)]
    assert install and "--worker=all" in install[0]
    run = cmds[-1]
    assert "--worker=all" in run
    remote = next(a for a in run if a.startswith("--command="))
    assert "moshax train --multihost --config configs/helium_7b.yaml --workdir gs://b/run train.steps=1000" in remote


def test_tpu_vm_reuse_and_git(capsys):
    assert main(["launch", "tpu-vm", "--name", "x", "--zone", "z", "--accelerator-type", "v5litepod-16", "--reuse",
                 "--code", "git", "--repo", "https://example.invalid/moshax.git", "--ref", "v1",
                 "--config", "c.yaml", "--workdir", "gs://b/r", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tpu-vm create" not in out and "git clone https://example.invalid/moshax.git" in out and "checkout v1" in out


def test_jobset_manifest():
    m = jobset_manifest("helium", "gcr.io/p/moshax:1", "v5p-64", "configs/helium_7b.yaml", "gs://b/run",
                        ["train.steps=10"], num_slices=2)
    m = yaml.safe_load(yaml.safe_dump(m))
    assert m["kind"] == "JobSet" and m["apiVersion"].startswith("jobset.x-k8s.io/")
    rj = m["spec"]["replicatedJobs"][0]
    assert rj["replicas"] == 2
    job = rj["template"]["spec"]
    assert job["completions"] == job["parallelism"] == 8 and job["completionMode"] == "Indexed"
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x4x4"}
    c = pod["containers"][0]
    assert c["resources"]["limits"]["google.com/tpu"] == 4
    assert c["command"][:3] == ["moshax", "train", "--multihost"] and c["command"][-1] == "train.steps=10"
    assert m["spec"]["failurePolicy"]["maxRestarts"] >= 1


def test_xpk_command_and_cli(capsys, tmp_path):
    cmd = xpk_command("cl", "helium", "img", "v5p-64", "c.yaml", "gs://b/r", [])
    assert cmd[:3] == ["xpk", "workload", "create"] and "--tpu-type=v5p-64" in cmd
    assert main(["launch", "gke", "--name", "h", "--image", "img", "--accelerator-type", "v6e-16", "--config", "c.yaml",
                 "--workdir", "gs://b/r", "--output", str(tmp_path / "m.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "m.yaml").read_text())["kind"] == "JobSet"
