"""FacialEncoder: fuses CLIP features of face-part images into the text tokens of the facial words.

Each of up to 5 part images (face, eye, ear, nose, lip crops, zero-padded) is reduced by the
Perceiver `AttentionMLP` (1280 -> E, one learned latent) to one embedding; the `FuseModule` then
replaces the k-th marked token of each prompt (`face`, `ears`, `eyes`, ...) by
`fuse(token, k-th valid part)` and leaves every other token as it was (spec §2).

The reference does this with `masked_scatter` over the flattened batch; here it is a rank gather per
row (static shapes, jit/shard friendly): token rank r in row b gets the r-th valid part of row b.
The two agree whenever every row has as many marked tokens as valid parts, which the reference's
own preprocessing guarantees (it asserts the totals match). Marked tokens beyond the row's valid
parts are left unfused (the reference would fail its assertion there).

Which part goes with which word is decided upstream, by the order of the part images: the
reference's positional order pairs "ears" with the eye crop (spec §9.1); the text module's `by_name`
pairing reorders the parts instead. This module just fuses positionally.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cid_jax.models.resampler import AttentionMLP, layer_norm
from cid_jax.sharding import dense_init


class MLP(nn.Module):
    """LayerNorm -> fc1 -> exact GELU -> fc2 (+ input when `use_residual`)."""
    out_dim: int
    hidden_dim: int
    use_residual: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.use_residual and x.shape[-1] != self.out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {x.shape[-1]} != {self.out_dim}")
        h = layer_norm("layernorm", self.dtype, self.param_dtype)(x)
        h = nn.Dense(self.hidden_dim, name="fc1", kernel_init=dense_init(("embed", "mlp")), **kw)(h)
        h = nn.Dense(self.out_dim, name="fc2", kernel_init=dense_init(("mlp", "embed")), **kw)(
            nn.gelu(h, approximate=False))
        return h + x if self.use_residual else h


def part_for_each_token(class_tokens_mask: jax.Array, valid_id_mask: jax.Array):
    """Which part embedding each token gets: (part index [B, L], fuse? [B, L]).

    The r-th True token of a row takes the row's r-th valid part (valid_id_mask need not be a
    prefix). Tokens past the row's number of valid parts are not fused.
    """
    mask = class_tokens_mask.astype(bool)
    valid = valid_id_mask.astype(bool)
    num_parts = valid.shape[1]
    token_rank = jnp.cumsum(mask, axis=1) - 1                     # [B, L]
    valid_rank = jnp.cumsum(valid, axis=1) - 1                    # [B, P]
    # order[b, r] = index of the r-th valid part of row b (scatter; invalid parts go out of range).
    target = jnp.where(valid, valid_rank, num_parts)
    order = jax.vmap(lambda t: jnp.zeros((num_parts,), jnp.int32).at[t].set(
        jnp.arange(num_parts, dtype=jnp.int32), mode="drop"))(target)
    fuse = mask & (token_rank < valid.sum(axis=1, keepdims=True))
    part = jnp.take_along_axis(order, jnp.clip(token_rank, 0, num_parts - 1), axis=1)
    return part, fuse


class FuseModule(nn.Module):
    """`fuse(p, id) = LN(mlp2(mlp1([p; id]) + p))` at the marked tokens, identity elsewhere."""
    embed_dim: int = 768
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        e = self.embed_dim
        self.mlp1 = MLP(e, e, use_residual=False, **kw)
        self.mlp2 = MLP(e, e, use_residual=True, **kw)
        self.layer_norm = layer_norm(None, self.dtype, self.param_dtype)

    def fuse_fn(self, prompt_embeds: jax.Array, id_embeds: jax.Array) -> jax.Array:
        h = self.mlp1(jnp.concatenate([prompt_embeds, id_embeds], axis=-1)) + prompt_embeds
        return self.layer_norm(self.mlp2(h))

    def __call__(self, prompt_embeds: jax.Array, id_embeds: jax.Array, class_tokens_mask: jax.Array,
                 valid_id_mask: jax.Array) -> jax.Array:
        """prompt_embeds [B, L, E]; id_embeds [B, P, E] (or [B, P, 1, E]); masks [B, L], [B, P]."""
        if id_embeds.ndim == 4:
            id_embeds = id_embeds[:, :, 0]
        part, fuse = part_for_each_token(class_tokens_mask, valid_id_mask)
        per_token = jnp.take_along_axis(id_embeds.astype(prompt_embeds.dtype), part[..., None], axis=1)
        # fuse_fn runs on every token (a few small matmuls over 77 tokens) and `where` keeps the
        # unmarked ones bit-identical: no dynamic shapes, nothing to scatter.
        fused = self.fuse_fn(prompt_embeds, per_token).astype(prompt_embeds.dtype)
        return jnp.where(fuse[..., None], fused, prompt_embeds)


class FacialEncoder(nn.Module):
    """(prompt_embeds [B,L,E], part CLIP states [B,P,257,1280], token mask [B,L], valid mask [B,P])
    -> prompt embeddings [B,L,E] with each facial word's token fused with its part image.

    E = 768 for SD1.5, 2048 for SDXL (`embed_dim`); `embedding_dim` is the CLIP-H width 1280.
    """
    embed_dim: int = 768
    embedding_dim: int = 1280
    dim: int = 1024          # Perceiver width, depth and heads of the visual projection (reference
    depth: int = 8           # values; smaller only for tiny demo/test models, which then export
    heads: int = 16          # with a matching key table)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.visual_projection = AttentionMLP(self.embed_dim, embedding_dim=self.embedding_dim,
                                              dim=self.dim, depth=self.depth, heads=self.heads,
                                              dim_head=self.dim // self.heads, **kw)
        self.fuse_module = FuseModule(self.embed_dim, **kw)

    def project_parts(self, multi_image_embeds: jax.Array) -> jax.Array:
        """[B, P, T, 1280] -> one embedding per part image [B, P, E]."""
        b, p, t, c = multi_image_embeds.shape
        out = self.visual_projection(multi_image_embeds.reshape(b * p, t, c).astype(self.dtype))
        return out.reshape(b, p, -1)

    def __call__(self, prompt_embeds: jax.Array, multi_image_embeds: jax.Array,
                 class_tokens_mask: jax.Array, valid_id_mask: jax.Array) -> jax.Array:
        id_embeds = self.project_parts(multi_image_embeds)
        return self.fuse_module(prompt_embeds, id_embeds, class_tokens_mask, valid_id_mask)
