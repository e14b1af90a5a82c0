"""Face parsing of a reference photo into the 19 CelebAMask-HQ labels (spec §6 step 3).

The reference (`parsing_face_mask`) resizes the photo to 512x512 with PIL BILINEAR (aspect ratio not
kept), normalises with ImageNet mean/std, runs BiSeNet and takes argmax of the main head. We do the
resize with PIL on the host, exactly as the reference does (PIL's bilinear downscale is an
antialiased filter on uint8 that jax.image.resize does not reproduce bit for bit), and run
normalise -> BiSeNet -> argmax as one jitted function.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cid_jax.face.bisenet import BiSeNet

# ---------------------------------------------------------------- CelebAMask-HQ labels (BiSeNet's)
BACKGROUND = 0
SKIN = 1
L_BROW = 2
R_BROW = 3
L_EYE = 4
R_EYE = 5
EYE_GLASSES = 6
L_EAR = 7
R_EAR = 8
EAR_RING = 9
NOSE = 10
MOUTH = 11  # inner mouth; the reference ignores it
U_LIP = 12
L_LIP = 13
NECK = 14
NECKLACE = 15
CLOTH = 16
HAIR = 17
HAT = 18

# Index -> CelebAMask-HQ's short name.
LABEL_NAMES = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear",
               "r_ear", "ear_r", "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth",
               "hair", "hat")
NUM_LABELS = len(LABEL_NAMES)

# The names the reference pipeline gives the labels it uses (its `mapping_table`; the entries it
# names wrongly -- 6, 9, 11, 15, 17, 18 -- are never used and are left out here). The region-mask
# step keys its masks by these strings, and the text step matches them against the caption.
REFERENCE_NAMES = {
    SKIN: "Face",
    L_EYE: "Left_Eye",
    R_EYE: "Right_Eye",
    L_EAR: "Left_Ear",
    R_EAR: "Right_Ear",
    NOSE: "Nose",
    U_LIP: "Upper_Lip",
    L_LIP: "Lower_Lip",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_rgb_uint8(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got shape {arr.shape} dtype {arr.dtype}")
    return arr


def resize_like_reference(image_rgb_uint8, size: int) -> np.ndarray:
    """PIL BILINEAR resize to size x size (aspect not kept), as the reference's parsing step."""
    img = Image.fromarray(_as_rgb_uint8(image_rgb_uint8))
    return np.asarray(img.resize((size, size), Image.BILINEAR))


@functools.partial(jax.jit, static_argnames=("model",))
def label_maps(model: BiSeNet, params, images_uint8: jax.Array) -> jax.Array:
    """[N, H, W, 3] uint8 -> [N, H, W] uint8 labels: /255, ImageNet normalise, BiSeNet, argmax."""
    x = images_uint8.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    logits = model.apply({"params": params}, x)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


def parse_face(image_rgb_uint8, model: BiSeNet, params, size: int = 512) -> np.ndarray:
    """Label map of one photo: uint8 [size, size] with values in 0..18 (CelebAMask-HQ order).

    `image_rgb_uint8`: [H, W, 3] uint8 RGB array (or a PIL image), any size; it is resized to
    size x size like the reference (SD1.5: 512; the SDXL reference uses 1280). The map is at that
    square resolution, as the reference's; later steps resize masks back to the photo's size.
    `model, params` as returned by `cid_jax.face.bisenet.load_bisenet`.
    """
    resized = resize_like_reference(image_rgb_uint8, size)
    return np.asarray(label_maps(model, params, jnp.asarray(resized)[None]))[0]


def parse_batch(parser, images, size: int, batch_size: int) -> list[np.ndarray]:
    """BiSeNet label maps [size, size] of several photos, `batch_size` at a time.

    The same steps as `parse_face` (PIL bilinear resize to size x size on the host, then the jitted
    normalise -> BiSeNet -> argmax); the last batch is padded so every call has the same shape and
    compiles once. `parser` is `(model, params)` from `load_bisenet`.
    """
    model, params = parser
    out = []
    for start in range(0, len(images), batch_size):
        chunk = np.stack([resize_like_reference(im, size) for im in images[start:start + batch_size]])
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        out.extend(np.asarray(label_maps(model, params, chunk))[:n])
    return out
