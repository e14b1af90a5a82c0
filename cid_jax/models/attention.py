"""diffusers-style Attention whose core is swapped per call site by a *processor*.

The `Attention` module owns the base projections (`to_q`, `to_k`, `to_v`, `to_out_0`) under the
diffusers-Flax names. Everything else — LoRA on the projections, a decoupled key/value branch for ID
tokens, capturing probabilities for a loss, a fused kernel — lives in a processor: a linen Module
created as the child `processor` of the attention, called as `processor(attn, hidden, context, **kw)`.
Its parameters therefore sit at `<attention path>/processor/...`, apart from the frozen base weights.

Which processor an attention gets is decided by a `ProcessorPlan`: a function of the call site
(`AttentionSite`: diffusers name, self/cross, widths). The UNet passes the plan down to every
attention, so ConsistentID (or a test) changes the attention of chosen layers without forking any
model code.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cid_jax.sharding import dense_init


class AttentionSite(NamedTuple):
    """Where an attention sits, in diffusers' names (the key of `unet.attn_processors`)."""
    name: str                   # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    is_cross: bool              # attn2 (cross-attention to the conditioning) vs attn1 (self)
    hidden_size: int            # query width (block channels)
    context_dim: int            # key/value input width (cross_attention_dim for attn2)
    heads: int
    dim_head: int


# A ProcessorPlan maps a site to a processor Module factory (a Module class or functools.partial).
ProcessorFactory = Callable[..., nn.Module]
ProcessorPlan = Callable[[AttentionSite], ProcessorFactory]


# ----------------------------------------------------------------------------- core functions


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, L, H*D] -> [B, L, H, D]; channel index is head*D + d, as torch's view(b, L, heads, -1)."""
    b, l, c = x.shape
    return x.reshape(b, l, heads, c // heads)


def merge_heads(x: jax.Array) -> jax.Array:
    b, l, h, d = x.shape
    return x.reshape(b, l, h * d)


def attention_probs(q: jax.Array, k: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """softmax(q k^T / sqrt(d)) in fp32: q [B,Lq,H,D], k [B,Lk,H,D] -> [B,H,Lq,Lk]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def attend_with_probs(probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs [B,H,Lq,Lk] @ v [B,Lk,H,D] -> [B,Lq,H,D]."""
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


# How `dot_product_attention` runs: "auto" picks the query-chunked kernel when compiling for the
# CPU and the fused kernel elsewhere; `cid_jax.aot` sets "fused" when compiling for TPU from a CPU host.
ATTENTION_KERNEL = {"mode": "auto"}
_CPU_CHUNK = 128          # queries per block: a [B, H, 128, Lk] logits block stays cache-sized
_CPU_CHUNK_MIN_SCORES = 1 << 20


def set_attention_kernel(mode: str) -> None:
    """'auto' (default), 'fused' (jax.nn.dot_product_attention) or 'chunked' (CPU-friendly)."""
    if mode not in ("auto", "fused", "chunked"):
        raise ValueError(f"attention kernel must be auto, fused or chunked, got {mode!r}")
    ATTENTION_KERNEL["mode"] = mode


def _chunked_attention(q, k, v, chunk: int) -> jax.Array:
    """Exact attention over blocks of `chunk` queries, normalising after the value product.

    On XLA:CPU this is ~2x faster than materialising the full [B, H, Lq, Lk] softmax (which is
    memory-bound at 4096 tokens) and needs a fraction of the memory."""
    b, lq, h, d = q.shape
    q = q * (1.0 / math.sqrt(d))

    def block(qb):
        s = jnp.einsum("bqhd,bkhd->bhqk", qb, k, preferred_element_type=jnp.float32)
        p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (o / jnp.sum(p, axis=-1).transpose(0, 2, 1)[..., None]).astype(v.dtype)

    blocks = q.reshape(b, lq // chunk, chunk, h, d).swapaxes(0, 1)
    return jax.lax.map(block, blocks).swapaxes(0, 1).reshape(b, lq, h, d)


def dot_product_attention(q, k, v, mask: Optional[jax.Array] = None) -> jax.Array:
    """Attention where no probabilities are needed: q/k/v [B, L, H, D] -> [B, Lq, H, D].

    The fused kernel (cuDNN flash attention on GPU when available, XLA elsewhere), except on the
    CPU for long unmasked sequences, where the query-chunked form is faster and leaner."""
    mode = ATTENTION_KERNEL["mode"]
    long = q.shape[1] * k.shape[1] >= _CPU_CHUNK_MIN_SCORES and q.shape[1] % _CPU_CHUNK == 0
    if mask is None and long and (mode == "chunked" or (mode == "auto" and jax.default_backend() == "cpu")):
        return _chunked_attention(q, k, v, _CPU_CHUNK)
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


# ------------------------------------------------------------------------------- processors


class DefaultProcessor(nn.Module):
    """Plain scaled-dot-product attention, optionally sowing the probabilities.

    With `capture=True` the softmax is computed explicitly and stored under the 'intermediates'
    collection as `attn_probs` [B, H, Lq, Lk]; otherwise the fused kernel runs.
    """
    capture: bool = False

    @nn.compact
    def __call__(self, attn: "Attention", hidden, context=None, mask=None, **unused):
        context = hidden if context is None else context
        q = split_heads(attn.to_q(hidden), attn.heads)
        k = split_heads(attn.to_k(context), attn.heads)
        v = split_heads(attn.to_v(context), attn.heads)
        if self.capture:
            probs = attention_probs(q, k, mask)
            self.sow("intermediates", "attn_probs", probs)
            out = attend_with_probs(probs, v)
        else:
            out = dot_product_attention(q, k, v, mask)
        return attn.to_out_0(merge_heads(out))


def default_plan(site: AttentionSite) -> ProcessorFactory:
    return DefaultProcessor


# -------------------------------------------------------------------------------- the module


class Attention(nn.Module):
    """diffusers `Attention` (to_q/to_k/to_v without bias, to_out.0 with bias); core = processor."""
    query_dim: int
    heads: int
    dim_head: int
    site: Optional[AttentionSite] = None
    processor_plan: ProcessorPlan = default_plan
    qkv_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        inner = self.heads * self.dim_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.qkv_bias)
        self.to_q = nn.Dense(inner, kernel_init=dense_init(("embed", "heads")), **kw)
        self.to_k = nn.Dense(inner, kernel_init=dense_init(("embed", "heads")), **kw)
        self.to_v = nn.Dense(inner, kernel_init=dense_init(("embed", "heads")), **kw)
        self.to_out_0 = nn.Dense(self.query_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                 kernel_init=dense_init(("heads", "embed")))
        factory = self.processor_plan(self.site) if self.site is not None else DefaultProcessor
        self.processor = factory()

    def __call__(self, hidden, context=None, mask=None, **attention_kwargs):
        return self.processor(self, hidden, context, mask=mask, **attention_kwargs)
