#!/bin/bash
# Helium 7B on a v5p-64 TPU VM slice (32 chips, 8 hosts), run directory in a Cloud Storage bucket.
# Prints everything first; drop --dry-run to run it. See launch/README.md.
set -euo pipefail
BUCKET=${BUCKET:-my-moshax-bucket}

moshax compile --config configs/helium_7b.yaml --topology v5p:2x4x4   # fits? (no TPU needed)

moshax launch tpu-vm --name helium-7b --zone us-east5-a --accelerator-type v5p-64 \
    --project "${PROJECT:-my-project}" --spot \
    --config configs/helium_7b.yaml --workdir "gs://$BUCKET/runs/helium-7b" \
    --dry-run \
    data.train_shards="/gcs/$BUCKET/data/helium-shards"
