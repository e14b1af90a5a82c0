"""Which facial parts a photo contributes, and to which facial word: one decision
(`cid_jax.data.masks.part_names`) for training and inference.

The judge is a rendering of the reference pipelines' `get_prepare_facemask` written here from the
spec (§6 step 4), independently of cid_jax: the labels found in the parsing map in ascending order,
those of `key_list`, and of each left/right (upper/lower) pair only the first one found. A photo
whose left ear is hidden by hair therefore still gives an ears word and an ear crop (Right_Ear).
"""
import numpy as np
import pytest

from cid_jax import sampling as pl
from cid_jax.data import masks as masks_lib
from cid_jax.data import sample as sample_lib
from tests.helpers import PARTS_CASES as CASES, parts_label_map as label_map

# The reference's names of the labels it uses (spec §6: mapping_table, the correct entries).
_NAMES = {1: "Face", 4: "Left_Eye", 5: "Right_Eye", 7: "Left_Ear", 8: "Right_Ear", 10: "Nose",
          12: "Upper_Lip", 13: "Lower_Lip"}
_KEY_LIST = ["Face", "Left_Ear", "Right_Ear", "Left_Eye", "Right_Eye", "Nose", "Upper_Lip", "Lower_Lip"]
_WORD = {"Face": "face", "Ear": "ears", "Eye": "eyes", "Nose": "nose", "Lip": "mouth"}


def reference_parts(label_map) -> list[str]:
    """The reference's `key_parsing_mask_list` keys, in its (ascending label) order."""
    keys, processed = [], set()
    for lab in sorted(int(v) for v in np.unique(label_map)):
        key = _NAMES.get(lab)
        if key not in _KEY_LIST:
            continue
        if "_" in key:
            suffix = key.split("_")[1]
            if suffix in processed:
                continue
            processed.add(suffix)
        keys.append(key)
    return keys


@pytest.fixture(scope="module")
def tokenizer():
    return sample_lib.default_tokenizer()


@pytest.fixture(scope="module")
def photo():
    return np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_and_inference_take_the_reference_parts(case, photo):
    lm = label_map(CASES[case])
    expected = reference_parts(lm)
    face = pl.face_batch(photo, lm)
    assert face.part_names == expected                                   # inference
    inputs = masks_lib.face_inputs(photo, lm)
    assert masks_lib.part_names(inputs.slot_labels) == expected          # training (pipeline.py)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("pairing", ["reference", "by_name"])
def test_inference_prompt_has_a_word_and_a_crop_for_every_part(case, pairing, photo, tokenizer):
    """Every part the reference keeps has its word marked in the default caption, and the k-th
    facial token gets the crop that the pairing mode assigns it (reference: the k-th part in label
    order; by_name: the part named by the word)."""
    lm = label_map(CASES[case])
    parts = reference_parts(lm)
    face = pl.face_batch(photo, lm)
    text = pl.text_batch("a photo", "", tokenizer, face.part_names, pairing=pairing)
    idx = np.flatnonzero(text.facial_token_mask)
    words = [tokenizer.decode([int(text.input_ids[i])]) for i in idx]
    expected_words = [w for w in ("face", "ears", "eyes", "nose", "mouth")
                      if any(_WORD[p.split("_")[-1] if "_" in p else p] == w for p in parts)]
    assert words == expected_words
    arranged = pl.model_inputs([face], [text])["part_clip_images"][0]
    by_label = parts                                          # already in ascending label order
    if pairing == "reference":
        crops = by_label
    else:
        crops = [next(p for p in by_label if _WORD[p.split("_")[-1] if "_" in p else p] == w)
                 for w in expected_words]
    for k, part in enumerate(crops):
        slot = masks_lib.slot_of_part_name(part)
        np.testing.assert_array_equal(arranged[k], face.part_clip_images[slot])
    assert not arranged[len(crops):].any()  # padding slots are zero


def test_training_text_keeps_the_same_parts(tokenizer):
    """The training caption rewrite gets the same parts as inference for the same parsing map."""
    lm = label_map(CASES["right_side_only"])
    slots = masks_lib.part_slot_labels(lm)
    detail = "The woman has a round face. Her ears are small. Her eyes are brown. A straight nose and a small mouth."
    t = sample_lib.text_inputs(tokenizer, "A woman in a park.", detail, slots, drop=False, pairing="reference")
    assert t.facial_token_idx_mask.sum() == len(reference_parts(lm)) == 5
    assert [int(s) for s in t.part_order[:5]] == [masks_lib.slot_of_part_name(p) for p in reference_parts(lm)]
