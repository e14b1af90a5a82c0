"""Building blocks shared by the networks: the UNet's and VAE's convolutional blocks (NHWC,
diffusers-Flax names), the transformers' Dense/LayerNorm factories (CLIP, ViT), and an eval-mode
BatchNorm (Inception, BiSeNet).

Parameters are always created in `param_dtype` (fp32 master weights); `dtype` is the compute dtype
(bf16 on accelerators). Normalisation statistics are computed in fp32 whatever `dtype` is.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cid_jax.sharding import conv_init, dense_init


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over NHWC (or N,L,C): statistics in fp32, affine `scale`/`bias`."""
    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        shape = x.shape
        xg = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, c // self.num_groups)
        mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
        xg = (xg - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = xg.reshape(shape) * scale + bias
        return y.astype(self.dtype)


def conv(features: int, kernel: int, name: str, *, stride: int = 1, padding="SAME_1",
         dtype=jnp.float32, param_dtype=jnp.float32, use_bias: bool = True) -> nn.Conv:
    """A torch-style Conv2d in NHWC. padding 'SAME_1' is torch's `padding=kernel//2`."""
    if padding == "SAME_1":
        p = kernel // 2
        padding = ((p, p), (p, p))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                   kernel_init=conv_init())


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D: GN-SiLU-conv, (+ time embedding), GN-SiLU-conv, 1x1 shortcut."""
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb: Optional[jax.Array] = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, self.eps, name="norm1", **kw)(x)
        h = conv(self.out_channels, 3, "conv1", **kw)(nn.silu(h))
        if temb is not None:
            t = nn.Dense(self.out_channels, name="time_emb_proj", kernel_init=dense_init(("mlp", "embed")), **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = GroupNorm(self.groups, self.eps, name="norm2", **kw)(h)
        h = conv(self.out_channels, 3, "conv2", **kw)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", padding="VALID", **kw)(x)
        return x.astype(h.dtype) + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `asymmetric_pad` is the VAE's (0,1,0,1) padding with no conv padding."""
    out_channels: int
    asymmetric_pad: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        padding = ((0, 1), (0, 1)) if self.asymmetric_pad else ((1, 1), (1, 1))
        return conv(self.out_channels, 3, "conv", stride=2, padding=padding,
                    dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""
    out_channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, 3, "conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


def dense(features: int, names: tuple, name: str, dtype, param_dtype, use_bias: bool = True) -> nn.Dense:
    """A Dense whose kernel carries the logical axis `names` (for `cid_jax.sharding`)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=dense_init(names), name=name)


def layer_norm(eps: float, name: str, dtype, param_dtype) -> nn.LayerNorm:
    # The checkpoint config's eps (torch's 1e-5 for CLIP, 1e-12 for the HF ViTs), never Flax's 1e-6 default.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class FrozenBatchNorm(nn.Module):
    """torch BatchNorm2d in eval mode over NHWC: (x - mean) / sqrt(var + eps) * scale + bias.

    `scale`, `bias`, `mean`, `var` are bn.weight, bn.bias, bn.running_mean, bn.running_var. The
    statistics are params because these networks are only ever evaluated. Folded into one
    multiply-add per channel (torch's CPU inference kernel does the same), computed in fp32.
    """
    epsilon: float = 1e-5     # torch's default; Inception's BasicConv2d uses 1e-3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        mean = self.param("mean", nn.initializers.zeros, (c,), self.param_dtype)
        var = self.param("var", nn.initializers.ones, (c,), self.param_dtype)
        mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + self.epsilon)
        add = bias.astype(jnp.float32) - mean.astype(jnp.float32) * mul
        return (x.astype(jnp.float32) * mul + add).astype(self.dtype)
