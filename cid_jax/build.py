"""The model and its weights from a config (`config.model`): the composition root over models/ and
weights/, used by training, generation, export, AOT and the benchmarks.

Architectures come from the base model's folders (`model.base`: a diffusers Stable Diffusion folder
with unet/ vae/ text_encoder/[ text_encoder_2/]; `model.image_encoder`: a transformers CLIP vision
folder), whose config.json files are read only for the parts asked for, or from a preset of
`cid_jax.models.presets` (`model.preset`, random weights: the demo, tests, benchmarks, AOT).

Weights:
* frozen: loaded strictly from the folders (`load_frozen`), or random from the abstract shapes
  (`random_frozen`: no model's forward pass is compiled);
* trainable: the reference initialisation (`init_trainable`: LoRA up = 0, down ~ N(0, 1/rank^2),
  to_k_ip / to_v_ip copied from the UNet's to_k / to_v, FacialEncoder and ProjPlus from their
  modules' initializers), also from abstract shapes; or a checkpoint (the run directory's, or
  `model.init_from`, read by the run layer).

Seeds: every random stream derives from `config.seed` and its name (`stream_seed`, `stream_key`), so
training and generation re-create the same tiny frozen weights without replaying anyone's splits.
"""
from __future__ import annotations

import json
import zlib
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cid_jax import errors, paths, runtime
from cid_jax.models import adapters, presets
from cid_jax.models.attention import default_plan
from cid_jax.models.clip import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                                 CLIPVisionConfig, CLIPVisionModelWithProjection)
from cid_jax.models.consistentid import ConsistentID, split_unet_params
from cid_jax.models.facial_encoder import FacialEncoder
from cid_jax.models.init import random_params
from cid_jax.models.resampler import ProjPlus
from cid_jax.models.unet import UNet2DConditionModel, UNetConfig, remat_mode
from cid_jax.models.vae import AutoencoderKL, VAEConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PARTS = ("unet", "vae", "text", "vision")
# Inits trace the forward pass only to learn parameter shapes, with XLA's attention: no per-shape
# kernel choice (on a GPU, the cuDNN probes) is spent on them.
_INIT_KERNEL = "fused"


class MissingWeightsError(errors.MissingError):
    """A configured base-model folder (or one of its config.json files) does not exist."""


# -------------------------------------------------------------------------------------- keys


def stream_seed(config, name: str) -> int:
    """The seed of the random stream `name` ("frozen", "trainable", "step", ...) of a run: a pure
    function of `config.seed` and the name."""
    return int(np.random.SeedSequence([int(config.seed), zlib.crc32(name.encode())]).generate_state(1)[0])


def stream_key(config, name: str) -> jax.Array:
    """`stream_seed` as a JAX key."""
    return jax.random.key(stream_seed(config, name))


# ------------------------------------------------------------------------------------- dtypes


def _dtype(name: str, field: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"--config.model.{field} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def compute_dtype(config) -> Any:
    return _dtype(config.model.get("dtype", "float32"), "dtype")


def frozen_dtype(config) -> Any:
    """Storage dtype of the frozen base weights: `model.frozen_dtype`, by default the compute dtype.

    The layers cast their weights to the compute dtype before use, so storing the frozen ones wider
    only costs memory (SD1.5 + CLIP-H: 6.8 GiB fp32, 3.4 GiB bf16 per replica)."""
    name = config.model.get("frozen_dtype") or config.model.get("dtype", "float32")
    return _dtype(name, "frozen_dtype")


def cast_floating(tree, dtype):
    """Every floating-point leaf of `tree` as `dtype` (works under eval_shape and on logical boxes)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ------------------------------------------------------------------------------ architectures


def weights_folder(value: str):
    """A configured weights folder (`model.base`, `model.image_encoder`, a metric model) as a local
    path: a remote one (gs://...) is copied into the local cache once (`cid_jax.paths.local_copy`),
    since the formats' readers memory-map and seek local files. A folder that does not exist comes
    back as it is, for the caller to report."""
    folder = paths.path(value)
    return paths.local_copy(value) if paths.is_remote(value) and folder.exists() else folder


def _folders(config) -> dict[str, list]:
    """The config.json folders of each part under `model.base` / `model.image_encoder`."""
    base = weights_folder(config.model.base)
    text = ["text_encoder"] + (["text_encoder_2"] if config.model.variant == "sdxl" else [])
    return {"unet": [base / "unet"], "vae": [base / "vae"], "text": [base / t for t in text],
            "vision": [weights_folder(config.model.image_encoder)] if config.model.image_encoder else []}


def missing_weight_folders(config, parts: Iterable[str] = PARTS) -> list[str]:
    """One line per configured weights folder (of `parts`) that does not exist; [] for presets."""
    m = config.model
    if not m.base:
        if m.get("preset"):
            return []
        return ["--config.model.base is not set (a diffusers Stable Diffusion folder), and no "
                "--config.model.preset names random weights"]
    problems = []
    folders = _folders(config)
    for part in parts:
        if part == "vision" and not m.image_encoder:
            problems.append("--config.model.image_encoder is not set (a CLIP-ViT-H-14 folder)")
        for folder in folders[part]:
            if not (folder / "config.json").exists():
                field = "image_encoder" if part == "vision" else "base"
                problems.append(f"--config.model.{field}: {folder}/config.json not found")
    return problems


def check_weight_folders(config, parts: Iterable[str] = PARTS) -> None:
    problems = missing_weight_folders(config, parts)
    if problems:
        raise MissingWeightsError(
            "base model weights not found:\n  " + "\n  ".join(problems)
            + "\nDownload them once (e.g. `huggingface-cli download runwayml/stable-diffusion-v1-5 "
              "--local-dir DIR` and laion/CLIP-ViT-H-14-laion2B-s32B-b79K) and point the config at "
              "the local folders; or use configs/demo.py (tiny random models).")


def architecture(config, parts: Iterable[str] = PARTS) -> dict:
    """The config dicts of `parts` (diffusers/transformers fields): from the folders' config.json
    files when `model.base` is set (only those asked for are read), else the preset's."""
    parts = tuple(parts)
    if not config.model.base:
        preset = presets.get(config.model.get("preset") or "")
        if presets.variant_of(preset) != config.model.variant:
            raise ValueError(f"--config.model.preset={config.model.preset} is an "
                             f"{presets.variant_of(preset)} architecture but --config.model.variant="
                             f"{config.model.variant}")
        return {p: preset[p] for p in parts}
    check_weight_folders(config, parts)
    folders = _folders(config)
    read = lambda folder: json.loads((folder / "config.json").read_text())  # noqa: E731
    out = {}
    for part in parts:
        configs = [read(f) for f in folders[part]]
        out[part] = configs if part == "text" else configs[0]
    return out


def _plan(mcfg, dtype, fold_lora: bool = False):
    return adapters.consistentid_plan(
        rank=mcfg.lora_rank, num_tokens=mcfg.num_id_tokens, scale=mcfg.ip_scale,
        capture=mcfg.facial_loss_mode, capture_groups=tuple(mcfg.capture_groups), fold_lora=fold_lora,
        dtype=dtype)


def facial_encoder_sizes(config) -> dict:
    """The FacialEncoder Perceiver's dim/depth/heads: the reference's, overridden by
    `model.facial_encoder` (tiny models)."""
    return dict(presets.REFERENCE_FACIAL_ENCODER, **dict(config.model.get("facial_encoder") or {}))


def tokenizer_for(config, which: str = "tokenizer"):
    """A prompt tokenizer, with the trigger tokens added: `which="tokenizer"` (SD1.5's, SDXL's first)
    or "tokenizer_2" (SDXL's second: pad "!"). The base folder's copy when there is one, else the
    packaged CLIP vocabulary with that tokenizer's padding."""
    from cid_jax.text import CLIPTokenizer, add_trigger_tokens

    tok_dir = weights_folder(config.model.base) / which if config.model.base else None
    if tok_dir is not None and tok_dir.is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = CLIPTokenizer.default(pad_token="!" if which == "tokenizer_2" else "<|endoftext|>")
    add_trigger_tokens(tokenizer)
    return tokenizer


def tokenizers_for(config) -> tuple:
    """(tokenizer, tokenizer_2 or None): what the model's text encoders read."""
    sdxl = config.model.variant == "sdxl"
    return tokenizer_for(config), tokenizer_for(config, "tokenizer_2") if sdxl else None


def build_modules(config, *, fold_lora: bool = False) -> ConsistentID:
    """The module definitions only (no weights). `fold_lora`: inference with the LoRA folded into
    the base kernels (`fold_lora_weights` makes the matching params)."""
    mcfg, dtype = config.model, compute_dtype(config)
    remat = mcfg.get("remat", False)  # the UNet takes the mode; the CLIP encoders remat only under "full"
    clip_remat = remat_mode(remat) == "full"
    kernel = mcfg.get("attention", "auto")
    arch = architecture(config)
    unet_cfg = UNetConfig.from_dict(arch["unet"])
    vision_cfg = CLIPVisionConfig.from_dict(arch["vision"])
    text_cfgs = [CLIPTextConfig.from_dict(c) for c in arch["text"]]
    text_classes = [CLIPTextModel, CLIPTextModelWithProjection][:len(text_cfgs)]
    context_dim = unet_cfg.cross_attention_dim
    return ConsistentID(
        unet=UNet2DConditionModel(unet_cfg, processor_plan=_plan(mcfg, dtype, fold_lora), attention_kernel=kernel,
                                  remat=remat, dtype=dtype),
        vae=AutoencoderKL(VAEConfig.from_dict(arch["vae"]), attention_kernel=kernel, dtype=dtype),
        text_encoders=tuple(cls(c, remat=clip_remat, dtype=dtype) for cls, c in zip(text_classes, text_cfgs)),
        vision=CLIPVisionModelWithProjection(vision_cfg, remat=clip_remat, dtype=dtype),
        facial_encoder=FacialEncoder(embed_dim=context_dim, embedding_dim=vision_cfg.hidden_size,
                                     dtype=dtype, **facial_encoder_sizes(config)),
        image_proj=ProjPlus(cross_attention_dim=context_dim, clip_embeddings_dim=vision_cfg.hidden_size,
                            num_tokens=mcfg.num_id_tokens, dtype=dtype),
        shortcut=bool(mcfg.projplus_shortcut),
    )


# ---------------------------------------------------------------------------- abstract trees


def _zeros(shapes):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def flax_init_frozen(model: ConsistentID) -> Callable[[jax.Array], dict]:
    """`key -> frozen tree` by flax's module inits (logically boxed). Only traced (`abstract_frozen`);
    running it would compile a forward pass per module, which construction never does."""
    unet = model.unet.clone(processor_plan=default_plan, attention_kernel=_INIT_KERNEL)
    vae = model.vae.clone(attention_kernel=_INIT_KERNEL)

    def init(key):
        return {
            "unet": unet.init(key, **_zeros(unet.dummy_inputs()))["params"],
            "vae": vae.init(key, jnp.zeros(vae.dummy_inputs().shape))["params"],
            "vision": model.vision.init(key, *model.vision.dummy_inputs(), output_hidden_states=False)["params"],
            "text": [m.init(key, *m.dummy_inputs(), output_hidden_states=False)["params"]
                     for m in model.text_encoders],
        }

    return init


def flax_init_trainable(model: ConsistentID) -> Callable[[jax.Array], dict]:
    """`key -> trainable tree` (adapters, FacialEncoder, ProjPlus) by flax's module inits; traced only."""
    unet = model.unet.clone(attention_kernel=_INIT_KERNEL)
    text_len = model.text_encoders[0].config.max_position_embeddings + model.image_proj.num_tokens
    v = model.vision.config
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    e = model.unet.config.cross_attention_dim

    def init(key):
        unet_params = unet.init(key, **_zeros(unet.dummy_inputs(text_len=text_len)))["params"]
        fe = model.facial_encoder.init(key, jnp.zeros((1, 77, e)), jnp.zeros((1, 5, tokens, v.hidden_size)),
                                       jnp.zeros((1, 77), bool), jnp.zeros((1, 5), bool))["params"]
        proj = model.image_proj.init(key, jnp.zeros((1, 512)), jnp.zeros((1, tokens, v.hidden_size)),
                                     shortcut=model.shortcut)["params"]
        return {"facial_encoder": fe, "image_proj": proj, "adapter_modules": split_unet_params(unet_params)[1]}

    return init


def abstract_frozen(model: ConsistentID, boxed: bool = True) -> dict:
    """The frozen tree's shapes (logically boxed for `sharding.param_shardings`), traced only."""
    def trace(boxed=boxed):
        init = flax_init_frozen(model)
        tree = jax.eval_shape(lambda: init(jax.random.key(0)))  # the key traced too: nothing compiles
        return tree if boxed else nn.meta.unbox(tree)

    return trace() if boxed else runtime.cached_shapes("frozen", runtime.describe(model), trace)


def abstract_trainable(model: ConsistentID, boxed: bool = True) -> dict:
    """The trainable tree's shapes (adapters, FacialEncoder, ProjPlus), traced only."""
    def trace(boxed=boxed):
        init = flax_init_trainable(model)
        tree = jax.eval_shape(lambda: init(jax.random.key(0)))
        return tree if boxed else nn.meta.unbox(tree)

    return trace() if boxed else runtime.cached_shapes("trainable", runtime.describe(model), trace)


# ------------------------------------------------------------------------------------ weights


def random_frozen(model: ConsistentID, seed: int, dtype=None, shardings=None) -> dict:
    """Random frozen weights (presets: demo, tests, benchmarks), from the abstract shapes (host numpy,
    or placed on `shardings`)."""
    return random_params(abstract_frozen(model), seed, dtype=dtype, shardings=shardings)


def fold_lora_weights(frozen: Mapping, trainable: Mapping) -> tuple[dict, dict]:
    """Inference weights for `build_modules(config, fold_lora=True)`: every LoRA folded into the
    frozen UNet kernel it adapts (fp32 arithmetic, then the kernel's dtype); the adapters keep
    their ID projections only."""
    unet, adapter_modules = adapters.fold_lora(frozen["unet"], trainable["adapter_modules"])
    return {**frozen, "unet": unet}, {**trainable, "adapter_modules": adapter_modules}


def load_frozen(model: ConsistentID, config) -> dict:
    """Frozen weights from the configured folders (fp32 host arrays), each loaded strictly."""
    from cid_jax.weights.clip import (load_clip_text, load_clip_text_with_projection,
                                      load_clip_vision_with_projection)
    from cid_jax.weights.unet import load_unet
    from cid_jax.weights.vae import load_vae

    check_weight_folders(config)
    folders = _folders(config)
    frozen = {"unet": load_unet(folders["unet"][0])[1], "vae": load_vae(folders["vae"][0])[1],
              "vision": load_clip_vision_with_projection(folders["vision"][0])[1],
              "text": [load_clip_text(folders["text"][0])[1]]}
    if model.is_sdxl:
        frozen["text"].append(load_clip_text_with_projection(folders["text"][1])[1])
    return frozen


def init_trainable(model: ConsistentID, frozen_unet: Mapping, seed: int) -> dict:
    """The reference initialisation of the trainable parts (fp32 host arrays), from the abstract
    shapes; the decoupled ID projections start as copies of the base UNet's text projections."""
    fresh = random_params(abstract_trainable(model), seed, dtype=jnp.float32)
    fresh["adapter_modules"] = adapters.init_ip_from_base(frozen_unet, fresh["adapter_modules"])
    return fresh


def base_weights(model: ConsistentID, config) -> dict:
    """The frozen weights a config names, in fp32: the folders' or, for a preset, random ones from
    the run's "frozen" stream (the same for training and generation)."""
    if config.model.base:
        return load_frozen(model, config)
    return random_frozen(model, stream_seed(config, "frozen"))


def build(config) -> tuple[ConsistentID, dict, dict]:
    """(model, frozen params in `frozen_dtype(config)`, fp32 trainable params at their reference
    initialisation) from the config. to_k_ip / to_v_ip copy the fp32 base weights."""
    model = build_modules(config)
    frozen = base_weights(model, config)
    trainable = init_trainable(model, frozen["unet"], stream_seed(config, "trainable"))
    return model, cast_floating(frozen, frozen_dtype(config)), trainable


def checkpoint_layout(config):
    """The ConsistentID checkpoint key layout of a config's architecture (reads only the UNet's and
    the image encoder's config.json, or the preset): what exports write and `init_from` must fit."""
    from cid_jax.weights import consistentid as cw

    arch = architecture(config, ("unet", "vision"))
    fe = facial_encoder_sizes(config)
    return cw.layout_for(arch["unet"], base=config.model.variant, rank=int(config.model.lora_rank),
                         num_tokens=int(config.model.num_id_tokens),
                         clip_dim=CLIPVisionConfig.from_dict(arch["vision"]).hidden_size,
                         fe_dim=fe["dim"], fe_depth=fe["depth"], fe_heads=fe["heads"])
