"""Synthetic FGID: procedurally drawn portraits with exact parsing maps, captions and identities.

Every sample is a function of (seed, index) only: no download, no model. A portrait is drawn as
polygons into a 19-class CelebAMask-HQ label map (painter's order: background, back hair, clothes,
neck, ears, face, hair fringe, hat, brows, eyes, nose, lips), then coloured (identity-specific skin,
hair, eyes and lips; per-sample background and clothes; lighting gradient, noise, a slight blur).
Pose (roll, yaw, size, position), a hidden ear or eye, an open mouth, the hair style and a hat vary
per sample. Each identity has a fixed random unit 512-d "ArcFace" embedding and fixed traits.

The generator also returns the truth the tests need: the expected hole-filled region mask of each
of the five part slots (drawn on separate canvases, where the features inside the face are holes
to be filled and anything drawn over a part later is an occluder) and the foreground.

A pure generator (numpy/PIL). The dataset is written by the builder (see README.md):
    python -m cid_jax.data.builder synthetic --out=DIR --num=N [--seed=0 --size=512 --identities=...]
(`python -m cid_jax.data.synthetic ...` is the same command.)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from cid_jax.data import masks as masks_lib

EMBED_DIM = 512
# Labels (CelebAMask-HQ order, see masks.CELEBAMASK_LABELS).
BG, SKIN, L_BROW, R_BROW, L_EYE, R_EYE, EYE_G, L_EAR, R_EAR, EAR_R, NOSE, MOUTH, U_LIP, L_LIP, \
    NECK, NECK_L, CLOTH, HAIR, HAT = range(19)
# Features inside the face: holes of the skin mask, which the face's region mask must fill.
_FACE_INTERIOR = frozenset({L_BROW, R_BROW, L_EYE, R_EYE, NOSE, MOUTH, U_LIP, L_LIP})

_SKIN_TONES = [("fair", (236, 200, 176)), ("light", (224, 182, 150)), ("olive", (198, 156, 116)),
               ("tan", (176, 128, 92)), ("brown", (140, 96, 66)), ("dark", (96, 64, 46))]
_HAIR = [("black", (28, 24, 22)), ("dark brown", (70, 46, 30)), ("brown", (112, 76, 46)),
         ("blond", (210, 176, 110)), ("red", (150, 64, 34)), ("gray", (150, 150, 150))]
_EYES = [("brown", (92, 60, 36)), ("blue", (70, 110, 170)), ("green", (70, 120, 80)),
         ("hazel", (120, 96, 54)), ("gray", (120, 128, 136))]
_LIPS = [("pink", (200, 110, 120)), ("red", (176, 64, 72)), ("pale", (206, 150, 140)),
         ("dark", (130, 70, 70))]
_CLOTHES = [("blue", (40, 70, 150)), ("red", (160, 40, 40)), ("white", (230, 230, 230)),
            ("black", (30, 30, 34)), ("green", (50, 120, 60)), ("yellow", (210, 180, 60)),
            ("gray", (110, 110, 116))]
_GARMENTS = ["shirt", "sweater", "jacket", "t-shirt", "dress", "hoodie"]
_BACKGROUNDS = [("a plain light wall", (200, 200, 196)), ("a blue sky", (120, 170, 220)),
                ("a green park", (90, 140, 80)), ("a dark studio backdrop", (40, 40, 48)),
                ("a beige room", (210, 190, 160))]
_FACE_SHAPES = ["oval", "round", "square", "heart-shaped", "long"]
_AGES = ["young", "middle-aged", "elderly"]


class Identity(NamedTuple):
    index: int
    gender: str          # "man" | "woman"
    age: str
    skin: tuple[str, tuple]
    hair: tuple[str, tuple]
    eyes: tuple[str, tuple]
    lips: tuple[str, tuple]
    face_shape: str
    aspect: float        # face half-height / half-width
    jaw: float           # chin narrowing
    eye_size: float
    nose_size: float
    mouth_width: float
    ear_size: float
    long_hair: bool
    bald: bool
    embedding: np.ndarray  # float32 [512], unit norm


class SyntheticFace(NamedTuple):
    image: np.ndarray        # uint8 [S, S, 3]
    parsing: np.ndarray      # uint8 [S, S] CelebAMask-HQ labels
    vqa_llva: str
    vqa_llva_more_face_detail: str
    id_embedding: np.ndarray  # float32 [512] (zeros when has_id_embedding is False)
    has_id_embedding: bool
    identity: str
    source_id: str
    # Truth for tests:
    slot_labels: np.ndarray   # int32 [5] the label each slot must take (0: absent)
    part_masks: np.ndarray    # bool [5, S, S] expected hole-filled region masks per slot
    foreground: np.ndarray    # bool [S, S] expected "WithoutBackground"
    mentions_ears: bool       # whether the detail caption names the ears


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def make_identity(seed: int, index: int) -> Identity:
    """The fixed traits and embedding of synthetic identity `index` (a function of (seed, index))."""
    r = _rng(seed, 0x1D, index)
    emb = r.standard_normal(EMBED_DIM).astype(np.float32)
    emb /= np.linalg.norm(emb)
    pick = lambda seq: seq[int(r.integers(len(seq)))]  # noqa: E731
    return Identity(
        index=index, gender=pick(["man", "woman"]), age=pick(_AGES), skin=pick(_SKIN_TONES),
        hair=pick(_HAIR), eyes=pick(_EYES), lips=pick(_LIPS), face_shape=pick(_FACE_SHAPES),
        aspect=float(r.uniform(1.15, 1.45)), jaw=float(r.uniform(0.0, 0.3)),
        eye_size=float(r.uniform(0.8, 1.2)), nose_size=float(r.uniform(0.8, 1.2)),
        mouth_width=float(r.uniform(0.8, 1.2)), ear_size=float(r.uniform(0.8, 1.2)),
        long_hair=bool(r.random() < 0.5), bald=bool(r.random() < 0.1), embedding=emb)


# ------------------------------------------------------------------------------------ geometry


def _ellipse(cu, cv, ru, rv, t0=0.0, t1=2 * math.pi, n=48):
    t = np.linspace(t0, t1, n, endpoint=(t1 - t0) < 2 * math.pi - 1e-9)
    return np.stack([cu + ru * np.cos(t), cv + rv * np.sin(t)], -1)


class _Canvas:
    """Draws polygons (in face coordinates) into the label map and the per-slot truth canvases."""

    def __init__(self, size, cx, cy, a, b, roll):
        self.size = size
        self.cx, self.cy, self.a, self.b = cx, cy, a, b
        self.c, self.s = math.cos(roll), math.sin(roll)
        self.labels = Image.new("L", (size, size), BG)
        self.draw = ImageDraw.Draw(self.labels)
        self.truth: dict[int, tuple[Image.Image, ImageDraw.ImageDraw]] = {}

    def to_image(self, pts):
        """face coords (u right, v down, in units of the half-width a / half-height b) -> pixels."""
        x, y = pts[:, 0] * self.a, pts[:, 1] * self.b
        return np.stack([self.cx + self.c * x - self.s * y, self.cy + self.s * x + self.c * y], -1)

    def polygon(self, label, pts, image_space=False, track=False):
        xy = [tuple(p) for p in (pts if image_space else self.to_image(pts)).tolist()]
        self.draw.polygon(xy, fill=label)
        for owner, (_, d) in self.truth.items():
            inside = owner == SKIN and label in _FACE_INTERIOR
            if label != owner and not inside:
                d.polygon(xy, fill=0)   # drawn over: occludes the owner's region
        if track:
            if label not in self.truth:
                im = Image.new("L", (self.size, self.size), 0)
                self.truth[label] = (im, ImageDraw.Draw(im))
            self.truth[label][1].polygon(xy, fill=1)

    def truth_mask(self, label):
        return np.asarray(self.truth[label][0], bool) if label in self.truth else None


def _draw_portrait(ident: Identity, r: np.random.Generator, size: int):
    """Draws the label map; returns (canvas, pose dict)."""
    a = size * r.uniform(0.16, 0.24)                        # face half-width in pixels
    b = a * ident.aspect
    cx = size * 0.5 + size * r.uniform(-0.08, 0.08)
    cy = size * 0.45 + size * r.uniform(-0.05, 0.05)
    roll = r.uniform(-0.25, 0.25)
    yaw = r.uniform(-0.6, 0.6)
    cv = _Canvas(size, cx, cy, a, b, roll)
    s = 0.3 * yaw                                          # horizontal shift of the features
    # Which features are visible: a strong turn hides the far ear; hair may hide the left eye.
    hide_ear = (L_EAR if yaw > 0.35 else R_EAR) if abs(yaw) > 0.35 else None
    hide_left_eye = bool(r.random() < 0.12) and not ident.bald
    lower_lip_only = bool(r.random() < 0.08)
    mouth_open = bool(r.random() < 0.3)
    hat = bool(r.random() < 0.15)

    if ident.long_hair and not ident.bald:                  # hair behind the head, to the shoulders
        cv.polygon(HAIR, _ellipse(0.0, 0.35, 1.45, 1.55))
    # Clothes and neck in image space so they always reach the bottom border (the figure touches it).
    shoulder_y = cy + 1.55 * b
    w_sh = size * r.uniform(0.32, 0.45)
    cv.polygon(CLOTH, np.array([[cx - w_sh * 0.6, shoulder_y], [cx + w_sh * 0.6, shoulder_y],
                                [cx + w_sh * 1.3, size + 2], [cx - w_sh * 1.3, size + 2]]), image_space=True)
    neck = np.array([[-0.42, 0.5], [0.42, 0.5], [0.46, 1.0], [-0.46, 1.0]])
    neck_img = cv.to_image(neck)
    neck_img = np.concatenate([neck_img, [[cx + 0.46 * a, shoulder_y + 4], [cx - 0.46 * a, shoulder_y + 4]]])
    cv.polygon(NECK, neck_img[[0, 1, 4, 5]], image_space=True)
    # Ears (person's left ear = label 7 on the image right), partly under the face.
    for lab, side in ((L_EAR, 1.0), (R_EAR, -1.0)):
        if lab == hide_ear:
            continue
        far = (side > 0) == (yaw > 0)
        eu = side * (0.98 - (0.12 if far else -0.04) * abs(yaw)) - 0.1 * yaw
        cv.polygon(lab, _ellipse(eu, 0.05, 0.2 * ident.ear_size, 0.28 * ident.ear_size), track=True)
    # Face outline: an ellipse whose lower half narrows towards the chin.
    t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    narrow = 1.0 - ident.jaw * np.clip(np.sin(t), 0, None) ** 2
    cv.polygon(SKIN, np.stack([np.cos(t) * narrow, np.sin(t)], -1), track=True)
    # Hair fringe over the top of the face (its lower edge, the hairline, stays above the brows).
    if not ident.bald:
        hairline = r.uniform(-0.72, -0.55)
        # The part of an ellipse above the hairline (a convex cap: no slivers that would only touch
        # the rest of the figure diagonally).
        cu, cvv, ru, rv = 0.0, -0.25, 1.15, 1.0
        t_end = math.asin((hairline - cvv) / rv)  # in (-pi/2, 0): where the ellipse meets the hairline
        cap = _ellipse(cu, cvv, ru, rv, math.pi - t_end, 2 * math.pi + t_end, 48)
        cv.polygon(HAIR, cap)
        if hat:
            cv.polygon(HAT, np.concatenate([_ellipse(0.0, -0.95, 1.0, 0.55, math.pi, 2 * math.pi, 32),
                                            [[1.25, -0.8], [-1.25, -0.8]]]))
    # Brows, eyes, nose, lips: all well inside the face outline.
    eye_v, brow_v = -0.12, -0.34
    for lab, brow, side in ((L_EYE, L_BROW, 1.0), (R_EYE, R_BROW, -1.0)):
        far = (side > 0) == (yaw > 0)
        squeeze = 1.0 - (0.45 if far else 0.0) * abs(yaw)
        eu = s + side * 0.38 * (1.0 - 0.3 * abs(yaw) * (1 if far else -0.5))
        cv.polygon(brow, _ellipse(eu, brow_v, 0.2 * squeeze, 0.04, math.pi, 2 * math.pi, 16)
                   + np.array([0.0, 0.02]))
        if lab == L_EYE and hide_left_eye:
            continue
        cv.polygon(lab, _ellipse(eu, eye_v, 0.15 * ident.eye_size * squeeze, 0.07 * ident.eye_size),
                   track=True)
    ns = ident.nose_size
    nose = np.array([[s + 0.02, -0.06], [s + 0.1 * ns, 0.22 * ns], [s + 0.13 * ns, 0.3 * ns],
                     [s, 0.34 * ns], [s - 0.13 * ns, 0.3 * ns], [s - 0.1 * ns, 0.22 * ns], [s - 0.02, -0.06]])
    cv.polygon(NOSE, nose, track=True)
    mw, mv = 0.27 * ident.mouth_width, 0.6
    gap = 0.035 if mouth_open else 0.0
    if not lower_lip_only:
        cv.polygon(U_LIP, _ellipse(s, mv - gap, mw, 0.07, math.pi, 2 * math.pi, 24), track=True)
    if mouth_open:
        cv.polygon(MOUTH, _ellipse(s, mv, mw * 0.85, gap + 1e-3, 0, 2 * math.pi, 24))
    cv.polygon(L_LIP, _ellipse(s, mv + gap, mw * 0.95, 0.09, 0.0, math.pi, 24), track=True)
    pose = dict(yaw=yaw, roll=roll, hide_ear=hide_ear, hide_left_eye=hide_left_eye, hat=hat,
                mouth_open=mouth_open)
    return cv, pose


def _colour(labels: np.ndarray, ident: Identity, r: np.random.Generator, eye_centres) -> np.ndarray:
    size = labels.shape[0]
    palette = np.zeros((256, 3), np.float32)
    skin = np.array(ident.skin[1], np.float32)
    bg = np.array(_BACKGROUNDS[int(r.integers(len(_BACKGROUNDS)))][1], np.float32) * r.uniform(0.85, 1.1)
    palette[BG] = bg
    for lab in (SKIN, NECK, NECK_L, L_EAR, R_EAR, NOSE):
        palette[lab] = skin
    palette[NECK] = skin * 0.9
    palette[NOSE] = skin * 0.95
    palette[[L_EAR, R_EAR]] = skin * 0.92
    palette[[L_BROW, R_BROW]] = np.array(ident.hair[1], np.float32) * 0.8
    palette[[L_EYE, R_EYE]] = (240, 240, 236)
    palette[[U_LIP, L_LIP]] = ident.lips[1]
    palette[MOUTH] = (60, 20, 24)
    palette[HAIR] = ident.hair[1]
    palette[HAT] = np.array(_CLOTHES[int(r.integers(len(_CLOTHES)))][1], np.float32)
    palette[CLOTH] = np.array(_CLOTHES[int(r.integers(len(_CLOTHES)))][1], np.float32)
    img = np.take(palette, labels, axis=0)
    # Lighting: a linear gradient from a random direction, plus mild pixel noise.
    ramp = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ang = r.uniform(0, 2 * math.pi)
    light = 1.0 + 0.25 * (np.sin(ang) * ramp[:, None] + np.cos(ang) * ramp[None, :])
    img *= light[..., None]
    img += r.integers(-8, 9, size=img.shape, dtype=np.int8)
    # Irises and pupils (image only: the label map keeps the whole eye as "eye").
    iris = np.array(ident.eyes[1], np.float32)
    for (ex, ey, rad, lab) in eye_centres:
        y0, y1 = max(0, int(ey - rad) - 1), min(size, int(ey + rad) + 2)
        x0, x1 = max(0, int(ex - rad) - 1), min(size, int(ex + rad) + 2)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d2 = (xx - ex) ** 2 + (yy - ey) ** 2
        on_eye = labels[y0:y1, x0:x1] == lab
        win = img[y0:y1, x0:x1]
        win[(d2 < rad ** 2) & on_eye] = iris
        win[(d2 < (0.45 * rad) ** 2) & on_eye] = (10, 10, 12)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(pil.filter(ImageFilter.BoxBlur(radius=max(0.5, size / 512))))


def _captions(ident: Identity, r: np.random.Generator, pose: dict, bg_desc: str, cloth: str):
    he, his = ("He", "His") if ident.gender == "man" else ("She", "Her")
    hair_len = "bald head" if ident.bald else (("long " if ident.long_hair else "short ") + ident.hair[0] + " hair")
    with_hair = f"with a {hair_len}" if ident.bald else f"with {hair_len}"
    look = "to the side" if abs(pose["yaw"]) > 0.35 else "at the camera"
    mood = ["calm", "happy", "serious", "relaxed", "thoughtful"][int(r.integers(5))]
    hat = f" {he} is wearing a hat." if pose["hat"] else ""
    llva = (f"The image features a {ident.age} {ident.gender} {with_hair}, wearing a {cloth}. "
            f"{he} is looking {look} and appears {mood}.{hat} The background shows {bg_desc}.")
    sentences = [f"The {ident.gender} has an {ident.face_shape} face with {ident.skin[0]} skin."
                 if ident.face_shape[0] in "aeiou" else
                 f"The {ident.gender} has a {ident.face_shape} face with {ident.skin[0]} skin."]
    mentions_ears = bool(r.random() < 0.85)
    if mentions_ears:
        ear = "one ear is hidden" if pose["hide_ear"] else "both ears are visible"
        sentences.append(f"{his} ears are {'large' if ident.ear_size > 1.05 else 'small'} and {ear}.")
    eye_shape = ["almond-shaped", "round", "narrow", "wide-set"][int(r.integers(4))]
    sentences.append(f"{his} eyes are {ident.eyes[0]} and {eye_shape}.")
    nose = ["straight", "small", "broad", "slightly upturned"][int(r.integers(4))]
    sentences.append(f"{he} has a {nose} nose, and {his.lower()} mouth is "
                     f"{'slightly open' if pose['mouth_open'] else 'closed'} with {ident.lips[0]} lips.")
    return llva, " ".join(sentences), mentions_ears


def _drop_strays(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sets to background the figure pixels not 4-connected to the image border.

    Rasterised acute polygon corners can leave pixels that touch the figure only diagonally; the
    reference's background fill turns those into background. Removing them here keeps the truth
    simple: the foreground is exactly `labels != 0`. Returns (labels, removed-pixel mask).
    """
    comp, _ = ndimage.label(np.pad(labels != BG, 1, constant_values=True))
    stray = (comp != comp[0, 0])[1:-1, 1:-1] & (labels != BG)
    if stray.any():
        labels = np.where(stray, np.uint8(BG), labels)
    return labels, stray


def render_sample(seed: int, index: int, size: int = 512, num_identities: int = 16,
                  missing_embedding_prob: float = 0.0) -> SyntheticFace:
    """Sample `index` of the synthetic dataset `seed`: a pure function of its arguments."""
    if size < 64:
        raise ValueError(f"size must be >= 64, got {size}")
    r = _rng(seed, 0x5A, index)
    ident = make_identity(seed, int(r.integers(num_identities)))
    cv, pose = _draw_portrait(ident, r, size)
    labels, stray = _drop_strays(np.asarray(cv.labels, np.uint8))
    bg_name, _ = _BACKGROUNDS[int(r.integers(len(_BACKGROUNDS)))]
    cloth_c, _ = _CLOTHES[int(r.integers(len(_CLOTHES)))]
    cloth = f"{cloth_c} {_GARMENTS[int(r.integers(len(_GARMENTS)))]}"
    eye_centres = []
    for lab in (L_EYE, R_EYE):
        ys, xs = np.nonzero(labels == lab)
        if len(xs):
            eye_centres.append((xs.mean(), ys.mean(), 0.55 * (ys.max() - ys.min() + 1), lab))
    image = _colour(labels, ident, r, eye_centres)
    llva, detail, mentions_ears = _captions(ident, r, pose, bg_name, cloth)
    has_emb = bool(r.random() >= missing_embedding_prob)

    slot_labels = np.zeros(masks_lib.MAX_PARTS, np.int32)
    part_masks = np.zeros((masks_lib.MAX_PARTS, size, size), bool)
    for k, (_, labs) in enumerate(masks_lib.PART_SLOTS):
        for lab in labs:
            m = cv.truth_mask(lab)
            if m is not None:
                m &= ~stray
            if m is not None and m.any():
                slot_labels[k], part_masks[k] = lab, m
                break
    return SyntheticFace(
        image=image, parsing=labels, vqa_llva=llva, vqa_llva_more_face_detail=detail,
        id_embedding=ident.embedding if has_emb else np.zeros(EMBED_DIM, np.float32),
        has_id_embedding=has_emb, identity=f"synthetic-{seed}-{ident.index:05d}",
        source_id=f"synthetic-{seed}-{index:07d}", slot_labels=slot_labels, part_masks=part_masks,
        foreground=labels != BG, mentions_ears=mentions_ears)


def record_of(face: SyntheticFace) -> dict:
    """The builder-facing record (the fields of features.py) of a synthetic sample."""
    return dict(image=face.image, parsing=face.parsing, vqa_llva=face.vqa_llva,
                vqa_llva_more_face_detail=face.vqa_llva_more_face_detail,
                id_embedding=face.id_embedding, has_id_embedding=face.has_id_embedding,
                identity=face.identity, source_id=face.source_id)
