"""ConsistentID checkpoints: the reference PyTorch layout <-> our Flax parameter trees.

The reference checkpoint (spec §5) has three groups, each a flat PyTorch state dict:

    FacialEncoder      visual_projection.* (Perceiver AttentionMLP) + fuse_module.*
    image_proj         ProjPlus (SD1.5 loader's name; SDXL's loader says image_proj_model)
    adapter_modules    {i}.to_q_lora.down.weight ... {i}.to_k_ip.weight, where i is the processor's
                       position in diffusers' `unet.attn_processors` (down, up, mid; attn1 then attn2)

Our side is the trainable tree of the model (`cid_jax.models.consistentid.TRAINABLE_GROUPS`):

    {"facial_encoder":  FacialEncoder params,
     "image_proj":      ProjPlus params,
     "adapter_modules": UNet-shaped tree holding only `<attention path>/processor/...` subtrees,
                        e.g. down_blocks_0/attentions_0/transformer_blocks_0/attn2/processor/to_k_ip/kernel}

`adapter_modules` merges straight into the UNet's param tree (`cid_jax.models.trainable.merge`).

Everything is derived from a `CheckpointLayout` (UNet attention sites + widths): `reference_keys`
writes the key table from the spec by hand, the module trees come from `jax.eval_shape` of the
modules, and every export is checked against both, so the two derivations guard each other.

Files: the reference nested pickle `.bin` (torch.save of OrderedDicts; the only thing the reference
SD1.5 loader reads), flat `.safetensors` with the reference's flat-file prefixes `FacialEncoder.`,
`image_proj_model.`, `adapter_modules.` (needs no torch; the reference SDXL pipeline and its convert
script read those names, for SD1.5 too), and IP-Adapter FaceID-Plus/PlusV2 SD1.5 checkpoints (`image_proj` + `ip_adapter`, same
layout) as an initialisation. Writes are atomic. Metadata (base model, pairing mode, step, dtype)
goes into the safetensors header; for `.bin` it goes into a sidecar `<file>.json`, so the pickle
holds exactly the reference's three top-level keys (see `save_reference_bin`).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from flax import traverse_util

from cid_jax import errors, runtime
from cid_jax.models import presets
from cid_jax.models.consistentid import TRAINABLE_GROUPS
from cid_jax.models.sites import ProcessorSite, processor_sites, site_name_to_flax_path
from cid_jax.weights.state_dict import (StateDict, WeightsError, export_from, load_into,
                                        atomic_write, read_state_dict, write_bytes_atomic, write_safetensors_atomic)

FACIAL_ENCODER, ADAPTERS = "FacialEncoder", "adapter_modules"
IMAGE_PROJ_SD15, IMAGE_PROJ_SDXL = "image_proj", "image_proj_model"
IP_ADAPTER = "ip_adapter"  # IP-Adapter FaceID-Plus's name for the adapter group
OUR_GROUPS = TRAINABLE_GROUPS  # ("facial_encoder", "image_proj", "adapter_modules")
PAIRING_MODES = ("reference", "by_name")
# The group prefixes of a flat `.safetensors` (the reference's convert script and SDXL pipeline).
FLAT_GROUP_NAMES = {FACIAL_ENCODER: FACIAL_ENCODER, IMAGE_PROJ_SD15: IMAGE_PROJ_SDXL,
                    IMAGE_PROJ_SDXL: IMAGE_PROJ_SDXL, ADAPTERS: ADAPTERS}


# ====================================================================================== layout


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
    """Everything that fixes the reference key set and shapes."""
    base: str                             # "sd15", "sdxl" or a free label for custom UNets
    image_proj_key: str                   # top-level name of the ProjPlus group in `.bin` exports
    cross_attention_dim: int              # C: UNet context width = ID token width = FacialEncoder E
    sites: tuple[ProcessorSite, ...]
    rank: int = 128
    num_tokens: int = 4
    id_dim: int = 512
    clip_dim: int = 1280
    fe_dim: int = 1024                    # FacialEncoder Perceiver width, depth, heads: the reference
    fe_depth: int = 8                     # values; other values only for tiny demo/test models
    fe_heads: int = 16

    @property
    def groups(self) -> tuple[str, str, str]:
        """Top-level keys of an export, in the reference's order."""
        return (FACIAL_ENCODER, self.image_proj_key, ADAPTERS)

    def site_by_name(self) -> dict[str, ProcessorSite]:
        return {s.name: s for s in self.sites}


def layout_for(unet_config, *, base: str = "custom", image_proj_key: Optional[str] = None,
               rank: int = 128, num_tokens: int = 4, **sizes) -> CheckpointLayout:
    """The checkpoint layout for a UNet config (`unet/config.json` dict or a UNetConfig); SDXL
    exports name the ProjPlus group `image_proj_model`. `sizes`: clip_dim, fe_dim, fe_depth, fe_heads."""
    c = int(unet_config["cross_attention_dim"] if isinstance(unet_config, Mapping)
            else unet_config.cross_attention_dim)
    if image_proj_key is None:
        image_proj_key = IMAGE_PROJ_SDXL if base == "sdxl" else IMAGE_PROJ_SD15
    return CheckpointLayout(base, image_proj_key, c, processor_sites(unet_config), rank, num_tokens, **sizes)


SD15 = layout_for(presets.SD15_UNET, base="sd15")
SDXL = layout_for(presets.SDXL_UNET, base="sdxl")
LAYOUTS = {"sd15": SD15, "sdxl": SDXL}


# ======================================================================= names: flax <-> torch


def _leaf(name: str) -> str:
    return {"kernel": "weight", "scale": "weight"}.get(name, name)


def perceiver_key(path: Sequence[str]) -> str:
    """Flax path inside a resampler / FacialEncoder / ProjPlus -> reference key.

    layers_{i}/attn/X -> layers.{i}.0.X; layers_{i}/ff/{norm,fc1,fc2} -> layers.{i}.1.{0,1,3};
    proj_0 / proj_2 (ProjPlus Sequential) -> proj.0 / proj.2; kernel, scale -> weight.
    """
    *mods, leaf = path
    out = []
    for k, m in enumerate(mods):
        parent = mods[k - 1] if k else ""
        if m.startswith("layers_") and m[7:].isdigit():
            out.append(f"layers.{m[7:]}")
        elif parent.startswith("layers_") and m in ("attn", "ff"):
            out.append("0" if m == "attn" else "1")
        elif parent == "ff" and m in ("norm", "fc1", "fc2"):
            out.append({"norm": "0", "fc1": "1", "fc2": "3"}[m])
        elif m in ("proj_0", "proj_2") and k == 0:
            out.append(m.replace("_", "."))
        else:
            out.append(m)
    return ".".join(out + [_leaf(leaf)])


def _module_key_fn(path, ndim):
    return perceiver_key(path)


def adapter_key_fn(layout: CheckpointLayout):
    """Flax adapters path (`<site path>/processor/to_q_lora/down/kernel`) -> `{i}.to_q_lora.down.weight`."""
    index = {site_name_to_flax_path(s.name): s.index for s in layout.sites}

    def key_fn(path, ndim):
        if "processor" not in path:
            raise WeightsError(f"adapter parameter outside a processor: {'/'.join(path)}")
        cut = path.index("processor")
        site = tuple(path[:cut])
        if site not in index:
            raise WeightsError(f"adapter at {'/'.join(site)} is not an attention of the "
                               f"{layout.base} layout ({len(layout.sites)} sites)")
        rest = path[cut + 1:]
        return ".".join((str(index[site]),) + tuple(rest[:-1]) + (_leaf(rest[-1]),))

    return key_fn


# ============================================================================ reference tables


def _perceiver_keys(prefix: str, dim: int, depth: int, inner: int, ff_mult: int = 4):
    keys = []
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        keys += [(p + "0.norm1.weight", (dim,)), (p + "0.norm1.bias", (dim,)),
                 (p + "0.norm2.weight", (dim,)), (p + "0.norm2.bias", (dim,)),
                 (p + "0.to_q.weight", (inner, dim)), (p + "0.to_kv.weight", (2 * inner, dim)),
                 (p + "0.to_out.weight", (dim, inner)),
                 (p + "1.0.weight", (dim,)), (p + "1.0.bias", (dim,)),
                 (p + "1.1.weight", (dim * ff_mult, dim)), (p + "1.3.weight", (dim, dim * ff_mult))]
    return keys


def reference_keys(layout: CheckpointLayout) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """The reference key table (spec §5.1-5.3), in the reference state-dict order, from the layout.

    Written from the spec independently of our modules: exports are checked against it.
    """
    c, e, clip, r = layout.cross_attention_dim, layout.cross_attention_dim, layout.clip_dim, layout.rank
    d = layout.fe_dim  # AttentionMLP width
    fe = [("visual_projection.latents", (1, 1, d)),
          ("visual_projection.proj_in.weight", (d, clip)), ("visual_projection.proj_in.bias", (d,)),
          ("visual_projection.proj_out.weight", (e, d)), ("visual_projection.proj_out.bias", (e,)),
          ("visual_projection.norm_out.weight", (e,)), ("visual_projection.norm_out.bias", (e,))]
    fe += _perceiver_keys("visual_projection.", d, layout.fe_depth, layout.fe_heads * (d // layout.fe_heads))
    for mlp, din in (("mlp1", 2 * e), ("mlp2", e)):
        p = f"fuse_module.{mlp}."
        fe += [(p + "layernorm.weight", (din,)), (p + "layernorm.bias", (din,)),
               (p + "fc1.weight", (e, din)), (p + "fc1.bias", (e,)),
               (p + "fc2.weight", (e, e)), (p + "fc2.bias", (e,))]
    fe += [("fuse_module.layer_norm.weight", (e,)), ("fuse_module.layer_norm.bias", (e,))]

    n = layout.num_tokens
    ip = [("proj.0.weight", (2 * layout.id_dim, layout.id_dim)), ("proj.0.bias", (2 * layout.id_dim,)),
          ("proj.2.weight", (n * c, 2 * layout.id_dim)), ("proj.2.bias", (n * c,)),
          ("norm.weight", (c,)), ("norm.bias", (c,)),
          ("perceiver_resampler.proj_in.weight", (c, clip)), ("perceiver_resampler.proj_in.bias", (c,)),
          ("perceiver_resampler.proj_out.weight", (c, c)), ("perceiver_resampler.proj_out.bias", (c,)),
          ("perceiver_resampler.norm_out.weight", (c,)), ("perceiver_resampler.norm_out.bias", (c,))]
    ip += _perceiver_keys("perceiver_resampler.", c, 4, (c // 64) * 64)

    ad = []
    for s in layout.sites:
        h, kin = s.hidden_size, (c if s.is_cross else s.hidden_size)
        for proj, din in (("to_q", h), ("to_k", kin), ("to_v", kin), ("to_out", h)):
            ad += [(f"{s.index}.{proj}_lora.down.weight", (r, din)), (f"{s.index}.{proj}_lora.up.weight", (h, r))]
        if s.is_cross:
            ad += [(f"{s.index}.to_k_ip.weight", (h, c)), (f"{s.index}.to_v_ip.weight", (h, c))]
    return {FACIAL_ENCODER: fe, layout.image_proj_key: ip, ADAPTERS: ad}


# ============================================================================ abstract params


def _unboxed_shapes(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def abstract_params(layout: CheckpointLayout, groups: Iterable[str] = OUR_GROUPS) -> dict:
    """Shape/dtype trees (`jax.ShapeDtypeStruct`) of our groups, from `jax.eval_shape` of the modules
    (kept with the compilation cache: `runtime.cached_shapes`)."""
    groups = sorted(set(groups))
    return runtime.cached_shapes("consistentid", f"{layout!r}\n{groups}", lambda: _trace_params(layout, groups))


def _trace_params(layout: CheckpointLayout, groups: Iterable[str]) -> dict:
    import jax
    import jax.numpy as jnp

    from cid_jax.models.adapters import consistentid_plan
    from cid_jax.models.attention import Attention, AttentionSite
    from cid_jax.models.facial_encoder import FacialEncoder
    from cid_jax.models.resampler import ProjPlus

    key = jax.random.key(0)
    c = layout.cross_attention_dim
    groups = set(groups)
    out = {}
    if "facial_encoder" in groups:
        fe = FacialEncoder(embed_dim=c, embedding_dim=layout.clip_dim, dim=layout.fe_dim,
                           depth=layout.fe_depth, heads=layout.fe_heads)
        v = jax.eval_shape(fe.init, key, jnp.zeros((1, 3, c)), jnp.zeros((1, 2, 2, layout.clip_dim)),
                           jnp.zeros((1, 3), bool), jnp.zeros((1, 2), bool))
        out["facial_encoder"] = _unboxed_shapes(v["params"])
    if "image_proj" in groups:
        ip = ProjPlus(cross_attention_dim=c, id_embeddings_dim=layout.id_dim,
                      clip_embeddings_dim=layout.clip_dim, num_tokens=layout.num_tokens)
        v = jax.eval_shape(ip.init, key, jnp.zeros((1, layout.id_dim)), jnp.zeros((1, 2, layout.clip_dim)))
        out["image_proj"] = _unboxed_shapes(v["params"])
    if ADAPTERS in groups:
        plan = consistentid_plan(rank=layout.rank, num_tokens=layout.num_tokens, capture="none")
        per_kind: dict[tuple[bool, int], Any] = {}
        adapters: dict[tuple[str, ...], Any] = {}
        for s in layout.sites:
            kind = (s.is_cross, s.hidden_size)
            if kind not in per_kind:
                ctx_dim = c if s.is_cross else s.hidden_size
                site = AttentionSite(s.name, s.is_cross, s.hidden_size, ctx_dim, 1, s.hidden_size)
                attn = Attention(s.hidden_size, 1, s.hidden_size, site=site, processor_plan=plan)
                ctx = jnp.zeros((1, 1 + layout.num_tokens, c)) if s.is_cross else None
                v = jax.eval_shape(attn.init, key, jnp.zeros((1, 2, s.hidden_size)), ctx)
                per_kind[kind] = _unboxed_shapes(v["params"]["processor"])
            for sub, leaf in traverse_util.flatten_dict(per_kind[kind]).items():
                adapters[site_name_to_flax_path(s.name) + ("processor",) + sub] = leaf
        out[ADAPTERS] = traverse_util.unflatten_dict(adapters)
    return out


def processor_subtree(tree: Mapping) -> dict:
    """Only the `.../processor/...` leaves of a (UNet-shaped) tree: the adapters of a full UNet tree."""
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if "processor" in p})


# ============================================================================ export / import


def _np_dtype(dtype) -> np.dtype:
    named = {"fp32": np.float32, "float32": np.float32, "fp16": np.float16, "float16": np.float16}
    if isinstance(dtype, str):
        if dtype not in named:
            raise ValueError(f"export dtype must be fp32 or fp16 (numpy has no bf16), got {dtype!r}")
        return np.dtype(named[dtype])
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
        raise ValueError(f"export dtype must be float32 or float16, got {dtype}")
    return dtype


def _check_against_table(groups: Mapping[str, StateDict], layout: CheckpointLayout, what: str,
                         partial: bool = False):
    """Key and shape sets equal to `reference_keys(layout)`; error names every difference.

    With `partial`, groups absent from `groups` are not required (e.g. an adapters-only export).
    """
    problems = []
    table = reference_keys(layout)
    for group, expected in table.items():
        if partial and group not in groups:
            continue
        have = {k: tuple(np.shape(v)) for k, v in groups.get(group, {}).items()}
        want = dict(expected)
        missing = [k for k in want if k not in have]
        unexpected = [k for k in have if k not in want]
        shapes = [f"{k}: have {have[k]} vs reference {want[k]}" for k in want if k in have and have[k] != want[k]]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                problems.append(f"{group}: {len(items)} {label}: " + "; ".join(items[:10])
                                + (" ..." if len(items) > 10 else ""))
    extra = sorted(set(groups) - set(table))
    if extra:
        problems.append(f"unexpected top-level groups {extra}; expected {list(table)}")
    if problems:
        raise WeightsError(f"{what} ({layout.base}):\n  " + "\n  ".join(problems))


def export_reference(params: Mapping, layout: CheckpointLayout, *, dtype="fp32",
                     partial: bool = False) -> dict[str, StateDict]:
    """Our params -> the reference groups `{FacialEncoder, image_proj[_model], adapter_modules}`.

    `params["adapter_modules"]` may be a full UNet tree: only its `processor` subtrees are exported. Each
    group is ordered like the reference state dict; keys and shapes are checked against the table.
    All three groups are required unless `partial` (then the groups that are not None are exported;
    the reference loaders need all three).
    """
    dtype = _np_dtype(dtype)
    missing = [g for g in OUR_GROUPS if params.get(g) is None]
    if missing and not partial:
        raise WeightsError(f"export needs all of {OUR_GROUPS}; missing {missing}")
    if len(missing) == len(OUR_GROUPS):
        raise WeightsError(f"nothing to export: none of {OUR_GROUPS} is given")
    raw = {}
    if params.get("facial_encoder") is not None:
        raw[FACIAL_ENCODER] = export_from(params["facial_encoder"], key_fn=_module_key_fn, dtype=dtype)
    if params.get("image_proj") is not None:
        raw[layout.image_proj_key] = export_from(params["image_proj"], key_fn=_module_key_fn, dtype=dtype)
    if params.get(ADAPTERS) is not None:
        raw[ADAPTERS] = export_from(processor_subtree(params[ADAPTERS]), key_fn=adapter_key_fn(layout),
                                    dtype=dtype)
    _check_against_table(raw, layout, "export does not match the reference key table", partial=True)
    table = reference_keys(layout)
    return {g: OrderedDict((k, raw[g][k]) for k, _ in table[g]) for g in layout.groups if g in raw}


def import_reference(groups: Mapping[str, StateDict], layout: CheckpointLayout, *,
                     required: Iterable[str] = OUR_GROUPS) -> dict:
    """Reference groups -> our params (fp32), strict per group. Groups absent from `groups` and not
    in `required` come back as None (IP-Adapter FaceID-Plus has no FacialEncoder).

    Accepts `image_proj` or `image_proj_model` (the reference's convert script writes the latter
    for SD1.5 too) and `adapter_modules` or IP-Adapter's `ip_adapter`.
    """
    sources = {
        "facial_encoder": [FACIAL_ENCODER],
        "image_proj": [IMAGE_PROJ_SD15, IMAGE_PROJ_SDXL],
        ADAPTERS: [ADAPTERS, IP_ADAPTER],
    }
    known = {name for names in sources.values() for name in names}
    unknown = sorted(set(groups) - known)
    if unknown:
        raise WeightsError(f"unexpected top-level groups {unknown}; known: {sorted(known)}")
    required = set(required)
    for name in (ADAPTERS, IP_ADAPTER):  # another base model's file: say so, not 43 shape mismatches
        count = _processor_count(groups.get(name) or {})
        if count != len(layout.sites) and count in (len(SD15.sites), len(SDXL.sites)):
            raise WeightsError(f"this is {_family(count)} checkpoint ({count} attention processors); the model "
                               f"is {_family(len(layout.sites))} one ({len(layout.sites)}): use a file made for "
                               "the same base model")
    out = {}
    for ours, names in sources.items():
        present = [n for n in names if n in groups]
        if len(present) > 1:
            raise WeightsError(f"checkpoint has both {present}: ambiguous {ours} group")
        if not present:
            if ours in required:
                raise WeightsError(f"checkpoint has no {' / '.join(names)} group (has {sorted(groups)})")
            out[ours] = None
            continue
        name = present[0]
        abstract = abstract_params(layout, [ours])
        key_fn = adapter_key_fn(layout) if ours == ADAPTERS else _module_key_fn
        out[ours] = load_into(abstract[ours], groups[name], what=f"{name} ({layout.base})", key_fn=key_fn)
    return out


# ==================================================================================== files


def split_groups(flat: Mapping[str, np.ndarray], ignore_prefixes: Sequence[str] = ("unet.",)) -> dict[str, StateDict]:
    """`{'FacialEncoder.visual_projection.latents': x, ...}` -> `{'FacialEncoder': {'visual_projection.latents': x}}`.

    Keys under `ignore_prefixes` (a training state's frozen UNet, as the SDXL loader skips) are dropped.
    """
    out: dict[str, StateDict] = {}
    for key, value in flat.items():
        if key.startswith(tuple(ignore_prefixes)):
            continue
        group, sep, rest = key.partition(".")
        if not sep:
            raise WeightsError(f"key {key!r} has no group prefix (expected e.g. 'FacialEncoder.')")
        out.setdefault(group, {})[rest] = value
    return out


def _processor_count(adapters: StateDict) -> int:
    return len({k.split(".", 1)[0] for k in adapters})


def _family(count: int) -> str:
    """'an SD1.5' / 'an SDXL' / 'a smaller preset's' for a number of attention processors."""
    named = {len(layout.sites): name for name, layout in (("an SD1.5", SD15), ("an SDXL", SDXL))}
    return named.get(count, "a smaller preset's (a demo run's)")


def detect_layout(groups: Mapping[str, StateDict]) -> CheckpointLayout:
    """SD1.5 or SDXL from the adapters (32 vs 140 processors) or the FacialEncoder width."""
    ad = groups.get(ADAPTERS) or groups.get(IP_ADAPTER)
    if ad:
        count = _processor_count(ad)
        for layout in LAYOUTS.values():
            if count == len(layout.sites):
                return layout
        raise WeightsError(f"{count} attention processors match neither SD1.5 (32) nor SDXL (140): a file of a "
                           "smaller preset (the demo's) is read through its run, --checkpoint=<run directory>")
    fe = groups.get(FACIAL_ENCODER, {})
    if "fuse_module.layer_norm.weight" in fe:
        width = int(np.shape(fe["fuse_module.layer_norm.weight"])[0])
        for layout in LAYOUTS.values():
            if width == layout.cross_attention_dim:
                return layout
    raise WeightsError(f"cannot tell SD1.5 from SDXL for groups {sorted(groups)}: pass the layout")


def sizes_of(groups: Mapping[str, StateDict], metadata: Optional[Mapping[str, str]] = None) -> dict:
    """The trainable parts' sizes a checkpoint was made with, from its tensors' shapes (and the
    FacialEncoder's head count from our exports' metadata, else the reference's width // 64):
    {"lora_rank", "facial_encoder": {"dim", "depth", "heads"}} (keys absent when the group is)."""
    meta, out = dict(metadata or {}), {}
    ad = groups.get(ADAPTERS) or groups.get(IP_ADAPTER) or {}
    downs = [np.shape(v) for k, v in ad.items() if k.endswith("to_q_lora.down.weight")]
    if downs:
        out["lora_rank"] = int(downs[0][0])
    fe = groups.get(FACIAL_ENCODER) or {}
    if "visual_projection.latents" in fe:
        dim = int(np.shape(fe["visual_projection.latents"])[-1])
        depth = len({k.split(".")[2] for k in fe if k.startswith("visual_projection.layers.")})
        out["facial_encoder"] = dict(dim=dim, depth=depth,
                                     heads=int(meta.get("facial_encoder_heads", max(1, dim // 64))))
    return out


def read_groups(path: os.PathLike) -> dict[str, StateDict]:
    """A reference `.bin` (nested, torch.load weights_only) or prefixed `.safetensors` -> groups."""
    return split_groups(read_state_dict(path))


def read_metadata(path: os.PathLike) -> dict[str, str]:
    """Metadata written by `save_*`: the safetensors header, or the `.bin`'s sidecar JSON ({} if none)."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    side = sidecar_path(path)
    return json.loads(side.read_text()) if side.exists() else {}


def load_checkpoint(path: os.PathLike, layout: Optional[CheckpointLayout] = None, *,
                    required: Iterable[str] = OUR_GROUPS) -> tuple[dict, CheckpointLayout]:
    """Reads a reference ConsistentID or IP-Adapter FaceID-Plus file into our params.

    Returns (params, layout); the layout is detected when not given. For an IP-Adapter
    checkpoint pass `required=("image_proj", "adapter_modules")` (its facial_encoder comes back None).
    """
    groups = read_groups(path)
    layout = layout or detect_layout(groups)
    return import_reference(groups, layout, required=required), layout


def make_metadata(layout: CheckpointLayout, *, base_model: str, pairing: str, step, dtype,
                  extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The metadata every export carries (all strings, as safetensors headers require)."""
    if pairing not in PAIRING_MODES:
        raise ValueError(f"pairing must be one of {PAIRING_MODES}, got {pairing!r}")
    import cid_jax

    meta = {"format": "pt", "producer": f"cid_jax {cid_jax.__version__}", "layout": layout.base,
            "base_model": str(base_model), "pairing": pairing, "step": str(step),
            "dtype": _np_dtype(dtype).name}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def sidecar_path(path: os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    return path.with_name(path.name + ".json")


def save_safetensors(groups: Mapping[str, StateDict], path: os.PathLike,
                     metadata: Optional[Mapping[str, str]] = None) -> None:
    """Flat `<group>.<key>` safetensors (no torch needed), metadata in the header, atomic. The group
    prefixes are the reference's flat-file names (`FLAT_GROUP_NAMES`: `image_proj_model.` for
    SD1.5 too), which its convert script and SDXL pipeline read."""
    flat = {f"{FLAT_GROUP_NAMES.get(g, g)}.{k}": v for g, sd in groups.items() for k, v in sd.items()}
    write_safetensors_atomic(flat, path, metadata=metadata)


def save_reference_bin(groups: Mapping[str, StateDict], path: os.PathLike,
                       metadata: Optional[Mapping[str, str]] = None) -> None:
    """The reference nested pickle: `torch.save({group: OrderedDict(key -> tensor)})`, atomic.

    The pickle holds exactly the reference's top-level keys: the SD1.5 loader indexes only those
    three, but tools that iterate the top level (the reference's convert script, `load_state_dict`
    over every group) would trip on an extra entry, so metadata goes to `<file>.json` beside it.
    Needs torch; `weights_only=True` loads it.
    """
    import torch

    path = pathlib.Path(path)
    obj = {g: OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in sd.items())
           for g, sd in groups.items()}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    side = sidecar_path(path)
    if metadata is not None:
        atomic_write(side, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(dict(metadata), indent=1)))
    else:
        side.unlink(missing_ok=True)  # never pair a new file with an older export's metadata


def save_checkpoint(params: Mapping, layout: CheckpointLayout, path: os.PathLike, *, dtype="fp32",
                    metadata: Optional[Mapping[str, str]] = None, partial: bool = False) -> dict[str, StateDict]:
    """Exports `params` to `path` (`.bin` reference pickle or `.safetensors`); returns the groups written."""
    path = pathlib.Path(path)
    groups = export_reference(params, layout, dtype=dtype, partial=partial)
    if path.suffix == ".safetensors":
        save_safetensors(groups, path, metadata)
    elif path.suffix in (".bin", ".pt", ".pth"):
        save_reference_bin(groups, path, metadata)
    else:
        raise WeightsError(f"unknown export format {path.suffix!r} for {path}: use .bin or .safetensors")
    return groups


def verify_written(path: os.PathLike, expected: Mapping[str, StateDict], layout: CheckpointLayout) -> None:
    """Self-check after a write: re-reads `path`, checks the top-level groups, keys and shapes
    against the reference table and every tensor bit-for-bit (dtype included) against `expected`."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        groups = read_groups(path)
        proj = [g for g in (IMAGE_PROJ_SD15, IMAGE_PROJ_SDXL) if g in groups]
        if proj and proj[0] != layout.image_proj_key:  # the flat name, for either base model
            groups[layout.image_proj_key] = groups.pop(proj[0])
    else:  # one torch.load: the nesting itself is part of the format
        import torch

        top = torch.load(path, map_location="cpu", weights_only=True)
        if list(top) != list(expected):
            raise WeightsError(f"{path}: top-level keys {list(top)} != written {list(expected)}")
        if not all(isinstance(sd, Mapping) for sd in top.values()):
            raise WeightsError(f"{path}: every top-level entry must be a state dict")
        groups = {g: {k: v.numpy() for k, v in sd.items()} for g, sd in top.items()}
        del top
    if sorted(groups) != sorted(expected):
        raise WeightsError(f"{path}: groups {sorted(groups)} != written {sorted(expected)}")
    _check_against_table(groups, layout, f"{path} does not match the reference key table",
                         partial=len(expected) < 3)
    for g, sd in expected.items():
        for k, v in sd.items():
            got = groups[g][k]
            if got.dtype != v.dtype or not np.array_equal(got, v):
                raise WeightsError(f"{path}: {g}.{k} differs after re-reading "
                                   f"(dtype {got.dtype} vs {v.dtype})")


# =================================================================== our own params files


def save_params_msgpack(params: Mapping, path: os.PathLike,
                        metadata: Optional[Mapping[str, str]] = None) -> None:
    """Our params (numpy/jax trees) as a flax msgpack `{facial_encoder, image_proj, adapters,
    __metadata__}`, atomic. Groups that are None are left out."""
    import jax

    from cid_jax.weights.flax_msgpack import write_msgpack_atomic

    tree = {g: jax.tree.map(np.asarray, params[g]) for g in OUR_GROUPS if params.get(g) is not None}
    # msgpack arrays cannot hold strings: the metadata travels as the bytes of its JSON.
    meta = json.dumps({k: str(v) for k, v in (metadata or {}).items()}, sort_keys=True).encode()
    tree["__metadata__"] = np.frombuffer(meta, np.uint8).copy()
    write_msgpack_atomic(tree, path)


def load_params_msgpack(path: os.PathLike) -> tuple[dict, dict[str, str]]:
    """Inverse of `save_params_msgpack`: (params with None for absent groups, metadata).

    A tree holding a whole UNet under "unet" (base + processors) is also accepted: its processor
    subtrees become `adapters`.
    """
    from cid_jax.weights.flax_msgpack import read_msgpack

    tree = dict(read_msgpack(path))
    raw = tree.pop("__metadata__", None)
    meta = json.loads(np.asarray(raw, np.uint8).tobytes().decode()) if raw is not None else {}
    # Older params files: the adapters under "adapters", or inside a whole UNet tree under "unet".
    for legacy in ("adapters", "unet"):
        if legacy in tree and ADAPTERS not in tree:
            tree[ADAPTERS] = processor_subtree(tree.pop(legacy))
    unknown = sorted(set(tree) - set(OUR_GROUPS))
    if unknown:
        raise WeightsError(f"{path}: unexpected top-level entries {unknown}; expected {OUR_GROUPS}")
    return {g: tree.get(g) for g in OUR_GROUPS}, meta


def check_params(params: Mapping, layout: CheckpointLayout) -> None:
    """Our params against the module shapes of `layout` (strict; names paths and both shapes)."""
    present = [g for g in OUR_GROUPS if params.get(g) is not None]
    abstract = abstract_params(layout, present)
    problems = []
    for g in present:
        tree = processor_subtree(params[g]) if g == ADAPTERS else params[g]
        have = {"/".join(p): tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(tree).items()}
        want = {"/".join(p): tuple(v.shape) for p, v in traverse_util.flatten_dict(abstract[g]).items()}
        for p in sorted(set(want) - set(have))[:10]:
            problems.append(f"{g}: missing {p}")
        for p in sorted(set(have) - set(want))[:10]:
            problems.append(f"{g}: unexpected {p}")
        for p in sorted(set(have) & set(want)):
            if have[p] != want[p]:
                problems.append(f"{g}: {p} has shape {have[p]}, the {layout.base} model wants {want[p]}")
    if problems:
        raise WeightsError(f"params do not fit the {layout.base} layout:\n  " + "\n  ".join(problems[:40]))


def load_params(source: os.PathLike, layout: Optional[CheckpointLayout] = None,
                ) -> tuple[dict, dict[str, str], CheckpointLayout]:
    """Our params from a weights file: (params, metadata, layout).

    * `*.msgpack`: our params file (`save_params_msgpack`);
    * `*.safetensors` / `*.bin`: a reference-layout ConsistentID checkpoint (ours or released);
    * a directory holding exactly one such file (`params.msgpack` first).
    Training run directories are read by `cid_jax.run`, which sits above this layer.
    """
    source = pathlib.Path(source)
    if source.is_dir():
        candidates = [source / "params.msgpack"] if (source / "params.msgpack").exists() else sorted(
            p for p in source.iterdir() if p.suffix in (".msgpack", ".safetensors", ".bin"))
        if len(candidates) != 1:
            raise WeightsError(f"{source}: expected one params file (params.msgpack, *.safetensors or "
                               f"*.bin), found {[p.name for p in candidates]}")
        source = candidates[0]
    if not source.exists():
        raise errors.MissingError(f"checkpoint not found: {source}")
    if source.suffix == ".msgpack":
        params, meta = load_params_msgpack(source)
        layout = layout or _layout_from_params(params)
        check_params(params, layout)
        return params, meta, layout
    params, layout = load_checkpoint(source, layout)
    return params, read_metadata(source), layout


def _layout_from_params(params: Mapping) -> CheckpointLayout:
    if params.get(ADAPTERS) is not None:
        count = sum(1 for p in traverse_util.flatten_dict(processor_subtree(params[ADAPTERS]))
                    if p[-3:] == ("to_q_lora", "down", "kernel"))
        for layout in LAYOUTS.values():
            if count == len(layout.sites):
                return layout
    raise WeightsError("cannot tell the layout (SD1.5/SDXL) of these params: pass it explicitly")


def import_to_params_file(source: os.PathLike, out: os.PathLike, *, layout: Optional[str] = None,
                          pairing: Optional[str] = None) -> tuple[dict, dict[str, str], CheckpointLayout]:
    """`convert/from_pytorch.py`: a reference ConsistentID or IP-Adapter FaceID-Plus file -> our params
    msgpack, read back and compared bit for bit (removed if that fails). Returns (params, metadata,
    layout); an IP-Adapter file gives image_proj and adapter_modules only (facial_encoder None)."""
    out = pathlib.Path(out)
    if out.suffix != ".msgpack":
        raise WeightsError(f"--out must be a .msgpack file, got {out}")
    groups = read_groups(source)
    lay = LAYOUTS[layout] if layout else detect_layout(groups)
    ip_adapter = IP_ADAPTER in groups
    params = import_reference(groups, lay, required=("image_proj", ADAPTERS) if ip_adapter else OUR_GROUPS)
    meta = read_metadata(source)
    metadata = {"layout": lay.base, "source": str(source),
                "source_kind": "ip_adapter_faceid_plus" if ip_adapter else "consistentid",
                "pairing": pairing or meta.get("pairing", "reference"),
                "step": meta.get("step", "unknown"), "base_model": meta.get("base_model", "unknown")}
    save_params_msgpack(params, out, metadata)
    try:
        _check_params_file(out, params, metadata, lay)
    except Exception:  # never leave a file behind that failed its self-check
        out.unlink(missing_ok=True)
        raise
    return params, metadata, lay


def _check_params_file(out, params, metadata, layout):
    """Reads `out` back: same groups and leaves bit for bit, shapes fit the layout, same metadata."""
    back, back_meta = load_params_msgpack(out)
    check_params(back, layout)
    for g in OUR_GROUPS:
        if (params[g] is None) != (back[g] is None):
            raise WeightsError(f"{out}: group {g} did not survive the round trip")
        if params[g] is None:
            continue
        a, b = traverse_util.flatten_dict(params[g]), traverse_util.flatten_dict(back[g])
        if set(a) != set(b):
            raise WeightsError(f"{out}: {g} paths differ after re-reading")
        for path in a:
            if not np.array_equal(np.asarray(a[path]), np.asarray(b[path])):
                raise WeightsError(f"{out}: {g}/{'/'.join(path)} differs after re-reading")
    if back_meta != metadata:
        raise WeightsError(f"{out}: metadata differs after re-reading")
