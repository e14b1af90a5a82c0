#!/usr/bin/env bash
# Runs the same training command on every worker of a TPU pod slice (JAX finds its peers itself).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- --config=configs/sd15.py --workdir=gs://bucket/run1 \
#       --config.data.path=gs://bucket/fgid --compilation_cache_dir=gs://bucket/xla_cache ...
#
# The workdir must be one folder every worker sees: a gs:// path (README, "Training on a TPU pod").
# Process 0 writes the run-level files and holds the run's lease (<workdir>/.lock); every worker
# writes its own checkpoint shards. A preemption notice (SIGTERM) on any worker makes all of them
# save the same step and exit 0; rerunning this command resumes there, also on a slice of another
# size with the same global batch.
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
for arg in "$@"; do
  if [[ $arg == --workdir=* && $arg != --workdir=gs://* ]]; then
    echo "$0: $arg is a path local to each worker; a pod needs one shared --workdir=gs://BUCKET/RUN" >&2; exit 2
  fi
done
printf -v train_args '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project_flag[@]}" --worker=all \
  --command="cd ~/cid_jax && . .venv/bin/activate && python -m cid_jax.train ${train_args}"
