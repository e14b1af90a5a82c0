"""The ViT image encoder of DINO (facebook/dino-vits16), numerically transformers' `ViTModel`.

The evaluation harness embeds images with it for the DINO and FGIS metrics: the class token of the
last hidden state, after the final LayerNorm (`cls_embedding`). The network is transformers'
`ViTModel(add_pooling_layer=False)`: a patch conv (with bias), a class token, learned positions,
pre-LN blocks, and a final LayerNorm. `load_vit` (cid_jax.weights.vit) builds it from a folder
written by `save_pretrained`.

Parameter names are the PyTorch state-dict keys of a ViT checkpoint as it is stored on disk
(transformers 5 renames them in memory, `layers.0.attention.q_proj`, but `save_pretrained` and the
hub files keep the original layout), with encoder layers as submodules `layer_<i>`:
`encoder/layer_0/attention/attention/query/kernel` <-> `encoder.layer.0.attention.attention.query.weight`.
Hence the one-parameter wrappers (`attention/output/dense`, `intermediate/dense`, `output/dense`):
they exist only so that every Flax path maps onto its key without a renaming table.
`cls_token` [1, 1, D] and `position_embeddings` [1, 1 + P, D] keep their PyTorch shapes.

Layout: images are NHWC, `pixel_values` [B, H, W, C] (transformers takes NCHW), already normalised
(DINO uses the ImageNet mean/std).

Position embeddings at another resolution: with `interpolate_pos_encoding=True` the patch grid of
the position embeddings is resized as transformers does (torch's bicubic, A = -0.75,
align_corners=False, given the output size; the class position is kept), so the model also runs on
images whose size differs from `config.image_size`, non-square ones included. Without it, the image
must have the config's size, as transformers requires.

Precision: `param_dtype` is the storage dtype of the parameters, `dtype` the compute dtype.
LayerNorm statistics and the attention softmax are computed in fp32. Dropout is left out: DINO's
config uses 0.0 and the encoder is frozen.

Sharding: as cid_jax.models.clip, kernels carry the logical names 'embed', 'heads', 'mlp' and the
conv names, so `model.init` returns boxed leaves; `abstract_params(model)` is the boxed abstract
tree for `cid_jax.sharding.param_shardings`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cid_jax.models.clip import ACTIVATIONS
from cid_jax.models.layers import dense, layer_norm
from cid_jax.sharding import conv_init

Dtype = Any

# ----------------------------------------------------------------------------------------- config


def _square_size(d: Mapping[str, Any], name: str, default: int) -> int:
    """transformers accepts an int or an (h, w) pair; the position grid we resize must be square."""
    value = d.get(name, default)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"ViT config {name}={value!r}: only square sizes are supported")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ViT config {name}={value!r}: expected a positive integer")
    return value


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The fields of transformers' ViTConfig that define `ViTModel` (defaults are transformers')."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # transformers' 'gelu' is the exact erf GELU
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; known: {sorted(ACTIVATIONS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        """Patches per side at `image_size` (14 for ViT-S/16 at 224 px)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Patches plus the class token (197 for ViT-S/16 at 224 px)."""
        return self.grid_size ** 2 + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ViTConfig":
        """From a transformers ViT config dict; fields that do not change the network (dropout,
        pooler, encoder_stride, initializer_range) are ignored, unsupported values are refused."""
        model_type = d.get("model_type", "vit")
        if model_type != "vit":
            raise ValueError(f"config has model_type {model_type!r}, not 'vit': this is not a "
                             "transformers ViT (ViTModel / ViTForImageClassification) config")
        fields = {f.name for f in dataclasses.fields(cls)} - {"image_size", "patch_size"}
        kw = {k: v for k, v in d.items() if k in fields and v is not None}
        kw["image_size"] = _square_size(d, "image_size", cls.image_size)
        kw["patch_size"] = _square_size(d, "patch_size", cls.patch_size)
        hidden = kw.get("hidden_size", cls.hidden_size)
        heads = kw.get("num_attention_heads", cls.num_attention_heads)
        # transformers reads an optional `head_dim`; a head width other than hidden / heads would
        # change the projection shapes, which this module does not build.
        head_dim = d.get("head_dim")
        if head_dim is not None and heads * head_dim != hidden:
            raise ValueError(f"head_dim {head_dim} x num_attention_heads {heads} != hidden_size "
                             f"{hidden}: only head_dim = hidden_size / num_attention_heads is supported")
        return cls(**kw)

    @classmethod
    def from_json(cls, path: os.PathLike) -> "ViTConfig":
        return cls.from_dict(json.loads(pathlib.Path(path).read_text()))


# facebook/dino-vits16 (DINO ViT-S/16), the values of its published config.json.
DINO_VITS16 = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                        intermediate_size=1536, hidden_act="gelu", layer_norm_eps=1e-12,
                        image_size=224, patch_size=16, num_channels=3, qkv_bias=True)


# ------------------------------------------------------------------- position-embedding resizing


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """The 4 taps (at offsets -1, 0, 1, 2) of Keys' cubic convolution for fractions t in [0, 1),
    with torch's A = -0.75 (not the A = -0.5 of jax.image.resize) -> [len(t), 4]."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix M with `M @ x` = torch's 1-D bicubic interpolation of x.

    torch (`F.interpolate(mode='bicubic', align_corners=False, size=...)`) samples output i at the
    source coordinate (i + 0.5) * in/out - 0.5 (half-pixel centres, not clamped below 0 for cubic),
    takes the 4 neighbours around its floor with the weights above, and clamps neighbour indices into
    [0, in_size - 1] (replicated borders). Equal sizes give the identity.
    """
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    m = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), weights[:, tap])
    return m.astype(np.float32)


def interpolate_position_embeddings(position_embeddings: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """[1, 1 + g*g, D] (g x g patch positions after the class position) -> [1, 1 + h*w, D] for the
    (h, w) patch grid, as transformers' `interpolate_pos_encoding` (class position unchanged)."""
    n = position_embeddings.shape[1] - 1
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"{n} patch positions are not a square grid")
    if tuple(grid) == (g, g):
        return position_embeddings
    h, w = grid
    cls_pos, patch_pos = position_embeddings[:, :1], position_embeddings[:, 1:]
    patch_pos = patch_pos.reshape(g, g, -1)
    # Separable: rows then columns, each a small matmul with the resize matrix; exact fp32 (the
    # matrices are tiny), whatever the backend's default matmul precision.
    rows = jnp.asarray(bicubic_resize_matrix(g, h), patch_pos.dtype)
    cols = jnp.asarray(bicubic_resize_matrix(g, w), patch_pos.dtype)
    resized = jnp.einsum("hi,wj,ijd->hwd", rows, cols, patch_pos, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([cls_pos, resized.reshape(1, h * w, -1)], axis=1)


# ----------------------------------------------------------------------------------------- blocks


class DenseWrapper(nn.Module):
    """One Linear named `dense`: transformers' ViTSelfOutput / ViTIntermediate / ViTOutput, whose
    only parameters are `<name>.dense.*`."""
    features: int
    names: tuple
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(self.features, self.names, "dense", self.dtype, self.param_dtype)(x)


class ViTSelfAttention(nn.Module):
    """The query/key/value projections (bias per `qkv_bias`) and scaled dot-product attention."""
    config: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        b, l, _ = x.shape
        heads = lambda t: t.reshape(b, l, cfg.num_attention_heads, -1)  # channel = head * head_dim + d
        proj = functools.partial(dense, cfg.hidden_size, ("embed", "heads"), dtype=self.dtype,
                                 param_dtype=self.param_dtype, use_bias=cfg.qkv_bias)
        q = heads(proj(name="query")(x))
        k = heads(proj(name="key")(x))
        v = heads(proj(name="value")(x))
        # Scale 1/sqrt(head_dim); logits and softmax in fp32 inside dot_product_attention.
        return jax.nn.dot_product_attention(q, k, v).reshape(b, l, cfg.hidden_size)


class ViTAttention(nn.Module):
    """`attention.attention` (q/k/v) then `attention.output.dense` (always with bias)."""
    config: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ViTSelfAttention(self.config, self.dtype, self.param_dtype, name="attention")(x)
        return DenseWrapper(self.config.hidden_size, ("heads", "embed"), self.dtype, self.param_dtype,
                            name="output")(x)


class ViTLayer(nn.Module):
    """Pre-LN block: x + attention(layernorm_before(x)), then x + mlp(layernorm_after(x))."""
    config: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        h = layer_norm(cfg.layer_norm_eps, "layernorm_before", dt, pdt)(x)
        x = x + ViTAttention(cfg, dt, pdt, name="attention")(h)
        h = layer_norm(cfg.layer_norm_eps, "layernorm_after", dt, pdt)(x)
        h = DenseWrapper(cfg.intermediate_size, ("embed", "mlp"), dt, pdt, name="intermediate")(h)
        h = ACTIVATIONS[cfg.hidden_act](h)
        return x + DenseWrapper(cfg.hidden_size, ("mlp", "embed"), dt, pdt, name="output")(h)


class ViTEncoder(nn.Module):
    config: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = ViTLayer(self.config, self.dtype, self.param_dtype, name=f"layer_{i}")(x)
        return x


class ViTPatchEmbeddings(nn.Module):
    """Non-overlapping p x p patches through a stride-p conv (with bias), NHWC -> [B, h*w, D]."""
    config: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg, p = self.config, self.config.patch_size
        # VALID drops a remainder of fewer than p pixels, as torch's unpadded conv does.
        patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=True,
                          dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_init(),
                          name="projection")(pixel_values)
        # Row-major over the patch grid, as torch's flatten(2) of [B, D, h, w].
        return patches.reshape(patches.shape[0], -1, cfg.hidden_size)


class ViTEmbeddings(nn.Module):
    """Class token, patch embeddings, plus the learned positions (resized on request)."""
    config: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
        cfg = self.config
        b, h, w, c = pixel_values.shape
        if c != cfg.num_channels:
            raise ValueError(f"pixel_values must be NHWC with {cfg.num_channels} channels, got shape "
                             f"{pixel_values.shape}")
        if not interpolate_pos_encoding and (h, w) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values are {h}x{w} but the model's image_size is {cfg.image_size}; "
                             "pass interpolate_pos_encoding=True to resize the position embeddings "
                             "(as transformers does)")
        if h < cfg.patch_size or w < cfg.patch_size:
            raise ValueError(f"pixel_values {h}x{w} are smaller than one {cfg.patch_size}-pixel patch")
        init = functools.partial(nn.with_logical_partitioning, names=(None, None, "embed"))
        cls_token = self.param("cls_token", init(nn.initializers.normal(0.02)),
                               (1, 1, cfg.hidden_size), self.param_dtype)
        positions = self.param("position_embeddings", init(nn.initializers.normal(0.02)),
                               (1, cfg.num_positions, cfg.hidden_size), self.param_dtype)
        patches = ViTPatchEmbeddings(cfg, self.dtype, self.param_dtype, name="patch_embeddings")(
            pixel_values.astype(self.dtype))
        grid = (h // cfg.patch_size, w // cfg.patch_size)
        positions = interpolate_position_embeddings(positions, grid)
        cls = jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, cfg.hidden_size))
        return jnp.concatenate([cls, patches], axis=1) + positions.astype(self.dtype)


# ------------------------------------------------------------------------------------------ model


class ViTModel(nn.Module):
    """transformers `ViTModel(add_pooling_layer=False)`.

    __call__(pixel_values [B, H, W, C] NHWC, normalised; interpolate_pos_encoding=False) ->
    last_hidden_state [B, 1 + (H/p)(W/p), D], after the final `layernorm`.
    `cls_embedding` (same arguments) -> [B, D], the class token of it: the DINO image embedding.
    """
    config: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x = ViTEmbeddings(cfg, dt, pdt, name="embeddings")(pixel_values, interpolate_pos_encoding)
        x = ViTEncoder(cfg, dt, pdt, name="encoder")(x)
        return layer_norm(cfg.layer_norm_eps, "layernorm", dt, pdt)(x)

    def cls_embedding(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
        """[B, D]: `model.apply({'params': p}, images, method='cls_embedding')`."""
        return cls_embedding(self(pixel_values, interpolate_pos_encoding))

    def dummy_inputs(self, batch_size: int = 1) -> tuple:
        s, c = self.config.image_size, self.config.num_channels
        return (jnp.zeros((batch_size, s, s, c), self.dtype),)


def cls_embedding(last_hidden_state: jax.Array) -> jax.Array:
    """The class token of a ViT's last hidden state: [B, 1 + P, D] -> [B, D]."""
    return last_hidden_state[:, 0]


def abstract_params(model: ViTModel, *, boxed: bool = True):
    """The parameter tree of `model` as ShapeDtypeStructs, without allocating or computing anything.

    boxed=True keeps the `nn.LogicallyPartitioned` wrappers (for `cid_jax.sharding.param_shardings`);
    boxed=False gives the plain tree `apply` takes and `load_into` fills.
    """
    variables = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
    params = variables["params"]
    return params if boxed else nn.meta.unbox(params)
