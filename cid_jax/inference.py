"""Inference: load a ConsistentID run or file and make images — the library under every tool.

`load` reads a training run directory (its newest readable checkpoint, or a step), our exported
`.safetensors`, or a reference `.bin`, with the base model's frozen weights; `generate_requests` makes
any number of (face, prompt, seed) images in fixed-size batches through one compiled program;
`read_image`, `read_parsing` and `read_prompts_file` are the input readers the tools share.

Used by `cid_jax.generate` (the command line), `cid_jax.evaluate`, `cid_jax.app` and training's
evaluation (`cid_jax.train_eval`). It parses no flags and prints nothing but log lines; a user's
mistake is a `cid_jax.errors.UserError`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Optional, Sequence

import numpy as np

from cid_jax import errors, paths
log = logging.getLogger("cid_jax.inference")


# ---------------------------------------------------------------------------- model loading


def base_config(base: Optional[str], image_encoder: Optional[str]):
    """A config for real weights: an SD1.5 or SDXL diffusers folder (SDXL: it has text_encoder_2/)
    + a CLIP-H folder."""
    from cid_jax import build as build_lib
    from cid_jax.config_base import base_config as defaults
    from cid_jax.models import presets

    config = defaults()
    config.model.dtype = "float32"
    if not base:
        raise errors.MissingError("--base (a diffusers Stable Diffusion 1.5 or SDXL folder) is needed for this "
                                  "checkpoint")
    base_path = build_lib.weights_folder(base)
    if not base_path.is_dir():
        raise errors.MissingError(f"base model folder {base_path} does not exist; expected a diffusers SD1.5 or SDXL "
                                  "folder (unet/, vae/, text_encoder/[, text_encoder_2/], tokenizer/)")
    if presets.is_sdxl_folder(base_path):  # the reference SDXL pipeline's settings
        config.model.variant = "sdxl"
        config.model.projplus_shortcut = True
    enc = build_lib.weights_folder(image_encoder) if image_encoder else base_path / "image_encoder"
    if not (enc / "config.json").exists():
        raise errors.MissingError(f"CLIP image encoder folder {enc} not found (config.json missing); pass "
                                  "--image_encoder=<laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder>")
    config.model.base, config.model.image_encoder = str(base_path), str(enc)
    return config


def variant(checkpoint: str, base: Optional[str]) -> str:
    """What `load(checkpoint, base)` will build, known before any weight is read (so the photo is
    parsed first): an SDXL `--base`, else the variant a run directory was trained with."""
    from cid_jax import run as run_lib
    from cid_jax.models import presets

    if base:
        return "sdxl" if presets.is_sdxl_folder(base) else "sd15"
    ckpt = paths.path(checkpoint)
    if run_lib.RunDir.looks_like_run(ckpt):
        try:
            return run_lib.read_config(run_lib.RunDir.of(ckpt)).model.variant
        except FileNotFoundError:
            pass
    return "sd15"


def inference_config(config, dtype: Optional[str] = None):
    """No attention capture at inference; optional compute dtype override."""
    config = config.copy_and_resolve_references()
    config.model.facial_loss_mode = "none"
    if dtype:
        config.model.dtype = dtype
    return config


def fit_config_to_file(config, path: pathlib.Path):
    """The trainable parts' sizes (LoRA rank, FacialEncoder width/depth/heads) of a checkpoint file,
    written into `config` (a released file has the reference's; our exports may be smaller)."""
    import ml_collections

    from cid_jax.weights import consistentid as cw

    sizes = cw.sizes_of(cw.read_groups(path), cw.read_metadata(path))
    config = config.copy_and_resolve_references()
    if "lora_rank" in sizes:
        config.model.lora_rank = sizes["lora_rank"]
    if "facial_encoder" in sizes:
        config.model.facial_encoder = ml_collections.ConfigDict(sizes["facial_encoder"])
    return config


def load_trainable_file(path: pathlib.Path, config) -> tuple[dict, dict]:
    """A reference-layout checkpoint (`.bin` / `.safetensors`, ours or the released one) into our
    trainable tree, strictly against this config's layout. Returns (trainable, metadata)."""
    from cid_jax import export
    from cid_jax.weights import consistentid as cw

    params, _ = cw.load_checkpoint(path, export.layout_for_config(config))
    return params, cw.read_metadata(path)


@dataclasses.dataclass
class Loaded:
    model: object
    frozen: dict
    trainable: dict
    metadata: dict
    tokenizer: object
    noise_config: dict
    tokenizer_2: object = None  # SDXL's second tokenizer (pad "!"), for text encoder 2


def noise_config_for(config) -> dict:
    from cid_jax import build as build_lib

    sched_file = build_lib.weights_folder(config.model.base) / "scheduler" / "scheduler_config.json" \
        if config.model.base else None
    if sched_file is not None and sched_file.exists():
        return json.loads(sched_file.read_text())
    # No scheduler folder (a preset, a bare base): the variant's shipped config with the run's noise
    # schedule on top, so DDIM keeps SD's clip_sample=False / set_alpha_to_one=False, as PyTorch does.
    from cid_jax import schedulers

    return dict(schedulers.standard_config(config.model.variant), **config.noise)


def load(checkpoint: str, base: Optional[str] = None, image_encoder: Optional[str] = None,
         dtype: Optional[str] = None, step: Optional[int] = None, fold_lora: bool = True) -> Loaded:
    """Model, frozen and trainable params, tokenizer and scheduler config for `--checkpoint`.

    `fold_lora` (default): each LoRA is folded into the base projection it adapts (W + up.down in
    fp32, then the compute dtype), so sampling runs plain projections; False keeps them apart."""
    from cid_jax import build as build_lib
    from cid_jax import run as run_lib

    ckpt = paths.path(checkpoint)
    if not ckpt.exists():
        raise errors.MissingError(f"checkpoint {ckpt} does not exist (a training run directory, an exported "
                                  ".safetensors or a reference ConsistentID .bin)")
    run = run_lib.RunDir.of(ckpt) if run_lib.RunDir.looks_like_run(ckpt) else None
    if run is None:
        ckpt = paths.local_copy(checkpoint)  # a weights file: read (memory-mapped) locally
    if run is not None and base is None:
        config = run_lib.read_config(run)
    else:
        config = base_config(base, image_encoder)
        if ckpt.is_file():
            config = fit_config_to_file(config, ckpt)
    config = inference_config(config, dtype)
    build_lib.check_weight_folders(config)
    model = build_lib.build_modules(config, fold_lora=fold_lora)

    metadata = {}
    if run is not None and run.checkpoints.is_dir():
        _, trainable, step = run_lib.restore_trainable(run, step)
        log.info("restored the trainable params of %s (step %d)", run.checkpoints, step)
        metadata["pairing"] = config.data.get("pairing", "reference")
    elif run is not None:
        files = sorted(p for p in run.root.iterdir()
                       if p.suffix in (".safetensors", ".bin") and p != run.frozen_file)
        if len(files) != 1:
            raise errors.MissingError(f"{run.root}: no checkpoints/ and no single exported *.safetensors/*.bin "
                                      f"(found {[p.name for p in files]})")
        trainable, metadata = load_trainable_file(paths.local_copy(files[0]), config)
        metadata.setdefault("pairing", config.data.get("pairing", "reference"))
    else:
        trainable, metadata = load_trainable_file(ckpt, config)
    # Pairing of part images to facial words: the checkpoint's metadata, else the training config's
    # (a run), else "reference" (the released weights).
    metadata.setdefault("pairing", "reference")
    frozen = run_lib.frozen_weights(model, config, run)
    if fold_lora:
        frozen, trainable = build_lib.fold_lora_weights(frozen, trainable)
    frozen = build_lib.cast_floating(frozen, build_lib.compute_dtype(config))
    tokenizer, tokenizer_2 = build_lib.tokenizers_for(config)
    return Loaded(model, frozen, trainable, metadata, tokenizer, noise_config_for(config), tokenizer_2)


# ------------------------------------------------------------------------------------- run


def default_size(loaded: Loaded, base: Optional[str]) -> int:
    """Image side when none is asked for: the variant's (512, SDXL 1024); 64 for a tiny preset run."""
    from cid_jax import sampling as pl

    if loaded.model.vae.config.sample_size <= 256 and not base:
        return 64
    return pl.VARIANT_DEFAULTS[loaded.model.variant].size


def read_image(path: str) -> np.ndarray:
    """An RGB uint8 photo; a missing, non-image or truncated file is a clear error."""
    from PIL import Image, UnidentifiedImageError

    p = paths.path(path)
    if not p.is_file():
        raise errors.MissingError(f"image {p} does not exist")
    try:
        with p.open("rb") as f, Image.open(f) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise errors.InputError(f"{p} is not a readable image ({e}); give a JPEG or PNG photo") from None


def read_parsing(path: str, size: int) -> np.ndarray:
    """A 19-class parsing label map (PNG, one channel), nearest-resized to `size` x `size`."""
    from PIL import Image

    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise errors.MissingError(f"parsing map {p} does not exist")
    labels = np.asarray(Image.open(p))
    if labels.ndim == 3:
        labels = labels[..., 0]
    if labels.max() > 18:
        raise errors.InputError(f"{p} has label {labels.max()}: expected a 19-class CelebAMask-HQ parsing map (0..18)")
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((size, size), Image.NEAREST))


def grid(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] -> one image, up to 4 per row."""
    n, h, w, c = images.shape
    cols = min(n, 4)
    rows = -(-n // cols)
    out = np.zeros((rows * h, cols * w, c), images.dtype)
    for k, im in enumerate(images):
        r, q = divmod(k, cols)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return out


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """One image to make: a prepared photo (`sampling.face_batch`), a prompt, a seed."""
    face: object
    prompt: str
    seed: int


@dataclasses.dataclass(frozen=True)
class ControlRequest:
    """One ControlNet for `generate_requests`: its module and params (`load_controlnets`), its
    control image at the output size (`sampling.control_arrays`), scale and active span."""
    module: object
    params: object
    image: np.ndarray
    scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0


def load_controlnets(folders: Sequence[str], loaded: "Loaded") -> list[tuple]:
    """(module, params) of each ControlNet folder (local or remote), in the model's dtype, each
    checked to fit the model's UNet."""
    from cid_jax.weights.controlnet import check_fits, load_controlnet

    out = []
    for folder in folders:
        module, params = load_controlnet(paths.local_copy(folder), dtype=loaded.model.unet.dtype)
        check_fits(module.config, loaded.model.unet.config, f"--controlnet={folder}")
        out.append((module, params))
    return out


@dataclasses.dataclass
class Timing:
    compile_s: float = 0.0     # compiling the batch program (0 when the persistent cache had it)
    sample_s: float = 0.0      # the calls that made the images, compile excluded
    images: int = 0

    @property
    def s_per_image(self) -> float:
        return self.sample_s / max(1, self.images)


def generate_requests(loaded: Loaded, requests: Sequence[ImageRequest], *, negative_prompt: str, steps: int,
                      guidance: float, merge_step: int, sampler: str, height: int, width: int,
                      caption: Optional[str] = None, batch_size: Optional[int] = None,
                      progress: bool = False, programs: Optional[dict] = None,
                      generator=None, ip_scale: float = 1.0, inpaint: Optional[tuple] = None,
                      strength: float = 1.0, controls: Sequence["ControlRequest"] = ()) -> tuple[np.ndarray, Timing]:
    """uint8 images [len(requests), H, W, 3] in request order, made `batch_size` at a time by one
    compiled program (the last batch padded by repeating its last request; default: all at once).

    `inpaint`: (init image, mask) as `sampling.inpainting_arrays` gives them at height x width: every
    image repaints the mask's white part of the init image, starting at `strength` (1: from noise).
    `controls`: ControlNets steering every image (`ControlRequest`).

    `programs`: a dict that keeps the compiled programs between calls (keyed by the batch's shapes),
    for callers that generate again and again (training-time evaluation, the web demo); then only
    the first call of a shape compiles. `generator`: a `sampling.Generator` (default: a new one)."""
    import jax
    import jax.numpy as jnp

    from cid_jax import sampling as pl
    from cid_jax.data.batch import sdxl_time_ids

    if not requests:
        return np.zeros((0, height, width, 3), np.uint8), Timing()
    batch_size = max(1, min(batch_size or len(requests), len(requests)))
    pairing = loaded.metadata.get("pairing", "reference")
    texts: dict[tuple, object] = {}

    def text_of(r: ImageRequest):
        key = (r.prompt, tuple(r.face.part_names))
        if key not in texts:
            texts[key] = pl.text_batch(r.prompt, negative_prompt, loaded.tokenizer, r.face.part_names, caption,
                                       pairing, loaded.model.variant, loaded.tokenizer_2)
            (log.info if progress else log.debug)("facial prompt: %s", texts[key].prompt_face)
        return texts[key]

    shape = pl.latent_shape(loaded.model, height, width)
    state = pl.scheduler_state(sampler, steps, loaded.noise_config)
    start = pl.first_step(steps, strength)
    if start and inpaint is None:
        raise errors.InputError(f"--strength={strength} needs an image to start from (--mask, --init_image)")
    generator = generator if generator is not None else pl.Generator(loaded.model)
    modules = tuple(c.module for c in controls)
    if generator.start != start or generator.controlnets != modules:
        generator = dataclasses.replace(generator, start=start, controlnets=modules)
    frozen = dict(loaded.frozen, controlnets=[c.params for c in controls]) if controls else loaded.frozen
    programs = {} if programs is None else programs

    def batch_inputs(batch):
        inputs = pl.model_inputs([r.face for r in batch], [text_of(r) for r in batch])
        for encoder in loaded.model.text_encoders:
            pl.check_token_ids(inputs, encoder.config.vocab_size)
        if loaded.model.is_sdxl:
            inputs["time_ids"] = sdxl_time_ids(len(batch), height, width)
        if inpaint is not None:
            inputs["init_image"] = np.repeat(inpaint[0][None], len(batch), axis=0)
            inputs["inpaint_mask"] = np.repeat(inpaint[1][None], len(batch), axis=0)
        for k, c in enumerate(controls):
            inputs[f"control_image_{k}"] = np.repeat(c.image[None], len(batch), axis=0)
            inputs[f"control_scale_{k}"] = np.float32(c.scale)
            inputs[f"control_keep_{k}"] = pl.control_keep(steps - start, c.guidance_start, c.guidance_end)
        return inputs, pl.initial_noise([r.seed for r in batch], shape)

    batches = [list(requests[i:i + batch_size]) for i in range(0, len(requests), batch_size)]
    batches[-1] += [batches[-1][-1]] * (batch_size - len(batches[-1]))
    timing = Timing(images=len(requests))
    t0 = time.perf_counter()
    inputs, noise = batch_inputs(batches[0])
    key = (tuple((k, np.shape(v), np.asarray(v).dtype.str) for k, v in sorted(inputs.items())), noise.shape,
           tuple(np.shape(x) for x in jax.tree.leaves(state)), id(generator.model), repr(generator.out_sharding),
           generator.start, tuple(id(m) for m in generator.controlnets))
    if key not in programs:
        programs[key] = generator.compile(frozen, loaded.trainable, inputs, noise, state)
        timing.compile_s = time.perf_counter() - t0
    compiled = programs[key]
    from tqdm.auto import tqdm

    out = []
    bar = tqdm(total=len(requests), desc="generate", unit="img", disable=not progress, dynamic_ncols=True)
    for k, batch in enumerate(batches):
        if k:
            inputs, noise = batch_inputs(batch)
        t0 = time.perf_counter()
        images, _ = compiled(frozen, loaded.trainable, inputs, noise, state, jnp.int32(merge_step),
                             jnp.float32(guidance), jnp.float32(ip_scale))
        images = pl.to_uint8(images)  # waits for the batch
        timing.sample_s += time.perf_counter() - t0
        out.append(images)
        bar.update(min(batch_size, len(requests) - k * batch_size))
    bar.close()
    return np.concatenate(out)[:len(requests)], timing


def generate(loaded: Loaded, image: np.ndarray, label_map: np.ndarray, id_embedding, prompts: Sequence[str],
             negative_prompt: str, seeds: Sequence[int], *, steps: int, guidance: float, merge_step: int,
             sampler: str, height: int, width: int, caption: Optional[str] = None) -> np.ndarray:
    """uint8 images [len(prompts) * len(seeds), H, W, 3] (prompt-major)."""
    from cid_jax import sampling as pl

    face = pl.face_batch(image, label_map, id_embedding)
    requests = [ImageRequest(face, p, s) for p in prompts for s in seeds]
    images, timing = generate_requests(loaded, requests, negative_prompt=negative_prompt, steps=steps,
                                       guidance=guidance, merge_step=merge_step, sampler=sampler, height=height,
                                       width=width, caption=caption)
    log.info("%d image(s): compiled in %.1f s, sampled in %.1f s (%d steps, %s)", len(images), timing.compile_s,
             timing.sample_s, steps, sampler)
    return images


def generate_group(loaded: Loaded, faces: Sequence, region_masks: np.ndarray, prompt: str, negative_prompt: str,
                   seeds: Sequence[int], *, steps: int, guidance: float, merge_step: int, sampler: str, height: int,
                   width: int, caption: Optional[str] = None, ip_scale: float = 1.0,
                   generator=None, programs: Optional[dict] = None) -> tuple[np.ndarray, Timing]:
    """uint8 images [len(seeds), H, W, 3] of several people in one picture (`cid_jax.people`):
    `faces` (`sampling.face_batch` each) and `region_masks` [P, height, width] in {0, 1}, one per
    face, non-overlapping. One compiled call for all seeds; `programs` keeps the compiled ones
    across calls (the app), as in `generate_requests`."""
    import jax
    import jax.numpy as jnp

    from cid_jax import people
    from cid_jax import sampling as pl

    if loaded.model.is_sdxl:
        raise errors.InputError("several people in one image: SD1.5 models only so far")
    people.check_masks(region_masks)
    texts = people.group_texts(prompt, negative_prompt, loaded.tokenizer, [f.part_names for f in faces], caption,
                               loaded.metadata.get("pairing", "reference"))
    log.info("facial prompt (%d people): %s", len(faces), texts[0].prompt_face)
    inputs = people.group_inputs(faces, texts, people.latent_masks(region_masks, loaded.model.vae.config.downscale),
                                 len(seeds))
    pl.check_token_ids(inputs["person_0"], loaded.model.text_encoders[0].config.vocab_size)
    noise = pl.initial_noise(seeds, pl.latent_shape(loaded.model, height, width))
    state = pl.scheduler_state(sampler, steps, loaded.noise_config)
    generator = generator if generator is not None else pl.Generator(loaded.model)
    programs = {} if programs is None else programs
    timing = Timing(images=len(seeds))
    key = ("people", str(jax.tree.structure(inputs)), tuple(np.shape(x) for x in jax.tree.leaves(inputs)),
           noise.shape, tuple(np.shape(x) for x in jax.tree.leaves(state)), id(generator.model))
    if key not in programs:
        t0 = time.perf_counter()
        programs[key] = generator.compile(loaded.frozen, loaded.trainable, inputs, noise, state)
        timing.compile_s = time.perf_counter() - t0
    compiled = programs[key]
    t0 = time.perf_counter()
    images, _ = compiled(loaded.frozen, loaded.trainable, inputs, noise, state, jnp.int32(merge_step),
                         jnp.float32(guidance), jnp.float32(ip_scale))
    images = pl.to_uint8(images)
    timing.sample_s = time.perf_counter() - t0
    return images, timing


def read_prompts_file(path: str, flag: str = "--prompts_file") -> list[str]:
    """The non-empty lines of a prompts file; `flag` names the option in the errors."""
    p = paths.path(path)
    if not p.is_file():
        raise errors.MissingError(f"{flag}={path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise errors.InputError(f"{flag}={path} is not a UTF-8 text file ({e.reason} at byte {e.start}); give one "
                                "prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise errors.InputError(f"{flag}={path} holds no prompt (one per line)")
    return prompts
