"""Training losses: the (optionally foreground-masked) noise MSE and the facial localization loss.

The facial localization loss follows the reference (`get_object_localization_loss` with
`BalancedL1Loss(threshold=1.0, normalize=True)`, spec §7.5): for each captured attention map
A [B, heads, N, 5] (attention of every pixel to each facial word) and the part masks resized to the
map's sqrt(N) x sqrt(N) grid,

    A <- A / (max_N A + 1e-5)
    L_k = mean_{background pixels} A - mean_{part pixels} A      (area-normalised, +1e-5 guards)
    loss = sum_k(L_k * valid_k) / (sum_k valid_k + 1e-5), averaged over heads and batch,

then averaged over the captured layers. It is negative when the facial words attend inside their
parts, so minimising it moves each word's attention into its mask.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

EPS = 1e-5


def resize_masks(masks: jax.Array, side: int) -> jax.Array:
    """[B, K, H, W] in [0, 1] -> [B, K, side*side] (bilinear, antialiased like torch's interpolate)."""
    b, k = masks.shape[:2]
    small = jax.image.resize(masks.astype(jnp.float32), (b, k, side, side), "bilinear", antialias=True)
    return small.reshape(b, k, side * side)


def balanced_l1_one_layer(attn: jax.Array, masks: jax.Array, valid: jax.Array) -> jax.Array:
    """One layer's loss. attn [B, H, N, K]; masks [B, K, N] in [0, 1]; valid [B, K] bool -> scalar."""
    attn = attn.astype(jnp.float32)
    attn = attn / (jnp.max(attn, axis=2, keepdims=True) + EPS)
    m = masks.transpose(0, 2, 1)[:, None]                               # [B, 1, N, K]
    background = jnp.sum(attn * (1.0 - m), axis=2) / (jnp.sum(1.0 - m, axis=2) + EPS)
    foreground = jnp.sum(attn * m, axis=2) / (jnp.sum(m, axis=2) + EPS)
    per_part = background - foreground                                  # [B, H, K]
    valid = valid.astype(jnp.float32)[:, None, :]
    per_head = jnp.sum(per_part * valid, axis=-1) / (jnp.sum(valid, axis=-1) + EPS)
    return jnp.mean(per_head)


def facial_localization_loss(maps: Mapping[str, jax.Array] | Sequence[jax.Array], facial_masks: jax.Array,
                             valid: jax.Array) -> jax.Array:
    """Average of `balanced_l1_one_layer` over the captured layers.

    maps: captured [B, H, N, K] arrays (N a square number of pixels); facial_masks [B, K, H, W];
    valid: facial_token_idx_mask [B, K].
    """
    layers = list(maps.values()) if isinstance(maps, Mapping) else list(maps)
    if not layers:
        raise ValueError("facial_localization_loss: no attention maps were captured; check the "
                         "capture mode and the block groups in the config")
    total = 0.0
    for attn in layers:
        side = math.isqrt(attn.shape[2])
        if side * side != attn.shape[2]:
            raise ValueError(f"captured map with {attn.shape[2]} pixels is not square")
        total = total + balanced_l1_one_layer(attn, resize_masks(facial_masks, side), valid)
    return total / len(layers)


def noise_mse(pred: jax.Array, target: jax.Array, foreground: jax.Array | None = None,
              use_foreground: jax.Array | None = None) -> jax.Array:
    """Mean squared error over all elements; where `use_foreground` [B] is set, prediction and
    target are both multiplied by the foreground mask (resized to the latent grid), as the
    reference does (the mean still runs over every element, masked ones included).

    pred/target [B, h, w, C] (NHWC latents); foreground [B, H, W] in [0, 1].
    """
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    if foreground is not None and use_foreground is not None:
        b, h, w, _ = pred.shape
        fg = jax.image.resize(foreground.astype(jnp.float32), (b, h, w), "bilinear",
                              antialias=False)[..., None]  # torch interpolate, no antialias
        weight = jnp.where(use_foreground.reshape(b, 1, 1, 1), fg, 1.0)
        pred, target = pred * weight, target * weight
    return jnp.mean(jnp.square(pred - target))
