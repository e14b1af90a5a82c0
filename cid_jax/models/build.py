"""Builds the composite model and its parameters from a config (`config.model`).

Two sources of frozen weights:
- `model.base` names a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/[, text_encoder_2/])
  and `model.image_encoder` a transformers CLIP vision folder: real weights, loaded strictly;
- `model.tiny` (the demo and the tests): small architectures initialised randomly from the seed,
  so nothing has to be downloaded.
The trainable parts (FacialEncoder, ProjPlus, adapters) are initialised as the reference does
(LoRA up = 0, to_k_ip/to_v_ip copied from the UNet's to_k/to_v), or imported from a checkpoint.
"""
from __future__ import annotations

import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cid_jax.models import adapters
from cid_jax.models.clip import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                                 CLIPVisionConfig, CLIPVisionModelWithProjection)
from cid_jax.models.consistentid import ConsistentID, split_unet_params
from cid_jax.models.facial_encoder import FacialEncoder
from cid_jax.models.resampler import ProjPlus
from cid_jax.models.attention import attention_kernel, default_plan
from cid_jax.models.unet import UNet2DConditionModel, UNetConfig
from cid_jax.models.vae import AutoencoderKL, VAEConfig
from cid_jax.weights.unet import unet_dummy_inputs

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(config) -> Any:
    return DTYPES[config.model.get("dtype", "float32")]


def frozen_dtype(config) -> Any:
    """Storage dtype of the frozen base weights: `model.frozen_dtype`, by default the compute dtype.

    The layers cast their weights to the compute dtype before use, so storing the frozen ones wider
    only costs memory (SD1.5 + CLIP-H: 6.8 GiB fp32, 3.4 GiB bf16 per replica)."""
    name = config.model.get("frozen_dtype") or config.model.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"--config.model.frozen_dtype must be one of {sorted(DTYPES)} (or empty), got {name!r}")
    return DTYPES[name]


def cast_floating(tree, dtype):
    """Every floating-point leaf of `tree` as `dtype` (works under eval_shape and on logical boxes)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _plan(mcfg, dtype):
    return adapters.consistentid_plan(
        rank=mcfg.lora_rank, num_tokens=mcfg.num_id_tokens, scale=mcfg.ip_scale,
        capture=mcfg.facial_loss_mode, capture_groups=tuple(mcfg.capture_groups), dtype=dtype)


def missing_weight_folders(config) -> list[str]:
    """Human-readable lines for each configured weights folder that does not exist."""
    mcfg = config.model
    if mcfg.get("tiny"):
        return []
    problems = []
    needed = [("model.base", mcfg.base, ("unet", "vae", "text_encoder")),
              ("model.image_encoder", mcfg.image_encoder, ())]
    if mcfg.variant == "sdxl":
        needed[0] = ("model.base", mcfg.base, ("unet", "vae", "text_encoder", "text_encoder_2"))
    for field, path, subdirs in needed:
        if not path:
            problems.append(f"--config.{field} is not set")
            continue
        for sub in subdirs or ("",):
            folder = pathlib.Path(path) / sub
            if not (folder / "config.json").exists():
                problems.append(f"--config.{field}: {folder}/config.json not found")
    return problems


def build_modules(config) -> ConsistentID:
    """The module definitions only (no weights): from `model.tiny` or the folders' config.json."""
    mcfg, dtype = config.model, compute_dtype(config)
    remat = bool(mcfg.get("remat", False))
    if mcfg.get("tiny"):
        tiny = mcfg.tiny
        unet_cfg = UNetConfig.from_dict(dict(tiny.unet))
        vae_cfg = VAEConfig.from_dict(dict(tiny.vae))
        text_cfgs = [CLIPTextConfig.from_dict(dict(c)) for c in tiny.text]
        vision_cfg = CLIPVisionConfig.from_dict(dict(tiny.vision))
    else:
        base = pathlib.Path(mcfg.base)
        unet_cfg = UNetConfig.from_json(base / "unet" / "config.json")
        vae_cfg = VAEConfig.from_json(base / "vae" / "config.json")
        names = ["text_encoder"] + (["text_encoder_2"] if mcfg.variant == "sdxl" else [])
        text_cfgs = [CLIPTextConfig.from_json(base / n / "config.json") for n in names]
        vision_cfg = CLIPVisionConfig.from_json(pathlib.Path(mcfg.image_encoder) / "config.json")
    text_classes = [CLIPTextModel, CLIPTextModelWithProjection][:len(text_cfgs)]
    context_dim = unet_cfg.cross_attention_dim
    fe_kwargs = {k: v for k, v in dict(mcfg.get("facial_encoder", {})).items()}
    return ConsistentID(
        unet=UNet2DConditionModel(unet_cfg, processor_plan=_plan(mcfg, dtype), remat=remat, dtype=dtype),
        vae=AutoencoderKL(vae_cfg, dtype=dtype),
        text_encoders=tuple(cls(c, remat=remat, dtype=dtype) for cls, c in zip(text_classes, text_cfgs)),
        vision=CLIPVisionModelWithProjection(vision_cfg, remat=remat, dtype=dtype),
        facial_encoder=FacialEncoder(embed_dim=context_dim, embedding_dim=vision_cfg.hidden_size,
                                     dtype=dtype, **fe_kwargs),
        image_proj=ProjPlus(cross_attention_dim=context_dim, clip_embeddings_dim=vision_cfg.hidden_size,
                            num_tokens=mcfg.num_id_tokens, dtype=dtype),
        shortcut=bool(mcfg.projplus_shortcut),
    )


def _abstract_inputs(model: ConsistentID, batch: int = 1):
    vcfg = model.vision.config
    tcfg = model.text_encoders[0].config
    clip = jax.ShapeDtypeStruct((batch, vcfg.image_size, vcfg.image_size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch, tcfg.max_position_embeddings, model.unet.config.cross_attention_dim),
                                  jnp.float32)
    return clip, tokens


# Inits trace the forward pass only to learn parameter shapes (XLA drops it as dead code), so they
# trace XLA's attention: no per-shape kernel choice (on a GPU, the cuDNN probes) is spent on them.
_INIT_ATTENTION = "fused"


def init_frozen_random(model: ConsistentID, key, unbox: bool = True) -> dict:
    """Random frozen weights (tiny demo/test models): the base UNet, VAE, text encoders, CLIP vision.

    `unbox=False` keeps the logical-axis boxes (for `sharding.param_shardings` under eval_shape)."""
    k_unet, k_vae, k_vision, *k_text = jax.random.split(key, 3 + len(model.text_encoders))
    base_unet = model.unet.clone(processor_plan=default_plan)
    inputs = unet_dummy_inputs(model.unet.config, size=8 * 2 ** (len(model.unet.config.block_out_channels) - 1))
    maybe_unbox = nn.meta.unbox if unbox else (lambda t: t)
    init = lambda m, k, *a, **kw: maybe_unbox(jax.jit(m.init, static_argnames="output_hidden_states")(  # noqa: E731
        k, *a, **kw)["params"])
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
    with attention_kernel(_INIT_ATTENTION):
        return {
            "unet": init(base_unet, k_unet, **jax.tree.map(zeros, inputs)),
            "vae": init(model.vae, k_vae, jnp.zeros(model.vae.dummy_inputs().shape)),
            "vision": init(model.vision, k_vision, *model.vision.dummy_inputs(), output_hidden_states=False),
            "text": [init(m, k, *m.dummy_inputs(), output_hidden_states=False)
                     for m, k in zip(model.text_encoders, k_text)],
        }


def load_frozen_pretrained(model: ConsistentID, config) -> dict:
    """Frozen weights from the configured folders (fp32 host arrays)."""
    from cid_jax.weights.clip import (load_clip_text, load_clip_text_with_projection,
                                      load_clip_vision_with_projection)
    from cid_jax.weights.unet import load_unet
    from cid_jax.weights.vae import load_vae

    base = pathlib.Path(config.model.base)
    frozen = {"unet": load_unet(base / "unet")[1], "vae": load_vae(base / "vae")[1],
              "vision": load_clip_vision_with_projection(config.model.image_encoder)[1],
              "text": [load_clip_text(base / "text_encoder")[1]]}
    if model.is_sdxl:
        frozen["text"].append(load_clip_text_with_projection(base / "text_encoder_2")[1])
    return frozen


def init_trainable(model: ConsistentID, frozen: dict, key, unbox: bool = True) -> dict:
    """Reference initialisation of the trainable parts (adapters, FacialEncoder, ProjPlus).

    `frozen` must hold the base UNet weights (to_k_ip/to_v_ip start as copies of to_k/to_v)."""
    maybe_unbox = nn.meta.unbox if unbox else (lambda t: t)
    k_unet, k_fe, k_proj = jax.random.split(key, 3)
    unet_inputs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), unet_dummy_inputs(
        model.unet.config, size=8 * 2 ** (len(model.unet.config.block_out_channels) - 1),
        text_len=model.text_encoders[0].config.max_position_embeddings + model.image_proj.num_tokens))

    @jax.jit
    def init_adapters(k):
        variables = model.unet.init(k, **unet_inputs)
        return split_unet_params(maybe_unbox(variables["params"]))[1]

    clip, tokens = _abstract_inputs(model)
    t = model.vision.config
    n_clip_tokens = (t.image_size // t.patch_size) ** 2 + 1
    clip_states = jnp.zeros((1, n_clip_tokens, t.hidden_size))
    parts = jnp.zeros((1, 5, n_clip_tokens, t.hidden_size))
    text = jnp.zeros(tokens.shape)
    with attention_kernel(_INIT_ATTENTION):
        adapter_params = adapters.init_ip_from_base(frozen["unet"], init_adapters(k_unet))
        fe = jax.jit(model.facial_encoder.init)(k_fe, text, parts, jnp.zeros(text.shape[:2], bool),
                                                jnp.zeros((1, 5), bool))
        proj = jax.jit(model.image_proj.init, static_argnames="shortcut")(
            k_proj, jnp.zeros((1, 512)), clip_states, shortcut=model.shortcut)
    return {"unet": adapter_params, "facial_encoder": maybe_unbox(fe["params"]),
            "image_proj": maybe_unbox(proj["params"])}


def build(config, key) -> tuple[ConsistentID, dict, dict]:
    """(model, frozen params in `frozen_dtype(config)`, fp32 trainable params) from the config."""
    problems = missing_weight_folders(config)
    if problems:
        raise FileNotFoundError(
            "base model weights not found:\n  " + "\n  ".join(problems)
            + "\nDownload them once (e.g. `huggingface-cli download runwayml/stable-diffusion-v1-5 "
              "--local-dir DIR` and laion/CLIP-ViT-H-14-laion2B-s32B-b79K) and point the config at "
              "the local folders; or use configs/demo.py (tiny random models).")
    model = build_modules(config)
    k_frozen, k_train = jax.random.split(key)
    frozen = (init_frozen_random(model, k_frozen) if config.model.get("tiny")
              else load_frozen_pretrained(model, config))
    trainable = init_trainable(model, frozen, k_train)  # to_k_ip/to_v_ip copy the fp32 base weights
    return model, cast_floating(frozen, frozen_dtype(config)), trainable
