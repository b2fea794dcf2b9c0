#!/bin/bash
# Helium 7B with xpk (https://github.com/AI-Hypercomputer/xpk) instead of a JobSet manifest.
# xpk builds the workload itself; the run directory must be on storage that xpk mounts in every pod
# (attach a bucket or a Filestore instance to the cluster with `xpk storage attach`, see xpk's docs), so
# --workdir is the path where that storage appears in the pods, never gs://.
set -euo pipefail
IMAGE=${IMAGE:-us-docker.pkg.dev/my-project/moshax/moshax:latest}

moshax launch gke --xpk-cluster "${CLUSTER:-my-cluster}" --name helium-7b --image "$IMAGE" \
    --accelerator-type v5p-64 --num-slices 1 \
    --config configs/helium_7b.yaml --workdir /mnt/shared/runs/helium-7b
# prints: xpk workload create --cluster=... --workload=helium-7b --tpu-type=v5p-64 --num-slices=1
#         --docker-image=... '--command=moshax train --multihost --config ... --workdir ...'; run it.
