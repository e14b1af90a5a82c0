"""Which JAX platforms to probe, decided before JAX starts a backend (standard library only).

With libtpu installed (the `tpu` extra, which `cid_jax.aot` needs on any host) JAX probes for a TPU
at start-up even on machines that have none, and libtpu prints half a screen of errors
("Unable to initialize backend 'tpu'", TPU_WORKER_HOSTNAMES, a source-location trace). When no TPU
device node exists (/dev/accel* on v4/v5p VMs, /dev/vfio/<n> on v5e/v6e) and the user has not set
JAX_PLATFORMS, it is set to the platforms that are present: "cuda,cpu" on an NVIDIA machine whose
JAX CUDA plugin is installed, else "cpu". Set JAX_PLATFORMS yourself to choose otherwise.
"""
import glob
import importlib.util
import os
import sys


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def tpu_present() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def skip_absent_tpu() -> None:
    if "JAX_PLATFORMS" in os.environ or not _has("libtpu") or tpu_present():
        return
    cuda = glob.glob("/dev/nvidia[0-9]*") and any(_has(f"jax_cuda{v}_plugin") for v in (12, 13))
    platforms = "cuda,cpu" if cuda else "cpu"
    os.environ["JAX_PLATFORMS"] = platforms
    jax = sys.modules.get("jax")
    if jax is not None:  # imported before cid_jax, so it read the environment already; its backends
        jax.config.update("jax_platforms", platforms)  # start on first use, which is still to come
