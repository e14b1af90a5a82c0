"""ControlNet (Zhang et al. 2023) in Flax, with diffusers' `ControlNetModel` parameter names.

A ControlNet is the UNet's encoder half (time embedding, `conv_in`, down blocks, mid block) plus a
small convolutional encoder of the control image, whose output is added after `conv_in`. Each skip
connection and the mid block's output go through a 1x1 convolution (zero-initialised in training),
and the results are added to the UNet's own skips and mid output (`UNet2DConditionModel(control=)`).

The control image is NHWC in [0, 1] at the output resolution (8x the latents' side for SD).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cid_jax.models.layers import conv
from cid_jax.models.unet import DownBlock, MidBlock, UNetConfig, conditioned_time_embedding

CHANNEL_ORDERS = ("rgb", "bgr")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """A diffusers ControlNet config.json: the UNet fields it shares, and its own."""
    unet: UNetConfig = UNetConfig()
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    channel_order: str = "rgb"               # diffusers' controlnet_conditioning_channel_order
    global_pool_conditions: bool = False     # residuals averaged over space (shuffle-type ControlNets)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ControlNetConfig":
        order = d.get("controlnet_conditioning_channel_order", "rgb")
        if order not in CHANNEL_ORDERS:
            raise ValueError(f"ControlNet config controlnet_conditioning_channel_order={order!r} is not one of "
                             f"{CHANNEL_ORDERS}")
        if d.get("class_embed_type") is not None or d.get("num_class_embeds") is not None:
            raise ValueError("ControlNet class embeddings (class_embed_type / num_class_embeds) are not supported")
        return cls(unet=UNetConfig.from_dict({k: v for k, v in d.items() if k != "up_block_types"}),
                   conditioning_channels=int(d.get("conditioning_channels", 3)),
                   conditioning_embedding_out_channels=tuple(d.get("conditioning_embedding_out_channels")
                                                             or (16, 32, 96, 256)),
                   channel_order=order, global_pool_conditions=bool(d.get("global_pool_conditions", False)))

    @classmethod
    def from_json(cls, path: os.PathLike) -> "ControlNetConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


class ConditioningEmbedding(nn.Module):
    """The control image's encoder: conv-SiLU, then per level a conv and a stride-2 conv (each
    followed by SiLU), then a conv to the UNet's first width: the image side / 2^(levels-1)."""
    out_channels: int
    block_out_channels: tuple[int, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = self.block_out_channels
        h = nn.silu(conv(widths[0], 3, "conv_in", **kw)(image))
        for i in range(len(widths) - 1):
            h = nn.silu(conv(widths[i], 3, f"blocks_{2 * i}", **kw)(h))
            h = nn.silu(conv(widths[i + 1], 3, f"blocks_{2 * i + 1}", stride=2, **kw)(h))
        return conv(self.out_channels, 3, "conv_out", **kw)(h)


class ControlNetModel(nn.Module):
    """(down residuals, mid residual) for the UNet, from the noisy latents, the timestep, the text
    context and the control image, each scaled by `conditioning_scale` (diffusers' forward)."""
    config: ControlNetConfig = ControlNetConfig()
    attention_kernel: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, control_image, conditioning_scale=1.0,
                 added_cond: Optional[Mapping] = None, guess_mode: bool = False):
        cfg, kw = self.config.unet, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(config=cfg, attention_kernel=self.attention_kernel, **kw)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        temb = conditioned_time_embedding(cfg, timesteps, added_cond, **kw)
        context = encoder_hidden_states.astype(self.dtype)
        if self.config.channel_order == "bgr":
            control_image = control_image[..., ::-1]
        h = conv(cfg.block_out_channels[0], 3, "conv_in", **kw)(sample.astype(self.dtype))
        h = h + ConditioningEmbedding(cfg.block_out_channels[0], self.config.conditioning_embedding_out_channels,
                                      name="controlnet_cond_embedding", **kw)(control_image.astype(self.dtype))
        skips = [h]
        for i in range(len(cfg.down_block_types)):
            h, block_skips = DownBlock(index=i, name=f"down_blocks_{i}", **block_kw)(h, temb, context, {})
            skips.extend(block_skips)
        h = MidBlock(index=0, name="mid_block", **block_kw)(h, temb, context, {})
        down = [conv(x.shape[-1], 1, f"controlnet_down_blocks_{k}", **kw)(x) for k, x in enumerate(skips)]
        mid = conv(h.shape[-1], 1, "controlnet_mid_block", **kw)(h)
        if guess_mode and not self.config.global_pool_conditions:
            # Guess mode: the shallow residuals count less (10^-1 ... 10^0 from the first to the mid).
            scales = jnp.logspace(-1.0, 0.0, len(down) + 1) * conditioning_scale
            down = [x * scales[k] for k, x in enumerate(down)]
            mid = mid * scales[-1]
        else:
            down = [x * conditioning_scale for x in down]
            mid = mid * conditioning_scale
        if self.config.global_pool_conditions:
            down = [jnp.mean(x, axis=(1, 2), keepdims=True) for x in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return down, mid

    def dummy_inputs(self, batch: int = 1, size: Optional[int] = None, text_len: int = 77) -> dict:
        """Shapes-only inputs for `init`/`eval_shape`."""
        cfg = self.config.unet
        size = size or 8 * 2 ** (len(cfg.block_out_channels) - 1)
        factor = 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)
        inputs = dict(
            sample=jax.ShapeDtypeStruct((batch, size, size, cfg.in_channels), jnp.float32),
            timesteps=jax.ShapeDtypeStruct((batch,), jnp.int32),
            encoder_hidden_states=jax.ShapeDtypeStruct((batch, text_len, cfg.cross_attention_dim), jnp.float32),
            control_image=jax.ShapeDtypeStruct((batch, size * factor, size * factor,
                                                self.config.conditioning_channels), jnp.float32))
        if cfg.addition_embed_type == "text_time":
            text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs["added_cond"] = dict(text_embeds=jax.ShapeDtypeStruct((batch, text_dim), jnp.float32),
                                        time_ids=jax.ShapeDtypeStruct((batch, 6), jnp.float32))
        return inputs


def sum_controls(controls: Sequence[tuple]) -> Optional[tuple]:
    """Several ControlNets act as one: their residuals are summed (diffusers' MultiControlNetModel)."""
    if not controls:
        return None
    down, mid = controls[0]
    for more_down, more_mid in controls[1:]:
        down = [a + b for a, b in zip(down, more_down)]
        mid = mid + more_mid
    return down, mid


def abstract_controlnet_params(module: ControlNetModel):
    """The ControlNet's param tree as ShapeDtypeStructs (traced, nothing allocated or compiled)."""
    return nn.meta.unbox(jax.eval_shape(lambda inp: module.init(jax.random.key(0), **inp),
                                        module.dummy_inputs())["params"])
