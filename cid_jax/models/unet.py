"""UNet2DConditionModel (SD1.5 and SDXL) in Flax linen, NHWC, with diffusers-Flax parameter names.

Built from a diffusers `unet/config.json`. Every attention gets its processor from
`processor_plan(site)` (see attention.py), and `attention_kwargs` reach every processor, so adapters
(LoRA, decoupled ID attention, probability capture) plug in without touching this file.
`remat` (REMAT_MODES): "full" (or True) rematerialises each resnet and transformer block in the
backward pass, "attention" only the transformer blocks, "none" (or False) nothing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cid_jax.models import presets
from cid_jax.models.attention import Attention, ProcessorPlan, default_plan
from cid_jax.models.layers import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv
from cid_jax.models.sites import AttentionSite
from cid_jax.sharding import dense_init

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

REMAT_MODES = ("none", "attention", "full")


def remat_mode(remat) -> str:
    """`model.remat` as one of REMAT_MODES (False/True are "none"/"full")."""
    if isinstance(remat, bool) or remat is None:
        return "full" if remat else "none"
    if isinstance(remat, str) and remat.lower() in ("true", "false"):  # --config.model.remat=True
        return "full" if remat.lower() == "true" else "none"
    if remat not in REMAT_MODES:
        raise ValueError(f"remat must be one of {REMAT_MODES} (or a bool), got {remat!r}")
    return remat


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The diffusers config fields this UNet reads (others must keep their SD defaults)."""
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    layers_per_block: int = 2
    attention_head_dim: tuple[int, ...] | int = 8   # diffusers' name; it is the head COUNT (SD quirk)
    num_attention_heads: tuple[int, ...] | int | None = None
    cross_attention_dim: int = 768
    transformer_layers_per_block: tuple[int, ...] | int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    use_linear_projection: bool = False
    addition_embed_type: Optional[str] = None        # "text_time" for SDXL
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    sample_size: int = 64

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        unsupported = {
            "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
            "class_embed_type": (None,), "encoder_hid_dim": (None,), "time_embedding_type": ("positional",),
            "only_cross_attention": (False,), "dual_cross_attention": (False,), "upcast_attention": (False, None),
            "resnet_time_scale_shift": ("default",), "act_fn": ("silu",), "center_input_sample": (False,),
            "mid_block_scale_factor": (1, 1.0), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
            "attention_type": ("default",), "time_cond_proj_dim": (None,),
        }
        for key, allowed in unsupported.items():
            if key in d and d[key] not in allowed:
                raise ValueError(f"UNet config {key}={d[key]!r} is not supported (supported: {allowed})")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
        return cls(**kw)

    @classmethod
    def from_json(cls, path: os.PathLike) -> "UNetConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def per_block(self, value, n=None):
        n = n or len(self.block_out_channels)
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n

    @property
    def heads(self) -> tuple[int, ...]:
        # diffusers: num_attention_heads defaults to attention_head_dim (a historic misnomer).
        return self.per_block(self.num_attention_heads or self.attention_head_dim)

    @property
    def depths(self) -> tuple[int, ...]:
        return self.per_block(self.transformer_layers_per_block)


SD15_UNET = UNetConfig.from_dict(presets.SD15_UNET)
SDXL_UNET = UNetConfig.from_dict(presets.SDXL_UNET)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, shift: float) -> jax.Array:
    """diffusers get_timestep_embedding: [N] -> [N, dim] sinusoids (fp32)."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    return emb


def conditioned_time_embedding(cfg: UNetConfig, timesteps: jax.Array, added_cond: Optional[Mapping], *,
                               dtype, param_dtype) -> jax.Array:
    """The time embedding [B, 4 C0] (+ SDXL's pooled-text and size/crop embedding), as submodules
    `time_embedding` / `add_embedding` of the calling module (the UNet, a ControlNet)."""
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    width = cfg.block_out_channels[0]
    temb = timestep_embedding(timesteps, width, cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = TimestepEmbedding(width * 4, name="time_embedding", **kw)(temb.astype(dtype))
    if cfg.addition_embed_type == "text_time":
        if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
            raise ValueError("an SDXL UNet needs added_cond={'text_embeds': ..., 'time_ids': ...}")
        time_ids = jnp.asarray(added_cond["time_ids"])
        size_emb = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                      cfg.flip_sin_to_cos, cfg.freq_shift).reshape(timesteps.shape[0], -1)
        aug = jnp.concatenate([jnp.asarray(added_cond["text_embeds"], jnp.float32), size_emb], -1)
        temb = temb + TimestepEmbedding(width * 4, name="add_embedding", **kw)(aug.astype(dtype))
    elif cfg.addition_embed_type is not None:
        raise ValueError(f"addition_embed_type={cfg.addition_embed_type!r} is not supported")
    return temb


class TimestepEmbedding(nn.Module):
    dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.dim, name="linear_1", kernel_init=dense_init(("mlp", "embed")), **kw)(x)
        return nn.Dense(self.dim, name="linear_2", kernel_init=dense_init(("mlp", "embed")), **kw)(nn.silu(x))


class GEGLU(nn.Module):
    """diffusers GEGLU: one projection to 2*inner, the second half gates the first (exact GELU)."""
    inner: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.inner * 2, name="proj", dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=dense_init(("embed", "mlp")))(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers FeedForward: `net.0` GEGLU (dim -> 4dim), `net.2` Linear (4dim -> dim)."""
    dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.dim * 4, name="net_0", **kw)(x)
        return nn.Dense(self.dim, name="net_2", kernel_init=dense_init(("mlp", "embed")), **kw)(h)


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    context_dim: int
    name_prefix: str
    processor_plan: ProcessorPlan = default_plan
    attention_kernel: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, attention_kwargs):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim_head = self.dim // self.heads

        def attention(which, ctx_dim):
            site = AttentionSite(f"{self.name_prefix}.{which}", which == "attn2", self.dim, ctx_dim,
                                 self.heads, dim_head)
            return Attention(self.dim, self.heads, dim_head, site=site, processor_plan=self.processor_plan,
                             kernel=self.attention_kernel, name=which, **kw)

        ln = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw)  # noqa: E731
        x = x + attention("attn1", self.dim)(ln("norm1")(x), None, **attention_kwargs)
        x = x + attention("attn2", self.context_dim)(ln("norm2")(x), context, **attention_kwargs)
        return x + FeedForward(self.dim, name="ff", **kw)(ln("norm3")(x))


class Transformer2DModel(nn.Module):
    channels: int
    heads: int
    depth: int
    context_dim: int
    use_linear_projection: bool
    name_prefix: str
    groups: int = 32
    processor_plan: ProcessorPlan = default_plan
    attention_kernel: str = "auto"
    remat: Any = False   # REMAT_MODES or a bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, attention_kwargs):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        residual = x
        h = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = h.reshape(b, hgt * wid, c)
            h = nn.Dense(self.channels, name="proj_in", kernel_init=dense_init(("mlp", "embed")), **kw)(h)
        else:
            h = conv(self.channels, 1, "proj_in", padding="VALID", **kw)(h).reshape(b, hgt * wid, c)
        block_cls = nn.remat(BasicTransformerBlock) if remat_mode(self.remat) != "none" else BasicTransformerBlock
        for i in range(self.depth):
            h = block_cls(self.channels, self.heads, self.context_dim,
                          name_prefix=f"{self.name_prefix}.transformer_blocks.{i}",
                          processor_plan=self.processor_plan, attention_kernel=self.attention_kernel,
                          name=f"transformer_blocks_{i}", **kw)(h, context, attention_kwargs)
        if self.use_linear_projection:
            h = nn.Dense(self.channels, name="proj_out", kernel_init=dense_init(("mlp", "embed")), **kw)(h)
            h = h.reshape(b, hgt, wid, c)
        else:
            h = conv(self.channels, 1, "proj_out", padding="VALID", **kw)(h.reshape(b, hgt, wid, c))
        return h + residual.astype(h.dtype)


class _BlockBase(nn.Module):
    """Shared fields of the down/mid/up blocks."""
    config: UNetConfig
    index: int
    processor_plan: ProcessorPlan = default_plan
    attention_kernel: str = "auto"
    remat: Any = False   # REMAT_MODES or a bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def resnet(self, channels: int, name: str):
        cls = nn.remat(ResnetBlock2D) if remat_mode(self.remat) == "full" else ResnetBlock2D
        return cls(channels, self.config.norm_num_groups, self.config.norm_eps, name=name,
                   dtype=self.dtype, param_dtype=self.param_dtype)

    def transformer(self, channels: int, heads: int, depth: int, prefix: str, name: str):
        cfg = self.config
        return Transformer2DModel(
            channels, heads, depth, cfg.cross_attention_dim, cfg.use_linear_projection,
            name_prefix=prefix, groups=cfg.norm_num_groups, processor_plan=self.processor_plan,
            attention_kernel=self.attention_kernel, remat=self.remat, name=name, dtype=self.dtype,
            param_dtype=self.param_dtype)


class DownBlock(_BlockBase):
    """CrossAttnDownBlock2D / DownBlock2D: (resnet [+ transformer]) x layers, then a downsampler.

    Returns the output and the skip connections it contributes to the up path.
    """

    @nn.compact
    def __call__(self, h, temb, context, attention_kwargs):
        cfg, i = self.config, self.index
        channels = cfg.block_out_channels[i]
        with_attention = cfg.down_block_types[i] == CROSS_DOWN
        skips = []
        for j in range(cfg.layers_per_block):
            h = self.resnet(channels, f"resnets_{j}")(h, temb)
            if with_attention:
                h = self.transformer(channels, cfg.heads[i], cfg.depths[i],
                                     f"down_blocks.{i}.attentions.{j}", f"attentions_{j}")(
                                         h, context, attention_kwargs)
            skips.append(h)
        if i < len(cfg.block_out_channels) - 1:
            h = Downsample2D(channels, name="downsamplers_0", dtype=self.dtype,
                             param_dtype=self.param_dtype)(h)
            skips.append(h)
        return h, skips


class MidBlock(_BlockBase):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    @nn.compact
    def __call__(self, h, temb, context, attention_kwargs):
        cfg = self.config
        channels = cfg.block_out_channels[-1]
        h = self.resnet(channels, "resnets_0")(h, temb)
        h = self.transformer(channels, cfg.heads[-1], cfg.depths[-1], "mid_block.attentions.0",
                             "attentions_0")(h, context, attention_kwargs)
        return self.resnet(channels, "resnets_1")(h, temb)


class UpBlock(_BlockBase):
    """CrossAttnUpBlock2D / UpBlock2D: (concat skip, resnet [+ transformer]) x (layers+1), upsampler."""

    @nn.compact
    def __call__(self, h, skips, temb, context, attention_kwargs):
        cfg, i = self.config, self.index
        rev_channels = cfg.block_out_channels[::-1]
        rev_heads, rev_depths = cfg.heads[::-1], cfg.depths[::-1]
        channels = rev_channels[i]
        with_attention = cfg.up_block_types[i] == CROSS_UP
        for j in range(cfg.layers_per_block + 1):
            h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
            h = self.resnet(channels, f"resnets_{j}")(h, temb)
            if with_attention:
                h = self.transformer(channels, rev_heads[i], rev_depths[i],
                                     f"up_blocks.{i}.attentions.{j}", f"attentions_{j}")(
                                         h, context, attention_kwargs)
        if i < len(rev_channels) - 1:
            h = Upsample2D(channels, name="upsamplers_0", dtype=self.dtype,
                           param_dtype=self.param_dtype)(h)
        return h


class UNet2DConditionModel(nn.Module):
    """Noise prediction eps(x_t, t, context).

    sample NHWC [B,H,W,C]; timesteps [B] or a scalar; encoder_hidden_states [B,L,cross_attention_dim];
    SDXL also `added_cond={'text_embeds': [B,1280], 'time_ids': [B,6]}`. `attention_kwargs` go to
    every attention processor unchanged. `attention_kernel` picks how every attention product runs
    (`cid_jax.models.attention.KERNELS`). `control`: (down residuals, mid residual) of one or more
    ControlNets, added to the skip connections and to the mid block's output.
    """
    config: UNetConfig = SD15_UNET
    processor_plan: ProcessorPlan = default_plan
    attention_kernel: str = "auto"
    remat: Any = False   # REMAT_MODES or a bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond: Optional[Mapping] = None,
                 attention_kwargs: Optional[Mapping] = None, control: Optional[tuple] = None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(config=cfg, processor_plan=self.processor_plan, attention_kernel=self.attention_kernel,
                        remat=self.remat, **kw)
        attention_kwargs = dict(attention_kwargs or {})
        channels = cfg.block_out_channels
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        temb = conditioned_time_embedding(cfg, timesteps, added_cond, **kw)
        context = encoder_hidden_states.astype(self.dtype)
        h = conv(channels[0], 3, "conv_in", **kw)(sample.astype(self.dtype))
        skips = [h]
        for i in range(len(cfg.down_block_types)):
            h, block_skips = DownBlock(index=i, name=f"down_blocks_{i}", **block_kw)(
                h, temb, context, attention_kwargs)
            skips.extend(block_skips)
        h = MidBlock(index=0, name="mid_block", **block_kw)(h, temb, context, attention_kwargs)
        if control is not None:  # ControlNet residuals (cid_jax.models.controlnet), added as diffusers does
            down_residuals, mid_residual = control
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} ControlNet down residuals for {len(skips)} skip connections")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
            h = h + mid_residual.astype(h.dtype)
        for i in range(len(cfg.up_block_types)):
            n = cfg.layers_per_block + 1
            block_skips, skips = skips[-n:], skips[:-n]
            h = UpBlock(index=i, name=f"up_blocks_{i}", **block_kw)(
                h, block_skips, temb, context, attention_kwargs)

        h = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h)
        return conv(cfg.out_channels, 3, "conv_out", **kw)(nn.silu(h))

    def dummy_inputs(self, batch: int = 1, size: Optional[int] = None, text_len: int = 77) -> dict:
        """Shapes-only inputs for `init`/`eval_shape`; by default the smallest latent side that fits
        every level (8 x 2^(levels - 1))."""
        cfg = self.config
        size = size or 8 * 2 ** (len(cfg.block_out_channels) - 1)
        inputs = dict(
            sample=jax.ShapeDtypeStruct((batch, size, size, cfg.in_channels), jnp.float32),
            timesteps=jax.ShapeDtypeStruct((batch,), jnp.int32),
            encoder_hidden_states=jax.ShapeDtypeStruct((batch, text_len, cfg.cross_attention_dim), jnp.float32))
        if cfg.addition_embed_type == "text_time":
            text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs["added_cond"] = dict(text_embeds=jax.ShapeDtypeStruct((batch, text_dim), jnp.float32),
                                        time_ids=jax.ShapeDtypeStruct((batch, 6), jnp.float32))
        return inputs


def abstract_unet_params(module: UNet2DConditionModel, boxed: bool = False, text_len: int = 77):
    """The UNet's param tree as ShapeDtypeStructs (traced once, nothing allocated or compiled)."""
    shapes = jax.eval_shape(lambda inp: module.init(jax.random.key(0), **inp),
                            module.dummy_inputs(text_len=text_len))["params"]  # inp: tracers of the shapes
    return shapes if boxed else nn.meta.unbox(shapes)
