"""diffusers-Flax / transformers-Flax msgpack checkpoints (`diffusion_flax_model.msgpack`,
`flax_model.msgpack`).

Such a file is `flax.serialization.msgpack_serialize` of the nested param dict (no 'params'
wrapper). Our modules use the same names, so loading is a restore plus a strict comparison with the
model's expected tree: every missing or unexpected path and every shape mismatch is named. Kernels are
already in Flax layout (HWIO convs, [in, out] dense), so nothing is transposed.
"""
from __future__ import annotations

import os
import pathlib
from typing import Callable, Mapping, Union

import numpy as np
from flax import serialization, traverse_util

from cid_jax import errors
from cid_jax.weights.state_dict import WeightsError, atomic_write

Path = tuple[str, ...]
# Either a {checkpoint module name: our module name} table applied to every path component, or a
# function of the whole checkpoint path.
Rename = Union[Mapping[str, str], Callable[[Path], Path], None]


def read_msgpack(path: os.PathLike) -> dict:
    """Reads a Flax msgpack file into a nested dict of numpy arrays (bf16 stays ml_dtypes bf16)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise errors.MissingError(f"msgpack checkpoint not found: {path}")
    tree = serialization.msgpack_restore(path.read_bytes())
    if not isinstance(tree, Mapping):
        raise WeightsError(f"{path}: expected a nested dict of arrays, got {type(tree).__name__}")
    return tree


def write_msgpack_atomic(params: Mapping, path: os.PathLike) -> None:
    """Writes a param tree as a Flax msgpack file via a temp file and rename."""
    tree = traverse_util.unflatten_dict(
        {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params)).items()})
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_bytes(serialization.msgpack_serialize(tree)))


def _rename_fn(rename: Rename) -> Callable[[Path], Path]:
    if rename is None:
        return lambda p: p
    if callable(rename):
        return rename
    table = dict(rename)
    return lambda p: tuple(table.get(part, part) for part in p)


def load_msgpack_into(abstract_params: Mapping, source: Union[os.PathLike, Mapping], *, what: str,
                      rename: Rename = None, dtype=np.float32) -> dict:
    """Fills a param tree (shapes from `jax.eval_shape`, unboxed) from a msgpack file or its tree.

    `source` is a path or an already restored nested dict. A single top-level 'params' wrapper is
    removed if the model tree has none. `rename` maps checkpoint names onto ours (see `Rename`).
    Strict: raises `WeightsError` naming missing paths, unexpected paths and shape mismatches.
    """
    tree = read_msgpack(source) if not isinstance(source, Mapping) else source
    if set(tree) == {"params"} and "params" not in abstract_params:
        tree = tree["params"]
    to_ours = _rename_fn(rename)
    ckpt = {}
    for path, value in traverse_util.flatten_dict(dict(tree)).items():
        ckpt[to_ours(tuple(str(p) for p in path))] = (path, value)
    expected = traverse_util.flatten_dict(dict(abstract_params))
    out, missing, bad_shapes = {}, [], []
    for path, leaf in expected.items():
        if path not in ckpt:
            missing.append("/".join(path))
            continue
        src_path, value = ckpt[path]
        value = np.asarray(value)
        if tuple(value.shape) != tuple(leaf.shape):
            bad_shapes.append(f"{'/'.join(src_path)}: checkpoint {tuple(value.shape)} "
                              f"vs model {tuple(leaf.shape)}")
            continue
        out[path] = value.astype(dtype)
    unexpected = sorted("/".join(ckpt[p][0]) for p in ckpt if p not in expected)
    problems = []
    for label, items in (("missing path(s)", missing), ("shape mismatch(es)", bad_shapes),
                         ("unexpected path(s)", unexpected)):
        if items:
            problems.append(f"{len(items)} {label}: " + ", ".join(items[:20])
                            + (" ..." if len(items) > 20 else ""))
    if problems:
        raise WeightsError(f"{what}: msgpack checkpoint does not match the model:\n  "
                           + "\n  ".join(problems))
    return traverse_util.unflatten_dict(out)
