"""Perceiver resamplers of ConsistentID: the FacialEncoder's `AttentionMLP` and the ID projection `ProjPlus`.

Both are the IP-Adapter-Plus Perceiver: a few learned or given *latent* queries attend, layer after
layer, to `[image tokens ; latents]`, each layer followed by a bias-free feed-forward. The numerics
follow the reference exactly (spec §2, §3, §5.5): LayerNorm eps 1e-5, exact-erf GELU, bias-free
q/kv/out, the `dim_head**-0.25` scale applied to q *and* k, `to_kv` split K-then-V, softmax in fp32.

Parameter names (Flax) and the reference PyTorch keys they export to (weights/consistentid.py):

    layers_{i}/attn/{norm1,norm2,to_q,to_kv,to_out}   <-> layers.{i}.0.{norm1,norm2,to_q,to_kv,to_out}
    layers_{i}/ff/{norm,fc1,fc2}                      <-> layers.{i}.1.{0,1,3}
    ProjPlus: proj_0, proj_2, norm, perceiver_resampler/...   <-> proj.0, proj.2, norm, ...
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cid_jax.sharding import dense_init

LN_EPS = 1e-5  # torch nn.LayerNorm default (Flax's is 1e-6)


def layer_norm(name, dtype, param_dtype) -> nn.LayerNorm:
    """torch-equivalent LayerNorm: eps 1e-5, statistics in fp32 (name=None inside `setup`)."""
    return nn.LayerNorm(epsilon=LN_EPS, name=name, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False)


class PerceiverAttention(nn.Module):
    """Latents attend to `[x ; latents]` (the latents also see themselves).

    x [B, Lx, dim], latents [B, Lq, dim] -> [B, Lq, dim]. The channel of head h, dim d is h*dim_head+d.
    """
    dim: int
    dim_head: int = 64
    heads: int = 8
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        inner = self.heads * self.dim_head
        x = layer_norm("norm1", self.dtype, self.param_dtype)(x)
        latents = layer_norm("norm2", self.dtype, self.param_dtype)(latents)

        q = nn.Dense(inner, name="to_q", kernel_init=dense_init(("embed", "heads")), **kw)(latents)
        kv = nn.Dense(2 * inner, name="to_kv", kernel_init=dense_init(("embed", "heads")), **kw)(
            jnp.concatenate([x, latents], axis=-2))
        k, v = kv[..., :inner], kv[..., inner:]  # K first, V second (torch .chunk(2, -1))

        b = latents.shape[0]
        q = q.reshape(b, -1, self.heads, self.dim_head)
        k = k.reshape(b, -1, self.heads, self.dim_head)
        v = v.reshape(b, -1, self.heads, self.dim_head)
        # The reference scales q and k separately by d^-1/4 (more stable in fp16 than one d^-1/2).
        s = self.dim_head ** -0.25
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * s, k * s)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, -1, inner)
        return nn.Dense(self.dim, name="to_out", kernel_init=dense_init(("heads", "embed")), **kw)(out)


class FeedForward(nn.Module):
    """LayerNorm -> Linear(dim, dim*mult, no bias) -> exact GELU -> Linear(dim*mult, dim, no bias)."""
    dim: int
    mult: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        h = layer_norm("norm", self.dtype, self.param_dtype)(x)
        h = nn.Dense(self.dim * self.mult, name="fc1", kernel_init=dense_init(("embed", "mlp")), **kw)(h)
        h = nn.gelu(h, approximate=False)
        return nn.Dense(self.dim, name="fc2", kernel_init=dense_init(("mlp", "embed")), **kw)(h)


class PerceiverLayer(nn.Module):
    """One resampler layer: residual PerceiverAttention then residual FeedForward."""
    dim: int
    dim_head: int
    heads: int
    ff_mult: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        latents = PerceiverAttention(self.dim, self.dim_head, self.heads, name="attn", **kw)(
            x, latents) + latents
        return FeedForward(self.dim, self.ff_mult, name="ff", **kw)(latents) + latents


class PerceiverResampler(nn.Module):
    """`proj_in(x)`, `depth` PerceiverLayers over the latents, then `norm_out(proj_out(latents))`.

    With `num_latents > 0` the latents are a learned parameter `latents` [1, num_latents, dim]
    (the FacialEncoder's `AttentionMLP`); with 0 they are given by the caller (ProjPlus's
    `FacePerceiverResampler`). x [B, L, embedding_dim] -> [B, num_latents, output_dim].
    """
    dim: int = 1024
    depth: int = 8
    dim_head: int = 64
    heads: int = 16
    embedding_dim: int = 1280
    output_dim: int = 768
    ff_mult: int = 4
    num_latents: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, latents: Optional[jax.Array] = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.num_latents:
            if latents is not None:
                raise ValueError("this resampler learns its own latents; do not pass any")
            learned = self.param(
                "latents", lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / self.dim ** 0.5,
                (1, self.num_latents, self.dim), self.param_dtype)
            latents = jnp.broadcast_to(learned.astype(self.dtype), (x.shape[0],) + learned.shape[1:])
        elif latents is None:
            raise ValueError("this resampler needs the latents (ProjPlus passes its ID tokens)")
        x = nn.Dense(self.dim, name="proj_in", kernel_init=dense_init(("mlp", "embed")), **kw)(x)
        for i in range(self.depth):
            latents = PerceiverLayer(self.dim, self.dim_head, self.heads, self.ff_mult,
                                     name=f"layers_{i}", **kw)(x, latents)
        out = nn.Dense(self.output_dim, name="proj_out", kernel_init=dense_init(("embed", "mlp")), **kw)(latents)
        return layer_norm("norm_out", self.dtype, self.param_dtype)(out)


def AttentionMLP(output_dim: int = 768, *, embedding_dim: int = 1280, dim: int = 1024, depth: int = 8,
                 dim_head: int = 64, heads: int = 16, num_latents: int = 1, ff_mult: int = 4,
                 dtype=jnp.float32, param_dtype=jnp.float32, name: Optional[str] = None):
    """The FacialEncoder's visual projection: 1 learned latent reads one part image's 257 CLIP tokens.

    A factory (not a class) so the reference defaults live in one place; (N, 257, 1280) -> (N, 1, out).
    """
    return PerceiverResampler(dim=dim, depth=depth, dim_head=dim_head, heads=heads,
                              embedding_dim=embedding_dim, output_dim=output_dim, ff_mult=ff_mult,
                              num_latents=num_latents, dtype=dtype, param_dtype=param_dtype, name=name)


class ProjPlus(nn.Module):
    """IP-Adapter FaceID-Plus `ProjPlusModel`: ArcFace 512 -> `num_tokens` ID tokens of width C.

    `proj` (Linear, GELU, Linear) makes the tokens from the identity embedding, LayerNorm `norm`,
    then a 4-layer Perceiver (heads = C // 64) refines them against the whole-image CLIP tokens.
    With `shortcut` (SDXL, FaceID-PlusV2) the result is `tokens + scale * refined`.

    id_embeds [B, 512] or [B, 1, 512]; clip_embeds [B, 257, 1280] -> [B, num_tokens, C].
    """
    cross_attention_dim: int = 768
    id_embeddings_dim: int = 512
    clip_embeddings_dim: int = 1280
    num_tokens: int = 4
    depth: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, id_embeds: jax.Array, clip_embeds: jax.Array, shortcut: bool = False,
                 scale: float | jax.Array = 1.0) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.cross_attention_dim
        h = nn.Dense(self.id_embeddings_dim * 2, name="proj_0", kernel_init=dense_init(("embed", "mlp")),
                     **kw)(id_embeds.astype(self.dtype))
        h = nn.gelu(h, approximate=False)
        h = nn.Dense(c * self.num_tokens, name="proj_2", kernel_init=dense_init(("mlp", "embed")), **kw)(h)
        x = layer_norm("norm", self.dtype, self.param_dtype)(h.reshape(-1, self.num_tokens, c))
        out = PerceiverResampler(dim=c, depth=self.depth, dim_head=64, heads=c // 64,
                                 embedding_dim=self.clip_embeddings_dim, output_dim=c, ff_mult=4,
                                 num_latents=0, name="perceiver_resampler", **kw)(
                                     clip_embeds.astype(self.dtype), x)
        if shortcut:
            out = x + scale * out
        return out
