"""CLIP image preprocessing, as the reference's `CLIPImageProcessor()` does it, in numpy + PIL.

The steps (OpenAI CLIP defaults, the ones ConsistentID's processors use):
  1. convert to RGB;
  2. resize so the shortest side is 224, the long side `int(224 * long / short)`, with PIL BICUBIC
     on the uint8 image (PIL's bicubic is antialiased: its kernel widens with the reduction factor);
  3. centre crop 224 x 224 (top = (h - 224) // 2, left = (w - 224) // 2);
  4. x / 255, then (x - mean) / std per channel.

Why PIL and not `tf.image.resize(..., "bicubic", antialias=True)`: the two differ (kernel edge
handling and PIL's uint8 rounding after resampling); `benchmarks/data_pipeline.py` measures the
difference on `skimage.data.astronaut()` (see benchmarks/results/data_pipeline.md). PIL reproduces
`CLIPImageProcessor` to float rounding (max |diff| <~ 1e-6, tested), so this one numpy function
serves both inference (numpy images) and the tf.data pipeline (through `tf.numpy_function`).
Output is NHWC float32, the layout our Flax CLIP vision tower takes.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_SIZE = 224
# OpenAI CLIP statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
OPENAI_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
OPENAI_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shortest side == size; the long side truncated like transformers/torchvision."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has an empty side: {height}x{width}")
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def center_crop_box(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of a centred crop x crop window (floor of the half-difference)."""
    return (height - crop) // 2, (width - crop) // 2


def to_rgb_uint8(image) -> np.ndarray:
    """A PIL image or an HxW / HxWx{1,3,4} uint8 array -> HxWx3 uint8 (PIL `convert("RGB")` rules)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got dtype {image.dtype} shape {image.shape}")
    if image.ndim == 3 and image.shape[-1] == 3:
        return image
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 4:
        return np.asarray(Image.fromarray(image, "RGBA").convert("RGB"))
    raise ValueError(f"expected an HxW or HxWx{{1,3,4}} image, got shape {image.shape}")


def clip_resize_crop(image, size: int = CLIP_SIZE) -> np.ndarray:
    """Steps 1-3: uint8 HxWx3 -> uint8 size x size x 3 (bicubic shortest side, centre crop)."""
    rgb = to_rgb_uint8(image)
    h, w = rgb.shape[:2]
    new_h, new_w = shortest_side_size(h, w, size)
    if (new_h, new_w) != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = center_crop_box(new_h, new_w, size)
    if top < 0 or left < 0:  # cannot happen after a shortest-side resize to `size`
        raise AssertionError((new_h, new_w, size))
    return rgb[top:top + size, left:left + size]


# Step 4 for every (uint8 value, channel): float32 (v * (1/255) - mean) / std, as transformers computes it.
_NORMALIZE_LUT = np.ascontiguousarray(
    ((np.arange(256, dtype=np.float32)[:, None] * np.float32(1.0 / 255.0)) - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD)


def clip_normalize(image_uint8: np.ndarray) -> np.ndarray:
    """Step 4 on uint8 pixels (any leading dims, channels last) -> float32 (a table lookup per channel)."""
    image_uint8 = np.asarray(image_uint8)
    if image_uint8.dtype != np.uint8 or image_uint8.shape[-1] != 3:
        raise ValueError(f"expected uint8 [..., 3], got {image_uint8.dtype} {image_uint8.shape}")
    out = np.empty(image_uint8.shape, np.float32)
    for c in range(3):
        out[..., c] = _NORMALIZE_LUT[:, c][image_uint8[..., c]]
    return out


def clip_preprocess(image, size: int = CLIP_SIZE) -> np.ndarray:
    """One image (PIL or uint8 array) -> float32 [size, size, 3], exactly CLIPImageProcessor's values (NHWC)."""
    return clip_normalize(clip_resize_crop(image, size))


def clip_preprocess_batch(images, size: int = CLIP_SIZE) -> np.ndarray:
    """A sequence of images (any sizes) -> float32 [N, size, size, 3]."""
    if len(images) == 0:
        return np.zeros((0, size, size, 3), np.float32)
    return clip_normalize(np.stack([clip_resize_crop(im, size) for im in images]))
