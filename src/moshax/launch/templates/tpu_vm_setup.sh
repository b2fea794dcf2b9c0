#!/bin/bash
# TPU VM worker set-up for `moshax launch tpu-vm`: copied to every worker (~/moshax-setup.sh) and run
# there over `gcloud compute tpus tpu-vm ssh --worker=all` before `moshax train --multihost`.
# It is safe to run again (`--reuse`, or after a preempted slice is recreated).
# moshax fills the placeholders below (Python string.Template: values are shell-quoted; a literal
# dollar sign is written as two). Edit a copy and pass it with `moshax launch tpu-vm --setup-script my-setup.sh ...`.
set -euo pipefail

CODE=${CODE}              # copy: unpack ~/moshax.tar.gz (shipped by scp); git: clone REPO at REF
REPO=${REPO}
REF=${REF}
GCS_BUCKET=${GCS_BUCKET}  # empty: no bucket to mount
MOUNT_PATH=${MOUNT_PATH}  # where the bucket is mounted (the workdir lives under it)

# 1. The code.
rm -rf ~/moshax
if [ "$$CODE" = copy ]; then
  mkdir -p ~/moshax && tar -xzf ~/moshax.tar.gz -C ~/moshax
else
  git clone "$$REPO" ~/moshax && git -C ~/moshax checkout "$$REF"
fi

# 2. moshax with libtpu, in a venv.
cd ~/moshax
python3 -m venv .venv
.venv/bin/pip install -q -U pip
.venv/bin/pip install -q -e '.[tpu]'

# 3. Shared storage: the run directory must be the same on every worker and survive the slice.
#    Cloud Storage FUSE mounts the bucket; rename-dir-limit lets Orbax finalize a checkpoint by
#    renaming its temporary directory on a flat bucket (buckets with hierarchical namespace rename
#    atomically and are the better choice for checkpoints).
if [ -n "$$GCS_BUCKET" ]; then
  if ! command -v gcsfuse >/dev/null; then
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$$(lsb_release -c -s) main" \
      | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
    sudo apt-get update -q && sudo apt-get install -y -q fuse gcsfuse
  fi
  sudo mkdir -p "$$MOUNT_PATH" && sudo chown "$$(id -u):$$(id -g)" "$$MOUNT_PATH"
  mountpoint -q "$$MOUNT_PATH" || gcsfuse --implicit-dirs --rename-dir-limit=200000 "$$GCS_BUCKET" "$$MOUNT_PATH"
fi
echo "moshax set up on $$(hostname)"
