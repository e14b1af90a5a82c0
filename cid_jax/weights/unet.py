"""Loading a diffusers `unet/` folder (config.json + diffusion_pytorch_model.{safetensors,bin})."""
from __future__ import annotations

import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from cid_jax.models.unet import UNet2DConditionModel, UNetConfig
from cid_jax.weights.state_dict import load_into, read_sharded_folder


def unet_dummy_inputs(config: UNetConfig, batch: int = 1, size: int | None = None, text_len: int = 77):
    """Shapes-only inputs for `init`/`eval_shape`."""
    size = size or config.sample_size
    inputs = dict(
        sample=jax.ShapeDtypeStruct((batch, size, size, config.in_channels), jnp.float32),
        timesteps=jax.ShapeDtypeStruct((batch,), jnp.int32),
        encoder_hidden_states=jax.ShapeDtypeStruct((batch, text_len, config.cross_attention_dim),
                                                   jnp.float32))
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond"] = dict(text_embeds=jax.ShapeDtypeStruct((batch, text_dim), jnp.float32),
                                    time_ids=jax.ShapeDtypeStruct((batch, 6), jnp.float32))
    return inputs


def abstract_unet_params(module: UNet2DConditionModel, boxed: bool = False):
    """The UNet's param tree as ShapeDtypeStructs (no allocation, no compile of the init)."""
    inputs = unet_dummy_inputs(module.config, size=8 * 2 ** (len(module.config.block_out_channels) - 1))
    shapes = jax.eval_shape(lambda inp: module.init(jax.random.key(0), **inp), inputs)["params"]
    return shapes if boxed else nn.meta.unbox(shapes)


def load_unet(folder: os.PathLike, dtype=jnp.float32, **module_kwargs):
    """Returns (UNet2DConditionModel, params) for a diffusers `unet/` folder.

    The module is built with the default processors; adapters are added to the tree separately.
    """
    folder = pathlib.Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}/config.json not found: expected a diffusers unet/ folder")
    config = UNetConfig.from_json(folder / "config.json")
    module = UNet2DConditionModel(config, dtype=dtype, **module_kwargs)
    state = read_sharded_folder(folder, "diffusion_pytorch_model")
    params = load_into(abstract_unet_params(UNet2DConditionModel(config)), state,
                       what=f"UNet {folder}")
    return module, params
