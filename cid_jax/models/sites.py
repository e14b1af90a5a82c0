"""The UNet's attention sites: their diffusers names, order, block groups and Flax paths.

One home for the facts that the model, the adapters, the losses and the checkpoint layer all need
about where an attention sits. Plain Python (no Flax), so configs can import it.

* A site's diffusers name is its key in `unet.attn_processors` without ".processor":
  "down_blocks.1.attentions.0.transformer_blocks.0.attn2". Our Flax path for it replaces each
  "<list>.<i>" by "<list>_<i>": ("down_blocks_1", "attentions_0", "transformer_blocks_0", "attn2").
* diffusers registers processors down blocks first, then up blocks, then the mid block; the
  reference checkpoint indexes its `adapter_modules` by that position (`processor_sites`).
* The reference hooks block *groups* ("down_blocks.1", "mid_block", ...) for the facial loss.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple, Sequence


class AttentionSite(NamedTuple):
    """Where an attention sits, in diffusers' names (the key of `unet.attn_processors`)."""
    name: str                   # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    is_cross: bool              # attn2 (cross-attention to the conditioning) vs attn1 (self)
    hidden_size: int            # query width (block channels)
    context_dim: int            # key/value input width (cross_attention_dim for attn2)
    heads: int
    dim_head: int


class ProcessorSite(NamedTuple):
    """One UNet attention as the reference checkpoint indexes it."""
    index: int              # position in diffusers' unet.attn_processors
    name: str               # diffusers name without '.processor'
    is_cross: bool          # attn2
    hidden_size: int


# Reference `unet_store_cross_attention_scores`: the hookable block groups, outermost first.
UNET_LAYER_NAMES = ("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
                    "up_blocks.1", "up_blocks.2", "up_blocks.3")


def reference_capture_groups(num_layers: int) -> tuple[str, ...]:
    """The block groups the reference hooks for `localization_layers=num_layers` (the middle ones).

    5 (SD1.5 training) -> down_blocks.1, down_blocks.2, mid_block, up_blocks.1, up_blocks.2;
    3 (SDXL training)  -> down_blocks.2, mid_block, up_blocks.1.
    """
    if not 1 <= num_layers <= len(UNET_LAYER_NAMES):
        raise ValueError(f"num_layers must be in 1..{len(UNET_LAYER_NAMES)}, got {num_layers}")
    start = (len(UNET_LAYER_NAMES) - num_layers) // 2
    return UNET_LAYER_NAMES[start:start + num_layers]


SD15_CAPTURE_GROUPS = reference_capture_groups(5)
SDXL_CAPTURE_GROUPS = reference_capture_groups(3)


def block_group(site_name: str) -> str:
    """'up_blocks.1.attentions.2.transformer_blocks.0.attn2' -> 'up_blocks.1'; mid -> 'mid_block'."""
    parts = site_name.split(".")
    return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


# --------------------------------------------------------------------------------- names <-> paths

_LIST_ITEM = re.compile(r"^(down_blocks|up_blocks|attentions|transformer_blocks)_(\d+)$")


def site_name_to_flax_path(name: str) -> tuple[str, ...]:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2' -> ('down_blocks_1', ..., 'attn2')."""
    parts, out, i = name.split("."), [], 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            out.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return tuple(out)


def flax_path_to_site_name(path: Sequence[str]) -> str:
    """Inverse of `site_name_to_flax_path`."""
    return ".".join(_LIST_ITEM.sub(r"\1.\2", str(p)) for p in path)


def processor_order_key(name: str) -> tuple:
    """Sort key giving diffusers' attn_processors order for site names (down, up, mid)."""
    parts = name.split(".")
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}[parts[0]]
    numbers = tuple(int(p) for p in parts if p.isdigit())
    return (group,) + numbers + (parts[-1],)


# ------------------------------------------------------------------------------------ all sites


def _field(config: Any, name: str, default=None):
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _per_block(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def processor_sites(unet_config) -> tuple[ProcessorSite, ...]:
    """All attention sites of a UNet2DConditionModel in `unet.attn_processors` order.

    `unet_config`: a diffusers config dict (`unet/config.json`) or an object with the same fields
    (`cid_jax.models.unet.UNetConfig`). diffusers registers `down_blocks`, then `up_blocks`, then
    `mid_block`; inside each: attentions[j].transformer_blocks[t].attn1, attn2. Up blocks have
    layers_per_block + 1 attentions and use the reversed per-block depths.
    """
    channels = tuple(_field(unet_config, "block_out_channels"))
    n = len(channels)
    down_types = tuple(_field(unet_config, "down_block_types"))
    up_types = tuple(_field(unet_config, "up_block_types"))
    layers = _field(unet_config, "layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ValueError(f"per-block layers_per_block {layers} is not supported")
        layers = layers[0]
    depths = _per_block(_field(unet_config, "transformer_layers_per_block", 1), n)
    mid_type = _field(unet_config, "mid_block_type", "UNetMidBlock2DCrossAttn")

    names: list[tuple[str, int]] = []

    def block(prefix: str, num_attn: int, depth: int, hidden: int):
        for j in range(num_attn):
            for t in range(depth):
                for which in ("attn1", "attn2"):
                    names.append((f"{prefix}.attentions.{j}.transformer_blocks.{t}.{which}", hidden))

    for i, kind in enumerate(down_types):
        if kind.startswith("CrossAttn"):
            block(f"down_blocks.{i}", layers, depths[i], channels[i])
    rev_channels, rev_depths = channels[::-1], depths[::-1]
    for i, kind in enumerate(up_types):
        if kind.startswith("CrossAttn"):
            block(f"up_blocks.{i}", layers + 1, rev_depths[i], rev_channels[i])
    if mid_type is not None:
        block("mid_block", 1, depths[-1], channels[-1])
    return tuple(ProcessorSite(k, name, name.endswith("attn2"), h) for k, (name, h) in enumerate(names))
