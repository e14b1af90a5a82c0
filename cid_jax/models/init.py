"""Parameters from abstract shapes, without compiling anything.

`module.init` creates parameters by *running* the module, so a jitted init compiles the whole
network (minutes for a full-size UNet on a GPU host, most of it for code whose result is thrown
away), and even a jitted program of only random draws compiles slowly once it has hundreds of
leaves. Here the tree comes from `jax.eval_shape(module.init, ...)` (tracing only) and every leaf is
drawn on the host with numpy, leaf by leaf on a few threads (peak host memory: a leaf per thread),
then placed on its sharding. Leaf k of a tree draws from `numpy.random.default_rng([seed, k])`, so
the values depend only on (seed, tree), not on the order, the threads or the machine.

Each leaf's distribution is the one its module declares:

    .../<proj>_lora/down/kernel   N(0, (1/rank)^2)            (LoRALinear: the reference's LoRA init)
    .../<proj>_lora/up/kernel     0                           (a fresh adapter changes nothing)
    kernel                        LeCun normal over fan-in    (every Dense and Conv: `dense_init`/`conv_init`:
                                  truncated at 2 std, as flax's `lecun_normal`)
    bias                          0
    scale                         1                           (LayerNorm / GroupNorm)
    embedding                     N(0, 0.02^2)                (CLIP token and position embeddings)
    cls_token, position_embeddings  N(0, 0.02^2)              (ViT, as transformers initialises them)
    class_embedding, latents      N(0, 1 / width)             (CLIP vision; Perceiver latents)

A parameter name without a rule is an error (a new module must add its rule here).
"""
from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Path = tuple[str, ...]
Draw = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]

# flax's lecun_normal: a normal truncated to [-2, 2], rescaled to unit variance.
_TRUNCATED_STD = 0.87962566103423978


def _normal(std: float) -> Draw:
    return lambda rng, shape: rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _truncated_normal(std: float) -> Draw:
    def draw(rng, shape):
        z = rng.standard_normal(shape, dtype=np.float32)
        bad = np.abs(z) > 2
        while bad.any():  # redraw the ~4.6% outside two standard deviations
            z[bad] = rng.standard_normal(int(bad.sum()), dtype=np.float32)
            bad = np.abs(z) > 2
        return z * np.float32(std / _TRUNCATED_STD)
    return draw


def _constant(value: float) -> Draw:
    return lambda rng, shape: np.full(shape, value, np.float32)


def initializer(path: Path, shape: tuple[int, ...]) -> Draw:
    """The host draw (rng, shape) -> float32 array of the parameter at `path`."""
    name = path[-1]
    parent = path[-2] if len(path) > 1 else ""
    owner = path[-3] if len(path) > 2 else ""
    if owner.endswith("_lora") and name == "kernel":
        if parent == "down":
            return _normal(1.0 / shape[-1])
        if parent == "up":
            return _constant(0.0)
    if name == "kernel":
        return _truncated_normal(1.0 / math.sqrt(max(1, int(np.prod(shape[:-1])))))
    if name == "bias":
        return _constant(0.0)
    if name == "scale":
        return _constant(1.0)
    if name in ("embedding", "cls_token", "position_embeddings"):
        return _normal(0.02)
    if name in ("class_embedding", "latents"):
        return _normal(shape[-1] ** -0.5)
    raise ValueError(f"no initializer rule for parameter {'/'.join(path)} (add one in {__name__})")


def _path_names(path) -> Path:
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def random_params(abstract, seed: int, dtype: Optional[Any] = None, shardings=None):
    """Values for an abstract (optionally logically boxed) param tree: host numpy arrays, or, with
    `shardings` (a matching tree of Shardings), device arrays placed leaf by leaf.

    `dtype`: storage dtype of floating leaves (default: each leaf's own)."""
    abstract = nn.meta.unbox(abstract)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    targets = jax.tree.leaves(shardings) if shardings is not None else [None] * len(with_paths)
    if len(targets) != len(with_paths):
        raise ValueError(f"{len(targets)} shardings for {len(with_paths)} parameters")

    def leaf_value(k: int):
        (path, leaf), target = with_paths[k], targets[k]
        shape = tuple(int(d) for d in leaf.shape)
        value = initializer(_path_names(path), shape)(np.random.default_rng([int(seed), k]), shape)
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        value = value.astype(dtype if dtype is not None and floating else leaf.dtype)
        return value if target is None else jax.device_put(value, target)

    # numpy's generators release the GIL while they fill an array, so leaves drawn on a few threads
    # take a fraction of the time (a full-size SD1.5 is ~1.7e9 draws: over a minute on one core).
    # Each leaf keeps its own generator, so the values do not depend on the threads.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        out = list(pool.map(leaf_value, range(len(with_paths))))
    return jax.tree.unflatten(treedef, out)
