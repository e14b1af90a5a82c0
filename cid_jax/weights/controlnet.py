"""Loading a diffusers ControlNet folder (config.json + diffusion_pytorch_model.{safetensors,bin})."""
from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp

from cid_jax import errors, runtime
from cid_jax.models.controlnet import ControlNetConfig, ControlNetModel, abstract_controlnet_params
from cid_jax.models.unet import UNetConfig
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


def check_fits(config: ControlNetConfig, unet: UNetConfig, name: str = "the ControlNet") -> None:
    """A ControlNet steers only a UNet of its own base model: the same widths, levels, text context
    and added embedding (an SDXL ControlNet on an SD1.5 UNet, say, is refused before anything runs).
    The input channels may differ: a 9-channel inpainting UNet is steered by a 4-channel ControlNet
    that sees the latents alone."""
    fields = ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
              "addition_embed_type")
    differ = [f"{f}: {getattr(config.unet, f)!r} vs the UNet's {getattr(unet, f)!r}" for f in fields
              if getattr(config.unet, f) != getattr(unet, f)]
    if differ:
        raise errors.InputError(f"{name} was made for another base model ({'; '.join(differ)})")
