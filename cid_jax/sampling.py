"""ConsistentID sampling (SD1.5 and SDXL), as pure functions: host-side inputs, the three embedding
sets, the compiled denoising loop and VAE decoding.

The reference pipeline (spec §6) in three stages:

1. Host (numpy, Python strings): `face_batch` turns a photo + its 19-class parsing map + an ArcFace
   embedding into CLIP inputs (via the one shared implementation in `cid_jax.data.masks`), and
   `text_batch` composes the facial prompt ("<prompt>Detail:The person has one face <|facial|>,
   ...") and tokenizes the facial, text-only and negative prompts.
2. `embedding_sets` (jitted): three [B, 81, E] contexts, each `[77 text tokens ; 4 ID tokens]`:
     null      = FacialEncoder(negative text, zero part images, *positive* masks) ; ProjPlus(0, CLIP(0))
     text      = text-only prompt (facial text without markers)                 ; ProjPlus(id, CLIP(img))
     augmented = FacialEncoder(facial prompt, part images)                      ; ProjPlus(id, CLIP(img))
3. `sample` (jitted once for all steps): a `lax.scan` over the step index i; the conditional
   context is `text` while i <= merge_step and `augmented` after (a traced select, so changing the
   merge step does not recompile), classifier-free guidance against `null`, and a diffusers-equal
   Euler or DDIM step (`cid_jax.schedulers`). `decode` maps latents to uint8 images.

SDXL (spec §6, "SDXL differences"): the contexts are [77 + 4, 2048] (both text encoders' penultimate
states), each set also carries encoder 2's pooled embedding, switched at the merge step like the
context, and the UNet gets `time_ids` = (H, W, 0, 0, H, W) for both CFG halves. The text-only and
negative sets encode the bare user prompt (no "; Detail:" caption). Encoder 2 reads the same ids
re-padded with its pad id (the aligned form the reference trained with; its inference script
BPE-splits `<|facial|>` for encoder 2, a bug not reproduced).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cid_jax import errors, runtime, schedulers
from cid_jax.data import masks as masks_lib
from cid_jax.models.consistentid import ConsistentID
from cid_jax.models.vae import AutoencoderKL
from cid_jax.text import facial_prompts as fp

log = logging.getLogger(__name__)

DEFAULT_STEPS = 50
DEFAULT_MERGE_STEP = 30
DEFAULT_GUIDANCE = 5.0


class VariantDefaults(NamedTuple):
    """What the reference pipelines use per base model when the user does not say."""
    guidance: float
    size: int        # image height and width
    parse_size: int  # the face parser's input side


VARIANT_DEFAULTS = {"sd15": VariantDefaults(DEFAULT_GUIDANCE, 512, 512),
                    "sdxl": VariantDefaults(7.5, 1024, 1280)}


DEFAULT_SAMPLER = "euler"  # the reference's; the paper reports DDIM


# ------------------------------------------------------------------------------- host inputs


class FaceBatch(NamedTuple):
    """One reference photo, ready for the model (numpy, no batch axis)."""
    clip_image: np.ndarray        # float32 [224, 224, 3]
    part_clip_images: np.ndarray  # float32 [5, 224, 224, 3] in slot order (Face, Eye, Ear, Nose, Lip)
    id_embedding: np.ndarray      # float32 [512]
    part_names: list              # present parts, reference names in label order ("Face", "Left_Eye", ...)


def face_batch(image, label_map, id_embedding: Optional[np.ndarray] = None) -> FaceBatch:
    """Photo (uint8 RGB) + its parsing label map (+ ArcFace embedding, zeros if None)."""
    inputs = masks_lib.face_inputs(image, label_map)
    emb = np.zeros(512, np.float32) if id_embedding is None else np.asarray(id_embedding, np.float32).reshape(512)
    return FaceBatch(inputs.clip_image, inputs.part_clip_images, emb, masks_lib.part_names(inputs.slot_labels))


class TextBatch(NamedTuple):
    """Token inputs of one prompt (numpy, no batch axis)."""
    input_ids: np.ndarray              # int32 [77]: the facial prompt, markers removed
    text_only_ids: np.ndarray          # int32 [77]: the same text tokenized normally (EOS kept)
    negative_ids: np.ndarray           # int32 [77]
    facial_token_mask: np.ndarray      # bool [77]
    facial_token_idx_mask: np.ndarray  # bool [5]
    part_order: np.ndarray             # int32 [5]: the slot feeding each facial token, -1 = none
    prompt_face: str                   # the composed facial prompt (with markers), for the log
    # SDXL only: the same three texts as SDXL's tokenizer_2 gives them, for text encoder 2.
    input_ids_2: Optional[np.ndarray] = None
    text_only_ids_2: Optional[np.ndarray] = None
    negative_ids_2: Optional[np.ndarray] = None


TOKEN_KEYS = ("input_ids", "text_only_ids", "negative_ids")


def text_batch(prompt: str, negative_prompt: str, tokenizer, part_names: Sequence[str],
               caption: Optional[str] = None, pairing: str = "reference",
               variant: str = "sd15", tokenizer_2=None) -> TextBatch:
    """The reference's prompt composition and tokenization (spec §6 step 5, §8).

    SDXL also takes `tokenizer_2` (SDXL's second tokenizer, pad "!": `build.tokenizers_for`):
    encoder 2 reads each text as it tokenizes it, the facial prompt without its markers
    (`fp.second_encoder_ids`, as the reference's SDXL training), the other two as diffusers'
    `encode_prompt` does.

    `caption` defaults to the variant's (DEFAULT_CAPTION_SD15 / _SDXL). The text-only branch encodes
    the facial prompt without markers for SD1.5 and the bare `prompt` for SDXL, as the references do.

    `tokenizer` must have <|image|>/<|facial|> registered (`fp.add_trigger_tokens`). The parts whose
    word is missing from the caption are dropped; the kept parts are ordered by `pairing`
    ("reference": label order, the released weights' quirky ears<->eyes pairing; "by_name").
    """
    if caption is None:
        caption = fp.DEFAULT_CAPTION_SDXL if variant == "sdxl" else fp.DEFAULT_CAPTION_SD15
    prompt_face, prompt_text_only = fp.compose_inference_prompt(prompt, caption, tokenizer, part_names,
                                                                variant)
    if variant == "sdxl":
        prompt_text_only = prompt
    marked, kept = fp.process_text_with_markers(caption, part_names)
    tokens = fp.tokenize_facial_prompt(tokenizer, prompt_face)
    _warn_if_cut(tokenizer, prompt_face, tokens.input_ids)
    ordered = fp.pair_parts_to_words(kept, pairing, marked) if fp.FACIAL_TOKEN in prompt_face else []
    rows = tokenizer([prompt_text_only, negative_prompt or ""], max_length=77, padding="max_length",
                     truncation=True)
    second = {}
    if variant == "sdxl":
        if tokenizer_2 is None:
            raise ValueError("SDXL prompts need tokenizer_2 (build.tokenizers_for)")
        rows_2 = tokenizer_2([prompt_text_only, negative_prompt or ""], max_length=77, padding="max_length",
                             truncation=True)
        second = dict(input_ids_2=fp.second_encoder_ids(tokenizer_2, prompt_face),
                      text_only_ids_2=np.asarray(rows_2[0], np.int32), negative_ids_2=np.asarray(rows_2[1], np.int32))
    return TextBatch(tokens.input_ids, np.asarray(rows[0], np.int32), np.asarray(rows[1], np.int32),
                     tokens.facial_token_mask, tokens.facial_token_idx_mask,
                     masks_lib.part_order(ordered), prompt_face, **second)


def _warn_if_cut(tokenizer, prompt_face: str, kept_ids: np.ndarray) -> None:
    """CLIP reads 77 tokens: a longer prompt is cut; say so, and where."""
    markers = {tokenizer.convert_tokens_to_ids(t) for t in (fp.FACIAL_TOKEN, fp.IMAGE_TOKEN)}
    n = sum(1 for i in tokenizer.encode(prompt_face) if i not in markers)
    if n > len(kept_ids):
        tail = tokenizer.decode([int(i) for i in kept_ids[-8:-1]]).strip()
        log.warning("the prompt (with the facial details) has %d tokens and the text encoder reads %d: it is cut "
                    "after '... %s'; shorten the prompt to keep the rest", n, len(kept_ids), tail)


def model_inputs(faces: Sequence[FaceBatch], texts: Sequence[TextBatch]) -> dict:
    """Stacks per-sample host inputs into the batch `embedding_sets` takes (one face per text)."""
    if len(faces) != len(texts):
        raise ValueError(f"{len(faces)} faces for {len(texts)} prompts")
    parts = [masks_lib.arrange_parts(f.part_clip_images, t.part_order) for f, t in zip(faces, texts)]
    keys = TOKEN_KEYS + (tuple(k + "_2" for k in TOKEN_KEYS) if texts[0].input_ids_2 is not None else ())
    return {
        **{k: np.stack([getattr(t, k) for t in texts]) for k in keys},
        "facial_token_mask": np.stack([t.facial_token_mask for t in texts]),
        "facial_token_idx_mask": np.stack([t.facial_token_idx_mask for t in texts]),
        "clip_image": np.stack([f.clip_image for f in faces]),
        "part_clip_images": np.stack(parts),
        "id_embedding": np.stack([f.id_embedding for f in faces]),
    }


def check_token_ids(inputs: Mapping[str, np.ndarray], vocab_size: int) -> None:
    """The text encoder's table must hold every id (a tiny encoder with a small vocabulary would
    otherwise silently read out of range under jit)."""
    for k in (k for k in inputs if k.removesuffix("_2") in TOKEN_KEYS):
        top = int(np.max(inputs[k]))
        if top >= vocab_size:
            raise ValueError(f"{k} has token id {top} but the text encoder's vocab_size is {vocab_size}")


# ---------------------------------------------------------------------------- embedding sets


class EmbeddingSets(NamedTuple):
    null: jax.Array       # [B, 81, E]
    text: jax.Array       # [B, 81, E]
    augmented: jax.Array  # [B, 81, E]
    # SDXL only (None for SD1.5): text encoder 2's pooled embedding of each set [B, P], and time ids.
    null_pooled: Optional[jax.Array] = None
    text_pooled: Optional[jax.Array] = None
    augmented_pooled: Optional[jax.Array] = None
    time_ids: Optional[jax.Array] = None  # [B, 6]


def embedding_sets(model: ConsistentID, frozen, trainable, inputs: Mapping[str, jax.Array]) -> EmbeddingSets:
    """The reference's three contexts (spec §6 steps 6-11) via `ConsistentID.conditioning`; for SDXL
    also their pooled embeddings, and `inputs["time_ids"]` (`cid_jax.data.batch.sdxl_time_ids`) is required."""
    common = {k: inputs[k] for k in ("facial_token_mask", "facial_token_idx_mask")}
    if model.is_sdxl:
        if "time_ids" not in inputs:
            raise ValueError("SDXL generation needs inputs['time_ids'] (cid_jax.data.batch.sdxl_time_ids)")
        common["time_ids"] = inputs["time_ids"]
    def ids(key):  # the batch's input_ids (and SDXL's input_ids_2) from one of the three texts
        both = {"input_ids": inputs[key]}
        if model.is_sdxl:
            if key + "_2" not in inputs:
                raise ValueError(f"SDXL generation needs inputs['{key}_2'] (text_batch with tokenizer_2)")
            both["input_ids_2"] = inputs[key + "_2"]
        return both

    real = dict(common, clip_image=inputs["clip_image"], part_clip_images=inputs["part_clip_images"],
                id_embedding=inputs["id_embedding"])
    augmented, augmented_added = model.conditioning(frozen, trainable, dict(real, **ids("input_ids")))
    text, text_added = model.conditioning(frozen, trainable, dict(real, **ids("text_only_ids")), fuse=False)
    # Unconditional: a zero *normalised* CLIP tensor (not a black image), a zero ID embedding, zero
    # part tensors, and the positive prompt's facial positions on the negative prompt (spec §9.6).
    null_inputs = dict(common, **ids("negative_ids"),
                       clip_image=jnp.zeros_like(inputs["clip_image"]),
                       part_clip_images=jnp.zeros_like(inputs["part_clip_images"]),
                       id_embedding=jnp.zeros_like(inputs["id_embedding"]))
    null, null_added = model.conditioning(frozen, trainable, null_inputs)
    if not model.is_sdxl:
        return EmbeddingSets(null, text, augmented)
    return EmbeddingSets(null, text, augmented, null_added["text_embeds"], text_added["text_embeds"],
                         augmented_added["text_embeds"], inputs["time_ids"])


# ---------------------------------------------------------------------------------- sampling


def conditional_context(i, merge_step, text: jax.Array, augmented: jax.Array) -> jax.Array:
    """The reference's switch: text-only while i <= start_merge_step, facial-fused afterwards."""
    return jnp.where(jnp.asarray(i) <= merge_step, text, augmented)


class Inpainting(NamedTuple):
    """What inpainting adds to sampling (`inpainting_inputs`), all at the latents' resolution."""
    image_latents: jax.Array          # [B, h, w, 4] the init image, encoded and scaled
    mask: jax.Array                   # [B, h, w, 1] 1 = repaint, 0 = keep
    masked_image_latents: jax.Array   # [B, h, w, 4] the init image with the repainted part mid-grey


def inpainting_arrays(image: np.ndarray, mask: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An init image (uint8 [H, W, 3]) and a mask (any [H, W] or [H, W, C] picture, white =
    repaint) -> ([height, width, 3] in [0, 1], [height, width, 1] in {0, 1}) as diffusers'
    VaeImageProcessor prepares them for the reference's pipeline: Lanczos resize, the mask made
    grey and binarised at 0.5."""
    from PIL import Image

    def resized(picture: Image.Image) -> np.ndarray:
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.LANCZOS)
        return np.asarray(picture, np.float32) / 255.0

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise errors.InputError(f"the init image must be an RGB picture, got an array of shape {image.shape}")
    mask = np.asarray(mask)
    if mask.shape[:2] != image.shape[:2]:
        raise errors.InputError(f"the mask is {mask.shape[1]}x{mask.shape[0]} but the init image is "
                                f"{image.shape[1]}x{image.shape[0]}: they must be the same size")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    mask_picture = Image.fromarray(mask.astype(np.uint8)).convert("L")
    grey = resized(mask_picture)
    return resized(Image.fromarray(image.astype(np.uint8))), (grey >= 0.5).astype(np.float32)[..., None]


class Control(NamedTuple):
    """One ControlNet steering the sampler (`sample(controls=...)`)."""
    module: Any                # cid_jax.models.controlnet.ControlNetModel (static)
    params: Any
    image: jax.Array           # [B, H, W, 3] at the output size (`control_arrays`)
    scale: Any = 1.0           # controlnet_conditioning_scale
    keep: Any = None           # [steps] 1.0 where it acts (`control_keep`), None: every step


def control_keep(steps: int, start: float = 0.0, end: float = 1.0) -> np.ndarray:
    """Which steps a ControlNet acts on, as the reference's control_guidance_start/end: step i of
    n is kept unless i/n < start or (i+1)/n > end."""
    if not 0.0 <= start < end <= 1.0:
        raise errors.InputError(f"ControlNet guidance start/end ({start}, {end}): need 0 <= start < end <= 1")
    i = np.arange(steps)
    return (1.0 - ((i / steps < start) | ((i + 1) / steps > end))).astype(np.float32)


def control_arrays(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A control picture (uint8 [H, W, 3], or float in [0, 1] with -1 for the inpainting ControlNet's
    masked pixels) -> [height, width, 3] float32 as diffusers' control image processor gives it:
    Lanczos resize of a picture, no normalisation."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype == np.uint8:
        picture = Image.fromarray(image).convert("RGB")
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.LANCZOS)
        return np.asarray(picture, np.float32) / 255.0
    if image.shape[:2] != (height, width):
        raise errors.InputError(f"a float control image must already be {width}x{height}, got "
                                f"{image.shape[1]}x{image.shape[0]}")
    return image.astype(np.float32)


def inpaint_control(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The control image of an inpainting ControlNet (control_v11p_sd15_inpaint), as the reference's
    demo makes it: the init image in [0, 1] with the masked pixels set to -1 (`inpainting_arrays`'
    outputs in, [H, W, 3] out)."""
    return np.where(mask >= 0.5, -1.0, image).astype(np.float32)


def canny_control(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """The edge picture a canny ControlNet is conditioned on, as the reference's demos make it from
    the init image: OpenCV's Canny at thresholds 100 / 200 on the RGB picture (uint8 [H, W, 3]),
    white edges on black as three equal channels."""
    try:
        import cv2
    except ImportError:
        raise errors.InputError("canny control images use OpenCV's Canny, as the reference's demos: "
                                "pip install opencv-python (in the [face] extra)") from None
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise errors.InputError(f"a canny control image is made from an RGB picture (uint8 [H, W, 3]), got "
                                f"{image.dtype} {image.shape}")
    edges = cv2.Canny(np.ascontiguousarray(image), low, high)
    return np.repeat(edges[..., None], 3, axis=-1)


def first_step(steps: int, strength: float) -> int:
    """Where a partial denoising starts (diffusers' get_timesteps): strength 1 runs every step
    from pure noise; strength s skips the first steps - int(steps * s)."""
    if not 0.0 < strength <= 1.0:
        raise errors.InputError(f"--strength={strength} must be in (0, 1]")
    if int(steps * strength) < 1:  # diffusers refuses this too: not one step would run
        raise errors.InputError(f"--strength={strength} with --steps={steps} leaves no denoising step; raise either")
    return max(steps - min(int(steps * strength), steps), 0)


def encode(model: ConsistentID, frozen, images: jax.Array) -> jax.Array:
    """Images in [-1, 1] [B, H, W, 3] -> diffusion latents: the posterior's mean, scaled. (The
    reference draws a sample of the posterior; its spread is a small fraction of the mean's, and
    the mean keeps one photo -> one latent, so only the seed changes an image.)"""
    posterior = model.vae.apply({"params": frozen["vae"]}, images, method=AutoencoderKL.encode)
    return model.vae.config.scale_latents(posterior.mean)


def inpainting_inputs(model: ConsistentID, frozen, image: jax.Array, mask: jax.Array) -> Inpainting:
    """`image` [B, H, W, 3] in [0, 1] and `mask` [B, H, W, 1] in {0, 1} (`inpainting_arrays`) ->
    `Inpainting`. The masked image is the image in [-1, 1] times (mask < 0.5), as the reference
    makes it (the repainted part mid-grey); the mask goes to the latents' side by nearest sampling,
    as torch's interpolate does."""
    pixels = image.astype(jnp.float32) * 2 - 1
    keep = (mask < 0.5).astype(jnp.float32)
    f = model.vae.config.downscale
    return Inpainting(image_latents=encode(model, frozen, pixels), mask=mask[:, ::f, ::f].astype(jnp.float32),
                      masked_image_latents=encode(model, frozen, pixels * keep))


class People(NamedTuple):
    """Several identities in one image (`sample(people=...)`, `cid_jax.people`)."""
    sets: EmbeddingSets   # each field [B, P, 81, E]: person p's null / text-only / facial contexts
    masks: jax.Array      # [B, P, h, w] each person's region weight at the latents' resolution


def people_sets(model: ConsistentID, frozen, trainable, per_person: Sequence[Mapping[str, jax.Array]]):
    """(base sets, per-person sets): each person's three contexts from their own inputs (the same
    token ids, their facial words' positions, their photo), stacked on axis 1; and the base contexts
    of the pixels outside every region: the negative prompt and the prompt alone, nothing fused (their
    ID tokens are not read)."""
    if model.is_sdxl:
        raise errors.InputError("several people in one image: SD1.5 models only so far")
    each = [embedding_sets(model, frozen, trainable, x) for x in per_person]
    stacked = EmbeddingSets(*(jnp.stack(f, axis=1) for f in zip(*[e[:3] for e in each])))
    first = per_person[0]
    negative, _ = model.conditioning(frozen, trainable, dict(
        input_ids=first["negative_ids"], clip_image=jnp.zeros_like(first["clip_image"]),
        id_embedding=jnp.zeros_like(first["id_embedding"])), fuse=False)
    return EmbeddingSets(negative, each[0].text, each[0].text), stacked


def region_weights(masks: jax.Array, levels: int) -> dict[int, jax.Array]:
    """[B, P, h, w] region weights at the latents' resolution -> {pixels: [B, P, pixels]} at it and
    at each UNet level below (2 x 2 means; an odd side is padded with its edge first, as the UNet's
    stride-2 convolutions halve a side rounding up), the keys of `adapters.Regions.weights`."""
    out = {}
    m = masks.astype(jnp.float32)
    for _ in range(levels):
        b, p, h, w = m.shape
        out[h * w] = m.reshape(b, p, h * w)
        m = jnp.pad(m, ((0, 0), (0, 0), (0, h % 2), (0, w % 2)), mode="edge")
        m = m.reshape(b, p, m.shape[2] // 2, 2, m.shape[3] // 2, 2).mean((3, 5))
    return out


def sample(model: ConsistentID, frozen, trainable, sets: EmbeddingSets, noise: jax.Array,
           state: schedulers.SamplerState, merge_step, guidance, collect: bool = False, ip_scale=None,
           inpainting: Optional[Inpainting] = None, start: int = 0, controls: Sequence[Control] = (),
           people: Optional[People] = None):
    """Denoises `noise` [B, h, w, 4] (standard normal) over `state`'s steps from `start` on.

    `merge_step`, `guidance` and `ip_scale` (the ID branch's weight; None: the model's) are traced
    scalars (no recompilation when they change); the merge step counts from `start`, as the
    reference's loop over the remaining timesteps does. With `inpainting` (the reference's inpainting
    pipeline): a 9-channel UNet sees [latents, mask, masked-image latents]; a 4-channel one has the
    kept part replaced after every step by the init image noised to the next step's level; from
    `start` > 0 (`first_step`, strength < 1) the latents start as the init image noised to that
    step. `controls`: ControlNets, as the reference's ControlNet pipeline runs them: on the latents
    and the conditional context only, their summed residuals added to both halves of the guidance
    batch. `people`: several identities, each inside its region (`sets` are then the base contexts
    of `people_sets`); the merge step switches every person's facial words. Returns the final
    latents, and with `collect=True` also every step's guided noise prediction [n - start, B, ...]."""
    n = state.timesteps.shape[0]
    batch = noise.shape[0]
    nine_channels = model.unet.config.in_channels == 9
    if nine_channels and inpainting is None:
        raise errors.InputError("this UNet is an inpainting one (9 input channels): give an init image and a mask")

    weights = None
    if people is not None:
        if controls:
            raise errors.InputError("ControlNets with several people in one image are not supported yet")
        weights = region_weights(jnp.concatenate([people.masks, people.masks], axis=0),
                                 len(model.unet.config.block_out_channels))

    def regions_at(i):  # each person's contexts of this step, for both halves of the guidance batch
        if people is None:
            return None
        from cid_jax.models.adapters import Regions

        cond_people = conditional_context(i - start, merge_step, people.sets.text, people.sets.augmented)
        return Regions(jnp.concatenate([people.sets.null, cond_people], axis=0), weights)

    def step(x, i):
        cond = conditional_context(i - start, merge_step, sets.text, sets.augmented)
        context = jnp.concatenate([sets.null, cond], axis=0)
        added = cond_added = None
        if sets.null_pooled is not None:  # SDXL: the pooled embedding switches with the context
            pooled = conditional_context(i - start, merge_step, sets.text_pooled, sets.augmented_pooled)
            added = dict(text_embeds=jnp.concatenate([sets.null_pooled, pooled], axis=0),
                         time_ids=jnp.concatenate([sets.time_ids, sets.time_ids], axis=0))
            cond_added = dict(text_embeds=pooled, time_ids=sets.time_ids)
        x_in = state.scale_model_input(x, i)
        control = None
        if controls:
            from cid_jax.models.controlnet import sum_controls

            residuals = []
            for c in controls:
                scale = c.scale if c.keep is None else c.scale * jnp.asarray(c.keep)[i - start]
                residuals.append(c.module.apply({"params": c.params}, x_in, state.timesteps[i], cond,
                                                c.image, scale, cond_added))
            down, mid = sum_controls(residuals)
            control = ([jnp.concatenate([r, r], axis=0) for r in down], jnp.concatenate([mid, mid], axis=0))
        if nine_channels:
            x_in = jnp.concatenate([x_in, inpainting.mask, inpainting.masked_image_latents.astype(x_in.dtype)], -1)
        eps, _ = model.predict_noise(frozen, trainable, jnp.concatenate([x_in, x_in], axis=0),
                                     state.timesteps[i], context, added, capture=False, ip_scale=ip_scale,
                                     control=control, regions=regions_at(i))
        eps = eps.astype(jnp.float32)
        eps_uncond, eps_cond = eps[:batch], eps[batch:]
        guided = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = state.step(guided, i, x).prev_sample
        if inpainting is not None and not nine_channels:
            kept = jnp.where(i < n - 1, state.add_noise(inpainting.image_latents, noise, jnp.minimum(i + 1, n - 1)),
                             inpainting.image_latents)
            x = (1 - inpainting.mask) * kept + inpainting.mask * x
        return x, (guided if collect else None)

    if start == 0:
        x0 = (noise * state.init_noise_sigma).astype(jnp.float32)
    else:
        x0 = state.add_noise(inpainting.image_latents.astype(jnp.float32), noise, start)
    x, per_step = jax.lax.scan(step, x0, jnp.arange(start, n))
    return (x, per_step) if collect else x


def decode(model: ConsistentID, frozen, latents: jax.Array) -> jax.Array:
    """Latents -> float images in [0, 1] [B, H, W, 3] (the reference's decode_latents)."""
    z = model.vae.config.unscale_latents(latents)
    img = model.vae.apply({"params": frozen["vae"]}, z, method=AutoencoderKL.decode)
    return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def to_uint8(images) -> np.ndarray:
    """[0, 1] floats -> uint8, as diffusers' numpy_to_pil ((x * 255).round())."""
    return (np.asarray(images) * 255).round().astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Generator:
    """A compiled generation function for one model: `generator(frozen, trainable, inputs, noise,
    state, merge_step, guidance, ip_scale=1) -> (uint8-ready float images, latents)`; compiled once
    per shape (the three scalars are traced).

    `out_sharding`: where the outputs go (replicated, so every process of a multi-host run can read
    the images); default: where XLA puts them. Inputs with `init_image` [B, H, W, 3] and
    `inpaint_mask` [B, H, W, 1] (`inpainting_arrays`) inpaint, from step `start` (`first_step`).
    Inputs with `region_masks` [B, P, h, w] and `person_0` ... (each person's model inputs,
    `cid_jax.people.group_inputs`) put several people in one image."""
    model: ConsistentID
    out_sharding: Any = None
    start: int = 0
    controlnets: tuple = ()   # ControlNetModel modules; their params in frozen["controlnets"], their
    #                           images, scales and per-step keeps in inputs["control_image_k"] ...

    @functools.cached_property
    def fn(self):
        model, start, controlnets = self.model, self.start, self.controlnets

        def run(frozen, trainable, inputs, noise, state, merge_step, guidance, ip_scale):
            people = None
            if "region_masks" in inputs:  # several people: person_k holds person k's model inputs
                per_person = [inputs[f"person_{k}"] for k in range(inputs["region_masks"].shape[1])]
                sets, stacked = people_sets(model, frozen, trainable, per_person)
                people = People(stacked, inputs["region_masks"])
            else:
                sets = embedding_sets(model, frozen, trainable, inputs)
            inpainting = None
            if "init_image" in inputs:
                inpainting = inpainting_inputs(model, frozen, inputs["init_image"], inputs["inpaint_mask"])
            controls = [Control(m, frozen["controlnets"][k], inputs[f"control_image_{k}"],
                                inputs[f"control_scale_{k}"], inputs[f"control_keep_{k}"])
                        for k, m in enumerate(controlnets)]
            latents = sample(model, frozen, trainable, sets, noise, state, merge_step, guidance, ip_scale=ip_scale,
                             inpainting=inpainting, start=start, controls=controls, people=people)
            return decode(model, frozen, latents), latents

        return jax.jit(run, out_shardings=self.out_sharding)

    def __call__(self, frozen, trainable, inputs, noise, state, merge_step, guidance, ip_scale=1.0):
        return self.fn(frozen, trainable, inputs, noise, state, jnp.int32(merge_step), jnp.float32(guidance),
                       jnp.float32(ip_scale))

    def compile(self, frozen, trainable, inputs, noise, state):
        """The executable for these shapes (compiled now, so callers can time it apart); call it as
        `compiled(frozen, trainable, inputs, noise, state, jnp.int32(merge_step), jnp.float32(guidance),
        jnp.float32(ip_scale))`."""
        args = (frozen, trainable, inputs, noise, state, jnp.int32(0), jnp.float32(0), jnp.float32(1))
        if self.out_sharding is not None:
            return self.fn.lower(*args).compile()
        signature = " ".join([runtime.describe(self.model), f"start={self.start}"]
                             + [runtime.describe(m) for m in self.controlnets])
        return runtime.compile_cached("generate", self.fn, args, signature)


def latent_shape(model: ConsistentID, height: int, width: int) -> tuple[int, int, int]:
    f = model.vae.config.downscale
    if height % f or width % f:
        raise errors.InputError(f"height/width ({height}x{width}) must be multiples of the VAE factor {f}")
    return height // f, width // f, model.vae.config.latent_channels  # a 9-channel UNet denoises 4 of them


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """Standard-normal latents [len(seeds), *shape], one independent stream per seed."""
    return np.stack([np.asarray(jax.random.normal(jax.random.key(int(s)), shape, jnp.float32))
                     for s in seeds])


def scheduler_state(sampler: str, steps: int, noise_config: Optional[Mapping[str, Any]] = None):
    """Euler or DDIM state from a diffusers scheduler_config dict (default SD1.5's)."""
    name = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler"}.get(sampler)
    if name is None:
        raise ValueError(f"sampler must be 'euler' or 'ddim', got {sampler!r}")
    cfg = schedulers.SchedulerConfig.from_config(dict(noise_config or schedulers.SD15_SCHEDULER_CONFIG), name)
    return schedulers.set_timesteps(cfg, steps, sampler)
