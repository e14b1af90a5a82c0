"""Generate images of a person from one reference photo with a ConsistentID checkpoint.

    python -m cid_jax.generate --checkpoint=CKPT --base=SD15_DIR --image_encoder=CLIP_H_DIR \
        --image=face.jpg --prompt="a woman in a garden" [--negative_prompt=... --steps=50
        --guidance=5 --merge_step=30 --seed=2024 --num_images=4 --sampler=euler --out=out.png
        --parser_weights=face_parsing.pth --insightface_models=~/.insightface/models/buffalo_l]

Many images per call: `--prompt` repeated and/or `--prompts_file` (one prompt a line) x `--seeds=1,2,3`
(or `--seed` and `--num_images`), made `--batch_size` at a time by one compiled program (the last
batch padded); `--out` is then their grid, and each image is also `<out>_<k>.png` with its prompt,
seed and settings in the PNG metadata. At load each LoRA is folded into its base projection
(`--no_fold_lora` keeps them apart). Compiled programs persist across runs (cid_jax.runtime:
`--compilation_cache_dir`, `--no_compilation_cache`); the log says how long loading, compiling and
sampling took.

(Every flag also answers to its dashed spelling: `--image-encoder`, `--merge-step`, ...)

`--base` may be an SD1.5 or an SDXL diffusers folder (SDXL: it has text_encoder_2/); SDXL uses the
reference SDXL pipeline's defaults (guidance 7.5, ProjPlus shortcut, 1024 px, its caption).

`--checkpoint` is one of
  * a training run directory (its newest readable checkpoint, or `--step`; or one exported
    `*.safetensors` / `*.bin` inside it); a run of a preset architecture (the demo) needs no `--base`:
    its frozen weights are the ones training stored in the run directory;
  * our exported `.safetensors`, or a reference ConsistentID `.bin` (e.g. `ConsistentID-v1.bin`).

Without `--parser_weights` the face is found by scikit-image's offline LBP cascade and the region
masks come from a geometric template; `--parsing=FILE` uses a 19-class parsing map (PNG) instead.
Without `--insightface_models` the ID embedding is zero (what the reference does when it finds no
face). Each fallback is announced once. A photo without a face exits with status 2 and a message.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Optional, Sequence

import numpy as np

from cid_jax import cli, inference, paths
log = logging.getLogger("cid_jax.generate")


def add_model_flags(p) -> None:
    """The flags that say which model to load and how to read faces (generate, the app)."""
    from cid_jax import runtime

    p.add_argument("--checkpoint", required=True, help="training run directory, exported .safetensors or reference .bin")
    p.add_argument("--step", type=int, default=None, help="run directory: the checkpoint step (default: the newest)")
    p.add_argument("--base", help="diffusers SD1.5 or SDXL folder (not needed for a preset (demo) run)")
    p.add_argument("--image_encoder", help="CLIP-ViT-H-14 folder (default: <base>/image_encoder)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--no_fold_lora", action="store_true",
                   help="keep each LoRA apart from its base projection (default: folded in at load)")
    p.add_argument("--height", type=int, default=None, help="default 512, SDXL 1024 (tiny demo: 64)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--sampler", choices=("euler", "ddim"), default="euler")
    p.add_argument("--negative_prompt", default="monochrome, lowres, bad anatomy, worst quality, low quality, blurry")
    p.add_argument("--caption", default=None, help="face caption with the facial words (default: the reference's)")
    p.add_argument("--parser_weights", help="BiSeNet 79999_iter.pth / face_parsing.pth")
    p.add_argument("--insightface_models", help="insightface buffalo_l folder")
    runtime.add_cache_flags(p)


def add_edit_flags(p) -> None:
    """Inpainting and ControlNet flags (generate and convert/run_pytorch.py)."""
    p.add_argument("--mask", help="inpainting: a picture the size of the init image, white = repaint "
                                  "(the reference's inpainting pipeline)")
    p.add_argument("--init_image", help="inpainting: the picture to repaint (default: --image, as the reference, "
                                        "which repaints the ID photo itself)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="inpainting: how far the init image is noised before denoising (1: from pure noise, "
                        "the reference demo's; 0.6: the last 60%% of the steps)")
    p.add_argument("--controlnet", action="append", default=[],
                   help="a diffusers ControlNet folder (repeat for several, each with its --control_image)")
    p.add_argument("--control_image", action="append", default=[],
                   help="the control picture of each --controlnet, in the same order (an edge map, a pose "
                        "drawing ...); or 'canny': OpenCV's Canny edges (100, 200) of the init image, as the "
                        "reference's demos make them; or 'inpaint': the init image with the masked pixels at "
                        "-1, for an inpainting ControlNet (control_v11p_sd15_inpaint)")
    p.add_argument("--controlnet_scale", action="append", type=float, default=[],
                   help="conditioning scale of each --controlnet (default 0.5 each, the reference's)")
    p.add_argument("--control_guidance_start", type=float, default=0.0,
                   help="fraction of the steps before the ControlNets act")
    p.add_argument("--control_guidance_end", type=float, default=1.0,
                   help="fraction of the steps after which they stop")


def parse_args(argv: Optional[Sequence[str]] = None):
    p = cli.ArgumentParser(prog="python -m cid_jax.generate", description=__doc__)
    add_model_flags(p)
    p.add_argument("--image", action="append", required=True,
                   help="reference photo with one face; repeat for several people in one image, each with a "
                        "--region (or all with --layout)")
    p.add_argument("--region", action="append", default=[],
                   help="several people: x0,y0,x1,y1 (pixels of the output) where the person of the --image "
                        "of the same rank goes; regions must not overlap")
    p.add_argument("--layout", help="several people: a picture, black = nobody, one grey level per person "
                                    "(darkest = first --image), instead of --region boxes")
    p.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    p.add_argument("--prompts_file", help="a text file with one prompt per line (added to --prompt)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default 5; SDXL 7.5, as the references)")
    p.add_argument("--merge_step", type=int, default=30, help="steps i <= merge_step use the text-only prompt")
    p.add_argument("--ip_scale", type=float, default=1.0, help="weight of the ID attention branch (ID scale)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--num_images", type=int, default=1, help="images per prompt, seeds seed, seed+1, ...")
    p.add_argument("--seeds", default=None, help="comma-separated seeds per prompt (instead of --seed/--num_images)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="images per compiled call (default: all, up to 4); the last batch is padded")
    p.add_argument("--out", default="consistentid.png",
                   help="PNG path; several images: this is their grid, and each is also <out>_<k>.png")
    p.add_argument("--parsing", help="a 19-class parsing map (PNG) of the photo, used instead of a parser")
    add_edit_flags(p)
    return p.parse_args(argv)

def seeds_of(args) -> list[int]:
    if args.seeds:
        try:
            return [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise cli.InputError(f"--seeds={args.seeds}: must be comma-separated integers") from None
    return [args.seed + k for k in range(args.num_images)]


def png_info(parameters: dict):
    """PNG text chunks: `prompt`, `seed`, and every setting as JSON under `parameters`."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", str(parameters.get("prompt", "")))
    info.add_text("seed", str(parameters.get("seed", "")))
    info.add_text("parameters", json.dumps(parameters))
    return info


def edit_problems(args) -> list[str]:
    """What is wrong with the inpainting / ControlNet flags (`add_edit_flags`), one line each."""
    problems = []
    if not (0.0 < args.strength <= 1.0):
        problems.append(f"--strength={args.strength}: must be in (0, 1]")
    elif args.strength < 1.0 and not args.mask:
        problems.append(f"--strength={args.strength} applies to inpainting: give --mask")
    if len(args.control_image) != len(args.controlnet):
        problems.append(f"{len(args.control_image)} --control_image for {len(args.controlnet)} --controlnet: "
                        "give one control image per ControlNet, in the same order")
    if args.controlnet_scale and len(args.controlnet_scale) != len(args.controlnet):
        problems.append(f"{len(args.controlnet_scale)} --controlnet_scale for {len(args.controlnet)} --controlnet")
    if "inpaint" in args.control_image and not args.mask:
        problems.append("--control_image=inpaint is made from the init image and --mask: give --mask")
    if not 0.0 <= args.control_guidance_start < args.control_guidance_end <= 1.0:
        problems.append(f"--control_guidance_start={args.control_guidance_start} / --control_guidance_end="
                        f"{args.control_guidance_end}: need 0 <= start < end <= 1")
    if args.init_image and not args.mask:
        problems.append("--init_image without --mask: give the mask of what to repaint (white = repaint)")
    return problems


def group_problems(args) -> list[str]:
    """What is wrong with the several-people flags (`args.images`: every --image; --region, --layout)."""
    images = args.images
    if not is_group(args):
        return []
    problems = []
    if args.region and args.layout:
        problems.append("give the people's places as --region boxes or as one --layout picture, not both")
    elif not args.layout and len(args.region) != len(images):
        problems.append(f"{len(images)} --image for {len(args.region)} --region: give one region per photo, "
                        "in the same order (or --layout)")
    for flag in ("mask", "init_image"):
        if getattr(args, flag):
            problems.append(f"--{flag} with several people is not supported yet")
    if args.controlnet:
        problems.append("--controlnet with several people is not supported yet")
    if args.parsing:
        problems.append("--parsing gives one photo's parsing map: with several photos leave it out (each is parsed)")
    return problems


def check_args(args) -> None:
    """Flag values that cannot work, found before anything is loaded."""
    import math

    problems = []
    if args.steps < 1:
        problems.append(f"--steps={args.steps}: must be >= 1 (the reference uses 50)")
    if args.num_images < 1:
        problems.append(f"--num_images={args.num_images}: must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        problems.append(f"--batch_size={args.batch_size}: must be >= 1")
    if not args.prompt and not args.prompts_file:
        problems.append("no prompt: give --prompt (repeatable) or --prompts_file")
    problems += edit_problems(args)
    problems += group_problems(args)
    if args.guidance is not None and not math.isfinite(args.guidance):
        problems.append(f"--guidance={args.guidance}: must be a finite number (the reference uses 5; SDXL 7.5)")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            problems.append(f"--{name}={value}: must be a positive multiple of 8 (the VAE's factor)")
    if problems:
        raise cli.InputError("; ".join(problems))


def analyse_photo(args, variant_name: str, path: Optional[str] = None):
    """(photo, parsing map, ID embedding or None) of `--image` (or `path`), with the analysis the
    flags ask for."""
    from cid_jax import sampling as pl
    from cid_jax.face import FaceAnalyzer

    path = path or args.image
    image = inference.read_image(path)
    size = pl.VARIANT_DEFAULTS[variant_name].parse_size
    analyzer = FaceAnalyzer(None if args.parsing else args.parser_weights, args.insightface_models)
    try:
        labels = inference.read_parsing(args.parsing, size) if args.parsing else analyzer.label_map(image, size=size)
        return image, labels, analyzer.id_embedding(image)
    except cli.UserError as e:
        raise type(e)(f"{path}: {e}") from None


@cli.entry_point("generate")
def main(argv: Optional[Sequence[str]] = None) -> int:
    cli.setup_logging()
    from cid_jax.observe import quiet_library_logs

    quiet_library_logs()
    args = parse_args(argv)
    args.images, args.image = args.image, args.image[0]
    check_args(args)
    prompts = list(args.prompt) + (inference.read_prompts_file(args.prompts_file) if args.prompts_file else [])
    seeds = seeds_of(args)
    if paths.path(args.out).is_dir():
        raise cli.InputError(f"--out={args.out} is a folder; give the PNG file to write")
    paths.check_writable(paths.path(args.out).parent, "--out")  # before the work, not after it
    from cid_jax import runtime

    runtime.cache_from_args(args)
    from cid_jax import sampling as pl

    with runtime.CompileStats() as stats:
        if is_group(args):
            return generate_group(args, prompts, seeds, stats)
        image, label_map, id_embedding = analyse_photo(args, inference.variant(args.checkpoint, args.base))
        log.info("loading %s", args.checkpoint)
        t0 = time.perf_counter()
        loaded = inference.load(args.checkpoint, args.base, args.image_encoder, args.dtype, args.step,
                      fold_lora=not args.no_fold_lora)
        load_s = time.perf_counter() - t0
        defaults = pl.VARIANT_DEFAULTS[loaded.model.variant]
        size = inference.default_size(loaded, args.base)
        height, width = args.height or size, args.width or size
        guidance = args.guidance if args.guidance is not None else defaults.guidance
        face = pl.face_batch(image, label_map, id_embedding)
        inpaint, control_images = edit_arrays(args, image, height, width)
        controls = control_requests(args, loaded, control_images)
        requests = [inference.ImageRequest(face, p, s) for p in prompts for s in seeds]
        batch_size = args.batch_size or min(len(requests), 4)
        log.info("%d image(s) (%d prompt(s) x %d seed(s)), %d per call, %dx%d, %d %s steps", len(requests),
                 len(prompts), len(seeds), batch_size, width, height, args.steps, args.sampler)
        images, timing = inference.generate_requests(
            loaded, requests, negative_prompt=args.negative_prompt, steps=args.steps, guidance=guidance,
            merge_step=args.merge_step, sampler=args.sampler, height=height, width=width, caption=args.caption,
            batch_size=batch_size, progress=True, ip_scale=args.ip_scale, inpaint=inpaint, strength=args.strength,
            controls=controls)
    log.info("loaded in %.1f s; compiled in %.1f s (%s); sampled %d image(s) in %.1f s (%.2f s/image)",
             load_s, timing.compile_s, stats.describe(), len(images), timing.sample_s, timing.s_per_image)
    write_images(args, images, requests, guidance)
    return 0


def is_group(args) -> bool:
    """Several people in one image (more than one --image, or regions given)."""
    return len(args.images) > 1 or bool(args.region or args.layout)


def region_masks(args, height: int, width: int) -> np.ndarray:
    """[P, height, width] masks of the people's places (--region boxes or --layout), checked."""
    from cid_jax import people

    if args.layout:
        masks = people.layout_masks(inference.read_image(args.layout), len(args.images), height, width)
    else:
        masks = people.box_masks([people.parse_box(r, height, width) for r in args.region], height, width)
    people.check_masks(masks, "--layout" if args.layout else "--region")
    return masks


def generate_group(args, prompts: Sequence[str], seeds: Sequence[int], stats) -> int:
    """Several people in each image (`cid_jax.people`): one compiled call per prompt, all seeds."""
    from cid_jax import sampling as pl

    variant_name = inference.variant(args.checkpoint, args.base)
    analysed = [analyse_photo(args, variant_name, path) for path in args.images]
    loaded = inference.load(args.checkpoint, args.base, args.image_encoder, args.dtype, args.step,
                            fold_lora=not args.no_fold_lora)
    size = inference.default_size(loaded, args.base)
    height, width = args.height or size, args.width or size
    guidance = args.guidance if args.guidance is not None else pl.VARIANT_DEFAULTS[loaded.model.variant].guidance
    masks = region_masks(args, height, width)
    faces = [pl.face_batch(*a) for a in analysed]
    log.info("%d people, %d image(s) (%d prompt(s) x %d seed(s)), %dx%d, %d %s steps", len(faces),
             len(prompts) * len(seeds), len(prompts), len(seeds), width, height, args.steps, args.sampler)
    out, compile_s, sample_s = [], 0.0, 0.0
    for prompt in prompts:
        images, timing = inference.generate_group(
            loaded, faces, masks, prompt, args.negative_prompt, seeds, steps=args.steps, guidance=guidance,
            merge_step=args.merge_step, sampler=args.sampler, height=height, width=width, caption=args.caption,
            ip_scale=args.ip_scale)
        out.append(images)
        compile_s, sample_s = compile_s + timing.compile_s, sample_s + timing.sample_s
    images = np.concatenate(out)
    log.info("compiled in %.1f s (%s); sampled %d image(s) in %.1f s", compile_s, stats.describe(), len(images),
             sample_s)
    write_images(args, images, [inference.ImageRequest(faces[0], p, s) for p in prompts for s in seeds], guidance)
    return 0


def edit_arrays(args, image: np.ndarray, height: int, width: int) -> tuple:
    """The host arrays the edit flags ask for (`edit_inputs` on the pictures the flags name)."""
    init = inference.read_image(args.init_image) if args.init_image else image
    mask = None
    if args.mask:
        mask = inference.read_image(args.mask)
    sources = [p if p in ("canny", "inpaint") else inference.read_image(p) for p in args.control_image]
    return edit_inputs(init, mask, sources, height, width, mask_name=f"--mask={args.mask}")


def edit_inputs(init: np.ndarray, mask: Optional[np.ndarray], control_sources: Sequence, height: int,
                width: int, mask_name: str = "the mask") -> tuple:
    """(init image, mask) at the output size (None without a mask) and each control image as the
    ControlNets read it; a control source is a picture, 'canny' (OpenCV's edges of the init image)
    or 'inpaint' (the init image with the masked pixels at -1)."""
    from cid_jax import sampling as pl

    inpaint = None
    if mask is not None:
        try:
            inpaint = pl.inpainting_arrays(init, mask, height, width)
        except cli.UserError as e:
            raise type(e)(f"{mask_name}: {e}") from None
    control_images = []
    for source in control_sources:
        if isinstance(source, str) and source == "inpaint":
            if inpaint is None:
                raise cli.InputError("an 'inpaint' control image is made from the init image and a mask: give a mask")
            control_images.append(pl.inpaint_control(*inpaint))
        elif isinstance(source, str) and source == "canny":
            control_images.append(pl.control_arrays(pl.canny_control(init), height, width))
        else:
            control_images.append(pl.control_arrays(np.asarray(source), height, width))
    return inpaint, control_images


def control_requests(args, loaded, control_images: Sequence[np.ndarray]) -> list:
    """The ControlNets the flags ask for, loaded and checked, with their control images."""
    scales = args.controlnet_scale or [0.5] * len(args.controlnet)
    return [inference.ControlRequest(module, params, image, scale, args.control_guidance_start,
                                     args.control_guidance_end)
            for (module, params), image, scale in zip(inference.load_controlnets(args.controlnet, loaded),
                                                      control_images, scales)]


def write_images(args, images: np.ndarray, requests: Sequence[inference.ImageRequest], guidance: float) -> None:
    """One PNG per image with its prompt and seed in the metadata; several also get a grid at --out."""
    from PIL import Image

    out = paths.path(args.out)
    common = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance=guidance,
                  merge_step=args.merge_step, ip_scale=args.ip_scale, sampler=args.sampler,
                  checkpoint=str(args.checkpoint), image=str(args.image))
    if args.mask:
        common.update(mask=str(args.mask), init_image=str(args.init_image or args.image), strength=args.strength)
    if is_group(args):
        common.update(images=[str(i) for i in args.images], regions=list(args.region), layout=args.layout)
    if args.controlnet:
        common.update(controlnet=list(args.controlnet), control_image=list(args.control_image),
                      controlnet_scale=args.controlnet_scale or [0.5] * len(args.controlnet),
                      control_guidance=[args.control_guidance_start, args.control_guidance_end])
    def save(image: np.ndarray, where, info: dict) -> None:  # local or remote (gs://...), whole or not at all
        paths.write_atomic(where, lambda tmp: Image.fromarray(image).save(tmp, format="PNG", pnginfo=png_info(info)))

    if len(images) == 1:
        save(images[0], out, dict(prompt=requests[0].prompt, seed=requests[0].seed, **common))
        log.info("wrote %s", out)
        return
    for k, (im, r) in enumerate(zip(images, requests)):
        save(im, out.parent / f"{out.stem}_{k}{out.suffix or '.png'}", dict(prompt=r.prompt, seed=r.seed, **common))
    save(inference.grid(images), out, dict(prompt=[r.prompt for r in requests], seed=[r.seed for r in requests], **common))
    log.info("wrote %s (grid) and %s_0..%d%s", out, out.with_suffix(""), len(images) - 1, out.suffix or ".png")


if __name__ == "__main__":
    sys.exit(main())
