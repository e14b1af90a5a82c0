"""Face-part region masks, the foreground mask and part images from a 19-class parsing label map.

One numpy implementation, used by inference (numpy images) and by the tf.data pipeline (called
through `tf.numpy_function`, see pipeline.py). It follows the reference (spec §6 step 4, §7.2):

* labels are CelebAMask-HQ's (BiSeNet `79999_iter.pth` output): 0 background, 1 skin, 4|5 eyes,
  7|8 ears, 10 nose, 12|13 lips, ... (`CELEBAMASK_LABELS`);
* each label's mask has its holes filled, as `cv2.findContours(RETR_EXTERNAL)` + filled
  `drawContours` does (`fill_holes`: same result, tested against cv2, without needing OpenCV);
* five part *slots* in label order: Face (1), Eye (first present of 4, 5), Ear (first present of
  7, 8), Nose (10), Lip (first present of 12, 13). A part that is absent leaves its slot empty
  (label 0); the reference packs present parts to the front, which `arrange_parts` does once the
  text has said which parts it keeps and in which order (pairing);
* the foreground ("WithoutBackground") mask is NOT(background with holes filled). The reference
  has no such mask when the map has no background pixel and crashes (spec §9.10); here that case
  is "everything is foreground". When filling the background swallows the whole person (a figure
  not touching the image border), the fill has degenerated and the unfilled `label != 0` is used;
* part images are the full frame with everything but the part blacked out (`PIL.Image.composite`
  with the mask resized to the image by PIL's default bicubic when sizes differ, as the
  reference's `fetch_mask_raw_image`); the caller then applies CLIP preprocessing.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from cid_jax.data import clip_preprocess as clip_lib

# CelebAMask-HQ / BiSeNet 19-class label order.
CELEBAMASK_LABELS = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear",
    "ear_r", "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)
NUM_LABELS = len(CELEBAMASK_LABELS)

# The reference's key names for the labels it uses (its `mapping_table`, the correct entries).
PART_NAME_OF_LABEL = {
    1: "Face", 4: "Left_Eye", 5: "Right_Eye", 7: "Left_Ear", 8: "Right_Ear",
    10: "Nose", 12: "Upper_Lip", 13: "Lower_Lip",
}
LABEL_OF_PART_NAME = {v: k for k, v in PART_NAME_OF_LABEL.items()}

# The five slots, in the reference's (ascending label) order; each takes the first present label.
PART_SLOTS = (("Face", (1,)), ("Eye", (4, 5)), ("Ear", (7, 8)), ("Nose", (10,)), ("Lip", (12, 13)))
MAX_PARTS = len(PART_SLOTS)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a binary mask (HxW): what filled external contours give.

    A hole is a background region (4-connected) that does not reach the image border, matching
    OpenCV's contour convention (foreground 8-connected, background 4-connected). Work is limited
    to the mask's bounding box, so small parts (eyes, nose) cost little.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"fill_holes expects an HxW mask, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return mask.copy()
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    # A one-pixel empty frame joins every border-touching background region into one component.
    box = np.pad(mask[r0:r1, c0:c1], 1)
    background, _ = ndimage.label(~box)  # default structure: 4-connectivity
    filled_box = background != background[0, 0]
    out = np.zeros_like(mask)
    out[r0:r1, c0:c1] = filled_box[1:-1, 1:-1]
    return out


def _check_label_map(label_map) -> np.ndarray:
    label_map = np.asarray(label_map)
    if label_map.ndim == 3 and label_map.shape[-1] == 1:
        label_map = label_map[..., 0]
    if label_map.ndim != 2:
        raise ValueError(f"expected an HxW parsing label map, got shape {label_map.shape}")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise TypeError(f"parsing label map must be integer, got {label_map.dtype}")
    return label_map


def part_slot_labels(label_map) -> np.ndarray:
    """int32 [5]: the label each slot (Face, Eye, Ear, Nose, Lip) takes, 0 where the part is absent."""
    label_map = _check_label_map(label_map)
    present = np.bincount(label_map.ravel(), minlength=256) > 0  # O(HW), unlike np.unique's sort
    out = np.zeros(MAX_PARTS, np.int32)
    for k, (_, labels) in enumerate(PART_SLOTS):
        for lab in labels:
            if present[lab]:
                out[k] = lab
                break
    return out


def part_names(slot_labels: Sequence[int]) -> list[str]:
    """Present slots -> the reference's key names, in slot order (e.g. ['Face', 'Left_Eye', ...])."""
    return [PART_NAME_OF_LABEL[int(lab)] for lab in slot_labels if int(lab) != 0]


def region_masks(label_map) -> tuple[np.ndarray, np.ndarray]:
    """(masks bool [5, H, W] hole-filled, slot_labels int32 [5]); empty slots give all-False masks."""
    label_map = _check_label_map(label_map)
    slot_labels = part_slot_labels(label_map)
    masks = np.zeros((MAX_PARTS,) + label_map.shape, bool)
    for k, lab in enumerate(slot_labels):
        if lab:
            masks[k] = fill_holes(label_map == lab)
    return masks, slot_labels


def foreground_mask(label_map) -> np.ndarray:
    """bool [H, W]: the reference's "WithoutBackground" = NOT(filled background), made total.

    No background pixel -> all True (the reference raises KeyError there). If filling the
    background covers every non-background pixel (a figure enclosed by background), the
    reference's mask would be empty; `label_map != 0` is returned instead.
    """
    label_map = _check_label_map(label_map)
    background = label_map == 0
    if not background.any():
        return np.ones(label_map.shape, bool)
    fg = ~fill_holes(background)
    if not fg.any():
        return ~background
    return fg


def part_images(image, masks: np.ndarray) -> np.ndarray:
    """uint8 [K, H, W, 3]: image kept where each mask is on, black elsewhere (full frame).

    `masks` is [K, h, w], bool or uint8 0/255. Masks of another size than the image are resized to
    it with PIL bicubic on the 0/255 'L' image and then used as a soft alpha, as the reference does
    (`Image.composite`); same-size binary masks reduce to an exact select.
    """
    rgb = clip_lib.to_rgb_uint8(image)
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [K, h, w], got shape {masks.shape}")
    h, w = rgb.shape[:2]
    if masks.shape[1:] == (h, w):
        out = np.zeros((masks.shape[0], h, w, 3), np.uint8)
        for k, m in enumerate(masks.astype(bool, copy=False)):
            rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            if rows.size:  # only the mask's bounding box can be non-zero
                r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
                box = m[r0:r1, c0:c1, None]
                out[k, r0:r1, c0:c1] = np.where(box, rgb[r0:r1, c0:c1], np.uint8(0))
        return out
    pil = Image.fromarray(rgb)
    black = Image.new("RGB", pil.size, (0, 0, 0))
    out = []
    for m in masks:
        m8 = (m.astype(bool).astype(np.uint8) * 255) if m.dtype == bool else m.astype(np.uint8)
        alpha = Image.fromarray(m8, "L").resize(pil.size, Image.Resampling.BICUBIC)
        out.append(np.asarray(Image.composite(pil, black, alpha)))
    return np.stack(out)


class FaceInputs(NamedTuple):
    """What the model needs from one reference photo and its parsing map (numpy, NHWC)."""

    clip_image: np.ndarray        # float32 [224, 224, 3] CLIP-preprocessed whole image
    part_clip_images: np.ndarray  # float32 [5, 224, 224, 3] per slot; zeros for empty slots
    slot_labels: np.ndarray       # int32 [5] label per slot (Face, Eye, Ear, Nose, Lip), 0 = absent
    part_masks: np.ndarray        # bool [5, h, w] hole-filled region masks at the label map's size
    foreground: np.ndarray        # bool [h, w] "WithoutBackground"

    @property
    def part_names(self) -> list[str]:
        """The present parts' reference names, in slot order (the input of the caption rewrite)."""
        return part_names(self.slot_labels)

    def arranged(self, ordered_part_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(part_clip_images [5, 224, 224, 3], part_masks [5, h, w]) packed in the given part order.

        `ordered_part_names`: `pair_parts_to_words(kept_part_names, pairing, marked_text)`.
        """
        order = part_order(ordered_part_names)
        return arrange_parts(self.part_clip_images, order), arrange_parts(self.part_masks, order)


def face_inputs(image, label_map) -> FaceInputs:
    """Region masks, part images and CLIP inputs for one image: the single shared implementation.

    Empty slots get an all-zero CLIP tensor (the reference pads with zeros *after* normalisation,
    not with a black image). The slots are in label order; `arrange_parts` reorders/packs them.
    """
    rgb = clip_lib.to_rgb_uint8(image)
    masks, slot_labels = region_masks(label_map)
    fg = foreground_mask(label_map)
    parts = np.zeros((MAX_PARTS, clip_lib.CLIP_SIZE, clip_lib.CLIP_SIZE, 3), np.float32)
    present = np.flatnonzero(slot_labels)
    if present.size:
        composites = part_images(rgb, masks[present])
        parts[present] = clip_lib.clip_preprocess_batch(list(composites))
    return FaceInputs(clip_lib.clip_preprocess(rgb), parts, slot_labels, masks, fg)


def slot_of_part_name(name: str) -> int:
    """'Left_Eye' -> 1 (the Eye slot)."""
    lab = LABEL_OF_PART_NAME.get(name)
    if lab is None:
        raise KeyError(f"unknown part name {name!r}; known: {sorted(LABEL_OF_PART_NAME)}")
    for k, (_, labels) in enumerate(PART_SLOTS):
        if lab in labels:
            return k
    raise AssertionError(name)


def part_order(ordered_part_names: Sequence[str], max_parts: int = MAX_PARTS) -> np.ndarray:
    """int32 [max_parts]: the slot feeding each facial-token position, -1 for padding.

    `ordered_part_names` is the list of kept parts in the order their images pair with the facial
    words (what `cid_jax.text.facial_prompts.pair_parts_to_words` returns).
    """
    order = np.full(max_parts, -1, np.int32)
    for i, name in enumerate(list(ordered_part_names)[:max_parts]):
        order[i] = slot_of_part_name(name)
    return order


def arrange_parts(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """values[order] along axis 0, zeros where order == -1 (packs and reorders slot-major arrays)."""
    values = np.asarray(values)
    order = np.asarray(order)
    out = np.zeros((order.shape[0],) + values.shape[1:], values.dtype)
    valid = order >= 0
    out[valid] = values[order[valid]]
    return out
