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

How the attention product itself runs (the *kernel*) is a field of each `Attention`, set once on the
top-level model (`UNet2DConditionModel.attention_kernel`, `AutoencoderKL.attention_kernel`) and
passed down: part of the module definition, so jit's cache sees it and no global state is read at
trace time.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from cid_jax.models.sites import AttentionSite
from cid_jax.sharding import dense_init


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


# The attention kernels. "auto": the query-chunked kernel when compiling for the CPU, cuDNN flash
# attention on a GPU for bf16/fp16 without a mask (when a probe shows it compiles and agrees with
# XLA there), XLA's fused attention otherwise. "fused": always XLA's (what `cid_jax.aot` uses when it
# compiles for a TPU from a CPU host, and what inits trace). "chunked": the CPU kernel wherever the
# sequence is long enough. "cudnn": cuDNN flash attention wherever there is no mask.
KERNELS = ("auto", "fused", "chunked", "cudnn")
# Queries per block of the CPU kernel: at most _CPU_CHUNK, fewer while the [B, H, chunk, Lk] logits
# block exceeds _CPU_BLOCK_SCORES (16 MB of fp32). Measured on one core (ms per sample): 4096 tokens,
# B=2: 572 / 298 / 363 at 128 / 64 / 32; 1024 tokens, B=8: 29 / 8.2 / 7.1 (a fixed 128 made
# batch-4 CFG generation 2x slower per image than batch 1).
_CPU_CHUNK = 64
_CPU_BLOCK_SCORES = 1 << 22
_CPU_CHUNK_MIN_SCORES = 1 << 20
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    return kernel


def cpu_chunk(batch: int, lq: int, heads: int, lk: int) -> int:
    """Queries per block of the CPU kernel: the largest power of two <= _CPU_CHUNK whose logits block
    fits _CPU_BLOCK_SCORES (at least 16) and divides lq; 0 where none divides it."""
    chunk = _CPU_CHUNK
    while chunk > 16 and batch * heads * chunk * lk > _CPU_BLOCK_SCORES:
        chunk //= 2
    while chunk >= 16 and lq % chunk:
        chunk //= 2
    return chunk if chunk >= 16 else 0


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


# (lq, lk, heads, head_dim, dtype) -> whether cuDNN attention passed its probe there (reported by
# the benchmarks, so a GPU run says which kernel it timed).
CUDNN_PROBES: dict[tuple, bool] = {}


def cudnn_attention_works(lq: int, lk: int, heads: int, head_dim: int, dtype_name: str) -> bool:
    """Whether cuDNN flash attention compiles on this GPU for these sizes, forward and backward,
    and matches XLA's attention (batch 1). Cached per shape; runs eagerly even while a caller is
    being traced. A failure is logged once and the caller falls back to XLA."""
    if jax.default_backend() != "gpu":
        return False
    key = (lq, lk, heads, head_dim, dtype_name)
    if key not in CUDNN_PROBES:
        CUDNN_PROBES[key] = _probe_cudnn_attention(*key)
    return CUDNN_PROBES[key]


def _probe_cudnn_attention(lq, lk, heads, head_dim, dtype_name) -> bool:
    dtype = jnp.dtype(dtype_name)
    try:
        with jax.ensure_compile_time_eval():
            keys = jax.random.split(jax.random.key(0), 3)
            q, k, v = (jax.random.normal(kk, (1, n, heads, head_dim), dtype)
                       for kk, n in zip(keys, (lq, lk, lk)))

            def loss(impl, q, k, v):
                out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
                return jnp.sum(out.astype(jnp.float32) ** 2), out

            grads = {impl: jax.jit(jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2),
                                                      has_aux=True))(q, k, v) for impl in ("cudnn", "xla")}
            (_, out_c), g_c = grads["cudnn"]
            (_, out_x), g_x = grads["xla"]
            # Relative error of each tensor as a whole: bf16 rounding differs between the kernels.
            ok = all(float(jnp.linalg.norm((a - b).astype(jnp.float32)))
                     <= 2e-2 * float(jnp.linalg.norm(b.astype(jnp.float32))) + 1e-6
                     for a, b in zip((out_c, *g_c), (out_x, *g_x)))
    except Exception as e:  # noqa: BLE001 - any compile/runtime refusal means "not here"
        logging.warning("cuDNN attention unavailable for q %d, k %d, %d x %d %s (%s: %s); using XLA's",
                        lq, lk, heads, head_dim, dtype_name, type(e).__name__, str(e).splitlines()[0][:200])
        return False
    if not ok:
        logging.warning("cuDNN attention disagrees with XLA's for q %d, k %d, %d x %d %s; using XLA's",
                        lq, lk, heads, head_dim, dtype_name)
    return ok


def dot_product_attention(q, k, v, mask: Optional[jax.Array] = None, kernel: str = "auto") -> jax.Array:
    """Attention where no probabilities are needed: q/k/v [B, L, H, D] -> [B, Lq, H, D].

    `kernel` (see KERNELS): by default chunked on the CPU for long unmasked sequences, cuDNN flash
    attention on a GPU in bf16/fp16, XLA's attention otherwise."""
    mode = check_kernel(kernel)
    if mask is None and mode in ("auto", "cudnn") and q.dtype in _CUDNN_DTYPES:
        if mode == "cudnn" or cudnn_attention_works(q.shape[1], k.shape[1], q.shape[2], q.shape[3],
                                                    jnp.dtype(q.dtype).name):
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    chunk = cpu_chunk(*q.shape[:3], k.shape[1])
    long = q.shape[1] * k.shape[1] >= _CPU_CHUNK_MIN_SCORES and chunk
    if mask is None and long and (mode == "chunked" or (mode == "auto" and jax.default_backend() == "cpu")):
        return _chunked_attention(q, k, v, chunk)
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
            out = dot_product_attention(q, k, v, mask, attn.kernel)
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
    kernel: str = "auto"            # how the attention product runs (KERNELS)
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
