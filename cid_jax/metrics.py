"""Identity-fidelity metrics of ConsistentID's paper (Table 3), on local metric models.

    CLIP-T   cosine of the prompt's and the generated image's CLIP embeddings (text fidelity)
    CLIP-I   cosine of the generated and the reference image's CLIP image embeddings
    DINO     cosine of DINO ViT-S/16 class tokens of the generated and the reference image
    FaceSim  cosine of ArcFace embeddings (insightface); a generated image without a detectable face
             scores 0 and is counted (`no_face`), as peers do
    FGIS     DINO class-token cosine of each facial region, averaged over the regions found in both
             images (`region_crops`: the five part slots of the parsing map, Face, Eye, Ear, Nose,
             Lip, each its hole-filled mask's pixels on black, cropped to the mask's bounding box
             squared up and padded by 10%; parsed by BiSeNet, or by the offline detector + template)
    FID/KID  Inception-v3 pool features of the generated set against the reference set (KID: the
             unbiased MMD with the cubic polynomial kernel; FID of a small set is noisy, KID less so)

The networks run in JAX with our modules (CLIP, DINO ViT, Inception: each equal to its PyTorch
reference in the tests); ArcFace runs in onnxruntime through insightface, on the host. A metric
whose model is not given is skipped, never silently dropped (`MetricModels.skipped`).
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cid_jax import errors

METRICS = ("clip_t", "clip_i", "dino", "facesim", "fgis", "fid", "kid", "s_per_image")
# The flag that enables each metric (for `skipped` entries).
ENABLED_BY = {"clip_t": "--clip_model", "clip_i": "--clip_model", "dino": "--dino_model",
              "facesim": "--face_models", "fgis": "--dino_model", "fid": "--inception", "kid": "--inception"}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
REGION_PAD = 0.10


# ------------------------------------------------------------------------------ metric models


@dataclasses.dataclass
class Encoder:
    """A jitted image (or text) embedding function over a fixed batch size, with its preprocessing."""
    embed: Callable[[np.ndarray], np.ndarray]   # preprocessed batch -> [N, D] (L2-normalised)
    preprocess: Callable[[np.ndarray], np.ndarray]  # one uint8 image -> one model input


@dataclasses.dataclass
class MetricModels:
    clip_image: Optional[Encoder] = None
    clip_text: Optional[Callable[[Sequence[str]], np.ndarray]] = None
    dino: Optional[Encoder] = None
    face: Any = None                    # ArcFaceEmbedder
    inception: Optional[Callable[[Sequence[np.ndarray]], np.ndarray]] = None  # uint8 images -> [N, 2048]
    parser: Any = None                  # FaceAnalyzer for the FGIS regions

    def skipped(self) -> dict[str, str]:
        """{metric: the flag that would enable it} for every metric without its model."""
        have = {"clip_t": self.clip_text, "clip_i": self.clip_image, "dino": self.dino, "facesim": self.face,
                "fgis": self.dino, "fid": self.inception, "kid": self.inception}
        return {m: ENABLED_BY[m] for m, model in have.items() if model is None}


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """How a metric network's input is made from a uint8 photo, as a transformers image processor
    does it: resize (PIL, `resample` in PIL's codes, which transformers uses too), centre crop,
    x * rescale, then (x - mean) / std per channel. NHWC float32 out."""
    size: tuple[int, int] | int         # (height, width) exactly, or an int: the shortest side
    crop: Optional[tuple[int, int]]     # (height, width) of the centred crop, None: no crop
    resample: int                       # PIL: 2 bilinear, 3 bicubic
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        from cid_jax.data import clip_preprocess as clip_lib

        rgb = clip_lib.to_rgb_uint8(image)
        h, w = rgb.shape[:2]
        new_h, new_w = (clip_lib.shortest_side_size(h, w, self.size) if isinstance(self.size, int) else self.size)
        if (new_h, new_w) != (h, w):
            rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling(self.resample)))
        if self.crop is not None:
            ch, cw = self.crop
            top, left = clip_lib.center_crop_box(new_h, new_w, ch)[0], clip_lib.center_crop_box(new_h, new_w, cw)[1]
            if top < 0 or left < 0:
                raise errors.InputError(f"the image processor crops {ch}x{cw} from a {new_h}x{new_w} resize")
            rgb = rgb[top:top + ch, left:left + cw]
        x = rgb.astype(np.float32) * np.float32(self.rescale)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def _hw(value, square_int: bool):
    """transformers' size fields: {"height", "width"}, {"shortest_edge"}, or an int (a square for
    ViT processors, the shortest side for CLIP's)."""
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        return int(value["height"]), int(value["width"])
    return (int(value), int(value)) if square_int else int(value)


def read_image_processing(folder, default: ImageProcessing) -> ImageProcessing:
    """The model folder's `preprocessor_config.json` (size, crop, resample, mean/std, rescale), field
    by field over `default`; `default` itself where the folder has none. facebook/dino-vits16's says
    bilinear where a hard-coded bicubic moved DINO by up to 1.8e-3 per image."""
    import json

    path = pathlib.Path(folder).expanduser() / "preprocessor_config.json"
    if not path.is_file():
        return default
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        kind = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "")
        square_int = "CLIP" not in kind  # CLIP's int size is the shortest edge; ViT's a square
        size = _hw(cfg["size"], square_int) if cfg.get("do_resize", True) and "size" in cfg else default.size
        crop = default.crop
        if "do_center_crop" in cfg or "crop_size" in cfg:
            crop = _hw(cfg.get("crop_size", default.crop), True) if cfg.get("do_center_crop", True) else None
        if isinstance(crop, int):
            crop = (crop, crop)
        mean, std = default.mean, default.std
        if cfg.get("do_normalize", True):
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        rescale = float(cfg.get("rescale_factor", default.rescale)) if cfg.get("do_rescale", True) else 1.0
        return ImageProcessing(size, crop, int(cfg.get("resample", default.resample)), mean, std, rescale)
    except (ValueError, KeyError, TypeError) as e:
        raise errors.InputError(f"{path} cannot be read as an image processor config ({e})") from None


def clip_image_processing(image_size: int) -> ImageProcessing:
    """CLIPImageProcessor's defaults (OpenAI CLIP): shortest side, centre crop, bicubic."""
    from cid_jax.data import clip_preprocess as clip_lib

    return ImageProcessing(image_size, (image_size, image_size), 3, tuple(clip_lib.OPENAI_CLIP_MEAN.tolist()),
                           tuple(clip_lib.OPENAI_CLIP_STD.tolist()))


def dino_image_processing(image_size: int) -> ImageProcessing:
    """A square resize (bicubic) with ImageNet statistics: the default where a DINO folder has no
    preprocessor_config.json."""
    return ImageProcessing((image_size, image_size), None, 3, tuple(IMAGENET_MEAN.tolist()),
                           tuple(IMAGENET_STD.tolist()))


def _normalise(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _batched(fn: Callable, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """fn over fixed-size batches (the last padded), so one program is compiled."""
    def run(x: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size]
            n = len(chunk)
            if n < batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
            out.append(np.asarray(fn(chunk))[:n])
        return np.concatenate(out) if out else np.zeros((0,))
    return run


def clip_encoders(text_model, text_params, vision_model, vision_params, tokenizer, batch_size: int = 8,
                  processing: Optional[ImageProcessing] = None):
    """(image Encoder, text embedding function) of a CLIP pair: the projected embeddings."""
    processing = processing or clip_image_processing(vision_model.config.image_size)
    image_fn = jax.jit(lambda x: vision_model.apply({"params": vision_params}, x,
                                                    output_hidden_states=False).image_embeds)
    text_fn = jax.jit(lambda ids: text_model.apply({"params": text_params}, ids,
                                                   output_hidden_states=False).text_embeds)

    def texts(prompts: Sequence[str]) -> np.ndarray:
        ids = np.asarray(tokenizer(list(prompts), max_length=77, padding="max_length", truncation=True), np.int32)
        return _normalise(_batched(text_fn, batch_size)(ids))

    image = Encoder(lambda x: _normalise(_batched(image_fn, batch_size)(x)), processing)
    return image, texts


def dino_encoder(model, params, image_size: int = 224, batch_size: int = 8,
                 processing: Optional[ImageProcessing] = None) -> Encoder:
    """DINO ViT class tokens, inputs made by `processing` (the model folder's image processor;
    default `dino_image_processing`)."""
    fn = jax.jit(lambda x: model.apply({"params": params}, x, method="cls_embedding"))
    return Encoder(lambda x: _normalise(_batched(fn, batch_size)(x)), processing or dino_image_processing(image_size))


def inception_features(model, params, batch_size: int = 8) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """uint8 images of any sizes -> Inception pool features [N, 2048] (float64): each image is
    brought to 299 px alone (pytorch-fid's resize), then the network runs in fixed-size batches."""
    from cid_jax.models import inception

    network = _batched(lambda x: inception.features_at_299(model, params, x), batch_size)

    def run(images: Sequence[np.ndarray]) -> np.ndarray:
        x = np.concatenate([np.asarray(inception.fid_preprocess(jnp.asarray(np.asarray(im, np.uint8)[None])))
                            for im in images])
        return np.asarray(network(x), np.float64)
    return run


def load_metric_models(*, clip_model: Optional[str] = None, dino_model: Optional[str] = None,
                       face_models: Optional[str] = None, inception: Optional[str] = None,
                       parser_weights: Optional[str] = None, batch_size: int = 8) -> MetricModels:
    """The metric networks from their standard local formats: a transformers CLIPModel folder, a
    transformers ViTModel folder (DINO), an insightface model folder, a pytorch-fid Inception `.pth`,
    and BiSeNet's weights for the FGIS regions (else the offline detector + template)."""
    from cid_jax.face import FaceAnalyzer

    from cid_jax import paths

    out = MetricModels()
    for flag, value in (("--clip_model", clip_model), ("--dino_model", dino_model),
                        ("--face_models", face_models), ("--inception", inception)):
        if value and not paths.path(value).exists():
            raise errors.MissingError(f"{flag}={value} does not exist")
    # Each format reads a local folder or file: a gs:// one is copied once into the local cache.
    clip_model, dino_model, face_models, inception = (
        str(paths.local_copy(v)) if v else v for v in (clip_model, dino_model, face_models, inception))
    if clip_model:
        from cid_jax.text import CLIPTokenizer
        from cid_jax.weights.clip import load_clip_text_with_projection, load_clip_vision_with_projection

        text_model, text_params = load_clip_text_with_projection(clip_model)
        vision_model, vision_params = load_clip_vision_with_projection(clip_model)
        folder = pathlib.Path(clip_model)
        tok = CLIPTokenizer.from_pretrained(folder) if (folder / "vocab.json").exists() or (
            folder / "tokenizer.json").exists() else CLIPTokenizer.default()
        processing = read_image_processing(clip_model, clip_image_processing(vision_model.config.image_size))
        out.clip_image, out.clip_text = clip_encoders(text_model, text_params, vision_model, vision_params, tok,
                                                      batch_size, processing)
    if dino_model:
        from cid_jax.weights.vit import load_vit

        model, params = load_vit(dino_model)
        processing = read_image_processing(dino_model, dino_image_processing(model.config.image_size))
        out.dino = dino_encoder(model, params, model.config.image_size, batch_size, processing)
    if face_models:
        from cid_jax.face import ArcFaceEmbedder

        out.face = ArcFaceEmbedder(face_models)
    if inception:
        from cid_jax.weights.inception import load_fid_inception

        model, params = load_fid_inception(inception)
        out.inception = inception_features(model, params, batch_size)
    if out.dino is not None:
        out.parser = FaceAnalyzer(parser_weights, None)
    return out


def random_metric_models(seed: int = 0, batch_size: int = 8) -> MetricModels:
    """Tiny random CLIP (text + vision, projected) and DINO ViT: the metrics' machinery end to end
    where no metric weights exist (the demo). Their numbers measure nothing about identity."""
    from cid_jax.face import FaceAnalyzer
    from cid_jax.models import clip, init, vit
    from cid_jax.text import CLIPTokenizer

    def params(abstract, k):
        return init.random_params(abstract, seed * 3 + k)

    text = clip.CLIPTextModelWithProjection(clip.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=16))
    vision = clip.CLIPVisionModelWithProjection(clip.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16))
    dino = vit.ViTModel(vit.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, image_size=32, patch_size=8))
    out = MetricModels(parser=FaceAnalyzer(None, None))
    out.clip_image, out.clip_text = clip_encoders(text, params(clip.abstract_params(text, boxed=False), 0), vision,
                                                  params(clip.abstract_params(vision, boxed=False), 1),
                                                  CLIPTokenizer.default(), batch_size)
    out.dino = dino_encoder(dino, params(vit.abstract_params(dino, boxed=False), 2), dino.config.image_size, batch_size)
    return out


# ------------------------------------------------------------------------------------ regions


def region_crops(image: np.ndarray, label_map: np.ndarray) -> dict[str, np.ndarray]:
    """{part slot name: uint8 crop} of the facial regions FGIS compares (see the module docstring)."""
    from PIL import Image

    from cid_jax.data import masks as masks_lib

    image = np.asarray(image, np.uint8)
    h, w = image.shape[:2]
    lm = np.asarray(Image.fromarray(np.asarray(label_map, np.uint8)).resize((w, h), Image.NEAREST))
    masks, labels = masks_lib.region_masks(lm)
    crops = {}
    for (slot, _), mask, label in zip(masks_lib.PART_SLOTS, masks, labels):
        if not label or not mask.any():
            continue
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        cy, cx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
        half = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]) * (1 + 2 * REGION_PAD) / 2
        y0, y1, x0, x1 = (int(round(v)) for v in (cy - half, cy + half, cx - half, cx + half))
        masked = np.where(mask[..., None], image, np.uint8(0))
        crop = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)  # squared up, zero where it leaves the image
        sy0, sy1, sx0, sx1 = max(0, y0), min(h, y1), max(0, x0), min(w, x1)
        crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = masked[sy0:sy1, sx0:sx1]
        crops[slot] = crop
    return crops


# -------------------------------------------------------------------------------- set metrics


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D]:
    |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr sqrt(C_a C_b)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m, n = len(a), len(b)
    if m < 2 or n < 2:
        return float("nan")
    mu_a, mu_b = a.mean(0), b.mean(0)
    xa, xb = (a - mu_a) / math.sqrt(m - 1), (b - mu_b) / math.sqrt(n - 1)  # C_a = xa^T xa, C_b = xb^T xb
    if min(m, n) < a.shape[1]:
        # Fewer images than dimensions (every paper-sized evaluation): C_a C_b = xa^T (xa xb^T) xb has
        # the non-zero eigenvalues of (xa xb^T)(xa xb^T)^T, so tr sqrt(C_a C_b) is the sum of the
        # singular values of the small [m, n] matrix xa xb^T: exact, where sqrtm of the rank-deficient
        # [D, D] product is ~1e-4 off (FID of a set with itself came out -3e-4) and takes ~40 s.
        trace_root = float(np.linalg.svd(xa @ xb.T, compute_uv=False).sum())
    else:  # pytorch-fid's form, well conditioned here
        from scipy import linalg

        cov_a, cov_b = xa.T @ xa, xb.T @ xb
        with warnings.catch_warnings():  # a singular product is handled below
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
        if not np.isfinite(root).all():  # near-singular products: regularise, as pytorch-fid
            eps = np.eye(a.shape[1]) * 1e-6
            root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
        trace_root = float(np.trace(root.real))
    return float(np.sum((mu_a - mu_b) ** 2) + np.sum(xa * xa) + np.sum(xb * xb) - 2 * trace_root)


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Kernel Inception Distance: the unbiased squared MMD with k(x, y) = (x.y / d + 1)^3."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m, n, d = len(a), len(b), a.shape[1]
    if m < 2 or n < 2:
        return float("nan")
    k = lambda x, y: (x @ y.T / d + 1.0) ** 3  # noqa: E731
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
                 - 2 * kab.mean())


def mean_and_interval(values_by_identity: Mapping[str, Sequence[float]]) -> dict:
    """Mean over identities (each identity's own mean first) and its 95% t-interval."""
    from scipy import stats

    means = np.array([np.mean(v) for v in values_by_identity.values() if len(v)], np.float64)
    if means.size == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "identities": 0}
    mean = float(means.mean())
    if means.size < 2:
        return {"mean": mean, "ci95": [float("nan"), float("nan")], "identities": int(means.size)}
    half = float(stats.t.ppf(0.975, means.size - 1) * means.std(ddof=1) / math.sqrt(means.size))
    return {"mean": mean, "ci95": [mean - half, mean + half], "identities": int(means.size)}


PER_IMAGE_METRICS = ("clip_t", "clip_i", "dino", "facesim", "fgis")


def per_identity(rows: Sequence[tuple[str, Mapping[str, float]]]) -> dict:
    """(identity, per-image scores) rows -> {metric: mean_and_interval over identities}."""
    by_identity: dict = {}
    for name, scores in rows:
        for m in PER_IMAGE_METRICS:
            if m in scores:
                by_identity.setdefault(m, {}).setdefault(name, []).append(scores[m])
    return {m: mean_and_interval(v) for m, v in by_identity.items()}


# --------------------------------------------------------------------------------- per image


@dataclasses.dataclass
class Reference:
    """What is computed once per reference photo."""
    name: str
    image: np.ndarray
    clip: Optional[np.ndarray] = None
    dino: Optional[np.ndarray] = None
    face: Optional[np.ndarray] = None
    regions: Optional[dict] = None      # slot -> DINO embedding of the region


def _face_embedding(face_model, image) -> Optional[np.ndarray]:
    from cid_jax.face.detect import NoFaceFoundError

    try:
        return _normalise(face_model.embed(image))
    except NoFaceFoundError:
        return None


def region_embeddings(models: MetricModels, image) -> dict:
    from cid_jax.face.detect import NoFaceFoundError

    try:
        labels = models.parser.label_map(image)
    except NoFaceFoundError:
        return {}
    crops = region_crops(image, labels)
    if not crops:
        return {}
    embeds = models.dino.embed(np.stack([models.dino.preprocess(c) for c in crops.values()]))
    return dict(zip(crops, embeds))


def describe_reference(models: MetricModels, name: str, image: np.ndarray) -> Reference:
    ref = Reference(name, image)
    if models.clip_image is not None:
        ref.clip = models.clip_image.embed(models.clip_image.preprocess(image)[None])[0]
    if models.dino is not None:
        ref.dino = models.dino.embed(models.dino.preprocess(image)[None])[0]
        ref.regions = region_embeddings(models, image)
    if models.face is not None:
        ref.face = _face_embedding(models.face, image)
    return ref


def similarities_to(models: MetricModels, image: np.ndarray, references: Sequence[Reference]) -> dict:
    """{metric: [cosine similarity of `image` to each reference]} for FaceSim, DINO and CLIP-I, the
    metrics whose model is loaded; FaceSim is None when no face is found in `image`."""
    out = {}
    if models.face is not None:
        e = _face_embedding(models.face, image)
        out["facesim"] = None if e is None else [float(e @ r.face) if r.face is not None else 0.0
                                                 for r in references]
    for metric, encoder, attr in (("dino", models.dino, "dino"), ("clip_i", models.clip_image, "clip")):
        if encoder is not None:
            e = encoder.embed(encoder.preprocess(image)[None])[0]
            out[metric] = [float(e @ getattr(r, attr)) for r in references]
    return out


def score_images(models: MetricModels, reference: Reference, images: Sequence[np.ndarray],
                 prompts: Sequence[Optional[str]]) -> list[dict]:
    """Per-image scores of generations of one reference: {metric: value} (absent = skipped)."""
    rows = [dict() for _ in images]
    if not images:
        return rows
    if models.clip_image is not None:
        emb = models.clip_image.embed(np.stack([models.clip_image.preprocess(im) for im in images]))
        for row, e in zip(rows, emb):
            row["clip_i"] = float(e @ reference.clip)
        if models.clip_text is not None and all(p is not None for p in prompts):
            texts = models.clip_text(list(prompts))
            for row, e, t in zip(rows, emb, texts):
                row["clip_t"] = float(e @ t)
    if models.dino is not None:
        emb = models.dino.embed(np.stack([models.dino.preprocess(im) for im in images]))
        for row, e, im in zip(rows, emb, images):
            row["dino"] = float(e @ reference.dino)
            regions = region_embeddings(models, im)
            shared = sorted(set(regions) & set(reference.regions or {}))
            row["fgis"] = float(np.mean([regions[s] @ reference.regions[s] for s in shared])) if shared else 0.0
            row["fgis_regions"] = len(shared)
    if models.face is not None:
        for row, im in zip(rows, images):
            e = _face_embedding(models.face, im)
            row["no_face"] = e is None
            row["facesim"] = 0.0 if e is None or reference.face is None else float(e @ reference.face)
    return rows
