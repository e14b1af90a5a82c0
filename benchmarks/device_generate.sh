#!/usr/bin/env bash
# ConsistentID generation on one GPU (H100): SD1.5 architecture at 512 px, 50 Euler steps, CFG 5,
# merge step 30, bf16 -- our compiled JAX pipeline and the PyTorch/diffusers path in the same run;
# prints seconds per image for both (median of 3 after a warm-up) and writes a markdown report.
#
#   bash benchmarks/device_generate.sh                 # from the repository root, on the GPU machine
#   bash benchmarks/device_generate.sh --runs=5 --batches=1,8   # extra flags go to benchmarks/generate.py
#   bash benchmarks/device_generate.sh --help
#
# Weights: no SD1.5 / CLIP-H / ConsistentID weights can be downloaded here, so both sides run the
# real architectures (UNet 859.5 M, VAE 83.7 M, CLIP-L text 123.1 M, CLIP ViT-H/14 vision 632.1 M,
# ConsistentID FacialEncoder/ProjPlus/LoRA-128 adapters 184.0 M params) with random weights,
# written once with save_pretrained / our exporter and read back by each side's loader. Speed does
# not depend on the values (random bf16 weights may even overflow: the image diff is then not
# meaningful, the timings are).
#
# Budget (H200, 2026-11-27, --runs=2): 70 s to create, save and load the random weights, 84 s for
# ours' first call (XLA compile + cuDNN probes), then ~0.5 s (ours) / ~2.8 s (PyTorch) per image:
# about 3.5 min in all. A 5 min timeout is enough.
#
# Python packages: the GPU image has jax (CUDA), flax, orbax, torch, transformers, safetensors,
# scikit-image; it lacks diffusers, ml-collections and importlib-metadata. Carry them as wheels in
# .whl/ (ignored by git: `echo /.whl/ >> .git/info/exclude`), downloaded on the dev machine with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.42.1 ml-collections==1.1.0 importlib-metadata
# and run with `carry: [".whl"]`; this script installs them into /tmp/site when .whl/ exists.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}

# Both frameworks share the GPU in one process: JAX takes 45% instead of its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
REQUIRED_PACKAGES="jax flax orbax.checkpoint ml_collections torch diffusers transformers safetensors skimage scipy PIL tqdm regex"
BENCHMARK=benchmarks/generate.py
source benchmarks/device_env.sh
"$PY" benchmarks/generate.py --presets=sd15 --device=gpu --dtype=bf16 --steps=50 --merge-step=30 \
  --guidance=5 --runs=3 --weights-dir=/tmp/cid_generate_weights --out="$REPORT_DIR/generate_sd15_gpu.md" "$@"
