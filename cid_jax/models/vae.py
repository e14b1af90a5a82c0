"""diffusers `AutoencoderKL` in Flax linen (NHWC), with the diffusers-Flax parameter names.

Images are NHWC in [-1, 1]; latents are NHWC with `latent_channels` channels, 2**(len(blocks)-1)
times smaller. The tree mirrors diffusers' PyTorch modules one to one so `torch_key` finds every
weight:

    encoder/conv_in, encoder/down_blocks_i/{resnets_j, downsamplers_0/conv},
    encoder/mid_block/{resnets_0, attentions_0/{group_norm,to_q,to_k,to_v,to_out_0}, resnets_1},
    encoder/{conv_norm_out, conv_out}, quant_conv, post_quant_conv,
    decoder/conv_in, decoder/mid_block/..., decoder/up_blocks_i/{resnets_j, upsamplers_0/conv},
    decoder/{conv_norm_out, conv_out}

(diffusers' own Flax VAE called the attention projections query/key/value/proj_attn; we use the
names of the current PyTorch module, see `cid_jax.weights.vae` for loading the old names.)

Every norm in the VAE uses eps 1e-6 (diffusers passes resnet_eps=1e-6 throughout), unlike the UNet.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from cid_jax.models import presets
from cid_jax.models.attention import Attention
from cid_jax.models.layers import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv

log = logging.getLogger(__name__)

VAE_EPS = 1e-6
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"


# ------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The diffusers AutoencoderKL config fields this module reads (defaults are diffusers')."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple[float, ...]] = None
    latents_std: Optional[tuple[float, ...]] = None
    # SDXL's VAE overflows in fp16; pipelines then run it in fp32. bf16 has fp32's range, so we only
    # act on it for float16 compute (see `cid_jax.weights.vae.load_vae`).
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    # Keys of a diffusers config.json that we accept only with these values.
    _FIXED = {"act_fn": ("silu",)}
    # Keys that carry no architecture (bookkeeping) or that we read separately.
    _IGNORED = ("_class_name", "_diffusers_version", "_name_or_path", "down_block_types",
                "up_block_types")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        for key, allowed in cls._FIXED.items():
            if key in d and d[key] not in allowed:
                raise ValueError(f"VAE config {key}={d[key]!r} is not supported (supported: {allowed})")
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for key, kind in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = tuple(d.get(key, (kind,) * n))
            if any(t != kind for t in types) or len(types) != n:
                raise ValueError(f"VAE config {key}={types!r}: only {n} x {kind!r} is supported "
                                 f"(one per entry of block_out_channels)")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and k not in cls._FIXED
                         and k not in cls._IGNORED)
        if unknown:  # newer diffusers keys: harmless only if they keep their defaults
            log.warning("VAE config: ignoring unknown keys %s", unknown)
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
        config = cls(**kw)
        for c in config.block_out_channels:
            if c % config.norm_num_groups:
                raise ValueError(f"VAE config: norm_num_groups={config.norm_num_groups} does not divide "
                                 f"block channels {config.block_out_channels}")
        return config

    @classmethod
    def from_json(cls, path: os.PathLike) -> "VAEConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """VAE latent -> diffusion latent: (z - shift) * scaling_factor (diffusers' pipelines)."""
        shift = 0.0 if self.shift_factor is None else self.shift_factor
        return (z - shift) * self.scaling_factor

    def unscale_latents(self, z: jax.Array) -> jax.Array:
        """Diffusion latent -> VAE latent, the inverse of `scale_latents` (before `decode`)."""
        shift = 0.0 if self.shift_factor is None else self.shift_factor
        return z / self.scaling_factor + shift


SD15_VAE = VAEConfig.from_dict(presets.SD15_VAE)
SDXL_VAE = VAEConfig.from_dict(presets.SDXL_VAE)


# ------------------------------------------------------------------------------ distribution


@struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element (a pytree, NHWC)."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """[..., 2C] -> mean = first C channels, logvar = last C, clipped to [-30, 20] as diffusers."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(self || N(0, 1)) summed over H, W, C -> [B]."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


# ---------------------------------------------------------------------------------- blocks


class SpatialSelfAttention(Attention):
    """The VAE mid-block attention: GroupNorm -> self-attention over H*W tokens -> + residual.

    It is diffusers' `Attention(..., norm_num_groups, residual_connection=True, bias=True)` applied to
    a feature map: `group_norm` sits next to the projections (attentions_0/group_norm), so this
    extends `Attention` rather than wrapping it (a wrapper would nest the projections one level
    deeper than the checkpoint has them). The VAE uses one head of width `channels` and an output
    rescale factor of 1.
    """
    num_groups: int = 32
    eps: float = VAE_EPS

    def setup(self):
        super().setup()
        self.group_norm = GroupNorm(self.num_groups, self.eps, dtype=self.dtype,
                                    param_dtype=self.param_dtype)

    def __call__(self, x, **attention_kwargs):
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        out = self.processor(self, tokens, None, mask=None, **attention_kwargs)
        return x.astype(out.dtype) + out.reshape(b, h, w, c)


class MidBlock2D(nn.Module):
    """diffusers UNetMidBlock2D without time embedding: resnet, (attention, resnet)."""
    channels: int
    groups: int
    add_attention: bool = True
    attention_kernel: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, self.groups, VAE_EPS, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = SpatialSelfAttention(query_dim=self.channels, heads=1, dim_head=self.channels,
                                     qkv_bias=True, num_groups=self.groups, kernel=self.attention_kernel,
                                     name="attentions_0", **kw)(x)
        return ResnetBlock2D(self.channels, self.groups, VAE_EPS, name="resnets_1", **kw)(x)


class DownEncoderBlock2D(nn.Module):
    """`layers` resnets (the first changes the width), then a stride-2 conv unless last."""
    out_channels: int
    layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.layers):
            x = ResnetBlock2D(self.out_channels, self.groups, VAE_EPS, name=f"resnets_{j}", **kw)(x)
        if self.add_downsample:  # diffusers: padding=0 + F.pad(0, 1, 0, 1), i.e. bottom/right only
            x = Downsample2D(self.out_channels, asymmetric_pad=True, name="downsamplers_0", **kw)(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`layers` resnets (the decoder has layers_per_block + 1), then 2x nearest + conv unless last."""
    out_channels: int
    layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.layers):
            x = ResnetBlock2D(self.out_channels, self.groups, VAE_EPS, name=f"resnets_{j}", **kw)(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """Image [B,H,W,in] -> moments [B,H/f,W/f,2*latent] (double_z: mean and logvar)."""
    config: VAEConfig
    attention_kernel: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans, g = cfg.block_out_channels, cfg.norm_num_groups
        x = conv(chans[0], 3, "conv_in", **kw)(x.astype(self.dtype))
        for i, ch in enumerate(chans):
            x = DownEncoderBlock2D(ch, cfg.layers_per_block, g, add_downsample=i < len(chans) - 1,
                                   name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock2D(chans[-1], g, cfg.mid_block_add_attention, self.attention_kernel, name="mid_block",
                       **kw)(x)
        x = nn.silu(GroupNorm(g, VAE_EPS, name="conv_norm_out", **kw)(x))
        return conv(2 * cfg.latent_channels, 3, "conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latent [B,h,w,latent] -> image [B,h*f,w*f,out]. Up blocks run over the reversed widths."""
    config: VAEConfig
    attention_kernel: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        x = conv(chans[0], 3, "conv_in", **kw)(z.astype(self.dtype))
        x = MidBlock2D(chans[0], g, cfg.mid_block_add_attention, self.attention_kernel, name="mid_block",
                       **kw)(x)
        for i, ch in enumerate(chans):
            x = UpDecoderBlock2D(ch, cfg.layers_per_block + 1, g, add_upsample=i < len(chans) - 1,
                                 name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(GroupNorm(g, VAE_EPS, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, "conv_out", **kw)(x)


# -------------------------------------------------------------------------------- the model


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL. `encode(x) -> DiagonalGaussian`, `decode(z) -> image` (both NHWC).

    `__call__` (encode, take the mode, decode) exists to create every parameter in `init`.
    Latent scaling is not applied here: use `config.scale_latents` / `config.unscale_latents`.
    """
    config: VAEConfig
    attention_kernel: str = "auto"     # the mid blocks' attention (cid_jax.models.attention.KERNELS)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, self.attention_kernel, **kw)
        self.decoder = Decoder(cfg, self.attention_kernel, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, "quant_conv", padding="VALID", **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, "post_quant_conv", padding="VALID", **kw)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images [B,H,W,C] in [-1, 1] -> posterior over latents [B,H/f,W/f,latent] (fp32 moments)."""
        h = self.encoder(x)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        return DiagonalGaussian.from_moments(h.astype(jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents [B,h,w,latent] (unscaled) -> images [B,h*f,w*f,C], roughly in [-1, 1]."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z)

    def dummy_inputs(self, batch: int = 1) -> jax.ShapeDtypeStruct:
        """The smallest image batch whose shapes fit every block (for `init`/`eval_shape`)."""
        size = self.config.downscale
        return jax.ShapeDtypeStruct((batch, size, size, self.config.in_channels), jnp.float32)


def abstract_vae_params(module: AutoencoderKL, boxed: bool = False):
    """The VAE's param tree as ShapeDtypeStructs (nothing allocated or compiled)."""
    params = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), module.dummy_inputs())["params"]
    return params if boxed else nn.meta.unbox(params)
