"""Reading and writing flat PyTorch-style state dicts as numpy, and mapping them onto Flax trees.

A state dict here is `dict[str, np.ndarray]` keyed by PyTorch names (`down_blocks.0.resnets.1.conv1.weight`).
safetensors files are read without torch; pickled `.bin`/`.pth` files only through
`torch.load(weights_only=True)`, so no code inside a checkpoint ever runs.

The Flax side uses the diffusers-Flax / transformers-Flax parameter names
(`down_blocks_0/resnets_1/conv1/kernel`). `torch_key` turns one Flax path into its PyTorch key
by explicit rules: only the names in `LIST_NAMES` are PyTorch lists (`down_blocks_0` -> `down_blocks.0`),
so a module named `linear_1` stays `linear_1` (the pitfall of regex-based converters).
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

from cid_jax import errors

StateDict = dict[str, np.ndarray]

# Flax submodule names `<name>_<i>` that stand for element i of a PyTorch ModuleList/Sequential.
LIST_NAMES = frozenset({
    "down_blocks", "up_blocks", "attentions", "resnets", "transformer_blocks", "downsamplers",
    "upsamplers", "layers", "to_out", "net",
    "blocks", "controlnet_down_blocks",  # a ControlNet's conditioning encoder and its 1x1 output convs
})


class WeightsError(errors.InputError):
    """A checkpoint does not fit the model: names the keys or shapes involved."""


# ----------------------------------------------------------------------------------------- files


def _torch_load(path: os.PathLike, mmap: bool = False) -> dict:
    """`torch.load(weights_only=True)`: no code in the file runs. A refused pickle (one that holds
    objects other than tensors and containers) is a `WeightsError` naming the file, never a hint to
    switch the safety off."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            f"Reading the pickled checkpoint {path} needs PyTorch (pip install 'cid_jax[torch]'); "
            "safetensors files need no torch."
        ) from e
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; we never say that. Keep only what it found.
        found = [line.strip() for line in str(e).splitlines()
                 if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line]
        raise WeightsError(f"{path}: refused to unpickle: it holds more than tensors and containers "
                           f"({found[0] if found else 'an object of another type'}). Only plain state dicts are "
                           "read, so no code from a checkpoint ever runs; convert the file with its author's "
                           "tools, or get a .safetensors version") from None
    except (RuntimeError, EOFError, OSError) as e:
        if mmap and "mmap" in str(e):  # a legacy (non-zip) pickle cannot be memory-mapped
            return _torch_load(path, mmap=False)
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:  # numpy has no bf16: widen, exactly
        t = t.float()
    return t.detach().cpu().numpy()


def flatten_nested(tree: Mapping, sep: str = ".") -> dict:
    """{'a': {'b': x}} -> {'a.b': x} (for nested reference checkpoints)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            for k2, v2 in flatten_nested(v, sep).items():
                out[f"{k}{sep}{k2}"] = v2
        else:
            out[k] = v
    return out


def _safetensors_dtypes() -> dict:
    import ml_dtypes

    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


_SAFETENSORS_DTYPES = _safetensors_dtypes()


def _safetensors_header(path: pathlib.Path) -> tuple[dict, int]:
    """(the JSON header, the byte offset of the data) of a safetensors file: an 8-byte little-endian
    header length, the header, then the tensors' bytes (the format's specification)."""
    import json
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 0 or n > 100 * 2**20:
            raise WeightsError(f"{path}: not a safetensors file (no valid header)")
        if 8 + n > size:
            raise WeightsError(f"{path}: truncated: its header alone needs {8 + n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise WeightsError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightsError(f"{path}: truncated: the header promises {8 + n + end} bytes, the file has {size}")
    return header, 8 + n


def _read_tensor(path: pathlib.Path, offset: int, dtype, shape) -> np.ndarray:
    out = np.empty(shape, dtype)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
            raise WeightsError(f"{path}: truncated while reading a tensor at byte {offset}")
    if out.dtype.name == "bfloat16":  # numpy has no bf16 arithmetic: widen, exactly
        out = out.astype(np.float32)
    return out


class LazyStateDict(Mapping):
    """A read-only state dict over one or more checkpoint files that reads each tensor when it is
    asked for and keeps none, so converting a model tensor by tensor needs about one copy of its
    weights in host memory (safetensors: read per tensor; `.bin`: memory-mapped)."""

    def __init__(self):
        self._get: dict[str, Callable[[], np.ndarray]] = {}

    def add_file(self, path: pathlib.Path) -> "LazyStateDict":
        path = pathlib.Path(path)
        if not path.exists():
            raise errors.MissingError(f"checkpoint file not found: {path}")
        if path.suffix == ".safetensors":
            self._add_safetensors(path)
        elif path.suffix in (".bin", ".pth", ".pt", ".ckpt"):
            obj = _torch_load(path, mmap=True)
            if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
                obj = obj["state_dict"]
            for k, v in flatten_nested(obj).items():
                if hasattr(v, "detach"):
                    self._get[k] = (lambda t: lambda: _to_numpy(t))(v)
        else:
            raise WeightsError(f"unknown checkpoint format {path.suffix!r} for {path}")
        return self

    def _add_safetensors(self, path: pathlib.Path) -> None:
        """Reads the header once; each tensor is then one positioned read into a fresh array. Plain
        reads, not a memory map: the file's pages stay in the page cache, outside this process."""
        header, data_start = _safetensors_header(path)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if dtype is None or end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
                raise WeightsError(f"{path}: tensor {key} has an unsupported dtype {info['dtype']!r} or a wrong size")
            self._get[key] = functools.partial(_read_tensor, path, data_start + begin, dtype, shape)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._get[key]()

    def __iter__(self):
        return iter(self._get)

    def __len__(self) -> int:
        return len(self._get)

    def __contains__(self, key) -> bool:
        return key in self._get


def read_state_dict(path: os.PathLike) -> StateDict:
    """Reads a `.safetensors`, `.bin`, `.pth` or `.pt` file into a flat numpy state dict.

    Nested pickled dicts (the reference ConsistentID `.bin`) are flattened with '.'.
    """
    lazy = LazyStateDict().add_file(pathlib.Path(path))
    return {k: np.array(lazy[k]) for k in lazy}


def read_sharded_folder(folder: os.PathLike, stem: str) -> LazyStateDict:
    """The weights of `<stem>.safetensors` (or `.bin`), or of the shards listed in
    `<stem>.safetensors.index.json`, as a `LazyStateDict` (read tensor by tensor).

    `stem` is e.g. 'diffusion_pytorch_model' or 'model'. Prefers safetensors, as diffusers does.
    """
    import json

    folder = pathlib.Path(folder)
    for ext in (".safetensors", ".bin"):
        single = folder / f"{stem}{ext}"
        if single.exists():
            return LazyStateDict().add_file(single)
        index = folder / f"{stem}{ext}.index.json"
        if index.exists():
            lazy = LazyStateDict()
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                lazy.add_file(folder / shard)
            return lazy
    raise errors.MissingError(
        f"no {stem}.safetensors or {stem}.bin (or a sharded index) in {folder}: "
        "expected a folder written by save_pretrained")


def atomic_write(path: os.PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(tmp_path)`, then the file appears whole at `path` (local or remote): a crash
    never leaves half a file (`cid_jax.paths.write_atomic`)."""
    from cid_jax import paths

    paths.write_atomic(path, write)


def write_safetensors_atomic(tensors: Mapping[str, np.ndarray], path: os.PathLike,
                             metadata: Mapping[str, str] | None = None) -> None:
    """Writes a safetensors file atomically (see `atomic_write`)."""
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=dict(metadata) if metadata else None)
    write_bytes_atomic(path, data)


def write_bytes_atomic(path: os.PathLike, data: bytes) -> None:
    """`data` to `path` atomically, written by Python's own file I/O: a full disk or a file-size
    limit is an OSError naming the file (ENOSPC, EFBIG), where safetensors' and torch's writers
    raise errors of their own that say neither."""
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_bytes(data))


# -------------------------------------------------------------------------------- name mapping


def torch_component(name: str) -> str:
    """One Flax module name -> its PyTorch path segment (`down_blocks_0` -> `down_blocks.0`)."""
    head, sep, tail = name.rpartition("_")
    if sep and tail.isdigit() and head in LIST_NAMES:
        return f"{head}.{tail}"
    return name


def torch_key(path: tuple[str, ...], ndim: int) -> str:
    """A Flax param path -> its PyTorch state-dict key.

    kernel -> weight (Dense or Conv), scale -> weight (norms), embedding -> weight (Embed).
    """
    *modules, leaf = path
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join([torch_component(m) for m in modules] + [leaf])


def torch_to_flax_array(path: tuple[str, ...], value: np.ndarray, flax_ndim: int) -> np.ndarray:
    """PyTorch layout -> Flax layout for one tensor (Linear W.T, Conv OIHW -> HWIO)."""
    if path[-1] == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:
            return value.T
    return value


def flax_to_torch_array(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Flax layout -> PyTorch layout (inverse of `torch_to_flax_array`)."""
    if path[-1] == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (3, 2, 0, 1))
        if value.ndim == 2:
            return value.T
    return value


KeyFn = Callable[[tuple[str, ...], int], str]


def load_into(abstract_params, state_dict: Mapping[str, np.ndarray], *, what: str,
              key_fn: KeyFn = torch_key, ignore: Iterable[str] = (),
              dtype=np.float32) -> dict:
    """Fills a Flax param tree (shapes from `jax.eval_shape(model.init, ...)`) from a state dict.

    Strict in both directions: every Flax param needs its key, every state-dict key must be used
    (except those matching a prefix in `ignore`), and shapes must agree after the layout change.
    Errors name the keys and both shapes.
    """
    flat = traverse_util.flatten_dict(abstract_params)
    out, used, missing, bad_shapes, bad_dtypes = {}, set(), [], [], []
    for path, leaf in flat.items():
        key = key_fn(path, len(leaf.shape))
        if key not in state_dict:
            missing.append(key)
            continue
        raw = np.asarray(state_dict[key])  # one tensor at a time (state_dict may be lazy)
        value = torch_to_flax_array(path, raw, len(leaf.shape))
        if tuple(value.shape) != tuple(leaf.shape):
            bad_shapes.append(f"{key}: checkpoint {tuple(raw.shape)} "
                              f"(as Flax {tuple(value.shape)}) vs model {tuple(leaf.shape)} at {'/'.join(path)}")
            continue
        if not np.issubdtype(raw.dtype, np.floating):
            bad_dtypes.append(f"{key}: checkpoint holds {raw.dtype} values where the model has a "
                              f"floating-point weight ({'/'.join(path)})")
            continue
        used.add(key)
        out[path] = np.ascontiguousarray(value, dtype=dtype)
        del raw, value
    ignore = tuple(ignore)
    unexpected = sorted(k for k in state_dict if k not in used and not k.startswith(ignore))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + ", ".join(missing[:20])
                        + (" ..." if len(missing) > 20 else ""))
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} shape mismatch(es): " + "; ".join(bad_shapes[:20]))
    if bad_dtypes:
        problems.append(f"{len(bad_dtypes)} dtype mismatch(es): " + "; ".join(bad_dtypes[:20]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:20])
                        + (" ..." if len(unexpected) > 20 else ""))
    if problems:
        raise WeightsError(f"{what}: checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict(out)


def export_from(params, *, key_fn: KeyFn = torch_key, dtype=np.float32) -> StateDict:
    """A Flax param tree -> a flat PyTorch state dict (numpy)."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        out[key_fn(path, value.ndim)] = np.ascontiguousarray(flax_to_torch_array(path, value),
                                                             dtype=dtype)
    return out
