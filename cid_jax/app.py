"""A web demo (Gradio) of ConsistentID: upload a face photo, write a prompt, get portraits.

    python -m cid_jax.app --checkpoint=RUN_OR_FILE [--base=SD15 --image_encoder=CLIP_H
        --parser_weights=face_parsing.pth --insightface_models=buffalo_l] [--host=127.0.0.1 --port=7860]

The model flags are generate's. The model is loaded and the sampler compiled once, at start-up
(the log shows each stage and its time); requests queue and run one at a time. Beside the images
the page shows what the pipeline saw: the face box, the five facial region masks over the photo,
and the facial prompt it composed. A photo without a face shows the error in the page.

Two folded panels edit a picture as the reference's inpainting / ControlNet demos do: "Repaint a
picture" takes a picture and a painted mask (white strokes = repaint; the face photo still gives the
identity) and a strength; "ControlNets" lists each `--controlnet=DIR` given at start with its control
(off, canny edges of the picture, the inpainting ControlNet's masked picture, or an uploaded
picture) and its scale. "Two people" takes a second face photo and, on a canvas the size of the
output, a red stroke area for the first person and a blue one for the second (nothing drawn: left and
right halves); each person's identity then acts only in their area (`cid_jax.people`). Each new
combination compiles once, as a new shape does.

Serves on the local machine only (no public share link). The first request with a new step count
or image count compiles that shape once (then the persistent cache keeps it for later runs).
Programmatic use: `gradio_client.Client(url).predict(photo, prompt, ..., api_name="/generate")`; the
inputs after the image count are optional and named: edit (picture + mask layers), strength,
second_photo, areas, and control_mode_k / control_picture_k / control_scale_k per ControlNet.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional, Sequence

import numpy as np

from cid_jax import cli

log = logging.getLogger("cid_jax.app")

MAX_IMAGES = 4
# One colour per facial region slot (cid_jax.data.masks.PART_SLOTS order: face, eye, ear, nose, lips).
REGION_COLOURS = ((255, 200, 0), (0, 160, 255), (180, 0, 255), (0, 220, 120), (255, 40, 80))


def parse_args(argv: Optional[Sequence[str]] = None):
    from cid_jax import generate as gen

    p = cli.ArgumentParser(prog="python -m cid_jax.app", description=__doc__)
    gen.add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--steps", type=int, default=30, help="the steps slider's start value")
    p.add_argument("--controlnet", action="append", default=[],
                   help="a diffusers ControlNet folder the page offers (repeat for several)")
    return p.parse_args(argv)


# How a ControlNet's control image is made (the page's choice per ControlNet).
CONTROL_MODES = ("off", "canny", "inpaint", "picture")


PERSON_COLOURS = ("#ff0000", "#0000ff")  # the canvas brush: first person red, second blue


def drawn_regions(value, height: int, width: int) -> Optional[np.ndarray]:
    """The "Two people" canvas -> [2, height, width] masks: red strokes the first person, blue the
    second; None when nothing is drawn. Strokes are read from the layers (where painted) by their
    dominant channel, scaled to the output size."""
    from PIL import Image

    if not value:
        return None
    layers = [np.asarray(layer) for layer in (value.get("layers") or []) if layer is not None]
    if not layers:
        return None
    masks = np.zeros((2, height, width), np.float32)
    for layer in layers:
        if layer.ndim != 3 or layer.shape[-1] != 4:
            continue
        painted = layer[..., 3] > 0
        red = painted & (layer[..., 0].astype(int) > layer[..., 2].astype(int))
        blue = painted & (layer[..., 2].astype(int) > layer[..., 0].astype(int))
        for k, strokes in enumerate((red, blue)):
            scaled = np.asarray(Image.fromarray(strokes).resize((width, height), Image.NEAREST))
            masks[k] = np.maximum(masks[k], scaled)
    return masks if masks.any() else None


def picture_and_mask(value) -> Optional[tuple]:
    """An ImageMask value -> (picture uint8 [H, W, 3], mask bool [H, W]: where strokes were painted),
    or None when no picture was given."""
    from PIL import Image

    if not value or value.get("background") is None:
        return None
    picture = np.asarray(value["background"])
    picture = (np.repeat(picture[..., None], 3, -1) if picture.ndim == 2 else picture[..., :3]).astype(np.uint8)
    painted = np.zeros(picture.shape[:2], bool)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = np.asarray(layer)
        strokes = layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[-1] == 4 else np.asarray(layer).max(-1) > 0
        if strokes.shape != painted.shape:  # a canvas of another size: its strokes scaled onto the picture
            strokes = np.asarray(Image.fromarray(strokes).resize(painted.shape[::-1], Image.NEAREST))
        painted |= strokes
    return picture, painted


def overlay(image: np.ndarray, label_map: np.ndarray, box) -> np.ndarray:
    """The photo with the face box and the five region masks drawn over it."""
    from PIL import Image, ImageDraw

    from cid_jax.data import masks as masks_lib

    h, w = image.shape[:2]
    labels = np.asarray(Image.fromarray(np.asarray(label_map, np.uint8)).resize((w, h), Image.NEAREST))
    masks, present = masks_lib.region_masks(labels)
    out = image.astype(np.float32)
    for mask, on, colour in zip(masks, present, REGION_COLOURS):
        if on:
            out[mask] = 0.45 * out[mask] + 0.55 * np.asarray(colour, np.float32)
    pic = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    if box is not None:
        draw.rectangle([box.x0, box.y0, box.x1, box.y1], outline=(255, 0, 0), width=max(2, w // 200))
    y = 4
    for (name, _), on, colour in zip(masks_lib.PART_SLOTS, present, REGION_COLOURS):
        draw.text((6, y), name + ("" if on else " (not found)"), fill=colour)
        y += 12
    return np.asarray(pic)


class Demo:
    """The loaded model and the request handler (one per server process)."""

    def __init__(self, args):
        from cid_jax import inference
        from cid_jax import sampling as pl
        from cid_jax.face import FaceAnalyzer

        self.args = args
        t0 = time.perf_counter()
        log.info("loading %s", args.checkpoint)
        self.loaded = inference.load(args.checkpoint, args.base, args.image_encoder, args.dtype, args.step,
                               fold_lora=not args.no_fold_lora)
        self.analyzer = FaceAnalyzer(args.parser_weights, args.insightface_models)
        self.variant = self.loaded.model.variant
        self.size = inference.default_size(self.loaded, args.base)
        self.height, self.width = args.height or self.size, args.width or self.size
        self.guidance = pl.VARIANT_DEFAULTS[self.variant].guidance
        self.programs: dict = {}
        self.generator = pl.Generator(self.loaded.model)
        self.controlnets = inference.load_controlnets(args.controlnet, self.loaded)
        self.controlnet_names = [str(folder).rstrip("/").rsplit("/", 1)[-1] for folder in args.controlnet]
        log.info("loaded in %.1f s", time.perf_counter() - t0)

    def warm_up(self, steps: int) -> None:
        """Compiles the one-image program at the default settings, on a synthetic face."""
        from cid_jax.data import synthetic

        t0 = time.perf_counter()
        log.info("compiling the sampler (1 image, %d steps, %dx%d)...", steps, self.width, self.height)
        face = synthetic.render_sample(0, 0, size=256)
        self.run(face.image, "a portrait", "", steps, self.guidance, min(steps - 1, 10), 1.0, 0, 1,
                 label_map=face.parsing)
        log.info("ready: compiled in %.1f s", time.perf_counter() - t0)

    def analyse(self, image: np.ndarray, label_map=None):
        from cid_jax import sampling as pl
        from cid_jax.face.detect import detect_largest_face

        size = pl.VARIANT_DEFAULTS[self.variant].parse_size
        if label_map is None:
            label_map = self.analyzer.label_map(image, size=size)  # no face: NoFaceFoundError
            box = detect_largest_face(image)
        else:
            box = None
        return label_map, self.analyzer.id_embedding(image), box

    def run(self, image, prompt: str, negative_prompt: str, steps: int, guidance: float, merge_step: int,
            ip_scale: float, seed: int, num_images: int, label_map=None, edit: Optional[tuple] = None,
            strength: float = 1.0, controls: Sequence[tuple] = (), second=None, regions=None):
        """(images, overlay, facial prompt, timing line). `edit`: (picture, mask) to repaint;
        `controls`: (mode, picture, scale) per loaded ControlNet; `second`: a second person's photo,
        `regions` [2, H, W] their places (None: left and right halves)."""
        from cid_jax import generate as gen
        from cid_jax import inference
        from cid_jax import sampling as pl

        image = np.asarray(image)[..., :3].astype(np.uint8)
        if second is not None:
            return self.run_two(image, np.asarray(second)[..., :3].astype(np.uint8), regions, prompt,
                                negative_prompt, steps, guidance, merge_step, ip_scale, seed, num_images)
        init, mask = edit if edit is not None else (image, None)
        active = [(net, mode, picture, float(scale)) for net, (mode, picture, scale) in zip(self.controlnets, controls)
                  if mode != "off"]
        sources = [np.asarray(picture)[..., :3].astype(np.uint8) if mode == "picture" else mode
                   for _, mode, picture, _ in active]
        inpaint, control_images = gen.edit_inputs(init, mask, sources, self.height, self.width,
                                                  mask_name="the painted mask")
        control_requests = [inference.ControlRequest(module, params, control, scale)
                            for ((module, params), _, _, scale), control in zip(active, control_images)]
        label_map, embedding, box = self.analyse(image, label_map)
        face = pl.face_batch(image, label_map, embedding)
        num_images = int(max(1, min(MAX_IMAGES, num_images)))
        requests = [inference.ImageRequest(face, prompt, int(seed) + k) for k in range(num_images)]
        t0 = time.perf_counter()
        images, timing = inference.generate_requests(
            self.loaded, requests, negative_prompt=negative_prompt, steps=int(steps), guidance=float(guidance),
            merge_step=int(merge_step), sampler=self.args.sampler, height=self.height, width=self.width,
            caption=self.args.caption, batch_size=num_images, programs=self.programs, generator=self.generator,
            ip_scale=float(ip_scale), inpaint=inpaint, strength=float(strength), controls=control_requests)
        text = pl.text_batch(prompt, negative_prompt, self.loaded.tokenizer, face.part_names, self.args.caption,
                             self.loaded.metadata.get("pairing", "reference"), self.variant, self.loaded.tokenizer_2)
        took = (f"{len(images)} image(s) in {time.perf_counter() - t0:.1f} s ({timing.s_per_image:.2f} s/image"
                + (f"; compiled this shape in {timing.compile_s:.1f} s" if timing.compile_s else "") + ")")
        return list(images), overlay(image, label_map, box), text.prompt_face, took

    def run_two(self, image, second, regions, prompt, negative_prompt, steps, guidance, merge_step, ip_scale, seed,
                num_images):
        """Two people in each image: (images, the regions over the output, facial prompt, timing)."""
        from cid_jax import inference, people
        from cid_jax import sampling as pl

        faces = []
        for k, photo in enumerate((image, second)):
            try:
                label_map, embedding, _ = self.analyse(photo)
            except cli.UserError as e:
                raise type(e)(f"photo {k + 1}: {e}") from None
            faces.append(pl.face_batch(photo, label_map, embedding))
        if regions is None:
            regions = people.box_masks(people.side_by_side(2, self.height, self.width), self.height, self.width)
        people.check_masks(regions, "the drawn areas")
        seeds = [int(seed) + k for k in range(int(max(1, min(MAX_IMAGES, num_images))))]
        t0 = time.perf_counter()
        images, timing = inference.generate_group(
            self.loaded, faces, regions, prompt, negative_prompt, seeds, steps=int(steps), guidance=float(guidance),
            merge_step=int(merge_step), sampler=self.args.sampler, height=self.height, width=self.width,
            caption=self.args.caption, ip_scale=float(ip_scale), generator=self.generator, programs=self.programs)
        texts = people.group_texts(prompt, negative_prompt, self.loaded.tokenizer, [f.part_names for f in faces],
                                   self.args.caption, self.loaded.metadata.get("pairing", "reference"))
        shown = np.full((self.height, self.width, 3), 255, np.uint8)
        for mask, colour in zip(regions, ((255, 0, 0), (0, 0, 255))):
            shown[mask > 0] = colour
        took = (f"{len(images)} image(s) of two people in {time.perf_counter() - t0:.1f} s"
                + (f" (compiled in {timing.compile_s:.1f} s)" if timing.compile_s else ""))
        return list(images), shown, texts[0].prompt_face, took

    def handle(self, image, prompt, negative_prompt, steps, guidance, merge_step, ip_scale, seed, num_images,
               edit=None, strength=1.0, second=None, layout=None, *controls):
        """The page's handler: user errors (no face, no photo) become messages in the page.
        `controls`: mode, picture, scale for each ControlNet, flat, as the page lists them."""
        import gradio as gr

        if image is None:
            raise gr.Error("Upload a photo with a face first.")
        if not str(prompt or "").strip():
            raise gr.Error("Write a prompt.")
        controls = [tuple(controls[k:k + 3]) for k in range(0, len(controls), 3)]
        controls += [("off", None, 0.5)] * (len(self.controlnets) - len(controls))
        problems = request_problems(steps=steps, guidance=guidance, merge_step=merge_step, ip_scale=ip_scale,
                                    seed=seed, num_images=num_images, strength=strength)
        problems += edit_problems(self.controlnet_names, edit, controls)
        regions = drawn_regions(layout, self.height, self.width)
        if second is None and regions is not None:
            problems.append("areas are drawn for two people: add the second person's photo")
        if second is not None and (picture_and_mask(edit) is not None or any(c[0] != "off" for c in controls)):
            problems.append("two people with repainting or ControlNets is not supported yet")
        if problems:
            raise gr.Error("; ".join(problems))
        try:
            return self.run(image, prompt, negative_prompt or "", steps, guidance, merge_step, ip_scale, seed,
                            num_images, edit=picture_and_mask(edit), strength=strength, controls=controls,
                            second=second, regions=regions)
        except cli.UserError as e:
            raise gr.Error(str(e)) from None


def edit_problems(names: Sequence[str], edit, controls: Sequence[tuple]) -> list[str]:
    """What is wrong with a request's inpainting / ControlNet inputs, one phrase each."""
    problems = []
    repaint = picture_and_mask(edit)
    if repaint is not None and not repaint[1].any():
        problems.append("the picture to repaint has nothing painted over it: paint what should change, or remove it")
    for name, (mode, picture, scale) in zip(names, controls):
        if mode not in CONTROL_MODES:
            problems.append(f"ControlNet {name}: control {mode!r} is not one of {', '.join(CONTROL_MODES)}")
        elif mode == "inpaint" and repaint is None:
            problems.append(f"ControlNet {name}: 'inpaint' needs a picture to repaint with a painted mask")
        elif mode == "picture" and picture is None:
            problems.append(f"ControlNet {name}: upload its control picture (or pick another control)")
        problems += [f"ControlNet {name}: {p}" for p in request_problems(controlnet_scale=scale)]
    if len(controls) > len(names):
        problems.append(f"{len(controls)} ControlNet inputs but the app serves {len(names)} ControlNet(s)")
    return problems


# What each numeric input of the page (and of its HTTP API, where any JSON value can arrive) may be:
# (low, high, whole number). The seed's range is numpy's and JAX's PRNG seed range.
REQUEST_RANGES = {
    "steps": (1, 1000, True), "guidance": (0.0, 50.0, False), "merge_step": (0, 1000, True),
    "ip_scale": (0.0, 10.0, False), "seed": (0, 2**32 - 1, True), "num_images": (1, MAX_IMAGES, True),
    "strength": (0.01, 1.0, False), "controlnet_scale": (0.0, 10.0, False),
}


def request_problems(**values) -> list[str]:
    """What is wrong with a request's numbers, one phrase each (NaN, inf, a 30-digit seed, 2.5 steps
    are refused here, as the CLI refuses them, instead of becoming a black image or a raw error)."""
    import math

    problems = []
    for name, value in values.items():
        low, high, whole = REQUEST_RANGES[name]
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            problems.append(f"{name}={value!r} is not a number")
            continue
        if not math.isfinite(number) or not low <= number <= high:
            problems.append(f"{name}={value!r} must be between {low} and {high}")
        elif whole and number != int(number):
            problems.append(f"{name}={value!r} must be a whole number")
    return problems


def check_port_free(host: str, port: int) -> None:
    """Fails at once, not after the model has loaded, when another program serves on the port."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise cli.InputError(f"--port={port} on {host} cannot be used ({e.strerror}); pick a free --port") from None


def api_handler(demo: Demo):
    """`demo.handle` with one named parameter per page input: gradio names the HTTP API's parameters
    after them, and lets a client leave out those with a default (the edit and ControlNet inputs)."""
    import inspect

    def handle(*values):
        return demo.handle(*values)

    def param(name, *default):
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 **({"default": default[0]} if default else {}))

    names = ("image", "prompt", "negative_prompt", "steps", "guidance", "merge_step", "ip_scale", "seed", "num_images")
    params = [param(n) for n in names] + [param("edit", None), param("strength", 1.0), param("second_photo", None),
                                          param("areas", None)]
    for k in range(len(demo.controlnets)):
        params += [param(f"control_mode_{k}", "off"), param(f"control_picture_{k}", None),
                   param(f"control_scale_{k}", 0.5)]
    handle.__signature__ = inspect.Signature(params)
    return handle


def build_ui(demo: Demo, steps: int):
    import gradio as gr

    with gr.Blocks(title="ConsistentID (cid_jax)") as ui:
        gr.Markdown("## ConsistentID in JAX\nUpload a photo with one face, describe the portrait, generate.")
        with gr.Row():
            with gr.Column():
                photo = gr.Image(label="face photo", type="numpy", elem_id="photo")
                prompt = gr.Textbox(label="prompt", value="a portrait of a person in the snow", elem_id="prompt")
                negative = gr.Textbox(label="negative prompt", value=demo.args.negative_prompt)
                with gr.Row():
                    steps_in = gr.Slider(1, 100, value=steps, step=1, label="steps")
                    merge = gr.Slider(0, 100, value=min(steps - 1, int(0.6 * steps)), step=1, label="merge step")
                with gr.Row():
                    guidance = gr.Slider(0.0, 15.0, value=demo.guidance, step=0.5, label="guidance")
                    ip_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="ID scale")
                with gr.Row():
                    seed = gr.Number(value=2024, precision=0, label="seed")
                    count = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="images")
                with gr.Accordion("Repaint a picture (inpainting)", open=False):
                    edit = gr.ImageMask(label="picture to repaint: paint over what should change", type="numpy",
                                        elem_id="repaint", brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
                    strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="strength (1: from pure noise)")
                with gr.Accordion("Two people", open=False):
                    second = gr.Image(label="the second person's photo", type="numpy", elem_id="photo_2")
                    blank = np.full((demo.height, demo.width, 3), 255, np.uint8)
                    areas = gr.ImageEditor(value={"background": blank, "layers": [], "composite": blank},
                                           label="their places: red = first photo, blue = second (empty: halves)",
                                           type="numpy", elem_id="areas",
                                           brush=gr.Brush(colors=list(PERSON_COLOURS), color_mode="fixed"))
                controls = []
                if demo.controlnet_names:
                    with gr.Accordion("ControlNets", open=False):
                        for k, name in enumerate(demo.controlnet_names):
                            with gr.Row():
                                controls.append(gr.Dropdown(list(CONTROL_MODES), value="off", label=f"{name}: control",
                                                            elem_id=f"control_mode_{k}"))
                                controls.append(gr.Image(label=f"{name}: control picture ('picture')", type="numpy",
                                                         elem_id=f"control_picture_{k}"))
                                controls.append(gr.Slider(0.0, 2.0, value=0.5, step=0.05, label=f"{name}: scale"))
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="images", elem_id="gallery", columns=2)
                seen = gr.Image(label="what the pipeline saw: face box and regions", elem_id="seen")
                facial = gr.Textbox(label="facial prompt", elem_id="facial_prompt")
                took = gr.Markdown(elem_id="timing")
        button.click(api_handler(demo), [photo, prompt, negative, steps_in, guidance, merge, ip_scale, seed, count, edit,
                                   strength, second, areas] + controls, [gallery, seen, facial, took], api_name="generate")
    ui.queue(default_concurrency_limit=1)
    return ui


@cli.entry_point("app")
def main(argv: Optional[Sequence[str]] = None) -> int:
    cli.setup_logging()
    from cid_jax.observe import quiet_library_logs

    quiet_library_logs()
    args = parse_args(argv)
    check_port_free(args.host, args.port)
    from cid_jax import runtime

    runtime.cache_from_args(args)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise cli.MissingError("the web demo needs gradio: pip install -c requirements/constraints.txt -e '.[app]'")
    demo = Demo(args)
    demo.warm_up(args.steps)
    ui = build_ui(demo, args.steps)
    log.info("serving on http://%s:%d (Ctrl-C stops)", args.host, args.port)
    ui.launch(server_name=args.host, server_port=args.port, share=False, show_error=True, quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
