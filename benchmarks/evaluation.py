"""Evaluation cost: images scored per second per metric (ours vs the PyTorch networks, same run),
and what evaluation during training costs next to the training steps.

    python benchmarks/evaluation.py --out=benchmarks/results/evaluation.md [--images=16 --runs=3]

1. Throughput, CPU, full-size metric networks with random weights in their standard formats (no
   metric weights are downloadable here; speed does not depend on the values): CLIP ViT-L/14
   (openai/clip-vit-large-patch14's config; CLIP-I images, CLIP-T prompts), DINO ViT-S/16
   (facebook/dino-vits16's), pytorch-fid's Inception-v3 (FID/KID features), and FGIS (parse the
   face, crop five regions, DINO on each; ours only: no other implementation exists). Ours is
   `cid_jax.metrics` (jitted Flax, batch 8); PyTorch is transformers' CLIPModel / ViTModel and
   the pytorch-fid network (tests/torch_reference/fid_inception.py), eval mode, no_grad, batch 8,
   on the same preprocessed inputs (the preprocessing is the same numpy code for both and is
   timed on both). One warm-up pass each (ours compiles), then `--runs` timed passes alternating
   ours / PyTorch; medians. FaceSim (insightface ArcFace on onnxruntime, the same on either side)
   needs buffalo_l's weights and is not measured.
2. The demo: `configs/demo.py` trained for 200 steps with evaluation every 100 (subprocess);
   from its metrics.jsonl, the evaluation's seconds (first one includes compiling the sampler)
   against the median step time.
3. SD1.5 (AOT-estimated, no accelerator needed): FLOPs of the evaluation program at the sd15
   config's `eval` settings (XLA's cost analysis of the lowered sampler: the loop body once, so
   encoders + decode and one denoising step are lowered apart and the step is multiplied by the
   step count) against the training step's FLOPs per chip from the AOT report
   (benchmarks/results/aot_sd15_v5e-16.txt). At equal MFU the FLOP ratio is the time ratio. The
   evaluation batch is not sharded over the data axis: every chip generates all images.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLIP_L14 = dict(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 max_position_embeddings=77, vocab_size=49408, eos_token_id=49407),
                vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, image_size=224, patch_size=14), projection_dim=768)
DINO_VITS16 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                   image_size=224, patch_size=16, qkv_bias=True, layer_norm_eps=1e-12)


def write_models(root: pathlib.Path) -> dict:
    """Full-size random metric networks in their standard on-disk formats (written once)."""
    import torch
    import transformers

    from tests.torch_reference.fid_inception import FIDInceptionV3Ref, randomize_

    root.mkdir(parents=True, exist_ok=True)
    paths = {"clip_model": root / "clip-vit-large-patch14", "dino_model": root / "dino-vits16",
             "inception": root / "pt_inception.pth"}
    torch.manual_seed(0)
    if not (paths["clip_model"] / "config.json").exists():
        transformers.CLIPModel(transformers.CLIPConfig(**CLIP_L14)).save_pretrained(paths["clip_model"])
    if not (paths["dino_model"] / "config.json").exists():
        transformers.ViTModel(transformers.ViTConfig(**DINO_VITS16), add_pooling_layer=False).save_pretrained(
            paths["dino_model"])
    if not paths["inception"].exists():
        torch.save(randomize_(FIDInceptionV3Ref(), 3).state_dict(), paths["inception"])
    return {k: str(v) for k, v in paths.items()}


def photos(n: int):
    import numpy as np
    import skimage.data
    from PIL import Image

    base = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    return [np.asarray(Image.fromarray(base[i % len(base)]).resize((512, 512), Image.BICUBIC))[:, ::(1 if i < 4 else -1)]
            .copy() for i in range(n)]


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def throughput(paths: dict, n: int, runs: int) -> list[dict]:
    import numpy as np
    import torch
    import transformers

    from cid_jax import metrics
    from cid_jax.text import CLIPTokenizer
    from tests.torch_reference.fid_inception import FIDInceptionV3Ref

    torch.set_num_threads(os.cpu_count() or 1)
    images = photos(n)
    prompts = [f"a person number {i} in the snow" for i in range(n)]
    ours = metrics.load_metric_models(batch_size=8, **paths)
    tok = CLIPTokenizer.default()
    clip_t = transformers.CLIPModel.from_pretrained(paths["clip_model"]).eval()
    dino_t = transformers.ViTModel.from_pretrained(paths["dino_model"], add_pooling_layer=False).eval()
    inc_t = FIDInceptionV3Ref()
    inc_t.load_state_dict(torch.load(paths["inception"], weights_only=True))
    inc_t.eval()

    def batches(x):
        return [x[i:i + 8] for i in range(0, len(x), 8)]

    @torch.no_grad()
    def torch_clip_images():
        x = np.stack([ours.clip_image.preprocess(im) for im in images]).transpose(0, 3, 1, 2)
        return [clip_t.get_image_features(pixel_values=torch.from_numpy(np.ascontiguousarray(b))) for b in batches(x)]

    @torch.no_grad()
    def torch_clip_texts():
        ids = np.asarray(tok(prompts, max_length=77, padding="max_length", truncation=True), np.int64)
        return [clip_t.get_text_features(input_ids=torch.from_numpy(b)) for b in batches(ids)]

    @torch.no_grad()
    def torch_dino():
        x = np.stack([ours.dino.preprocess(im) for im in images]).transpose(0, 3, 1, 2)
        return [dino_t(pixel_values=torch.from_numpy(np.ascontiguousarray(b))).last_hidden_state[:, 0]
                for b in batches(x)]

    @torch.no_grad()
    def torch_inception():
        x = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        return [inc_t(torch.from_numpy(np.ascontiguousarray(b))) for b in batches(x)]

    cases = [
        ("CLIP-I (CLIP ViT-L/14 image)", lambda: ours.clip_image.embed(np.stack([ours.clip_image.preprocess(im)
                                                                                 for im in images])),
         torch_clip_images),
        ("CLIP-T (CLIP ViT-L/14 text)", lambda: ours.clip_text(prompts), torch_clip_texts),
        ("DINO (ViT-S/16)", lambda: ours.dino.embed(np.stack([ours.dino.preprocess(im) for im in images])), torch_dino),
        ("FID/KID features (Inception-v3)", lambda: ours.inception(images), torch_inception),
        ("FGIS (parse + 5 regions x DINO)", lambda: [metrics.region_embeddings(ours, im) for im in images], None),
    ]
    rows = []
    for name, mine, theirs in cases:
        mine()  # compiles
        if theirs:
            theirs()
        t_ours, t_torch = [], []
        for _ in range(runs):
            t_ours += timed(mine, 1)
            if theirs:
                t_torch += timed(theirs, 1)
        row = {"metric": name, "ours_img_s": n / statistics.median(t_ours)}
        if theirs:
            row["torch_img_s"] = n / statistics.median(t_torch)
        rows.append(row)
        print(row, flush=True)
    return rows


def demo_cost(steps: int = 200, every: int = 100) -> dict:
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-m", "cid_jax.train", "--config=configs/demo.py", f"--workdir={work}",
               f"--config.train.num_steps={steps}", f"--config.eval.every_steps={every}",
               "--config.train.export_at_end=False", "--config.checkpoint.every_steps=1000"]
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines = [json.loads(x) for x in (pathlib.Path(work) / "metrics.jsonl").read_text().splitlines()]
    step_times = [x["step_time_s"] for x in lines if "step_time_s" in x and x["step"] > 1]
    evals = [x["eval/seconds"] for x in lines if "eval/seconds" in x]
    step = statistics.median(step_times)
    return {"every": every, "step_s": step, "first_eval_s": evals[0], "eval_s": statistics.median(evals[1:]),
            "fraction": statistics.median(evals[1:]) / (every * step)}


def sd15_estimate() -> dict:
    import jax
    import jax.numpy as jnp
    import skimage.data

    from cid_jax import build, sampling as pl
    from cid_jax.face.detect import template_parse
    spec = importlib.util.spec_from_file_location("sd15_config", REPO / "configs" / "sd15.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.preset = "sd15"
    e = config.eval
    model = build.build_modules(config)
    dt = build.compute_dtype(config)
    frozen = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dt), build.abstract_frozen(model, boxed=False))
    trainable = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                             build.abstract_trainable(model, boxed=False))
    photo = skimage.data.astronaut()
    face = pl.face_batch(photo, template_parse(photo, 512), None)
    n = e.num_references * len(e.prompts) * e.seeds
    text = pl.text_batch(e.prompts[0].replace("<class word>", "woman"), "", build.tokenizer_for(config),
                         face.part_names, None, config.data.pairing, "sd15")
    inputs = pl.model_inputs([face] * n, [text] * n)
    noise = pl.initial_noise(list(range(n)), pl.latent_shape(model, 512, 512))
    state = pl.scheduler_state(e.sampler, e.steps)

    def flops(lowered):
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])

    whole = flops(pl.Generator(model).fn.lower(frozen, trainable, inputs, noise, state, jnp.int32(e.merge_step),
                                               jnp.float32(e.guidance), jnp.float32(1.0)))
    sets = flops(jax.jit(lambda f, t, i: pl.embedding_sets(model, f, t, i)).lower(frozen, trainable, inputs))
    dec = flops(jax.jit(lambda f, x: pl.decode(model, f, x)).lower(frozen, noise))
    one_step = whole - sets - dec
    eval_flops = sets + dec + e.steps * one_step
    report = (REPO / "benchmarks/results/aot_sd15_v5e-16.txt").read_text()
    per_chip = float(re.search(r"\(([\d.]+) TFLOP per chip", report).group(1)) * 1e12
    return {"images": n, "steps": e.steps, "eval_tflop": eval_flops / 1e12, "step_tflop_per_chip": per_chip / 1e12,
            "every": e.every_steps, "fraction": eval_flops / (e.every_steps * per_chip),
            "equivalent_steps": eval_flops / per_chip}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/evaluation.md"))
    p.add_argument("--models", default="/tmp/cid_metric_models", help="where the random metric networks are written")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--skip", default="", help="comma list of parts to skip: throughput,demo,sd15")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    lines = ["# Evaluation cost", "", f"`python benchmarks/evaluation.py` ({time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} CPU cores; medians of {args.runs} runs). See the script's docstring for the method.", ""]
    if "throughput" not in skip:
        rows = throughput(write_models(pathlib.Path(args.models)), args.images, args.runs)
        lines += [f"## Images scored per second, CPU, batch 8, {args.images} images of 512 px", "",
                  "| metric (network) | ours | PyTorch | ours / PyTorch |", "|---|---|---|---|"]
        for r in rows:
            t = r.get("torch_img_s")
            theirs, ratio = (f"{t:.2f}", f"{r['ours_img_s'] / t:.2f}x") if t else ("n/a", "n/a")
            lines.append(f"| {r['metric']} | {r['ours_img_s']:.2f} | {theirs} | {ratio} |")
        lines += ["", "FaceSim (insightface ArcFace R50 on onnxruntime, the same code on either side) needs "
                  "buffalo_l's weights: not measured here.", ""]
    if "demo" not in skip:
        d = demo_cost()
        lines += ["## Evaluation during training: the demo (measured)", "",
                  f"configs/demo.py: 2 held-out faces x 2 prompts x 1 seed, 10 sampling steps, tiny random metric nets, "
                  f"every {d['every']} steps. Median train step {d['step_s'] * 1e3:.0f} ms; an evaluation "
                  f"{d['eval_s']:.2f} s (the first {d['first_eval_s']:.1f} s, compiling the sampler included): "
                  f"**{100 * d['fraction']:.1f}% of the training time** (plus the one-time compile).", ""]
    if "sd15" not in skip:
        s = sd15_estimate()
        lines += ["## Evaluation during training: SD1.5 (AOT-estimated)", "",
                  f"configs/sd15.py's eval settings: {s['images']} images (4 references x 2 prompts x 1 seed), "
                  f"{s['steps']} Euler steps with CFG at 512 px: {s['eval_tflop']:.1f} TFLOP (XLA cost analysis). "
                  f"Training step on v5e-16: {s['step_tflop_per_chip']:.2f} TFLOP per chip. Every chip generates "
                  f"every image (the evaluation batch is not sharded), so one evaluation costs about "
                  f"{s['equivalent_steps']:.0f} training steps: every {s['every']} steps that is "
                  f"**{100 * s['fraction']:.2f}% of the training time** at equal MFU.", ""]
    pathlib.Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
