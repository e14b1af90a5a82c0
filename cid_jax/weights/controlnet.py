"""Loading a diffusers ControlNet folder (config.json + diffusion_pytorch_model.{safetensors,bin})."""
from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp

from cid_jax import errors, runtime
from cid_jax.models.controlnet import ControlNetConfig, ControlNetModel, abstract_controlnet_params
from cid_jax.weights.state_dict import load_into, read_sharded_folder


def load_controlnet(folder: os.PathLike, dtype=jnp.float32, **module_kwargs):
    """Returns (ControlNetModel, params) for a diffusers ControlNet folder (e.g.
    lllyasviel/control_v11p_sd15_inpaint), read tensor by tensor as the UNet is."""
    folder = pathlib.Path(folder)
    if not (folder / "config.json").exists():
        raise errors.MissingError(f"{folder}/config.json not found: expected a diffusers ControlNet folder")
    kind = json.loads((folder / "config.json").read_text()).get("_class_name", "ControlNetModel")
    if kind != "ControlNetModel":
        raise errors.InputError(f"{folder} holds a diffusers {kind}, not a ControlNetModel")
    config = ControlNetConfig.from_json(folder / "config.json")
    module = ControlNetModel(config, dtype=dtype, **module_kwargs)
    plain = ControlNetModel(config)
    abstract = runtime.cached_shapes("controlnet", runtime.describe(plain), lambda: abstract_controlnet_params(plain))
    state = read_sharded_folder(folder, "diffusion_pytorch_model")
    return module, load_into(abstract, state, what=f"ControlNet {folder}")
