#!/bin/bash
# Helium 7B on GKE, one v5p-64 slice: a JobSet whose pods mount the bucket with the Cloud Storage FUSE
# CSI driver (the Kubernetes service account `moshax` has Workload Identity access to the bucket; see
# launch/README.md). Every restart (maxRestarts) resumes from the latest checkpoint in the bucket.
set -euo pipefail
BUCKET=${BUCKET:-my-moshax-bucket}
IMAGE=${IMAGE:-us-docker.pkg.dev/my-project/moshax/moshax:latest}

moshax launch gke --name helium-7b --image "$IMAGE" --accelerator-type v5p-64 \
    --config configs/helium_7b.yaml --workdir "gs://$BUCKET/runs/helium-7b" --service-account moshax \
    --output helium-7b.yaml \
    data.train_shards="/gcs/$BUCKET/data/helium-shards"
kubectl apply -f helium-7b.yaml

# The same run with a Filestore share instead of a bucket (the claim from filestore-pvc.yaml):
#   moshax launch gke ... --pvc moshax-shared --workdir /mnt/shared/runs/helium-7b
