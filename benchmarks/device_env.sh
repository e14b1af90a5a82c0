# Sourced by the device_*.sh scripts: the environment of a GPU session, then a check that JAX and
# PyTorch both see the GPU and every package the benchmark imports is there.
#
#   REQUIRED_PACKAGES="jax flax torch ..." ; source benchmarks/device_env.sh
#
# Missing wheels carried in .whl/ (see the scripts' headers) are installed into /tmp/site.
# `--help` among the caller's arguments prints the caller's header and $BENCHMARK's flags, and exits.
PY=${PYTHON:-python3}
for a in "$@"; do
  if [[ "$a" == "-h" || "$a" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[1]}" | sed '$d; s/^# \{0,1\}//'
    echo "$BENCHMARK flags (appended after the defaults, so they override them):"
    "$PY" "$BENCHMARK" --help | sed -n '/^options:/,$p'
    exit 0
  fi
done
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 USE_TF=0
export DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error

REQUIRED_PACKAGES="$REQUIRED_PACKAGES" "$PY" - <<'PYEOF'
import importlib
import os

missing = []
for name in os.environ["REQUIRED_PACKAGES"].split():
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    raise SystemExit("missing Python packages: " + "; ".join(missing)
                     + "\ncarry them as wheels in .whl/ (see the comment at the top of the device script)")
import jax, torch
print(f"jax {jax.__version__}: {jax.devices()}")
print(f"torch {torch.__version__}: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA'}")
if jax.default_backend() != "gpu" or not torch.cuda.is_available():
    raise SystemExit("this benchmark needs a GPU visible to both JAX and PyTorch")
PYEOF

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
REPORT_DIR=${OUT:-benchmarks/results}
mkdir -p "$REPORT_DIR"
