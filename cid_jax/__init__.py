"""cid_jax: ConsistentID in JAX/Flax.

The flow a sample takes: data/ (FGID records -> tf.data batches) -> models/ (frozen SD family +
ConsistentID adapters) -> train.py (sharded jitted step, orbax checkpoints) -> weights/ (export to
the reference PyTorch layout) -> inference.py (load a run, make images; generate.py is its command
line) -> scoring.py (the paper's metrics; evaluate.py is its command line).
"""
__version__ = "0.1.0"

import os

# Object stores through fsspec (gcsfs), not TensorFlow's GCS filesystem: see cid_jax/paths.py.
os.environ.setdefault("EPATH_USE_TF", "false")
if os.environ.get("STORAGE_EMULATOR_HOST"):  # an emulator has no storage-control API for gcsfs to ask
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from cid_jax import _platforms  # noqa: E402

_platforms.skip_absent_tpu()  # before anything imports JAX: no TPU probe (and its noise) without a TPU
