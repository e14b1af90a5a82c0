"""CLIP text and vision encoders (frozen feature extractors of the SD family and ConsistentID).

Three models, numerically the transformers (PyTorch) CLIP models they are named after:

* `CLIPTextModel`: SD1.5's text encoder and SDXL's `text_encoder` (OpenAI CLIP ViT-L/14 text tower).
* `CLIPTextModelWithProjection`: SDXL's `text_encoder_2` (OpenCLIP ViT-bigG/14 text tower) with
  `text_projection`, whose output is SDXL's pooled `text_embeds`.
* `CLIPVisionModelWithProjection`: the ViT-H/14 image encoder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K);
  ConsistentID uses its penultimate hidden states (`hidden_states[-2]`, 257 x 1280 at 224 px).

Parameter names are transformers-Flax's (`text_model/embeddings/token_embedding/embedding`,
`vision_model/pre_layrnorm/scale`), except that encoder layers are the submodules `layers_<i>`
(transformers-Flax used a dict key `layers/<i>`), so that `cid_jax.weights.state_dict.torch_key`
maps every Flax path to its PyTorch key (`encoder/layers_0/...` -> `encoder.layers.0...`).

Layout: images are NHWC, `pixel_values` [B, H, W, 3] (transformers takes NCHW), already normalised
with the CLIP mean/std. Token ids are [B, L].

Precision: `param_dtype` is the storage dtype of the parameters (fp32), `dtype` the compute dtype.
LayerNorm statistics and the attention softmax are always computed in fp32, as torch does.
Dropout is left out: CLIP's configs use 0.0 and these towers are frozen.

Sharding: kernels and embeddings carry logical axis names (`cid_jax.sharding`): 'embed' (model
width), 'heads' (attention inner width), 'mlp' (FFN hidden width), 'vocab', and the conv names.
`model.init` therefore returns boxed (`nn.LogicallyPartitioned`) leaves; `nn.meta.unbox` gives the
plain tree that `apply` and the loaders use. `abstract_params(model)` returns the boxed abstract tree
that `cid_jax.sharding.param_shardings` takes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from cid_jax.models.layers import dense, layer_norm
from cid_jax.sharding import conv_init

Dtype = Any

# ----------------------------------------------------------------------------------------- configs


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation, `x * sigmoid(1.702 x)` (transformers' QuickGELUActivation)."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> functions. 'gelu' is the exact erf GELU (torch nn.GELU()),
# which OpenCLIP models (bigG text, ViT-H vision) use; OpenAI's ViT-L uses quick_gelu.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def _pick_sub_config(d: Mapping[str, Any], sub: str) -> dict:
    """The tower's config from a tower config.json, or from a full CLIPModel config.json.

    A full CLIPModel (model_type 'clip', e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K) nests the towers
    under 'text_config' / 'vision_config' and sets the projection width at the top level; that is
    the width its `text_projection` / `visual_projection` weights were built with, so it wins.
    """
    if sub in d:
        out = dict(d[sub] or {})
        if "projection_dim" in d:
            out["projection_dim"] = d["projection_dim"]
        return out
    return dict(d)


def _from_fields(cls, d: Mapping[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})


def _check_common(cfg) -> None:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by "
                         f"num_attention_heads {cfg.num_attention_heads}")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported; known: {sorted(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' CLIPTextConfig that define the network (defaults are transformers')."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 512

    def __post_init__(self):
        _check_common(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a transformers config dict (a text config, or a full CLIPModel config); extra keys are ignored."""
        return _from_fields(cls, _pick_sub_config(d, "text_config"))

    @classmethod
    def from_json(cls, path: os.PathLike) -> "CLIPTextConfig":
        return cls.from_dict(json.loads(pathlib.Path(path).read_text()))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' CLIPVisionConfig that define the network (defaults are transformers')."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        _check_common(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        """Patches plus the class token (257 for ViT-H/14 at 224 px)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
        """From a transformers config dict (a vision config, or a full CLIPModel config); extra keys are ignored."""
        return _from_fields(cls, _pick_sub_config(d, "vision_config"))

    @classmethod
    def from_json(cls, path: os.PathLike) -> "CLIPVisionConfig":
        return cls.from_dict(json.loads(pathlib.Path(path).read_text()))


# ----------------------------------------------------------------------------------------- outputs


@flax.struct.dataclass
class CLIPTextOutput:
    """What the text models return (a pytree, so it can leave a jit).

    last_hidden_state: [B, L, D], after `final_layer_norm`.
    pooler_output: [B, D], `last_hidden_state` at the EOS position (see `eos_positions`).
    hidden_states: num_hidden_layers + 1 arrays [B, L, D] (embeddings, then each layer's output,
      *before* the final LayerNorm, as transformers) — `hidden_states[-2]` is the penultimate layer
      SDXL uses; None when called with `output_hidden_states=False`.
    text_embeds: [B, projection_dim], `text_projection(pooler_output)`; None without projection.
    """
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: Optional[tuple[jax.Array, ...]] = None
    text_embeds: Optional[jax.Array] = None


@flax.struct.dataclass
class CLIPVisionOutput:
    """What the vision model returns (a pytree).

    last_hidden_state: [B, 1 + P, D], the last layer's output (no LayerNorm, as transformers).
    pooler_output: [B, D], `post_layernorm` of the class token.
    hidden_states: num_hidden_layers + 1 arrays [B, 1 + P, D] (after `pre_layrnorm`, then each
      layer's output) — ConsistentID uses `hidden_states[-2]`; None when `output_hidden_states=False`.
    image_embeds: [B, projection_dim], `visual_projection(pooler_output)`.
    """
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: Optional[tuple[jax.Array, ...]] = None
    image_embeds: Optional[jax.Array] = None


# ----------------------------------------------------------------------------------------- blocks


class CLIPAttention(nn.Module):
    """Multi-head self-attention with transformers' q/k/v/out_proj names (all with bias)."""
    hidden_size: int
    num_heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        b, l, _ = x.shape
        heads = lambda t: t.reshape(b, l, self.num_heads, -1)  # channel = head * head_dim + d
        proj = functools.partial(dense, self.hidden_size, ("embed", "heads"),
                                 dtype=self.dtype, param_dtype=self.param_dtype)
        q = heads(proj(name="q_proj")(x))
        k = heads(proj(name="k_proj")(x))
        v = heads(proj(name="v_proj")(x))
        # Scale 1/sqrt(head_dim); logits and softmax in fp32 inside dot_product_attention.
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal)
        out = out.reshape(b, l, self.hidden_size)
        return dense(self.hidden_size, ("heads", "embed"), "out_proj", self.dtype,
                      self.param_dtype)(out)


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = dense(self.intermediate_size, ("embed", "mlp"), "fc1", self.dtype, self.param_dtype)(x)
        x = ACTIVATIONS[self.hidden_act](x)
        return dense(self.hidden_size, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype)(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
    config: Any  # CLIPTextConfig or CLIPVisionConfig
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        h = layer_norm(cfg.layer_norm_eps, "layer_norm1", dt, pdt)(x)
        x = x + CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, self.causal, dt, pdt,
                              name="self_attn")(h, mask)
        h = layer_norm(cfg.layer_norm_eps, "layer_norm2", dt, pdt)(x)
        return x + CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dt, pdt,
                           name="mlp")(h)


class CLIPEncoder(nn.Module):
    """The layer stack; returns (last output, (input, output of each layer))."""
    config: Any
    causal: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None):
        # nn.remat keeps the parameter names; it only recomputes the block in the backward pass.
        layer = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        hidden = [x]
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, self.causal, self.dtype, self.param_dtype, name=f"layers_{i}")(x, mask)
            hidden.append(x)
        return x, tuple(hidden)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the token whose final state is the pooled output, exactly as transformers picks it.

    Configs with `eos_token_id == 2` (the value in SD1.5's and SDXL's configs, from before the fix in
    transformers PR #24773) take the position of the largest token id — the EOT token, 49407, is the
    largest in the CLIP vocabulary. Other configs take the first position holding `eos_token_id`
    (0 if there is none, as torch's argmax of an all-zero row).

    This is the one place that reads a config's `eos_token_id`, and rightly: the pooled output must
    be the state transformers pools, stale config value and all (with 2, the largest id is the first
    EOT whether a row is padded with EOT, SD's tokenizer, or with "!" = 0, SDXL's tokenizer_2). Which
    id ends a text is the tokenizer's business, never read from this field.
    """
    ids = input_ids.astype(jnp.int32)
    if eos_token_id == 2:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


# ------------------------------------------------------------------------------------- text towers


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, position_ids: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        token = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
                         name="token_embedding")
        position = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                            param_dtype=self.param_dtype,
                            embedding_init=nn.with_logical_partitioning(init, (None, "embed")),
                            name="position_embedding")
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[-1])[None]
        return token(input_ids) + position(position_ids)


class CLIPTextTransformer(nn.Module):
    """transformers' CLIPTextModel body (`text_model`): embeddings, causal encoder, final LayerNorm."""
    config: CLIPTextConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=True):
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        x = CLIPTextEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(input_ids, position_ids)
        mask = None
        if attention_mask is not None:  # padding mask over keys, combined with the causal mask
            mask = attention_mask.astype(bool)[:, None, None, :]
        x, hidden = CLIPEncoder(cfg, causal=True, remat=self.remat, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="encoder")(x, mask)
        last = layer_norm(cfg.layer_norm_eps, "final_layer_norm", self.dtype, self.param_dtype)(x)
        pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled,
                              hidden_states=hidden if output_hidden_states else None)


class CLIPTextModel(nn.Module):
    """transformers CLIPTextModel: params under `text_model/`.

    __call__(input_ids [B, L] int, attention_mask [B, L] (1 = keep) or None, position_ids [1|B, L]
    or None, output_hidden_states=True) -> CLIPTextOutput (text_embeds None).
    """
    config: CLIPTextConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=True):
        return CLIPTextTransformer(self.config, self.remat, self.dtype, self.param_dtype, name="text_model")(
            input_ids, attention_mask, position_ids, output_hidden_states)

    def dummy_inputs(self, batch_size: int = 1) -> tuple:
        return (jnp.zeros((batch_size, self.config.max_position_embeddings), jnp.int32),)


class CLIPTextModelWithProjection(nn.Module):
    """transformers CLIPTextModelWithProjection: `text_model/` plus `text_projection` (no bias).

    Same call as CLIPTextModel; the output's `text_embeds` = text_projection(pooler_output).
    """
    config: CLIPTextConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=True):
        out = CLIPTextTransformer(self.config, self.remat, self.dtype, self.param_dtype, name="text_model")(
            input_ids, attention_mask, position_ids, output_hidden_states)
        embeds = dense(self.config.projection_dim, ("embed", None), "text_projection", self.dtype,
                        self.param_dtype, use_bias=False)(out.pooler_output)
        return out.replace(text_embeds=embeds)

    def dummy_inputs(self, batch_size: int = 1) -> tuple:
        return (jnp.zeros((batch_size, self.config.max_position_embeddings), jnp.int32),)


# ------------------------------------------------------------------------------------ vision tower


class CLIPVisionEmbeddings(nn.Module):
    """Class token + non-overlapping patch conv (no bias) + learned positions, NHWC input."""
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        b, h, w, c = pixel_values.shape
        if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"pixel_values must be NHWC [B, {cfg.image_size}, {cfg.image_size}, "
                             f"{cfg.num_channels}], got {pixel_values.shape} (position embeddings are "
                             "not interpolated)")
        p = cfg.patch_size
        patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_init(),
                          name="patch_embedding")(pixel_values.astype(self.dtype))
        # Row-major over the patch grid, as torch's flatten(2) of [B, D, gh, gw].
        patches = patches.reshape(b, -1, cfg.hidden_size)
        cls = self.param("class_embedding",
                         nn.with_logical_partitioning(nn.initializers.normal(cfg.hidden_size ** -0.5),
                                                      ("embed",)),
                         (cfg.hidden_size,), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden_size))
        positions = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                         (None, "embed")),
                             name="position_embedding")(jnp.arange(cfg.num_positions))
        return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' CLIPVisionModel body (`vision_model`)."""
    config: CLIPVisionConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states=True):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x = CLIPVisionEmbeddings(cfg, dt, pdt, name="embeddings")(pixel_values)
        x = layer_norm(cfg.layer_norm_eps, "pre_layrnorm", dt, pdt)(x)  # sic: transformers' name
        x, hidden = CLIPEncoder(cfg, causal=False, remat=self.remat, dtype=dt, param_dtype=pdt,
                                name="encoder")(x)
        pooled = layer_norm(cfg.layer_norm_eps, "post_layernorm", dt, pdt)(x[:, 0])
        return CLIPVisionOutput(last_hidden_state=x, pooler_output=pooled,
                                hidden_states=hidden if output_hidden_states else None)


class CLIPVisionModelWithProjection(nn.Module):
    """transformers CLIPVisionModelWithProjection: `vision_model/` plus `visual_projection` (no bias).

    __call__(pixel_values [B, H, W, C] NHWC, normalised; output_hidden_states=True) -> CLIPVisionOutput.
    Inside a jit that only uses `hidden_states[-2]` (ConsistentID), XLA drops the unused last layer.
    """
    config: CLIPVisionConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states=True):
        out = CLIPVisionTransformer(self.config, self.remat, self.dtype, self.param_dtype,
                                    name="vision_model")(pixel_values, output_hidden_states)
        embeds = dense(self.config.projection_dim, ("embed", None), "visual_projection", self.dtype,
                        self.param_dtype, use_bias=False)(out.pooler_output)
        return out.replace(image_embeds=embeds)

    def dummy_inputs(self, batch_size: int = 1) -> tuple:
        s, c = self.config.image_size, self.config.num_channels
        return (jnp.zeros((batch_size, s, s, c), self.dtype),)


CLIPModule = CLIPTextModel | CLIPTextModelWithProjection | CLIPVisionModelWithProjection


def abstract_params(model: nn.Module, *, boxed: bool = True):
    """The parameter tree of `model` as ShapeDtypeStructs, without allocating or computing anything.

    boxed=True keeps the `nn.LogicallyPartitioned` wrappers (for `cid_jax.sharding.param_shardings`);
    boxed=False gives the plain tree `apply` takes and `load_into` fills.
    """
    init = functools.partial(model.init, output_hidden_states=False)
    variables = jax.eval_shape(init, jax.random.key(0), *model.dummy_inputs())
    params = variables["params"]
    return params if boxed else nn.meta.unbox(params)
