"""Identity fidelity measured while training (`config.eval`): every `eval.every_steps` steps, and at
the last step, the current weights generate each reference x prompt x seed and the metric models
score them (FaceSim, CLIP-T, CLIP-I, DINO, FGIS as `cid_jax.scoring` computes them). The means
over identities go to TensorBoard (`eval/...`) and metrics.jsonl; the images to
`<workdir>/images/eval_<step>.png` (one row per reference: the photo, then its generations).

References (`eval.references`): a folder of photos; or "" = the first `eval.num_references`
identities of the built dataset's `validation` split (`builder build --json validation=FILE`), with
the parsing maps and ID embeddings stored in it; or, for a dataset without one (the synthetic
demo), synthetic faces drawn with a seed no training set uses (held out; exact maps and embeddings).
Metric models: local folders in their standard formats (`eval.clip_model`, `eval.dino_model`,
`eval.face_models`), or `eval.random_metric_models` (tiny random nets: the demo runs the whole
machinery; its numbers say nothing about identity). Without any, evaluation is off, said once.

The sampling program is compiled on the first evaluation and reused by the later ones. On a
multi-host run every process takes part in generation (one program over the global mesh, images
replicated); process 0 scores and writes.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import jax
import numpy as np

from cid_jax import errors, paths

log = logging.getLogger(__name__)

# Synthetic references are drawn from this dataset seed offset: no training set built from
# `config.seed` (the demo's) shares their identities.
HELD_OUT_SEED_OFFSET = 7919


@dataclasses.dataclass
class EvalReference:
    name: str
    image: np.ndarray        # uint8 [H, W, 3]
    class_word: str
    face: object             # sampling.FaceBatch


def metric_models_of(config):
    """The configured metric models, or None (evaluation off)."""
    from cid_jax import metrics

    e = config.eval
    if e.random_metric_models:
        return metrics.random_metric_models(config.seed)
    if not (e.clip_model or e.dino_model or e.face_models):
        return None
    return metrics.load_metric_models(clip_model=e.clip_model or None, dino_model=e.dino_model or None,
                                      face_models=e.face_models or None, parser_weights=e.parser_weights or None)


def synthetic_references(config, size: int) -> list[EvalReference]:
    from cid_jax import sampling as pl
    from cid_jax.data import synthetic

    out, seed = [], config.seed + HELD_OUT_SEED_OFFSET
    for k in range(config.eval.num_references):
        face = synthetic.render_sample(seed, k, size=max(64, size))
        word = synthetic.make_identity(seed, int(face.identity.rsplit("-", 1)[1])).gender
        embedding = face.id_embedding if face.has_id_embedding else None
        out.append(EvalReference(f"heldout{k}", face.image, word, pl.face_batch(face.image, face.parsing, embedding)))
    return out


VALIDATION_SPLIT = "validation"


def dataset_references(config) -> Optional[list[EvalReference]]:
    """The first identities of the built dataset's validation split, or None if it has none."""
    from cid_jax import sampling as pl
    from cid_jax.data.pipeline import RecordSource

    if not config.data.path:
        return None
    try:
        source = RecordSource(config.data.path, VALIDATION_SPLIT)
    except KeyError:
        return None
    out, seen = [], set()
    for i in range(len(source)):
        ex = source.features.deserialize_example_np(source.read(i))
        identity = ex["identity"].decode()
        if identity in seen:
            continue
        seen.add(identity)
        image, parsing = ex["image"], ex["parsing"][..., 0]
        embedding = ex["id_embedding"] if ex["has_id_embedding"] else None
        out.append(EvalReference(identity, image, config.eval.class_word, pl.face_batch(image, parsing, embedding)))
        if len(out) == config.eval.num_references:
            break
    return out or None


def photo_references(config) -> list[EvalReference]:
    from cid_jax import inference, scoring
    from cid_jax import sampling as pl
    from cid_jax.face import FaceAnalyzer

    e = config.eval
    analyzer = FaceAnalyzer(e.parser_weights or None, e.face_models or None)
    with paths.local_folder(e.references) as folder:  # a gs:// folder is downloaded; the photos are read now
        words = scoring.class_words(folder)
        photos = {name: inference.read_image(str(path)) for name, path in scoring.read_references(folder).items()}
    out = []
    for name, photo in photos.items():
        path = f"{e.references}/{name}"
        try:
            face = pl.face_batch(photo, analyzer.label_map(photo, pl.VARIANT_DEFAULTS[config.model.variant].parse_size),
                                 analyzer.id_embedding(photo))
        except errors.UserError as err:
            raise type(err)(f"--config.eval.references: {path}: {err}") from None
        out.append(EvalReference(name, photo, words.get(name, e.class_word), face))
    return out


class TrainingEvaluator:
    """`evaluator(step, frozen, trainable) -> {metric: mean over identities}` (empty off process 0)."""

    def __init__(self, config, model, run, mesh=None):
        from jax.sharding import NamedSharding, PartitionSpec

        from cid_jax import build as build_lib
        from cid_jax import scoring
        from cid_jax import inference
        from cid_jax import sampling as pl

        self.config, self.model, self.run = config, model, run
        e = config.eval
        self.metric_models = metric_models_of(config)
        self.size = int(config.data.resolution)
        self.references = (photo_references(config) if e.references else
                           dataset_references(config) or synthetic_references(config, self.size))
        self.requests = [(ref, inference.ImageRequest(ref.face, scoring.fill(prompt, ref.class_word), seed))
                         for ref in self.references for prompt in e.prompts
                         for seed in range(e.seed, e.seed + e.seeds)]
        self.tokenizers = build_lib.tokenizers_for(config)
        self.noise_config = inference.noise_config_for(config)
        replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        self.generator = pl.Generator(model, out_sharding=replicated)
        self.programs: dict = {}
        log.info("evaluation every %d steps: %d reference(s) x %d prompt(s) x %d seed(s), %d sampling steps, "
                 "metrics %s", e.every_steps, len(self.references), len(e.prompts), e.seeds, e.steps,
                 ", ".join(m for m in ("facesim", "clip_t", "clip_i", "dino", "fgis")
                           if m not in self.metric_models.skipped()))

    def __call__(self, step: int, frozen, trainable) -> dict:
        from cid_jax import inference
        from cid_jax import metrics

        e = self.config.eval
        loaded = inference.Loaded(self.model, frozen, trainable, {"pairing": self.config.data.pairing}, self.tokenizers[0],
                            self.noise_config, self.tokenizers[1])
        t0 = time.perf_counter()
        images, timing = inference.generate_requests(
            loaded, [r for _, r in self.requests], negative_prompt=e.negative_prompt, steps=e.steps,
            guidance=e.guidance, merge_step=e.merge_step, sampler=e.sampler, height=self.size, width=self.size,
            batch_size=e.batch_size or None, programs=self.programs, generator=self.generator)
        if jax.process_index() != 0:
            return {}
        scored = []
        for ref in self.references:
            mine = [(r, im) for (owner, r), im in zip(self.requests, images) if owner is ref]
            described = metrics.describe_reference(self.metric_models, ref.name, ref.image)
            rows = metrics.score_images(self.metric_models, described, [im for _, im in mine],
                                        [r.prompt for r, _ in mine])
            scored += [(ref.name, row) for row in rows]
        summary = {m: v["mean"] for m, v in metrics.per_identity(scored).items()}
        summary["seconds"] = time.perf_counter() - t0
        self.write_grid(step, images)
        log.info("evaluation at step %d (%d images, %.1f s%s): %s", step, len(images), summary["seconds"],
                 f", {timing.compile_s:.1f} s of it compiling" if timing.compile_s else "",
                 ", ".join(f"{k}={v:.4f}" for k, v in summary.items() if k != "seconds"))
        return summary

    def write_grid(self, step: int, images: np.ndarray):
        from PIL import Image

        per_ref = len(images) // max(1, len(self.references))
        s = self.size
        sheet = Image.new("RGB", (s * (per_ref + 1), s * len(self.references)), "white")
        for row, ref in enumerate(self.references):
            photo = Image.fromarray(ref.image).resize((s, s), Image.Resampling.BICUBIC)
            sheet.paste(photo, (0, row * s))
            for col in range(per_ref):
                sheet.paste(Image.fromarray(images[row * per_ref + col]), ((col + 1) * s, row * s))
        path = self.run.images / f"eval_{step:07d}.png"
        paths.write_atomic(path, lambda tmp: sheet.save(tmp, format="PNG"))
        return path


def make_evaluator(config, model, run, mesh=None) -> Optional[TrainingEvaluator]:
    """The evaluator `config.eval` asks for, or None when it is off (said once, with the fix)."""
    e = config.eval
    if not e.every_steps:
        return None
    if not (e.random_metric_models or e.clip_model or e.dino_model or e.face_models):
        log.info("evaluation during training is off: no metric models (set --config.eval.clip_model, "
                 "--config.eval.dino_model and/or --config.eval.face_models to local folders)")
        return None
    return TrainingEvaluator(config, model, run, mesh)
