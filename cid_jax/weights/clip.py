"""Loading transformers CLIP checkpoints (a folder written by `save_pretrained`) into cid_jax.models.clip.

A folder holds `config.json` and `model.safetensors` (transformers 5 writes only this), or
`pytorch_model.bin` (transformers 4 with safe_serialization=False), or shards listed in
`model.safetensors.index.json` / `pytorch_model.bin.index.json`. The PyTorch keys come in three layouts,
all accepted:

* transformers >= 5 `CLIPTextModel.save_pretrained`: bare keys (`embeddings.token_embedding.weight`),
  because the model no longer wraps a `text_model`;
* transformers 4 and the hub checkpoints (SD1.5 `text_encoder`), `CLIPTextModelWithProjection`,
  `CLIPVisionModelWithProjection`: `text_model.` / `vision_model.` prefixes, plus the projection;
* a full `CLIPModel` (laion/CLIP-ViT-H-14-laion2B-s32B-b79K): both towers, both projections and
  `logit_scale`; the loader takes its tower and ignores the other one.

Loading is strict (`load_into`): every parameter must be found with the right shape and every key
must be used, apart from the `position_ids` buffers older transformers saved and, for a full
CLIPModel, the other tower. The returned params are the plain (unboxed) tree of host numpy arrays;
place them with `jax.device_put(params, cid_jax.sharding.param_shardings(abstract_params(model), mesh))`.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from cid_jax import errors, runtime
from cid_jax.models.clip import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                                 CLIPVisionConfig, CLIPVisionModelWithProjection, abstract_params)
from cid_jax.weights.state_dict import StateDict, load_into, read_sharded_folder

# Non-persistent buffers that transformers < 4.31 wrote into checkpoints; never parameters.
POSITION_ID_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# The keys of each tower in a full CLIPModel checkpoint (loading one tower skips the other's).
_TEXT_PARTS = ("text_model.", "text_projection.")
_VISION_PARTS = ("vision_model.", "visual_projection.")


def read_config(folder: os.PathLike) -> dict:
    path = pathlib.Path(folder) / "config.json"
    if not path.exists():
        raise errors.MissingError(f"no config.json in {folder}: expected a folder written by save_pretrained")
    return json.loads(path.read_text())


def is_full_clip(config: dict) -> bool:
    """A CLIPModel config (both towers nested) rather than a single-tower config."""
    return config.get("model_type") == "clip" or "text_config" in config or "vision_config" in config


def _read_weights(folder: os.PathLike, variant: str | None) -> StateDict:
    """transformers names its safetensors `model*.safetensors` but its pickles `pytorch_model*.bin`."""
    folder = pathlib.Path(folder)
    suffix = "" if variant is None else f".{variant}"
    for stem in (f"model{suffix}", f"pytorch_model{suffix}"):
        if any((folder / f"{stem}{ext}").exists()
               for ext in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")):
            return read_sharded_folder(folder, stem)
    raise errors.MissingError(
        f"no model{suffix}.safetensors, pytorch_model{suffix}.bin or a sharded index of either in "
        f"{folder}: expected a folder written by transformers' save_pretrained")


def text_state_dict_with_prefix(state_dict: StateDict) -> StateDict:
    """Prefixes transformers-5 bare CLIPTextModel keys with `text_model.` (our Flax tree has it)."""
    if any(k.startswith("text_model.") for k in state_dict):
        return dict(state_dict)
    return {f"text_model.{k}": v for k, v in state_dict.items()}


def _load(model, state_dict: StateDict, *, what: str, ignore: tuple[str, ...], param_dtype) -> dict:
    abstract = runtime.cached_shapes("clip", runtime.describe(model), lambda: abstract_params(model, boxed=False))
    return load_into(abstract, state_dict, what=what,
                     ignore=POSITION_ID_BUFFERS + ignore, dtype=np.dtype(param_dtype))


def _load_text(cls, folder, *, dtype, param_dtype, remat, variant):
    config = read_config(folder)
    model = cls(CLIPTextConfig.from_dict(config), remat=remat, dtype=dtype, param_dtype=param_dtype)
    state_dict = text_state_dict_with_prefix(_read_weights(folder, variant))
    ignore: tuple[str, ...] = ()
    if is_full_clip(config):  # a CLIPModel: skip the vision tower and logit_scale
        ignore = _VISION_PARTS + ("logit_scale",)
        if cls is CLIPTextModel:
            ignore += ("text_projection.",)
    params = _load(model, state_dict, what=f"{cls.__name__} from {folder}", ignore=ignore,
                   param_dtype=param_dtype)
    return model, params


def load_clip_text(folder: os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   remat: bool = False, variant: str | None = None):
    """A transformers CLIPTextModel folder (SD1.5 / SDXL `text_encoder`) -> (CLIPTextModel, params).

    `dtype` is the compute dtype of the module, `param_dtype` the dtype of the returned arrays;
    `variant` reads `model.<variant>.safetensors` (e.g. 'fp16').
    """
    return _load_text(CLIPTextModel, folder, dtype=dtype, param_dtype=param_dtype, remat=remat,
                      variant=variant)


def load_clip_text_with_projection(folder: os.PathLike, *, dtype: Any = jnp.float32,
                                   param_dtype: Any = jnp.float32, remat: bool = False,
                                   variant: str | None = None):
    """A CLIPTextModelWithProjection folder (SDXL `text_encoder_2`) -> (CLIPTextModelWithProjection, params)."""
    return _load_text(CLIPTextModelWithProjection, folder, dtype=dtype, param_dtype=param_dtype,
                      remat=remat, variant=variant)


def load_clip_vision_with_projection(folder: os.PathLike, *, dtype: Any = jnp.float32,
                                     param_dtype: Any = jnp.float32, remat: bool = False,
                                     variant: str | None = None):
    """A CLIPVisionModelWithProjection folder (the IP-Adapter `image_encoder`) or a full CLIPModel
    folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) -> (CLIPVisionModelWithProjection, params)."""
    config = read_config(folder)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(config), remat=remat, dtype=dtype,
                                          param_dtype=param_dtype)
    state_dict = _read_weights(folder, variant)
    ignore = _TEXT_PARTS + ("logit_scale",) if is_full_clip(config) else ()
    params = _load(model, state_dict, what=f"CLIPVisionModelWithProjection from {folder}",
                   ignore=ignore, param_dtype=param_dtype)
    return model, params
