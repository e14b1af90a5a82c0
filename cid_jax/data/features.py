"""The FGID record: one place that says what an example holds (see README.md, "Record format").

| field                       | tfds feature                 | content                                          |
|-----------------------------|------------------------------|--------------------------------------------------|
| `image`                     | Image (None, None, 3) uint8  | the photo, encoded bytes as given (JPEG or PNG), |
|                             |                              | at source resolution or downscaled to `max_side` |
| `parsing`                   | Image (None, None, 1) PNG    | 19-class CelebAMask-HQ label map, same H x W     |
| `vqa_llva`                  | Text                         | whole-person caption (LLaVA)                     |
| `vqa_llva_more_face_detail` | Text                         | facial-feature caption (face/ears/eyes/nose/mouth)|
| `id_embedding`              | Tensor (512,) float32        | ArcFace `normed_embedding`; zeros when missing   |
| `has_id_embedding`          | Scalar bool                  | whether `id_embedding` is real                   |
| `identity`                  | Text                         | person id when known, else ""                    |
| `source_id`                 | Text                         | the source record's key (e.g. its image path)    |

`validate_record` (numpy/PIL, no TensorFlow) checks and normalises one record before it is written,
raising `BadRecord` with a reason; the builders skip and report such records. The tfds
`FeaturesDict` is made by `features_dict()`, which imports tensorflow_datasets lazily.
"""
from __future__ import annotations

import io
import os
from typing import Any, Mapping

import numpy as np
from PIL import Image

from cid_jax.data import masks as masks_lib

EMBED_DIM = 512
TEXT_FIELDS = ("vqa_llva", "vqa_llva_more_face_detail", "identity", "source_id")
FIELDS = ("image", "parsing", "vqa_llva", "vqa_llva_more_face_detail", "id_embedding",
          "has_id_embedding", "identity", "source_id")


class BadRecord(ValueError):
    """A source record that cannot become an example; the message says why."""


def features_dict():
    """The tfds FeaturesDict of an FGID example."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        # No encoding_format: bytes are stored as given (no JPEG re-encoding loss).
        "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
        "parsing": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
        "vqa_llva": tfds.features.Text(),
        "vqa_llva_more_face_detail": tfds.features.Text(),
        "id_embedding": tfds.features.Tensor(shape=(EMBED_DIM,), dtype=np.float32),
        "has_id_embedding": tfds.features.Scalar(dtype=np.bool_),
        "identity": tfds.features.Text(),
        "source_id": tfds.features.Text(),
    })


# ------------------------------------------------------------------------------- validation


def _open_image(data, what: str) -> Image.Image:
    """bytes / path / PIL / array -> a fully loaded PIL image (decoding errors become BadRecord)."""
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, np.ndarray):
        return Image.fromarray(data)
    try:
        im = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        im.load()
        return im
    except FileNotFoundError as e:
        raise BadRecord(f"{what}: missing file {e.filename or data}") from e
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadRecord(f"{what}: cannot decode ({type(e).__name__}: {e})") from e


def _encode(im: Image.Image, fmt: str, png_level: int = 6) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, format="JPEG", quality=95)
    else:
        im.save(buf, format="PNG", compress_level=png_level)
    return buf.getvalue()


def _is_gray(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all())


def _label_array(im: Image.Image) -> np.ndarray:
    if im.mode in ("L", "P"):  # 'P': the palette indices are the labels
        arr = np.asarray(im)
    elif im.mode in ("I", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(im).astype(np.int64)
    elif im.mode == "RGB" and _is_gray(np.asarray(im)):  # labels saved as a 3-channel gray image
        arr = np.asarray(im)[..., 0]
    else:
        raise BadRecord(f"parsing: expected a single-channel label map (mode L/P/I), got mode {im.mode} "
                        "(a colour visualisation instead of the label PNG?)")
    if arr.max(initial=0) >= masks_lib.NUM_LABELS:
        raise BadRecord(f"parsing: label {int(arr.max())} out of range 0..{masks_lib.NUM_LABELS - 1}")
    return arr.astype(np.uint8)


def validate_record(rec: Mapping[str, Any], max_side: int | None = None) -> dict[str, Any]:
    """Checks one source record and returns the example dict for `features_dict()`.

    `rec["image"]`: encoded bytes, a path, a PIL image or a uint8 HxWx3 array; `rec["parsing"]`
    likewise (single-channel labels). Captions are strings; `id_embedding` is None (missing) or
    512 floats (any shape with 512 elements). Images larger than `max_side` are downscaled
    (bicubic; labels nearest) and re-encoded; otherwise encoded bytes are kept as they are.
    """
    image_src = rec["image"]
    im = _open_image(image_src, "image")
    lab_im = _open_image(rec["parsing"], "parsing")
    labels = _label_array(lab_im)
    if labels.shape != (im.height, im.width):
        raise BadRecord(f"parsing: size {labels.shape[1]}x{labels.shape[0]} != image size {im.width}x{im.height}")
    if min(im.size) < 16:
        raise BadRecord(f"image: too small ({im.width}x{im.height})")
    # Keep the source's encoded bytes when they can be (JPEG/PNG RGB at an accepted size): no
    # re-encoding loss. Otherwise (arrays, other formats or modes, downscaling) encode afresh.
    if isinstance(image_src, (bytes, bytearray)):
        image_bytes = bytes(image_src)
    elif isinstance(image_src, (str, os.PathLike)):
        with open(image_src, "rb") as f:
            image_bytes = f.read()
    else:
        image_bytes = None
    fmt = "JPEG" if im.format == "JPEG" else "PNG"
    if im.format not in ("JPEG", "PNG") or im.mode != "RGB":
        image_bytes = None
        im = im.convert("RGB")
    if max_side is not None and max(im.size) > max_side:
        scale = max_side / max(im.size)
        new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(new, Image.Resampling.BICUBIC)
        labels = np.asarray(Image.fromarray(labels).resize(new, Image.Resampling.NEAREST))
        image_bytes = None
    if image_bytes is None:  # PNG level 1: 5x faster than the default on photos, ~15% larger
        image_bytes = _encode(im, fmt, png_level=1)

    out = {"image": image_bytes, "parsing": _encode(Image.fromarray(labels, "L"), "PNG")}
    for key in ("vqa_llva", "vqa_llva_more_face_detail"):
        text = rec.get(key)
        if not isinstance(text, str):
            raise BadRecord(f"{key}: expected a string, got {type(text).__name__}")
        out[key] = text
    emb = rec.get("id_embedding")
    if emb is None:
        out["id_embedding"] = np.zeros(EMBED_DIM, np.float32)
        out["has_id_embedding"] = False
    else:
        emb = np.asarray(emb, np.float32).reshape(-1)
        if emb.size != EMBED_DIM:
            raise BadRecord(f"id_embedding: expected {EMBED_DIM} values, got shape {np.shape(rec['id_embedding'])}")
        if not np.isfinite(emb).all():
            raise BadRecord("id_embedding: non-finite values")
        out["id_embedding"] = emb
        out["has_id_embedding"] = bool(rec.get("has_id_embedding", True))
    out["identity"] = str(rec.get("identity") or "")
    out["source_id"] = str(rec.get("source_id") or "")
    return out
