"""Loading a diffusers `unet/` folder (config.json + diffusion_pytorch_model.{safetensors,bin})."""
from __future__ import annotations

import os
import pathlib

import jax.numpy as jnp

from cid_jax import errors, runtime
from cid_jax.models.unet import UNet2DConditionModel, UNetConfig, abstract_unet_params
from cid_jax.weights.state_dict import load_into, read_sharded_folder


def load_unet(folder: os.PathLike, dtype=jnp.float32, **module_kwargs):
    """Returns (UNet2DConditionModel, params) for a diffusers `unet/` folder.

    The module is built with the default processors; adapters are added to the tree separately.
    """
    folder = pathlib.Path(folder)
    if not (folder / "config.json").exists():
        raise errors.MissingError(f"{folder}/config.json not found: expected a diffusers unet/ folder")
    config = UNetConfig.from_json(folder / "config.json")
    module = UNet2DConditionModel(config, dtype=dtype, **module_kwargs)
    state = read_sharded_folder(folder, "diffusion_pytorch_model")
    plain = UNet2DConditionModel(config)
    abstract = runtime.cached_shapes("unet", runtime.describe(plain), lambda: abstract_unet_params(plain))
    params = load_into(abstract, state, what=f"UNet {folder}")
    return module, params
