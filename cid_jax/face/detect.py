"""Offline face detection and a geometric label-map template: the fallback when no weights are given.

Without a BiSeNet checkpoint (and insightface models) generation still needs a face box and a
19-class label map so that the region masks and part images are built exactly as with real parsing.
The detector here ships with scikit-image (a core dependency): OpenCV's LBP frontal-face cascade,
distributed in skimage's data as `lbp_frontal_face_cascade_filename()`. It finds upright frontal faces only; profile or
strongly rotated faces raise `NoFaceFoundError`, as does a photo with no face.

`template_label_map` paints a fixed face layout into the box (see `TEMPLATE`). It is a stand-in,
not a parser: the parts sit where they sit on an average frontal face, not where they are in
this photo. Real parsing (`cid_jax.face.parsing.parse_face`) should be used whenever the weights
are available.
"""
from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import numpy as np

from cid_jax import errors
from cid_jax.face import parsing as L

log = logging.getLogger(__name__)


class NoFaceFoundError(errors.InputError):
    """No face in the image: ConsistentID needs one clear, frontal, reasonably large face."""


def no_face_error(image_shape, detector: str) -> NoFaceFoundError:
    h, w = image_shape[:2]
    return NoFaceFoundError(
        f"no face found in the {w}x{h} image by {detector}. ConsistentID needs a photo with one "
        "clear, upright, frontal face (ideally at least ~1/6 of the image height); crop closer to the "
        "face or use a better-lit, frontal photo.")


class FaceBox(NamedTuple):
    """An axis-aligned face box in pixels: x0, y0 inclusive; x1, y1 exclusive."""
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return self.width * self.height

    def scaled(self, sx: float, sy: float) -> "FaceBox":
        """The same box in an image resized by (sx, sy)."""
        return FaceBox(int(round(self.x0 * sx)), int(round(self.y0 * sy)),
                       int(round(self.x1 * sx)), int(round(self.y1 * sy)))


@functools.lru_cache(maxsize=1)
def _cascade():
    from skimage import data, feature

    return feature.Cascade(data.lbp_frontal_face_cascade_filename())


def detect_faces(image_rgb, *, min_size: int | None = None, scale_factor: float = 1.2,
                 min_neighbor_number: int = 4, max_side: int = 640) -> list[FaceBox]:
    """All frontal faces found by skimage's LBP cascade, largest first, in the input's pixels.

    The image is downscaled (if needed) so its longer side is at most `max_side` before the
    multi-scale scan, which keeps the scan well under a second; `min_size` (in input pixels)
    defaults to 8% of the shorter side, which drops most texture false positives.
    """
    from skimage import color, transform

    img = np.asarray(image_rgb)
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
        raise ValueError(f"expected an RGB [H, W, 3] or gray [H, W] image, got shape {img.shape}")
    h, w = img.shape[:2]
    gray = color.rgb2gray(img) if img.ndim == 3 else img.astype(np.float64)
    if gray.max() > 1.0:  # integer-valued gray input
        gray = gray / 255.0
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        gray = transform.resize(gray, (round(h * scale), round(w * scale)), anti_aliasing=True)
    if min_size is None:
        min_size = max(24, int(0.08 * min(h, w)))
    win = max(24, int(min_size * scale))
    dets = _cascade().detect_multi_scale(
        img=gray, scale_factor=scale_factor, step_ratio=1, min_size=(win, win),
        max_size=gray.shape[:2], min_neighbor_number=min_neighbor_number)
    boxes = [FaceBox(d["c"], d["r"], d["c"] + d["width"], d["r"] + d["height"]).scaled(1 / scale, 1 / scale)
             for d in dets]
    boxes = [FaceBox(max(0, b.x0), max(0, b.y0), min(w, b.x1), min(h, b.y1)) for b in boxes]
    return sorted(boxes, key=lambda b: b.area, reverse=True)


def detect_largest_face(image_rgb, **kwargs) -> FaceBox:
    """The largest face box (see `detect_faces`); raises `NoFaceFoundError` if there is none."""
    boxes = detect_faces(image_rgb, **kwargs)
    if not boxes:
        raise no_face_error(np.shape(image_rgb), "the scikit-image LBP frontal-face cascade")
    if len(boxes) > 1:
        b = boxes[0]
        log.info("%d faces in the photo; using the largest (box x %d..%d, y %d..%d)", len(boxes), b.x0, b.x1,
                 b.y0, b.y1)
    return boxes[0]


# ------------------------------------------------------------------------------------ template

# The layout, painted in this order (later entries overwrite earlier ones), as ellipses in
# box-normalised coordinates: u = (x - x0) / width, v = (y - y0) / height, with the cascade's box
# spanning roughly hairline..chin and cheek..cheek. `half`: 'top'/'bottom' keeps only that half of
# the ellipse (hair stays above the brows; the lips split at the mouth line). l_* parts are drawn on
# the image's left. Values measured on frontal faces such as skimage's astronaut.
#         label       cu     cv     ru     rv    half
TEMPLATE = (
    (L.HAIR,        0.50,  0.32,  0.72,  0.65, "top"),
    (L.L_EAR,       0.06,  0.50,  0.07,  0.14, None),
    (L.R_EAR,       0.94,  0.50,  0.07,  0.14, None),
    (L.SKIN,        0.50,  0.52,  0.42,  0.56, None),
    (L.L_BROW,      0.32,  0.33,  0.11,  0.03, None),
    (L.R_BROW,      0.68,  0.33,  0.11,  0.03, None),
    (L.L_EYE,       0.33,  0.42,  0.08,  0.035, None),
    (L.R_EYE,       0.67,  0.42,  0.08,  0.035, None),
    (L.NOSE,        0.50,  0.58,  0.07,  0.13, None),
    (L.U_LIP,       0.50,  0.80,  0.15,  0.045, "top"),
    (L.L_LIP,       0.50,  0.80,  0.14,  0.05, "bottom"),
)


def template_label_map(image_shape, box: FaceBox) -> np.ndarray:
    """uint8 [H, W] label map (CelebAMask-HQ ids) with the `TEMPLATE` face painted into `box`.

    `image_shape` is (H, W) or (H, W, C); `box` in the same pixel grid. Everything outside the
    painted parts is background (0), so the region-mask step also finds a background label.
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    box = FaceBox(*box)
    if box.width <= 0 or box.height <= 0:
        raise ValueError(f"empty face box {box}")
    # Pixel centres in box coordinates.
    v = ((np.arange(h, dtype=np.float32) + 0.5 - box.y0) / box.height)[:, None]
    u = ((np.arange(w, dtype=np.float32) + 0.5 - box.x0) / box.width)[None, :]
    labels = np.zeros((h, w), np.uint8)
    for label, cu, cv, ru, rv, half in TEMPLATE:
        inside = ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0
        if half == "top":
            inside &= v <= cv
        elif half == "bottom":
            inside &= v > cv
        labels[inside] = label
    return labels


def template_parse(image_rgb, size: int = 512, **detect_kwargs) -> np.ndarray:
    """The fallback for `parsing.parse_face`: detect the largest face and paint the template.

    Returns uint8 [size, size] like `parse_face` (the photo squashed to size x size, as the
    reference's parsing step does); raises `NoFaceFoundError` when no face is found.
    """
    img = np.asarray(image_rgb)
    box = detect_largest_face(img, **detect_kwargs)
    return template_label_map((size, size), box.scaled(size / img.shape[1], size / img.shape[0]))
