"""A web demo (Gradio) of ConsistentID: upload a face photo, write a prompt, get portraits.

    python -m cid_jax.app --checkpoint=RUN_OR_FILE [--base=SD15 --image_encoder=CLIP_H
        --parser_weights=face_parsing.pth --insightface_models=buffalo_l] [--host=127.0.0.1 --port=7860]

The model flags are generate's. The model is loaded and the sampler compiled once, at start-up
(the log shows each stage and its time); requests queue and run one at a time. Beside the images
the page shows what the pipeline saw: the face box, the five facial region masks over the photo,
and the facial prompt it composed. A photo without a face shows the error in the page.

Serves on the local machine only (no public share link). The first request with a new step count
or image count compiles that shape once (then the persistent cache keeps it for later runs).
Programmatic use: `gradio_client.Client(url).predict(photo, prompt, ..., api_name="/generate")`.
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
    return p.parse_args(argv)


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
            ip_scale: float, seed: int, num_images: int, label_map=None):
        """(images, overlay, facial prompt, timing line)."""
        from cid_jax import inference
        from cid_jax import sampling as pl

        image = np.asarray(image)[..., :3].astype(np.uint8)
        label_map, embedding, box = self.analyse(image, label_map)
        face = pl.face_batch(image, label_map, embedding)
        num_images = int(max(1, min(MAX_IMAGES, num_images)))
        requests = [inference.ImageRequest(face, prompt, int(seed) + k) for k in range(num_images)]
        t0 = time.perf_counter()
        images, timing = inference.generate_requests(
            self.loaded, requests, negative_prompt=negative_prompt, steps=int(steps), guidance=float(guidance),
            merge_step=int(merge_step), sampler=self.args.sampler, height=self.height, width=self.width,
            caption=self.args.caption, batch_size=num_images, programs=self.programs, generator=self.generator,
            ip_scale=float(ip_scale))
        text = pl.text_batch(prompt, negative_prompt, self.loaded.tokenizer, face.part_names, self.args.caption,
                             self.loaded.metadata.get("pairing", "reference"), self.variant, self.loaded.tokenizer_2)
        took = (f"{len(images)} image(s) in {time.perf_counter() - t0:.1f} s ({timing.s_per_image:.2f} s/image"
                + (f"; compiled this shape in {timing.compile_s:.1f} s" if timing.compile_s else "") + ")")
        return list(images), overlay(image, label_map, box), text.prompt_face, took

    def handle(self, image, prompt, negative_prompt, steps, guidance, merge_step, ip_scale, seed, num_images):
        """The page's handler: user errors (no face, no photo) become messages in the page."""
        import gradio as gr

        if image is None:
            raise gr.Error("Upload a photo with a face first.")
        if not str(prompt or "").strip():
            raise gr.Error("Write a prompt.")
        problems = request_problems(steps=steps, guidance=guidance, merge_step=merge_step, ip_scale=ip_scale,
                                    seed=seed, num_images=num_images)
        if problems:
            raise gr.Error("; ".join(problems))
        try:
            return self.run(image, prompt, negative_prompt or "", steps, guidance, merge_step, ip_scale, seed,
                            num_images)
        except cli.UserError as e:
            raise gr.Error(str(e)) from None


# What each numeric input of the page (and of its HTTP API, where any JSON value can arrive) may be:
# (low, high, whole number). The seed's range is numpy's and JAX's PRNG seed range.
REQUEST_RANGES = {
    "steps": (1, 1000, True), "guidance": (0.0, 50.0, False), "merge_step": (0, 1000, True),
    "ip_scale": (0.0, 10.0, False), "seed": (0, 2**32 - 1, True), "num_images": (1, MAX_IMAGES, True),
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
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="images", elem_id="gallery", columns=2)
                seen = gr.Image(label="what the pipeline saw: face box and regions", elem_id="seen")
                facial = gr.Textbox(label="facial prompt", elem_id="facial_prompt")
                took = gr.Markdown(elem_id="timing")
        button.click(demo.handle, [photo, prompt, negative, steps_in, guidance, merge, ip_scale, seed, count],
                     [gallery, seen, facial, took], api_name="generate")
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
