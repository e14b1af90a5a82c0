"""cid_jax: ConsistentID in JAX/Flax.

The flow a sample takes: data/ (FGID records -> tf.data batches) -> models/ (frozen SD family +
ConsistentID adapters) -> train.py (sharded jitted step, orbax checkpoints) -> weights/ (export to
the reference PyTorch layout) -> generate.py.
"""
__version__ = "0.1.0"

from cid_jax import _platforms

_platforms.skip_absent_tpu()  # before anything imports JAX: no TPU probe (and its noise) without a TPU
