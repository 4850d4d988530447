#!/bin/bash
# Train vesperjax on every host of a multi-host Cloud TPU VM slice. Not run here (no
# TPU): docs/launch.md says what is and is not tested.
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a examples/tpu/train.sh \
#       --config experiments/large.py --workdir /mnt/runs/large
#
# The arguments go to `python -m vesperjax.train` on every worker (`--worker=all`); JAX
# finds the hosts through the TPU VM's metadata (the log's `processes: N found through
# Cloud TPU's environment` line), so no coordinator flags are needed. --workdir must be
# the same shared folder on every worker (Filestore NFS or a gcsfuse mount): process 0
# prepares the data there and every process writes its part of each checkpoint.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

# The committed tree (experiments/ included), not the working copy: what runs is known.
ARCHIVE=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$ARCHIVE"' EXIT
git archive --format=tar.gz -o "$ARCHIVE" HEAD

# shellcheck disable=SC2086  # PROJECT_FLAG is empty or one word
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":vesperjax.tar.gz \
  --worker=all --zone="$ZONE" $PROJECT_FLAG

ARGS=$(printf ' %q' "$@")
# shellcheck disable=SC2086
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone="$ZONE" $PROJECT_FLAG \
  --command="set -e; rm -rf vesperjax && mkdir vesperjax && tar xzf vesperjax.tar.gz -C vesperjax \
    && cd vesperjax && python3 -m pip install --quiet '.[tpu]' \
    && python3 -m vesperjax.train${ARGS}"
