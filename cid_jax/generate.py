"""Generate images of a person from one reference photo with a ConsistentID checkpoint.

    python -m cid_jax.generate --checkpoint=CKPT --base=SD15_DIR --image-encoder=CLIP_H_DIR \
        --image=face.jpg --prompt="a woman in a garden" [--negative-prompt=... --steps=50
        --guidance=5 --merge-step=30 --seed=2024 --num-images=4 --sampler=euler --out=out.png
        --parser-weights=face_parsing.pth --insightface-models=~/.insightface/models/buffalo_l]

`--base` may be an SD1.5 or an SDXL diffusers folder (SDXL: it has text_encoder_2/); SDXL uses the
reference SDXL pipeline's defaults (guidance 7.5, ProjPlus shortcut, 1024 px, its caption).

`--checkpoint` is one of
  * a training workdir (`config.json` + orbax `checkpoints/`, or an exported `*.safetensors` /
    `params.msgpack` inside it); a workdir trained on the demo config's tiny models needs no
    `--base` (the frozen weights are re-created from the config's seed, as training did);
  * our exported `.safetensors`, or a reference ConsistentID `.bin` (e.g. `ConsistentID-v1.bin`).

Without `--parser-weights` the face is found by scikit-image's offline LBP cascade and the region
masks come from a geometric template; without `--insightface-models` the ID embedding is zero (what
the reference does when it finds no face). Each fallback is announced once. A photo without a face
exits with status 2 and a message, not a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
import time
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("cid_jax.generate")

EXIT_NO_FACE = 2
EXIT_MISSING = 3


class UserError(Exception):
    """A problem the user can fix (missing file, bad option): printed without a traceback."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------- model loading


def _config_from_json(text: str):
    import ml_collections

    return ml_collections.ConfigDict(json.loads(text))


def workdir_config(workdir: pathlib.Path):
    """The ml_collections config of a training run: `config.json`, else the newest checkpoint's meta."""
    path = workdir / "config.json"
    if path.exists():
        return _config_from_json(path.read_text())
    metas = sorted((workdir / "checkpoints").glob("*/meta/metadata")) if (workdir / "checkpoints").is_dir() else []
    for meta in reversed(metas):
        data = json.loads(meta.read_text())
        if "config" in data:
            return _config_from_json(data["config"])
    raise UserError(f"{workdir} has no config.json (nor a checkpoint with a saved config); "
                    "pass --base to use a diffusers folder instead", EXIT_MISSING)


def base_config(base: Optional[str], image_encoder: Optional[str]):
    """A config for real weights: an SD1.5 or SDXL diffusers folder (SDXL: it has text_encoder_2/)
    + a CLIP-H folder."""
    from cid_jax import pipeline as pl
    from cid_jax.config_base import base_config as defaults

    config = defaults()
    config.model.dtype = "float32"
    if not base:
        raise UserError("--base (a diffusers Stable Diffusion 1.5 or SDXL folder) is needed for this checkpoint",
                        EXIT_MISSING)
    base_path = pathlib.Path(base).expanduser()
    if not base_path.is_dir():
        raise UserError(f"base model folder {base_path} does not exist; expected a diffusers SD1.5 or SDXL "
                        "folder (unet/, vae/, text_encoder/[, text_encoder_2/], tokenizer/)", EXIT_MISSING)
    if pl.is_sdxl_base(base_path):  # the reference SDXL pipeline's settings
        config.model.variant = "sdxl"
        config.model.projplus_shortcut = True
    enc = pathlib.Path(image_encoder).expanduser() if image_encoder else base_path / "image_encoder"
    if not (enc / "config.json").exists():
        raise UserError(f"CLIP image encoder folder {enc} not found (config.json missing); pass "
                        "--image-encoder=<laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder>", EXIT_MISSING)
    config.model.base, config.model.image_encoder = str(base_path), str(enc)
    return config


def is_sdxl(checkpoint: str, base: Optional[str]) -> bool:
    """Whether `load(checkpoint, base)` will build SDXL: an SDXL `--base` (text_encoder_2/), else a
    workdir trained with variant sdxl. Cheap (no weights read), so the photo is parsed first."""
    from cid_jax import pipeline as pl

    if base:
        return pl.is_sdxl_base(base)
    ckpt = pathlib.Path(checkpoint).expanduser()
    try:
        return ckpt.is_dir() and workdir_config(ckpt).model.get("variant") == "sdxl"
    except UserError:
        return False


def inference_config(config, dtype: Optional[str] = None):
    """No attention capture at inference; optional compute dtype override."""
    config = config.copy_and_resolve_references()
    config.model.facial_loss_mode = "none"
    if dtype:
        config.model.dtype = dtype
    return config


def load_trainable_file(path: pathlib.Path, config, model) -> tuple[dict, dict]:
    """A reference-layout checkpoint (`.bin` / `.safetensors`, ours or the released one) into our
    trainable tree, strictly against this model's layout. Returns (trainable, metadata)."""
    from cid_jax import export
    from cid_jax.weights import consistentid as cw

    params, _ = cw.load_checkpoint(path, export.layout_for_config(config, model))
    return export.from_export_groups(params), cw.read_metadata(path)


@dataclasses.dataclass
class Loaded:
    model: object
    frozen: dict
    trainable: dict
    metadata: dict
    tokenizer: object
    noise_config: dict


def load(checkpoint: str, base: Optional[str] = None, image_encoder: Optional[str] = None,
         dtype: Optional[str] = None) -> Loaded:
    """Model, frozen and trainable params, tokenizer and scheduler config for `--checkpoint`."""
    import jax

    from cid_jax.models import build as build_lib
    from cid_jax.text import CLIPTokenizer, add_trigger_tokens

    ckpt = pathlib.Path(checkpoint).expanduser()
    if not ckpt.exists():
        raise UserError(f"checkpoint {ckpt} does not exist (a training workdir, an exported .safetensors "
                        "or a reference ConsistentID .bin)", EXIT_MISSING)
    workdir = ckpt if ckpt.is_dir() else None
    if workdir is not None and base is None:
        config = workdir_config(workdir)
    else:
        config = base_config(base, image_encoder)
    config = inference_config(config, dtype)
    problems = build_lib.missing_weight_folders(config)
    if problems:
        raise UserError("base model weights not found:\n  " + "\n  ".join(problems), EXIT_MISSING)

    model = build_lib.build_modules(config)
    key = jax.random.key(int(config.get("seed", 0)))
    k_model, _ = jax.random.split(key)  # the trainer's split: tiny frozen weights equal training's
    k_frozen, _ = jax.random.split(k_model)
    if config.model.get("tiny"):
        frozen = build_lib.init_frozen_random(model, k_frozen)
    else:
        frozen = build_lib.load_frozen_pretrained(model, config)
    trainable, metadata = None, {}
    if workdir is not None:
        files = sorted(p for p in workdir.iterdir() if p.suffix in (".safetensors", ".bin"))
        if (workdir / "checkpoints").is_dir():
            from cid_jax import export

            _, trainable, step = export.restore_trainable(workdir)
            log.info("restored trainable params from %s (step %d)", workdir / "checkpoints", step)
        elif len(files) == 1:
            trainable, metadata = load_trainable_file(files[0], config, model)
        else:
            raise UserError(f"{workdir}: no orbax checkpoint under checkpoints/ and no single exported "
                            f"*.safetensors/*.bin (found {[p.name for p in files]})", EXIT_MISSING)
    else:
        trainable, metadata = load_trainable_file(ckpt, config, model)

    if config.model.get("tiny") or not config.model.base:
        tokenizer = CLIPTokenizer.default()
    else:
        tok_dir = pathlib.Path(config.model.base) / "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir) if tok_dir.is_dir() else CLIPTokenizer.default()
    add_trigger_tokens(tokenizer)
    noise_config = dict(config.noise)
    sched_file = pathlib.Path(config.model.base or "", "scheduler", "scheduler_config.json")
    if config.model.base and sched_file.exists():
        noise_config = json.loads(sched_file.read_text())
    else:
        noise_config.setdefault("steps_offset", 1)
    # Pairing of part images to facial words: the checkpoint's metadata, else the training config's
    # (a workdir), else "reference" (the released weights).
    metadata.setdefault("pairing", config.data.get("pairing", "reference") if workdir is not None else "reference")
    return Loaded(model, frozen, trainable, metadata, tokenizer, noise_config)


# ---------------------------------------------------------------------------- face analysis


class FaceAnalyzer:
    """Parsing map and ID embedding of a photo, with the offline fallbacks announced once."""

    def __init__(self, parser_weights: Optional[str] = None, insightface_models: Optional[str] = None):
        self.parser = None
        self.embedder = None
        if parser_weights:
            path = pathlib.Path(parser_weights).expanduser()
            if not path.exists():
                raise UserError(f"face parsing weights {path} not found; expected BiSeNet's 79999_iter.pth "
                                "(also published as face_parsing.pth)", EXIT_MISSING)
            from cid_jax.face import load_bisenet

            self.parser = load_bisenet(path)
        else:
            log.warning("no --parser-weights: detecting the face with scikit-image's LBP cascade and "
                        "using the geometric part template (lower fidelity than BiSeNet parsing)")
        if insightface_models:
            from cid_jax.face import ArcFaceEmbedder, ArcFaceModelsError

            try:
                self.embedder = ArcFaceEmbedder(insightface_models)
            except ArcFaceModelsError as e:
                raise UserError(str(e), EXIT_MISSING) from None
        else:
            log.warning("no --insightface-models: using a zero ID embedding (as the reference does "
                        "without a detected face); identity will come from the CLIP features only")

    def label_map(self, image: np.ndarray, size: int = 512) -> np.ndarray:
        """The parsing map at `size` x `size` (the references parse at 512 for SD1.5, 1280 for SDXL)."""
        from cid_jax.face import detect_largest_face, parse_face, template_parse

        if self.parser is None:
            return template_parse(image, size=size)
        detect_largest_face(image)  # refuse photos without a face before trusting the parser
        return parse_face(image, *self.parser, size=size)

    def id_embedding(self, image: np.ndarray) -> Optional[np.ndarray]:
        return None if self.embedder is None else self.embedder.embed(image)


# ------------------------------------------------------------------------------------- run


def read_image(path: str) -> np.ndarray:
    from PIL import Image

    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise UserError(f"image {p} does not exist", EXIT_MISSING)
    return np.asarray(Image.open(p).convert("RGB"))


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


def generate(loaded: Loaded, image: np.ndarray, label_map: np.ndarray, id_embedding, prompts: Sequence[str],
             negative_prompt: str, seeds: Sequence[int], *, steps: int, guidance: float, merge_step: int,
             sampler: str, height: int, width: int, caption: Optional[str] = None) -> np.ndarray:
    """uint8 images [len(prompts) * len(seeds), H, W, 3] (prompt-major)."""
    from cid_jax import pipeline as pl

    face = pl.face_batch(image, label_map, id_embedding)
    pairing = loaded.metadata.get("pairing", "reference")
    variant = "sdxl" if loaded.model.is_sdxl else "sd15"
    texts = [pl.text_batch(p, negative_prompt, loaded.tokenizer, face.part_names, caption, pairing, variant)
             for p in prompts]
    for t in texts:
        log.info("facial prompt: %s", t.prompt_face)
    texts = [t for t in texts for _ in seeds]
    inputs = pl.model_inputs([face] * len(texts), texts)
    for encoder in loaded.model.text_encoders:
        pl.check_token_ids(inputs, encoder.config.vocab_size)
    if loaded.model.is_sdxl:
        inputs["time_ids"] = pl.sdxl_time_ids(len(texts), height, width)
    shape = pl.latent_shape(loaded.model, height, width)
    noise = pl.initial_noise(list(seeds) * len(prompts), shape)
    state = pl.scheduler_state(sampler, steps, loaded.noise_config)
    gen = pl.Generator(loaded.model)
    t0 = time.perf_counter()
    images, _ = gen(loaded.frozen, loaded.trainable, inputs, noise, state, merge_step, guidance)
    images = pl.to_uint8(images)
    log.info("%d image(s) in %.1f s (%d steps, %s, including compilation)", len(images),
             time.perf_counter() - t0, steps, sampler)
    return images


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cid_jax.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training workdir, exported .safetensors or reference .bin")
    p.add_argument("--base", help="diffusers SD1.5 or SDXL folder (not needed for a tiny demo workdir)")
    p.add_argument("--image-encoder", help="CLIP-ViT-H-14 folder (default: <base>/image_encoder)")
    p.add_argument("--image", required=True, help="reference photo with one face")
    p.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    p.add_argument("--negative-prompt", default="monochrome, lowres, bad anatomy, worst quality, low quality, blurry")
    p.add_argument("--caption", default=None, help="face caption with the facial words (default: the reference's)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default 5; SDXL 7.5, as the references)")
    p.add_argument("--merge-step", type=int, default=30, help="steps i <= merge-step use the text-only prompt")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--num-images", type=int, default=1, help="seeds seed, seed+1, ...")
    p.add_argument("--sampler", choices=("euler", "ddim"), default="euler")
    p.add_argument("--height", type=int, default=None, help="default 512, SDXL 1024 (tiny demo: 64)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--out", default="consistentid.png", help="PNG path; several images also write <out>_<k>.png")
    p.add_argument("--parser-weights", help="BiSeNet 79999_iter.pth / face_parsing.pth")
    p.add_argument("--insightface-models", help="insightface buffalo_l folder")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from cid_jax.observe import quiet_library_logs

    quiet_library_logs()
    args = parse_args(argv)
    from cid_jax import pipeline as pl

    try:
        image = read_image(args.image)
        analyzer = FaceAnalyzer(args.parser_weights, args.insightface_models)
        from cid_jax.face import NoFaceFoundError

        try:
            variant = "sdxl" if is_sdxl(args.checkpoint, args.base) else "sd15"
            label_map = analyzer.label_map(image, size=pl.VARIANT_DEFAULTS[variant].parse_size)
            id_embedding = analyzer.id_embedding(image)
        except NoFaceFoundError as e:
            raise UserError(f"{args.image}: {e}", EXIT_NO_FACE) from None
        log.info("loading %s", args.checkpoint)
        loaded = load(args.checkpoint, args.base, args.image_encoder, args.dtype)
        defaults = pl.VARIANT_DEFAULTS["sdxl" if loaded.model.is_sdxl else "sd15"]
        default_size = 64 if loaded.model.vae.config.sample_size <= 256 and not args.base else defaults.size
        height, width = args.height or default_size, args.width or default_size
        guidance = args.guidance if args.guidance is not None else defaults.guidance
        seeds = [args.seed + k for k in range(args.num_images)]
        images = generate(loaded, image, label_map, id_embedding, args.prompt, args.negative_prompt, seeds,
                          steps=args.steps, guidance=guidance, merge_step=args.merge_step,
                          sampler=args.sampler, height=height, width=width, caption=args.caption)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    from PIL import Image

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        Image.fromarray(images[0]).save(out)
    else:
        for k, im in enumerate(images):
            Image.fromarray(im).save(out.with_name(f"{out.stem}_{k}{out.suffix or '.png'}"))
        Image.fromarray(grid(images)).save(out)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
