"""Launchers, by dry run: the gcloud commands and the GKE manifests they generate, the templates they
render, and the one table of TPU facts they read."""

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from moshax.cli import main
from moshax.config import ConfigError
from moshax.launch.gke import jobset_manifest, xpk_command
from moshax.launch.render import TEMPLATES, resolve_storage
from moshax.launch.slices import parse_slice
from moshax.launch.tpu_vm import TpuVmPlan
from moshax.parallel import tpu_facts
from moshax.training.aot import hbm_per_chip
from moshax.training.metrics import peak_flops_per_device

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3


@pytest.mark.parametrize("name, chips, hosts, per_host, topology, compile_name", [
    ("v5p-8", 4, 1, 4, "2x2x1", "v5p:2x2x1"),
    ("v5p-64", 32, 8, 4, "2x4x4", "v5p:2x4x4"),
    ("v5p-128", 64, 16, 4, "4x4x4", "v5p:4x4x4"),
    ("v5litepod-8", 8, 1, 8, "2x4", "v5e:2x4"),  # the 8-chip v5e/v6e slices are one host
    ("v5litepod-16", 16, 4, 4, "4x4", "v5e:4x4"),
    ("v6e-4", 4, 1, 4, "2x2", "v6e:2x2"),
    ("v6e-8", 8, 1, 8, "2x4", "v6e:2x4"),
    ("v4-16", 8, 2, 4, "2x2x2", "v4:2x2x2"),
    ("v3-32", 16, 4, 4, "4x4", "v3:4x4"),
])
def test_slice_shapes(name, chips, hosts, per_host, topology, compile_name):
    s = parse_slice(name)
    assert (s.chips, s.hosts, s.chips_per_host, s.topology, s.compile_topology) == (
        chips, hosts, per_host, topology, compile_name)


@pytest.mark.parametrize("bad", ["v5p", "v9-8", "v5p-6", "v5p-9", "v5e-16"])
def test_bad_slice_names(bad):
    with pytest.raises(ConfigError):
        parse_slice(bad)


# ---- the one table of TPU facts

def test_every_family_has_every_fact():
    for f in tpu_facts.TPU_FAMILIES.values():
        assert f.hbm_bytes >= 16 * GiB and f.peak_bf16_flops > 1e14 and f.hbm_bandwidth > 5e11
        assert f.ici_bandwidth is None or f.ici_bandwidth > 1e11
        assert f.runtime_version and f.chips_per_host == 4 and f.torus_dims in (2, 3)
        for n in f.names():  # every name finds its own family
            assert tpu_facts.tpu_family(n) is f, n


@pytest.mark.parametrize("name, family", [
    ("v5p:4x4x4", "v5p"), ("v5e:2x2", "v5e"), ("v6e:4x4", "v6e"), ("v4:2x2x2", "v4"), ("v5litepod-16", "v5e"),
    ("TPU v5 lite", "v5e"), ("TPU v5", "v5p"), ("TPU v5p", "v5p"), ("TPU v6 lite", "v6e"), ("TPU v4", "v4"),
])
def test_names_find_their_family(name, family):
    assert tpu_facts.tpu_family(name).name == family


def test_compile_memory_and_mfu_read_the_table():
    assert hbm_per_chip("v5p:4x4x4") == 95 * GiB and hbm_per_chip("v5e:2x2") == 16 * GiB
    assert hbm_per_chip("v6e:2x2") == 32 * GiB and hbm_per_chip("v4:2x2x2") == 32 * GiB
    assert hbm_per_chip("v3:2x2") == 16 * GiB  # a v3 JAX device is one TensorCore: half a chip
    assert hbm_per_chip("h100") is None
    assert peak_flops_per_device("TPU v5 lite") == 197e12 and peak_flops_per_device("TPU v5") == 459e12
    assert peak_flops_per_device("TPU v6 lite") == 918e12 and peak_flops_per_device("TPU v4") == 275e12
    assert peak_flops_per_device("TPU v3") == 123e12 / 2
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops_per_device("NVIDIA L4") == 121e12
    assert peak_flops_per_device("cpu") is None


# ---- TPU VMs

def tpu_vm(*args, accel="v5p-64", workdir="gs://b/run"):
    return ["launch", "tpu-vm", "--name", "helium", "--zone", "us-east5-a", "--accelerator-type", accel,
            "--config", "configs/helium_7b.yaml", "--workdir", workdir, "--dry-run", *args]


def printed_commands(out):
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def test_tpu_vm_dry_run_prints_every_step(capsys):
    assert main(tpu_vm("--project", "proj", "--spot", "train.steps=1000")) == 0
    out = capsys.readouterr().out
    cmds = printed_commands(out)
    create = cmds[0]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "helium"]
    assert "--accelerator-type=v5p-64" in create and "--spot" in create and "--project=proj" in create
    assert "--version=v2-alpha-tpuv5" in create
    assert cmds[1][:2] == ["git", "archive"]
    scp = cmds[2]
    assert "scp" in scp and "--worker=all" in scp and "/tmp/moshax.tar.gz" in scp
    script = Path(next(a for a in scp if a.endswith("moshax-setup.sh")))
    assert "--worker=all" in cmds[3] and "--command=bash ~/moshax-setup.sh" in cmds[3]
    text = script.read_text()
    assert "pip install -q -e '.[tpu]'" in text and "\nGCS_BUCKET=b " in text and "\nMOUNT_PATH=/gcs/b " in text
    assert "gcsfuse --implicit-dirs" in text and "#   | GCS_BUCKET=b" in out  # the script is shown in the dry run
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # valid bash
    run = cmds[-1]
    assert "--worker=all" in run
    remote = next(a for a in run if a.startswith("--command="))
    # gs://b/run is the bucket mounted with gcsfuse on every worker
    assert "moshax train --multihost --config configs/helium_7b.yaml --workdir /gcs/b/run train.steps=1000" in remote


@pytest.mark.parametrize("accel, image", [("v4-16", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                          ("v5p-64", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_tpu_vm_runtime_image_per_family(accel, image, capsys):
    assert main(tpu_vm(accel=accel)) == 0
    assert f"--version={image}" in printed_commands(capsys.readouterr().out)[0]
    assert main(tpu_vm("--runtime-version", "my-image", accel=accel)) == 0
    assert "--version=my-image" in printed_commands(capsys.readouterr().out)[0]


def test_tpu_vm_reuse_and_git(capsys):
    assert main(tpu_vm("--reuse", "--code", "git", "--repo", "https://example.invalid/moshax.git", "--ref", "v1",
                       accel="v5litepod-16", workdir="/mnt/nfs/runs/r")) == 0
    out = capsys.readouterr().out
    cmds = printed_commands(out)
    assert "tpu-vm create" not in out and not any(c[:2] == ["git", "archive"] for c in cmds)
    assert "#   | REPO=https://example.invalid/moshax.git" in out and "#   | REF=v1" in out
    assert "#   | GCS_BUCKET=''" in out  # an NFS path: nothing to mount
    assert "--workdir /mnt/nfs/runs/r" in next(a for a in cmds[-1] if a.startswith("--command="))


def test_tpu_vm_user_setup_script(tmp_path):
    mine = tmp_path / "setup.sh"
    mine.write_text("echo code=${CODE} bucket=${GCS_BUCKET} home=$$HOME\n")
    plan = TpuVmPlan("n", "z", "v6e-8", None, None, False, False, "copy", None, "HEAD", "c.yaml", "gs://bk/r", [],
                     setup_template=str(mine))
    assert plan.setup_script() == "echo code=copy bucket=bk home=$HOME\n"
    mine.write_text("echo ${NOPE}\n")
    with pytest.raises(ConfigError, match=r"no value for \$\{NOPE\}"):
        plan.setup_script()


# ---- GKE

def test_jobset_manifest_on_a_bucket():
    m = jobset_manifest("helium", "gcr.io/p/moshax:1", "v5p-64", "configs/helium_7b.yaml", "gs://b/run",
                        ["train.steps=10"], num_slices=2, service_account="moshax")
    m = yaml.safe_load(yaml.safe_dump(m))
    assert m["kind"] == "JobSet" and m["apiVersion"].startswith("jobset.x-k8s.io/")
    rj = m["spec"]["replicatedJobs"][0]
    assert rj["replicas"] == 2
    job = rj["template"]["spec"]
    assert job["completions"] == job["parallelism"] == 8 and job["completionMode"] == "Indexed"
    assert job["template"]["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x4x4"}
    assert pod["serviceAccountName"] == "moshax"
    assert pod["volumes"] == [{"name": "shared", "csi": {"driver": "gcsfuse.csi.storage.gke.io", "volumeAttributes": {
        "bucketName": "b", "mountOptions": "implicit-dirs,rename-dir-limit=200000"}}}]
    c = pod["containers"][0]
    assert c["volumeMounts"] == [{"name": "shared", "mountPath": "/gcs/b"}]
    assert c["resources"]["limits"]["google.com/tpu"] == 4
    assert c["command"] == ["moshax", "train", "--multihost", "--config", "configs/helium_7b.yaml",
                            "--workdir", "/gcs/b/run", "train.steps=10"]
    assert m["spec"]["failurePolicy"]["maxRestarts"] >= 1


def test_jobset_manifest_on_a_volume_claim():
    m = jobset_manifest("h", "img", "v6e-16", "c.yaml", "/mnt/shared/runs/h", [], pvc="filestore")
    pod = m["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": "filestore"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "shared", "mountPath": "/mnt/shared"}]
    cmd = pod["containers"][0]["command"]
    assert cmd[cmd.index("--workdir") + 1] == "/mnt/shared/runs/h"
    assert "serviceAccountName" not in pod  # null fields are dropped
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v6e-slice"
    m = jobset_manifest("h", "img", "v4-16", "c.yaml", "/data/r", [], pvc="fs", mount_path="/data")
    pod = m["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/data"


def test_jobset_bucket_by_flag_and_custom_template(tmp_path):
    storage = resolve_storage("/ckpt/r", gcs_bucket="bk", mount_path="/ckpt")
    assert (storage.kind, storage.source, storage.workdir) == ("gcs", "bk", "/ckpt/r")
    mine = tmp_path / "jobset.yaml"
    mine.write_text((ROOT / "launch" / "templates" / "jobset.yaml").read_text().replace(
        "restartPolicy: Never", "restartPolicy: Never\n              priorityClassName: high"))
    m = jobset_manifest("h", "img", "v5litepod-16", "c.yaml", "gs://bk/r", [], template=str(mine))
    assert m["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["priorityClassName"] == "high"


@pytest.mark.parametrize("args, message", [
    (["--workdir", "gs://b/r", "--pvc", "fs"], "is a bucket but --pvc"),
    (["--workdir", "gs://b/r", "--gcs-bucket", "other"], "is in bucket b, but --gcs-bucket is other"),
    (["--workdir", "/mnt/shared/r", "--gcs-bucket", "b", "--pvc", "fs"], "not both"),
    (["--workdir", "/runs/r"], "pod's own disk"),
    (["--workdir", "/runs/r", "--pvc", "fs"], "not under the pvc mount /mnt/shared"),
    (["--workdir", "runs/r", "--pvc", "fs"], "absolute path"),
    (["--workdir", "gs:///r"], "gs://BUCKET/PATH"),
    (["--workdir", "gs://b/r", "--accelerator-type", "v3-8"], "GKE has no TPU v3"),
    (["--workdir", "gs://b/r", "--accelerator-type", "v7x-8"], "family must be one of"),
    (["--workdir", "gs://b/r", "--xpk-cluster", "cl"], "with xpk give the absolute path"),
    (["--workdir", "/mnt/r", "--xpk-cluster", "cl", "--pvc", "fs"], "attach storage through xpk"),
])
def test_gke_bad_combinations_are_one_line_errors(args, message, capsys):
    argv = ["launch", "gke", "--name", "h", "--image", "img", "--accelerator-type", "v5p-64", "--config", "c.yaml"]
    assert main(argv + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("moshax: error: ") and err.count("\n") == 1 and message in err


def test_tpu_vm_bad_combinations_are_one_line_errors(capsys):
    for args, message in [(tpu_vm(workdir="runs/r"), "absolute path"),
                          (tpu_vm("--code", "git"), "--code git needs --repo"),
                          (tpu_vm(accel="v9-8"), "family must be one of")]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("moshax: error: ") and err.count("\n") == 1 and message in err


def test_xpk_command_and_cli(capsys, tmp_path):
    cmd = xpk_command("cl", "helium", "img", "v5p-64", "c.yaml", "/mnt/shared/r", [])
    assert cmd[:3] == ["xpk", "workload", "create"] and "--tpu-type=v5p-64" in cmd
    assert main(["launch", "gke", "--name", "h", "--image", "img", "--accelerator-type", "v6e-16", "--config", "c.yaml",
                 "--workdir", "gs://b/r", "--output", str(tmp_path / "m.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "m.yaml").read_text())["kind"] == "JobSet"


# ---- templates: one source of truth, shipped in the package

def test_top_level_templates_are_the_packaged_ones():
    packaged = ROOT / "src" / "moshax" / "launch" / "templates"
    top = ROOT / "launch" / "templates"
    assert top.resolve() == packaged.resolve()
    for name in TEMPLATES:
        assert (packaged / name).is_file()


def test_a_gs_workdir_checkpoints_through_its_mount(tmp_path, monkeypatch):
    """gs://BUCKET/PATH -> the FUSE mount path -> an Orbax save and restore there (a local directory stands
    in for the mounted bucket: no network here)."""
    import jax
    import jax.numpy as jnp

    from moshax.launch import render
    from moshax.checkpoint.manager import Checkpointer

    monkeypatch.setattr(render, "GCS_MOUNT_ROOT", str(tmp_path / "gcs"))
    storage = resolve_storage("gs://bk/runs/a")
    assert (storage.source, storage.mount_path) == ("bk", f"{tmp_path}/gcs/bk")
    assert storage.workdir == f"{tmp_path}/gcs/bk/runs/a"
    ckpt = Checkpointer(Path(storage.workdir) / "checkpoints", async_save=False)
    state = {"w": jnp.arange(6.0).reshape(2, 3)}
    ckpt.save(3, state)
    ckpt.manager.wait_until_finished()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
    restored, _ = Checkpointer(Path(storage.workdir) / "checkpoints").restore(3, abstract)
    assert (restored["w"] == state["w"]).all()
