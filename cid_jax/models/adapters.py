"""ConsistentID's attention adapters: processors plugged into the UNet's attention swap points.

Every attention of the UNet gets LoRA (rank 128, no alpha, scale 1: `W x + up(down(x))`) on its
q/k/v/out projections; every cross-attention additionally reads the last `num_tokens` (4) tokens of
the conditioning -- the ID tokens from ProjPlus -- through its own bias-free `to_k_ip`/`to_v_ip`,
with the same LoRA-augmented query, and adds `scale * h_ip` to the text attention output *before*
the output projection (spec §4). This is IP-Adapter-FaceID-Plus's layout, parameter for parameter.

The processors also capture, for the facial localization loss, the attention the 5 facial word
tokens receive, gathered to [B, heads, pixels, 5] instead of keeping whole maps:
  * capture "cross" (the paper; the default): the text-part cross-attention softmax over the 77
    text tokens, gathered at the facial token positions;
  * capture "self" (what the reference training code actually computes, spec §7.5): the attn1
    self-attention probabilities gathered at *key* indices equal to the facial token positions.
Probabilities are computed explicitly only at captured sites; everywhere else the fused kernel runs.
Captured arrays are sown into the `intermediates` collection under the name `facial_attn`
(`collect_facial_attn` reads them back in diffusers processor order).

Several people in one image (`Regions` in the attention kwargs, inference only): each cross-attention
attends once per person to that person's context (their facial words fused, their ID tokens) and once
to a base context (the text alone, no ID attention), and mixes the results per query pixel by the
people's region weights at that pixel's resolution: inside person p's region only p's photo acts.

Parameters live in the UNet param tree at `<attention path>/processor/...`, named after the
reference processor's state dict (`to_q_lora/down/kernel`, ..., `to_k_ip/kernel`), so the export
to `adapter_modules.{index}.to_q_lora.down.weight` is a rename plus a transpose.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cid_jax.models.attention import (ProcessorPlan, attend_with_probs, attention_probs,
                                      dot_product_attention, merge_heads, split_heads)
from cid_jax.models.sites import (SD15_CAPTURE_GROUPS, UNET_LAYER_NAMES, AttentionSite, block_group,
                                  flax_path_to_site_name, processor_order_key)

CAPTURE_MODES = ("cross", "self", "none")
CAPTURE_NAME = "facial_attn"          # sown under collection "intermediates"
CAPTURE_COLLECTION = "intermediates"


# ------------------------------------------------------------------------------------ modules


class Regions(NamedTuple):
    """Several identities, each acting inside its own region (`ConsistentCrossProcessor`).

    contexts: [B, P, T + num_tokens, E], person p's text context (their facial words fused) and their
      ID tokens; the processor's own `context` is then the base context of the pixels outside every
      region (its text part: the text alone; its ID tokens are not read).
    weights: {pixels L: [B, P, L]} each person's region weight at each UNet resolution (the
      flattened feature map of L pixels), in [0, 1], summing to <= 1 over people at every pixel."""
    contexts: jax.Array
    weights: Mapping[int, jax.Array]


def _attend_each(q: jax.Array, k: jax.Array, v: jax.Array, kernel: str) -> jax.Array:
    """One query set against several contexts: q [B, L, H, D], k/v [B, C, T, H, D] -> [B, C, L, H, D]."""
    b, c = k.shape[:2]
    fold = lambda x: x.reshape(b * c, *x.shape[2:])  # noqa: E731
    qs = jnp.broadcast_to(q[:, None], (b, c) + q.shape[1:])
    out = dot_product_attention(fold(qs), fold(k), fold(v), kernel=kernel)
    return out.reshape(b, c, *out.shape[1:])


def _lora_down_init(rank: int):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0 / rank), ("embed", "mlp"))


class LoRALinear(nn.Module):
    """`up(down(x))`, bias-free, rank `rank`: diffusers' LoRALinearLayer with network_alpha=None.

    Init as the reference: down ~ N(0, (1/rank)^2), up = 0, so a fresh adapter changes nothing.
    """
    features: int
    rank: int = 128
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        h = nn.Dense(self.rank, name="down", kernel_init=_lora_down_init(self.rank), **kw)(x)
        return nn.Dense(self.features, name="up", kernel_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("mlp", "embed")), **kw)(h)


class _LoRAProjections(nn.Module):
    """Shared part of both processors: LoRA-augmented q/k/v and output projection.

    `folded=True`: the LoRA has been folded into the base kernels (`fold_lora`, inference), so the
    projections are the plain ones and the processor has no LoRA parameters."""
    rank: int = 128
    lora_scale: float = 1.0
    folded: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def project(self, base, name: str, features: int, x):
        if self.folded:
            return base(x)
        lora = LoRALinear(features, self.rank, name=name, dtype=self.dtype, param_dtype=self.param_dtype)
        return base(x) + self.lora_scale * lora(x)

    def qkv(self, attn, hidden, context):
        inner = attn.heads * attn.dim_head
        q = self.project(attn.to_q, "to_q_lora", inner, hidden)
        k = self.project(attn.to_k, "to_k_lora", inner, context)
        v = self.project(attn.to_v, "to_v_lora", inner, context)
        return (split_heads(q, attn.heads), split_heads(k, attn.heads), split_heads(v, attn.heads))

    def out(self, attn, h):
        return self.project(attn.to_out_0, "to_out_lora", attn.query_dim, h)


def gather_keys(probs: jax.Array, token_idx: jax.Array) -> jax.Array:
    """probs [B, H, Lq, Lk] at key positions token_idx [B, K] -> [B, H, Lq, K].

    A position >= Lk reads 0. This only happens in "self" mode, where the keys are pixels: at 512 px
    the mid block has 8x8 = 64 pixels while facial tokens can sit at positions up to 76, and the
    reference's torch.gather would fail there. A zero map contributes exactly 0 to the localization
    loss (its normalised background and part means are both 0).
    """
    idx = token_idx.astype(jnp.int32)[:, None, None, :]
    return jnp.take_along_axis(probs, idx, axis=-1, mode="fill", fill_value=0)


class ConsistentSelfProcessor(_LoRAProjections):
    """Reference `Consistent_AttProcessor`: attention with LoRA on q/k/v/out (used on attn1).

    With `capture=True` and `facial_token_idx` [B, 5] in the attention kwargs, the probabilities are
    computed explicitly and those at key indices `facial_token_idx` are sown ("self" capture mode).
    """
    capture: bool = False

    @nn.compact
    def __call__(self, attn, hidden, context=None, mask=None, facial_token_idx=None, **unused):
        context = hidden if context is None else context
        q, k, v = self.qkv(attn, hidden, context)
        if self.capture and facial_token_idx is not None:
            probs = attention_probs(q, k, mask)
            self.sow(CAPTURE_COLLECTION, CAPTURE_NAME, gather_keys(probs, facial_token_idx))
            h = attend_with_probs(probs, v)
        else:
            h = dot_product_attention(q, k, v, mask, attn.kernel)
        return self.out(attn, merge_heads(h))


class ConsistentCrossProcessor(_LoRAProjections):
    """Reference `Consistent_IPAttProcessor`: LoRA cross-attention + decoupled ID-token attention.

    context [B, T + num_tokens, C]: the first T tokens are text (LoRA k/v, optional mask), the last
    `num_tokens` are ID tokens (`to_k_ip`/`to_v_ip`, no LoRA, no mask); both use the same query and
    `h_text + scale * h_ip` goes through the (LoRA) output projection. An `ip_scale` entry in the
    attention kwargs (a scalar) overrides `scale` at run time.

    With `capture=True` and `facial_token_idx` given, the text probabilities gathered at the facial
    token positions are sown ("cross" capture mode, [B, heads, pixels, 5]).
    """
    num_tokens: int = 4
    scale: float = 1.0
    capture: bool = False

    @nn.compact
    def __call__(self, attn, hidden, context=None, mask=None, facial_token_idx=None, ip_scale=None,
                 regions: Regions | None = None, **unused):
        if context is None or context.shape[1] <= self.num_tokens:
            raise ValueError(
                f"{type(self).__name__} needs a context of text tokens followed by {self.num_tokens} ID "
                f"tokens; got {None if context is None else context.shape}")
        end = context.shape[1] - self.num_tokens
        text, ip = context[:, :end], context[:, end:]
        inner = attn.heads * attn.dim_head
        ip_kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                              ("embed", "heads")))
        to_k_ip, to_v_ip = nn.Dense(inner, name="to_k_ip", **ip_kw), nn.Dense(inner, name="to_v_ip", **ip_kw)
        if regions is not None:
            return self.regional(attn, hidden, text, regions, to_k_ip, to_v_ip, ip_scale)
        if mask is not None and mask.shape[-1] == context.shape[1]:
            mask = mask[..., :end]  # the mask covers the text part only
        q, k, v = self.qkv(attn, hidden, text)
        if self.capture and facial_token_idx is not None:
            probs = attention_probs(q, k, mask)
            self.sow(CAPTURE_COLLECTION, CAPTURE_NAME, gather_keys(probs, facial_token_idx))
            h = attend_with_probs(probs, v)
        else:
            h = dot_product_attention(q, k, v, mask, attn.kernel)

        ip_k, ip_v = split_heads(to_k_ip(ip), attn.heads), split_heads(to_v_ip(ip), attn.heads)
        h_ip = dot_product_attention(q, ip_k, ip_v, kernel=attn.kernel)
        scale = self.scale if ip_scale is None else jnp.asarray(ip_scale, h.dtype)
        return self.out(attn, merge_heads(h + scale * h_ip.astype(h.dtype)))

    def regional(self, attn, hidden, text, regions: Regions, to_k_ip, to_v_ip, ip_scale):
        """Each pixel: sum_p w_p (text attention to person p's context + scale x ID attention to p's
        tokens) + (1 - sum_p w_p) text attention to the base context. A pixel's output reads only the
        contexts whose weight there is not 0, so inside one region no other photo acts."""
        heads, inner = attn.heads, attn.heads * attn.dim_head
        weights = regions.weights[hidden.shape[1]]                       # [B, P, L]
        people = regions.contexts.astype(text.dtype)                     # [B, P, T + n, E]
        end = text.shape[1]
        texts = jnp.concatenate([text[:, None], people[:, :, :end]], axis=1)  # [B, 1 + P, T, E]
        per_head = lambda x: x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)  # noqa: E731
        q = split_heads(self.project(attn.to_q, "to_q_lora", inner, hidden), heads)
        k = per_head(self.project(attn.to_k, "to_k_lora", inner, texts))
        v = per_head(self.project(attn.to_v, "to_v_lora", inner, texts))
        h_text = _attend_each(q, k, v, attn.kernel)                      # [B, 1 + P, L, H, D]
        ip = people[:, :, end:]
        h_ip = _attend_each(q, per_head(to_k_ip(ip)), per_head(to_v_ip(ip)), attn.kernel)  # [B, P, L, H, D]
        scale = self.scale if ip_scale is None else jnp.asarray(ip_scale, h_text.dtype)
        w = weights.astype(h_text.dtype)[..., None, None]                # [B, P, L, 1, 1]
        h = (1 - w.sum(1)) * h_text[:, 0] + (w * (h_text[:, 1:] + scale * h_ip.astype(h_text.dtype))).sum(1)
        return self.out(attn, merge_heads(h))


# --------------------------------------------------------------------------------------- plan


def consistentid_plan(*, rank: int = 128, num_tokens: int = 4, scale: float = 1.0,
                      capture: str = "cross", capture_groups: Sequence[str] = SD15_CAPTURE_GROUPS,
                      lora_scale: float = 1.0, fold_lora: bool = False, dtype=jnp.float32,
                      param_dtype=jnp.float32) -> ProcessorPlan:
    """The ProcessorPlan that puts ConsistentID's processors on every attention of a UNet.

    attn1 -> ConsistentSelfProcessor, attn2 -> ConsistentCrossProcessor. `capture` is "cross"
    (paper: attn2 text probabilities), "self" (reference training code: attn1 probabilities) or
    "none"; it applies to the sites whose block group (`block_group`) is in `capture_groups`.
    `fold_lora`: the processors expect base kernels with the LoRA folded in (`fold_lora`).
    """
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
    groups = frozenset(capture_groups)
    unknown = groups - set(UNET_LAYER_NAMES)
    if unknown:
        raise ValueError(f"unknown capture groups {sorted(unknown)}; known: {UNET_LAYER_NAMES}")
    common = dict(rank=rank, lora_scale=lora_scale, folded=fold_lora, dtype=dtype, param_dtype=param_dtype)

    def plan(site: AttentionSite):
        captured = block_group(site.name) in groups and capture == ("cross" if site.is_cross else "self")
        if site.is_cross:
            return functools.partial(ConsistentCrossProcessor, num_tokens=num_tokens, scale=scale,
                                     capture=captured, **common)
        return functools.partial(ConsistentSelfProcessor, capture=captured, **common)

    return plan


# ----------------------------------------------------------------------------- param helpers


def _unbox(x):
    return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x


def init_ip_from_base(unet_params: Mapping, adapter_params: Mapping) -> dict:
    """Copies each attn2's base `to_k`/`to_v` kernel into its `processor/to_k_ip`/`to_v_ip` kernel.

    The reference initialises the decoupled ID projections from the UNet's own text projections
    (train.py). `unet_params` holds `.../attn2/to_k/kernel`; `adapter_params` holds
    `.../attn2/processor/to_k_ip/kernel` (both may be the same merged tree). Returns a new
    `adapter_params`; raises if an ip kernel has no base kernel or the shapes differ.
    """
    base = traverse_util.flatten_dict(unet_params)
    flat = dict(traverse_util.flatten_dict(adapter_params))
    copied = 0
    for path, leaf in list(flat.items()):
        if path[-3:] not in (("processor", "to_k_ip", "kernel"), ("processor", "to_v_ip", "kernel")):
            continue
        src = path[:-3] + (path[-2][:-3], "kernel")  # to_k_ip -> to_k
        if src not in base:
            raise KeyError(f"init_ip_from_base: no base kernel {'/'.join(src)} for {'/'.join(path)}")
        value, target = _unbox(base[src]), _unbox(leaf)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"init_ip_from_base: {'/'.join(src)} has shape {tuple(value.shape)} but "
                             f"{'/'.join(path)} has {tuple(target.shape)}")
        # Host trees stay on the host (numpy); device trees stay on the device.
        value = (np.asarray(value, dtype=target.dtype) if isinstance(target, np.ndarray)
                 else jnp.asarray(value, dtype=target.dtype))
        flat[path] = leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value
        copied += 1
    if not copied:
        raise ValueError("init_ip_from_base: adapter_params has no processor/to_{k,v}_ip/kernel")
    return traverse_util.unflatten_dict(flat)


# The base projection each LoRA adapts (`<attention>/processor/<lora>` -> `<attention>/<base>`).
LORA_TARGETS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out_0"}


def fold_lora(unet_params: Mapping, adapter_params: Mapping, lora_scale: float = 1.0) -> tuple[dict, dict]:
    """(base UNet params with every LoRA folded in, adapter params without the LoRA subtrees).

    Each adapted kernel becomes `W + lora_scale * down @ up`, computed in float32 and cast back to
    W's dtype, so a model built with `consistentid_plan(fold_lora=True)` computes the same function
    with one matmul per projection instead of three. Host trees stay numpy, device trees stay on
    their devices; raises if a LoRA has no base kernel."""
    base = dict(traverse_util.flatten_dict(unet_params))
    adapters = traverse_util.flatten_dict(adapter_params)
    kept = {}
    folded = 0
    for path, leaf in adapters.items():
        if len(path) < 4 or path[-4] != "processor" or path[-3] not in LORA_TARGETS:
            kept[path] = leaf
            continue
        if path[-2:] != ("down", "kernel"):
            continue  # `up` is read with its `down`
        attention = path[:-4]
        target = attention + (LORA_TARGETS[path[-3]], "kernel")
        if target not in base:
            raise KeyError(f"fold_lora: no base kernel {'/'.join(target)} for {'/'.join(path[:-2])}")
        up = adapters[path[:-2] + ("up", "kernel")]
        w = base[target]
        xp = np if isinstance(w, np.ndarray) else jnp
        delta = xp.asarray(leaf, xp.float32) @ xp.asarray(up, xp.float32)
        base[target] = (xp.asarray(w, xp.float32) + xp.float32(lora_scale) * delta).astype(w.dtype)
        folded += 1
    if not folded:
        raise ValueError("fold_lora: adapter_params has no processor/*_lora/down/kernel")
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(kept)


def collect_facial_attn(intermediates: Mapping) -> dict[str, jax.Array]:
    """The captured maps from an `intermediates` collection, keyed by diffusers attention name.

    Ordered like `unet.attn_processors` (down, up, mid). Each value is [B, heads, pixels, 5].
    """
    found = {}
    for path, value in traverse_util.flatten_dict(intermediates, keep_empty_nodes=False).items():
        if CAPTURE_NAME in path:
            cut = path.index(CAPTURE_NAME)
            module_path = tuple(p for p in path[:cut] if p != "processor")
            found[flax_path_to_site_name(module_path)] = value[0] if isinstance(value, tuple) else value
    return dict(sorted(found.items(), key=lambda kv: processor_order_key(kv[0])))
