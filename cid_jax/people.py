"""Several people in one image, each keeping their own identity (training-free).

The reference conditions one identity per image. Here each person brings a photo and a region of
the output (a box, or a grey level of a layout picture), and the prompt carries one facial caption
per person ("<prompt>Detail:The person has one face <|facial|>, ... The person has one face
<|facial|>, ..."): person k's facial words are the k-th group of facial tokens. Every
cross-attention of the UNet then runs once per person on that person's context -- their facial
words fused with their own part images by the FacialEncoder, everyone else's words left as text --
plus their 4 ID tokens, and once on the plain text with no ID, and mixes the results pixel by pixel
with the people's region weights at that attention's resolution (`models.adapters.Regions`):
inside person k's region only person k's photo acts; outside every region the text alone
conditions, as a prompt without an ID. The merge step switches every person's facial words at
once; classifier-free guidance runs the same mixing on the unconditional side (each person's
facial positions on the negative prompt, as the reference does for one).

Departures from the paper (which describes one identity per image): the regional mixing is ours,
as is captioning each person with the same template; regions must not overlap (a pixel belongs to
at most one person; soft edges come from averaging a region down to each UNet resolution).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from cid_jax import errors
from cid_jax.data import masks as masks_lib
from cid_jax.text import facial_prompts as fp


def group_texts(prompt: str, negative_prompt: str, tokenizer, part_names: Sequence[Sequence[str]],
                caption: Optional[str] = None, pairing: str = "reference") -> list:
    """One `sampling.TextBatch` per person over one shared token sequence: the prompt followed by
    each person's marked caption; person k's batch flags only the k-th group of facial tokens and
    orders person k's parts to them."""
    from cid_jax import sampling as pl

    caption = caption or fp.DEFAULT_CAPTION_SD15
    marked = [fp.process_text_with_markers(caption, names) for names in part_names]
    prompt_face = prompt + "Detail:" + " ".join(m for m, _ in marked)
    counts = [m.count(fp.FACIAL_TOKEN) for m, _ in marked]
    tokens = fp.tokenize_facial_prompt(tokenizer, prompt_face, max_facials=max(1, sum(counts)))
    positions = np.flatnonzero(tokens.facial_token_mask)
    if len(positions) < sum(counts):
        raise errors.InputError(
            f"the prompt with {len(part_names)} people's facial captions is longer than the text encoder's 77 "
            f"tokens, so {sum(counts) - len(positions)} facial word(s) would be cut: shorten --prompt or --caption")
    rows = tokenizer([prompt_face.replace(fp.FACIAL_TOKEN, ""), negative_prompt or ""], max_length=77,
                     padding="max_length", truncation=True)
    texts, first = [], 0
    for (words, kept), n in zip(marked, counts):
        mask = np.zeros_like(tokens.facial_token_mask)
        mask[positions[first:first + n]] = True
        first += n
        ordered = fp.pair_parts_to_words(kept, pairing, words) if n else []
        texts.append(pl.TextBatch(tokens.input_ids, np.asarray(rows[0], np.int32), np.asarray(rows[1], np.int32),
                                  mask, np.arange(len(fp.FACIAL_WORDS)) < n,
                                  masks_lib.part_order(ordered), prompt_face))
    return texts


def parse_box(text: str, height: int, width: int, flag: str = "--region") -> tuple[int, int, int, int]:
    """'x0,y0,x1,y1' (pixels of the output image, x1/y1 exclusive) -> a box inside the image."""
    try:
        x0, y0, x1, y1 = (int(round(float(v))) for v in text.split(","))
    except ValueError:
        raise errors.InputError(f"{flag}={text}: give x0,y0,x1,y1 in pixels of the output image") from None
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise errors.InputError(f"{flag}={text} is not a box inside the {width}x{height} image "
                                "(need 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height)")
    return x0, y0, x1, y1


def box_masks(boxes: Sequence[tuple[int, int, int, int]], height: int, width: int) -> np.ndarray:
    """Boxes -> [P, height, width] masks in {0, 1}."""
    masks = np.zeros((len(boxes), height, width), np.float32)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = 1.0
    return masks


def layout_masks(picture: np.ndarray, count: int, height: int, width: int, flag: str = "--layout") -> np.ndarray:
    """A layout picture (black = nobody, one grey level per person, darkest first) -> [P, height,
    width] masks in {0, 1}; resized to the output by nearest neighbour."""
    from PIL import Image

    grey = Image.fromarray(np.asarray(picture).astype(np.uint8)).convert("L")
    if grey.size != (width, height):
        grey = grey.resize((width, height), Image.NEAREST)
    grey = np.asarray(grey)
    levels = [int(v) for v in np.unique(grey) if v > 0]
    if len(levels) != count:
        raise errors.InputError(f"{flag} has {len(levels)} grey level(s) besides black ({levels}) for {count} "
                                "photo(s): give one level per person, darkest for the first --image")
    return np.stack([(grey == v).astype(np.float32) for v in levels])


def check_masks(masks: np.ndarray, flag: str = "--region") -> None:
    """Regions must be non-empty and must not overlap (a pixel belongs to at most one person)."""
    for k, m in enumerate(masks):
        if not m.any():
            raise errors.InputError(f"{flag}: the region of person {k + 1} is empty")
    shared = masks.sum(0) > 1
    if shared.any():
        pairs = [f"{a + 1} and {b + 1}" for a in range(len(masks)) for b in range(a + 1, len(masks))
                 if (masks[a] * masks[b]).any()]
        raise errors.InputError(f"{flag}: the regions of persons {', '.join(pairs)} overlap ({int(shared.sum())} "
                                "pixels); each pixel belongs to at most one person")


def latent_masks(masks: np.ndarray, factor: int) -> np.ndarray:
    """[P, H, W] pixel masks -> [P, H / factor, W / factor] region weights at the latents' resolution
    (the mean over each latent pixel's footprint: soft edges)."""
    p, h, w = masks.shape
    return masks.reshape(p, h // factor, factor, w // factor, factor).mean((2, 4)).astype(np.float32)


def side_by_side(count: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """`count` boxes side by side across the image, full height, an eighth of a column apart from
    each other's edges (so the soft edges at the coarse UNet levels do not touch)."""
    column = width / count
    margin = int(column / 16)
    return [(int(round(k * column)) + margin * (k > 0), 0, int(round((k + 1) * column)) - margin * (k < count - 1),
             height) for k in range(count)]


def group_inputs(faces: Sequence, texts: Sequence, region_masks: np.ndarray, batch: int) -> dict:
    """The Generator's inputs for `batch` images of the same people: person_k (person k's model
    inputs) and region_masks [batch, P, h, w]."""
    from cid_jax import sampling as pl

    if len(faces) != len(texts) or len(faces) != len(region_masks):
        raise errors.InputError(f"{len(faces)} photo(s), {len(texts)} caption(s) and {len(region_masks)} "
                                "region(s): give one region per photo")
    inputs = {f"person_{k}": pl.model_inputs([face] * batch, [text] * batch)
              for k, (face, text) in enumerate(zip(faces, texts))}
    inputs["region_masks"] = np.repeat(np.asarray(region_masks, np.float32)[None], batch, axis=0)
    return inputs
