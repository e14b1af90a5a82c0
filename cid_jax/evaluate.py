"""Measure identity fidelity as ConsistentID's paper does (its Table 3), on local metric models.

Generate, then score (one compiled program makes every reference photo x prompt x seed, in batches):

    python -m cid_jax.evaluate --checkpoint=RUN_OR_FILE [--base=SD15 --image_encoder=CLIP_H] \\
        --references=PHOTOS --prompts=paper --seeds=4 --out=EVAL \\
        --clip_model=CLIP_L --dino_model=DINO_VITS16 --face_models=BUFFALO_L --inception=PT_INCEPTION.pth

Score images made by anything (another method, another framework) under the same metric models:

    python -m cid_jax.evaluate --generated=IMAGES --references=PHOTOS [--prompts=FILE] --out=EVAL ...

Inputs:
  --references   a folder of photos, one identity each (the file name without extension names it);
                 `class_words.json` beside them ({"einstein": "man"}) sets each identity's class word
                 (default --class_word=person) for the prompts' `<class word>`
  --prompts      `reference`: the reference repository's own sheet (45 prompts; its 15 identities'
                 class words built in, so photos named albert_einstein.png, ... need no class_words.json;
                 PhotoMaker's `img` kept, an ordinary word to ConsistentID); `paper`: the prompts legible
                 in the paper's Table 2 (36 of its 45); or a file with one prompt per line (may contain
                 `<class word>`)
  --generated    a folder as this tool writes it: `<identity>/p<prompt index>_s<seed>.png` (prompts
                 indexed into --prompts) or any images in `<identity>/` folders, or a `manifest.csv`
                 (image, reference[, prompt]); without prompts CLIP-T is skipped

Metric models, each in its standard local format (a metric whose model is not given is marked
`skipped` with the flag that enables it):
  --clip_model   a transformers CLIPModel folder. Paper-style CLIP-T / CLIP-I: openai/clip-vit-large-patch14
                 (the PhotoMaker protocol the paper follows)
  --dino_model   a transformers ViTModel folder: facebook/dino-vits16 (DINO, and FGIS on the facial regions)
  --face_models  an insightface model folder (buffalo_l) for FaceSim (ArcFace; the paper used FaceNet)
  --inception    pytorch-fid's pt_inception-2015-12-05-6726825d.pth for FID and KID
  --parser_weights  BiSeNet's 79999_iter.pth for the FGIS regions (else the offline detector + template)

Outputs in --out: report.md (a table laid out like the paper's Table 3, scores x 100 as there),
metrics.json (clip_t, clip_i, dino, facesim, fgis, fid, kid, s_per_image: mean and 95% interval
over identities), per_image.csv, contact_sheet.png (each row: the reference, then its generations),
and with --checkpoint the images themselves under images/.

Several people (`--people=N`, with --checkpoint): the references are taken N at a time in name order,
each group generated together (person k in the k-th --region, default the k-th of N side-by-side
columns, `cid_jax.people`), and
each person's region is cropped and scored against every reference of its group: people.json /
people.md give, per metric (FaceSim, DINO, CLIP-I), the mean similarity of a crop to its own reference,
to the closest other one, the margin between them (95% interval) and the share of crops closer to
their own reference.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import pathlib
import sys
import time
from typing import Optional, Sequence

from cid_jax import cli, paths, scoring

log = logging.getLogger("cid_jax.evaluate")


# --------------------------------------------------------------------------------- generation


def reference_face(analyzer, path, variant: str):
    """A reference photo ready for the model (`sampling.face_batch`); a photo the analyzer cannot use
    is an error naming it."""
    from cid_jax import inference
    from cid_jax import sampling as pl

    photo = inference.read_image(str(path))
    try:
        return pl.face_batch(photo, analyzer.label_map(photo, pl.VARIANT_DEFAULTS[variant].parse_size),
                             analyzer.id_embedding(photo))
    except cli.UserError as e:
        raise type(e)(f"reference {path}: {e}") from None


def generate_all(args, references, prompts, words, out: pathlib.Path) -> tuple[list[scoring.Generated], dict]:
    """Every reference x prompt x seed with the checkpoint, batched; returns the images' records and
    the timing (s/image with compile excluded; compile apart)."""
    from PIL import Image

    from cid_jax import inference
    from cid_jax import sampling as pl
    from cid_jax.face import FaceAnalyzer

    variant = inference.variant(args.checkpoint, args.base)
    analyzer = FaceAnalyzer(args.parser_weights, args.face_models)
    t0 = time.perf_counter()
    loaded = inference.load(args.checkpoint, args.base, args.image_encoder, args.dtype)
    log.info("loaded %s in %.1f s", args.checkpoint, time.perf_counter() - t0)
    defaults = pl.VARIANT_DEFAULTS[loaded.model.variant]
    size = args.size or inference.default_size(loaded, args.base)
    requests, records = [], []
    for name, path in references.items():
        face = reference_face(analyzer, path, variant)
        for k, prompt in enumerate(prompts):
            text = scoring.fill(prompt, words.get(name, args.class_word))
            for seed in range(args.seed, args.seed + args.seeds):
                requests.append(inference.ImageRequest(face, text, seed))
                records.append(scoring.Generated(out / "images" / name / f"p{k:02d}_s{seed}.png", name, text, seed))
    log.info("generating %d images (%d identities x %d prompts x %d seeds), %d at a time", len(requests),
             len(references), len(prompts), args.seeds, args.batch_size)
    images, timing = inference.generate_requests(
        loaded, requests, negative_prompt=args.negative_prompt, steps=args.steps,
        guidance=args.guidance if args.guidance is not None else defaults.guidance, merge_step=args.merge_step,
        sampler=args.sampler, height=size, width=size, batch_size=args.batch_size, progress=True)
    log.info("generated %d images: compiled in %.1f s, sampled in %.1f s (%.2f s/image)", timing.images,
             timing.compile_s, timing.sample_s, timing.s_per_image)
    for record, image in zip(records, images):
        record.path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(record.path)
    with open(out / "images" / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "reference", "prompt", "seed"])
        for r in records:
            w.writerow([r.path.relative_to(out / "images").as_posix(), r.reference, r.prompt, r.seed])
    return records, {"s_per_image": timing.s_per_image, "compile_s": timing.compile_s, "images": timing.images}


# ---------------------------------------------------------------------------------- several people


def generate_groups(args, references, prompts, words, out: pathlib.Path) -> list[dict]:
    """The references N at a time (name order), each group x prompt x seed in one image with the
    people side by side; returns one record per image: path, the group's names, prompt, seed, boxes."""
    from PIL import Image

    from cid_jax import inference, people
    from cid_jax import sampling as pl
    from cid_jax.face import FaceAnalyzer

    names = sorted(references)
    groups = [names[i:i + args.people] for i in range(0, len(names) - args.people + 1, args.people)]
    if not groups:
        raise cli.InputError(f"--people={args.people} but --references has {len(names)} photo(s)")
    if len(names) % args.people:
        log.warning("%d reference(s) left out: %d is not a multiple of --people=%d", len(names) % args.people,
                    len(names), args.people)
    variant = inference.variant(args.checkpoint, args.base)
    analyzer = FaceAnalyzer(args.parser_weights, args.face_models)
    loaded = inference.load(args.checkpoint, args.base, args.image_encoder, args.dtype)
    size = args.size or inference.default_size(loaded, args.base)
    boxes = ([people.parse_box(r, size, size) for r in args.region] if args.region
             else people.side_by_side(args.people, size, size))
    masks = people.box_masks(boxes, size, size)
    people.check_masks(masks)
    guidance = args.guidance if args.guidance is not None else pl.VARIANT_DEFAULTS[loaded.model.variant].guidance
    faces = {name: reference_face(analyzer, references[name], variant) for name in names}
    seeds = list(range(args.seed, args.seed + args.seeds))
    records, generator = [], pl.Generator(loaded.model)
    for group in groups:
        word = " and ".join(words.get(n, args.class_word) for n in group)
        for k, prompt in enumerate(prompts):
            text = scoring.fill(prompt, word)
            images, _ = inference.generate_group(
                loaded, [faces[n] for n in group], masks, text, args.negative_prompt, seeds, steps=args.steps,
                guidance=guidance, merge_step=args.merge_step, sampler=args.sampler, height=size, width=size,
                generator=generator)
            for seed, image in zip(seeds, images):
                path = out / "images" / "+".join(group) / f"p{k:02d}_s{seed}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)
                records.append(dict(path=path, group=group, prompt=text, seed=seed, boxes=boxes))
    log.info("generated %d images of %d people each", len(records), args.people)
    return records


def score_groups(models, references, records: Sequence[dict]) -> tuple[dict, list[dict]]:
    """Each person's crop against every reference of its group, per metric: (summary, rows)."""
    import numpy as np

    from cid_jax import inference, metrics

    described = {}
    rows = []
    for record in records:
        image = inference.read_image(str(record["path"]))
        for k, (name, (x0, y0, x1, y1)) in enumerate(zip(record["group"], record["boxes"])):
            crop = np.ascontiguousarray(image[y0:y1, x0:x1])
            for metric, sims in metrics.similarities_to(models, crop, [
                    described.setdefault(n, metrics.describe_reference(models, n, inference.read_image(
                        str(references[n])))) for n in record["group"]]).items():
                if sims is None:
                    rows.append(dict(image=str(record["path"]), person=k, reference=name, metric=metric, no_face=True))
                    continue
                own, others = sims[k], [s for j, s in enumerate(sims) if j != k]
                rows.append(dict(image=str(record["path"]), person=k, reference=name, metric=metric, own=own,
                                 other=max(others), margin=own - max(others)))
    summary = {}
    for metric in sorted({r["metric"] for r in rows}):
        scored = [r for r in rows if r["metric"] == metric and "margin" in r]
        by_reference = {}
        for r in scored:
            by_reference.setdefault(r["reference"], []).append(r["margin"])
        summary[metric] = dict(
            own=float(np.mean([r["own"] for r in scored])) if scored else None,
            other=float(np.mean([r["other"] for r in scored])) if scored else None,
            margin=metrics.mean_and_interval(by_reference) if scored else None,
            closer_to_own=float(np.mean([r["margin"] > 0 for r in scored])) if scored else None,
            crops=len(scored), no_face=sum(1 for r in rows if r["metric"] == metric and r.get("no_face")))
    return summary, rows


def write_people(out: pathlib.Path, summary: dict, rows: list[dict], name: str, count: int) -> None:
    import json

    (out / "people.json").write_text(json.dumps(scoring.finite_or_null(summary), indent=1, allow_nan=False))
    with open(out / "people.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "person", "reference", "metric", "own", "other", "margin",
                                          "no_face"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"# {name}: {count} people per image, each crop against its group's references", "",
             "| metric | own reference | closest other | margin (95% interval) | crops closer to own | crops |",
             "|---|---|---|---|---|---|"]
    for metric, s in summary.items():
        if not s["crops"]:
            lines.append(f"| {metric} | - | - | - | - | 0 ({s['no_face']} without a face) |")
            continue
        m = s["margin"]
        low, high = m["ci95"]
        lines.append(f"| {metric} | {s['own']:.3f} | {s['other']:.3f} | {m['mean']:+.3f} ({low:+.3f} .. {high:+.3f}) "
                     f"| {100 * s['closer_to_own']:.0f}% | {s['crops']} |")
    (out / "people.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m cid_jax.evaluate", description=__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="generate with this run directory / checkpoint file, then score")
    what.add_argument("--generated", help="score the images of this folder (made by anything)")
    p.add_argument("--references", required=True, help="folder of reference photos, one identity each")
    p.add_argument("--prompts", default=None,
                   help="'reference' (the reference repository's 45-prompt sheet), 'paper' (Table 2), or a file")
    p.add_argument("--class_word", default="person", help="the prompts' <class word> (class_words.json overrides)")
    p.add_argument("--seeds", type=int, default=1, help="images per reference and prompt (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--out", required=True, help="folder for report.md, metrics.json, per_image.csv, ...")
    p.add_argument("--base", help="diffusers SD1.5/SDXL folder (not needed for a preset (demo) run)")
    p.add_argument("--image_encoder", help="CLIP-ViT-H-14 folder (default: <base>/image_encoder)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--merge_step", type=int, default=30)
    p.add_argument("--sampler", choices=("euler", "ddim"), default="euler")
    p.add_argument("--negative_prompt", default="monochrome, lowres, bad anatomy, worst quality, low quality, blurry")
    p.add_argument("--size", type=int, default=None, help="image side (default: the base model's; demo 64)")
    p.add_argument("--batch_size", type=int, default=4, help="images per compiled call")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--clip_model", help="transformers CLIPModel folder (CLIP-T, CLIP-I)")
    p.add_argument("--dino_model", help="transformers ViTModel folder, facebook/dino-vits16 (DINO, FGIS)")
    p.add_argument("--face_models", help="insightface model folder, buffalo_l (FaceSim)")
    p.add_argument("--inception", help="pytorch-fid Inception weights .pth (FID, KID)")
    p.add_argument("--parser_weights", help="BiSeNet weights for the FGIS regions (default: offline template)")
    p.add_argument("--name", default=None, help="the method's name in the report (default: the checkpoint's)")
    p.add_argument("--people", type=int, default=1,
                   help="N > 1: generate the references N at a time in one image each, side by side, and score "
                        "each person's crop against every reference of the group (people.md, people.json)")
    p.add_argument("--region", action="append", default=[],
                   help="with --people: x0,y0,x1,y1 of each person (pixels of the image, one per person, in group "
                        "order; default: side-by-side columns)")
    from cid_jax import runtime

    runtime.add_cache_flags(p)
    return p.parse_args(argv)


def check_args(args) -> None:
    problems = []
    for flag in ("seeds", "steps", "batch_size"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag}={getattr(args, flag)}: must be >= 1")
    if args.checkpoint and not args.prompts:
        problems.append("--prompts is needed to generate (reference, paper, or a file with one prompt per line)")
    if args.people < 1:
        problems.append(f"--people={args.people}: must be >= 1")
    elif args.people > 1 and not args.checkpoint:
        problems.append("--people scores images this tool generates: give --checkpoint")
    if args.region and len(args.region) != args.people:
        problems.append(f"{len(args.region)} --region for --people={args.people}: give one per person")
    if problems:
        raise cli.InputError("; ".join(problems))


@cli.entry_point("evaluate")
def main(argv: Optional[Sequence[str]] = None) -> int:
    cli.setup_logging()
    args = parse_args(argv)
    check_args(args)
    from cid_jax import runtime

    runtime.cache_from_args(args)
    check_out(args.out)
    prompts = scoring.read_prompts(args.prompts)
    args.name = args.name or paths.path(args.checkpoint or args.generated).name
    with contextlib.ExitStack() as stack:  # remote inputs are downloaded, a remote --out is uploaded at the end
        args.references = stack.enter_context(paths.local_folder(args.references))
        if args.generated:
            args.generated = stack.enter_context(paths.local_folder(args.generated))
        out = stack.enter_context(paths.staged_folder(args.out))
        evaluate(args, prompts, out)
    log.info("wrote %s", paths.path(args.out) / "report.md")
    return 0


def check_out(out: str) -> None:
    """--out is a folder this run can write, found out before any work."""
    if paths.path(out).is_file():
        raise cli.InputError(f"--out={out} is a file; give a folder for report.md, metrics.json, ...")
    paths.check_writable(out, "--out")


def evaluate(args, prompts, out: pathlib.Path) -> None:
    """Generates (with --checkpoint) or reads (--generated) the images, scores them, writes `out`."""
    from cid_jax import metrics

    references = scoring.read_references(args.references)
    words = scoring.class_words(args.references, args.prompts)
    t0 = time.perf_counter()
    models = metrics.load_metric_models(clip_model=args.clip_model, dino_model=args.dino_model,
                                        face_models=args.face_models, inception=args.inception,
                                        parser_weights=args.parser_weights)
    for m, flag in models.skipped().items():
        log.warning("%s: skipped (needs %s)", m, flag)
    if args.people > 1:
        out.mkdir(parents=True, exist_ok=True)
        groups = generate_groups(args, references, prompts, words, out)
        summary, rows = score_groups(models, references, groups)
        write_people(out, summary, rows, args.name, args.people)
        log.info("scored %d group images in %.1f s", len(groups), time.perf_counter() - t0)
        print((out / "people.md").read_text())
        return
    if args.checkpoint:
        out.mkdir(parents=True, exist_ok=True)
        generated, timing = generate_all(args, references, prompts, words, out)
    else:
        generated, timing = scoring.read_generated(args.generated, references, prompts, words, args.class_word), None
    result, rows = scoring.score(models, references, generated, timing)
    scoring.write_outputs(out, result, rows, references, generated, args.name)
    log.info("scored %d images in %.1f s", len(generated), time.perf_counter() - t0)
    print((out / "report.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
