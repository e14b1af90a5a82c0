#!/usr/bin/env bash
# ConsistentID train step on one GPU (H100): SD1.5 architecture at 512 px, bf16 compute (bf16 frozen,
# fp32 trainable params and AdamW state on both sides), per-chip batch 8 -- our jitted step
# (cid_jax.trainer.jit_train_step on a 1-device mesh) and the PyTorch reference step (diffusers
# UNet/VAE + transformers CLIP + the PyTorch ConsistentID adapters/FacialEncoder/ProjPlus of
# tests/torch_reference, torch.autocast bf16, AdamW on the trainable params only) in the same run,
# each in its own subprocess. Prints per side: median step time of 5 after 2 warm-up steps,
# samples/s, peak device memory; for ours the XLA compile time and the per-device FLOP count of the
# compiled step (cost analysis); TFLOP/s and MFU against the H100 bf16 dense peak (989 TFLOP/s)
# for both sides from that same count. Loss = noise MSE + 0.01 * facial localization loss (cross
# capture) on both sides.
#
#   bash benchmarks/device_train.sh                      # from the repository root, on the GPU machine
#   bash benchmarks/device_train.sh --batch=16 --remat=attention   # extra flags go to benchmarks/train_step.py
#   bash benchmarks/device_train.sh --help
#
# Weights: no SD1.5 / CLIP-H / ConsistentID weights can be downloaded on the device machine, so both
# sides initialise the real architectures (UNet 859.5 M, VAE 83.7 M, CLIP-L text 123.1 M, CLIP
# ViT-H/14 vision 632.1 M frozen; FacialEncoder/ProjPlus/LoRA-128 adapters 184.0 M trainable) with
# random weights directly on the device. The step's cost does not depend on the values; random bf16
# activations may overflow, so the printed losses are only a sanity signal, the timings are the result.
#
# Budget (H200, 2026-11-27): PyTorch side 28 s in all; the JAX side needed more than 240 s (random
# init + cuDNN probes + XLA autotuned compile of the SD1.5-size step) and did not finish in the 330 s
# left beside the generation run. Since then construction is host-side (no init compiles; on CPU the
# SD1.5 trees take ~50 s of numpy draws, benchmarks/results/first_step.md) and inits trace no cuDNN
# probe, so one call of this script (construction + compile + 2 warm-up + 5 timed steps of each side)
# is meant to fit 8 minutes. Run it alone with timeout_s=480.
#
# Python packages: the GPU image has jax (CUDA), flax, optax, orbax, torch, transformers; it lacks
# diffusers, ml-collections and importlib-metadata. Carry them as wheels in .whl/ (ignored by git:
# `echo /.whl/ >> .git/info/exclude`), downloaded on the dev machine with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.42.1 ml-collections==1.1.0 importlib-metadata
# and run with `carry: [".whl"]`; this script installs them into /tmp/site when .whl/ exists.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}

# Each side has the GPU to itself (separate subprocesses, one after the other).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
REQUIRED_PACKAGES="jax flax optax orbax.checkpoint ml_collections torch diffusers transformers numpy"
BENCHMARK=benchmarks/train_step.py
source benchmarks/device_env.sh
"$PY" benchmarks/train_step.py --preset=sd15 --device=gpu --dtype=bfloat16 --batch=8 --runs=5 --warmup=2 \
  --out="$REPORT_DIR/train_step_sd15_gpu.md" "$@"
