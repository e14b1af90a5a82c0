#!/usr/bin/env bash
# Runs the same training command on every worker of a TPU pod slice (JAX finds its peers itself).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- --config=configs/sd15.py --workdir=gs://bucket/run1 ...
#
# Assumes the repo is checked out at ~/cid_jax on every worker with its venv in ~/cid_jax/.venv
# (e.g. installed once with: gcloud compute tpus tpu-vm ssh TPU --worker=all --command="...").
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE [PROJECT] -- <cid_jax.train flags>" >&2; exit 2
fi
name=$1; zone=$2; shift 2
project_flag=()
if [[ $# -gt 0 && $1 != "--" ]]; then project_flag=(--project "$1"); shift; fi
[[ ${1:-} == "--" ]] && shift
printf -v train_args '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project_flag[@]}" --worker=all \
  --command="cd ~/cid_jax && . .venv/bin/activate && python -m cid_jax.train ${train_args}"
