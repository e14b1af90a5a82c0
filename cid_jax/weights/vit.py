"""Loading transformers ViT checkpoints (facebook/dino-vits16) into cid_jax.models.vit.

A folder holds `config.json` and `model.safetensors` (what transformers 5 `save_pretrained` writes),
or `pytorch_model.bin` (the hub's older DINO files), or shards listed in
`model.safetensors.index.json` / `pytorch_model.bin.index.json`. The keys are in the on-disk layout
that `save_pretrained` keeps (`encoder.layer.0.attention.attention.query.weight`), and come bare
(`ViTModel`) or under `vit.` (`ViTForImageClassification` and its relatives), which is stripped.

Loading is strict (`load_into`): every parameter must be found with the right shape and every key
must be used, apart from the heads a backbone does not have: `pooler.*` (a `ViTModel` saved with its
pooling layer) and `classifier.*` (an image-classification checkpoint). The returned params are the
plain (unboxed) tree of host numpy arrays; place them with
`jax.device_put(params, cid_jax.sharding.param_shardings(abstract_params(model), mesh))`.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from cid_jax import errors
from cid_jax.models.vit import ViTConfig, ViTModel, abstract_params
from cid_jax.weights.clip import read_config
from cid_jax.weights.state_dict import StateDict, load_into, read_sharded_folder, torch_key

# Wrappers around the backbone whose weights sit under this prefix (ViTForImageClassification, ...).
BACKBONE_PREFIX = "vit."
# Heads next to the backbone that the DINO embedding does not use; skipped by name, nothing else is.
HEAD_PREFIXES = ("pooler.", "classifier.")


def vit_key(path: tuple[str, ...], ndim: int) -> str:
    """A Flax param path of `ViTModel` -> its PyTorch key: `encoder/layer_3/...` -> `encoder.layer.3...`.

    `layer` is not among the generic list names of `torch_key` (a module may legitimately be called
    `layer_1` elsewhere), so the ViT encoder's list is mapped here, by position in the path.
    """
    parts = list(path)
    if len(parts) > 1 and parts[0] == "encoder":
        head, _, index = parts[1].rpartition("_")
        if head == "layer" and index.isdigit():
            parts[1:2] = ["layer", index]
    # torch_key leaves segments without a list name alone, and maps kernel/scale -> weight.
    return torch_key(tuple(parts), ndim)


class _StrippedPrefix(Mapping):
    """A read-only view of a (lazy) state dict with `prefix` removed from the keys that have it;
    other keys pass through unchanged, so `load_into` still sees (and reports) them."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], prefix: str):
        self._sd = state_dict
        self._names = {(k[len(prefix):] if k.startswith(prefix) else k): k for k in state_dict}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._sd[self._names[key]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key) -> bool:
        return key in self._names


def backbone_state_dict(state_dict: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """The ViTModel keys of a checkpoint: bare keys as they are, `vit.`-prefixed ones stripped."""
    if any(k.startswith(BACKBONE_PREFIX) for k in state_dict):
        return _StrippedPrefix(state_dict, BACKBONE_PREFIX)
    return state_dict


def _read_weights(folder: pathlib.Path) -> StateDict:
    """transformers names its safetensors `model*.safetensors` but its pickles `pytorch_model*.bin`."""
    for stem in ("model", "pytorch_model"):
        if any((folder / f"{stem}{ext}").exists()
               for ext in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")):
            return read_sharded_folder(folder, stem)
    raise errors.MissingError(
        f"no model.safetensors, pytorch_model.bin or a sharded index of either in {folder}: "
        "expected a ViT folder written by transformers' save_pretrained")


def vit_config_from_folder(folder: os.PathLike) -> ViTConfig:
    """The folder's config.json as a ViTConfig; a config of another model is refused by name."""
    config = read_config(folder)
    model_type = config.get("model_type")
    if model_type != "vit":
        arch = ", ".join(config.get("architectures") or []) or "unknown architecture"
        raise errors.InputError(f"{folder} is not a ViT checkpoint: its config.json has model_type "
                                f"{model_type!r} ({arch}); expected 'vit' (e.g. facebook/dino-vits16)")
    try:
        return ViTConfig.from_dict(config)
    except ValueError as e:
        raise errors.InputError(f"{folder}/config.json: {e}") from None


def load_vit(folder: os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    """A transformers ViT folder (facebook/dino-vits16) -> (ViTModel, params).

    `dtype` is the compute dtype of the module, `param_dtype` the dtype of the returned arrays.
    """
    folder = pathlib.Path(folder)
    model = ViTModel(vit_config_from_folder(folder), dtype=dtype, param_dtype=param_dtype)
    state_dict = backbone_state_dict(_read_weights(folder))
    params = load_into(abstract_params(model, boxed=False), state_dict, what=f"ViTModel from {folder}",
                       key_fn=vit_key, ignore=HEAD_PREFIXES, dtype=np.dtype(param_dtype))
    return model, params
