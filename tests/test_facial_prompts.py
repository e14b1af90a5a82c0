"""Facial-marker prompt logic against a rendering of the reference (spec §6 step 5, §7.2, §8, §9).

`_Ref` below is a literal, step-by-step rendering of the reference functions' behaviour
(process_text_with_markers with its in-place dict deletion, tokenize_and_mask_noun_phrases_ends,
prepare_image_token_idx, the pipelines' and dataset's text composition), tokenizing with
transformers' CLIPTokenizer. cid_jax's implementation, with our own tokenizer, must agree with it on
hand-checked examples and on thousands of random captions. The spec's worked example string and
several hand-derived strings are asserted literally.
"""
import json
import random
import re

import numpy as np
import pytest

from cid_jax.text import facial_prompts as fp
from cid_jax.text.tokenizer import CLIPTokenizer
from tests.helpers import write_hf_tokenizer

ALL_FIVE = ["Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]  # label order, as the reference has them
WORKED_EXAMPLE = ("The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, "
                  "one nose <|facial|>, and one mouth <|facial|>,")
PROMPT = ("cinematic photo,a woman in a red coat in the snow, 50mm photograph, half-length portrait, film, "
          "bokeh, professional, 4k, highly detailed")
LLAVA = (
    "The image features a young woman with long, wavy brown hair, wearing a white blouse and a delicate "
    "necklace. She is smiling warmly at the camera, and her expression appears friendly and approachable. "
    "The background is softly blurred, suggesting an outdoor setting with natural light."
)
LLAVA_FACE = (
    "The woman has an oval face with smooth, fair skin. Her ears are partially covered by her hair. "
    "Her eyes are large and brown, framed by thick, dark eyelashes and well-groomed eyebrows. She has a "
    "straight, slender nose, and her mouth is curved into a gentle smile, showing a hint of her teeth. "
    "Overall, her face appears youthful and her eyes look bright."
)


class _Ref:
    """The reference's text functions, rendered from its behaviour (not our implementation)."""

    WORDS = ["face", "ears", "eyes", "nose", "mouth"]
    SCAN = ["Face", "Left_Ear", "Right_Ear", "Left_Eye", "Right_Eye", "Nose", "Upper_Lip", "Lower_Lip"]
    MAP = {"Face": "face", "Left_Ear": "ears", "Right_Ear": "ears", "Left_Eye": "eyes",
           "Right_Eye": "eyes", "Nose": "nose", "Upper_Lip": "mouth", "Lower_Lip": "mouth"}

    @staticmethod
    def remove_duplicate_keywords(text, keywords):
        tokens = re.findall(r"\b\w+\b|[.,;!?]", text)
        for kw in keywords:
            n = 0
            for i in range(len(tokens)):
                if tokens[i].lower() == kw.lower():
                    n += 1
                    if n > 1:
                        tokens[i] = ""
        return " ".join(tokens)

    @classmethod
    def process_text_with_markers(cls, text, parts: dict):
        text = cls.remove_duplicate_keywords(text, cls.WORDS)
        feats, marks = [], []
        for key in cls.SCAN:
            if key in parts and cls.MAP[key] not in feats:
                feats.append(cls.MAP[key])
                marks.append("<|" + cls.MAP[key] + "|>")
        for feat, mark in reversed(list(zip(feats, marks))):
            new = re.sub(r"\b" + feat + r"\b", feat + " " + mark, text, count=1)
            if new == text:
                for key, word in cls.MAP.items():
                    if word == feat and key in parts:
                        del parts[key]  # the reference edits the caller's dict
            text = new
        text = text.replace("\n", "")
        out = []
        for mark in marks:
            s = text.find(mark)
            e = s + len(mark)
            while s > 0 and text[s - 1] not in ",.;":
                s -= 1
            while e < len(text) and text[e] not in ",.;":
                e += 1
            ctx = text[s:e].strip()
            if ctx != "":
                out.append(ctx + ",")
                text = text[:s] + text[e:]
        res = " ".join(out)
        for m in ["<|face|>", "<|ears|>", "<|nose|>", "<|eyes|>", "<|mouth|>"]:
            res = res.replace(m, "<|facial|>")
        return res, parts

    @staticmethod
    def tokenize_and_mask(text, facial_id, tok, max_len=77):
        ids = tok.encode(text)
        mask = [False] * len(ids)
        clean = []
        for i in ids:
            if i == facial_id:
                mask[len(clean) - 1] = True
            else:
                clean.append(i)
        clean = clean[:max_len] if len(clean) > max_len else clean + [tok.pad_token_id] * (max_len - len(clean))
        mask = mask[:max_len] if len(mask) > max_len else mask + [False] * (max_len - len(mask))
        return clean, mask

    @staticmethod
    def prepare_idx(mask, max_facials=5):
        idx = [i for i, m in enumerate(mask) if m]
        valid = [True] * len(idx)
        if len(idx) < max_facials:
            valid += [False] * (max_facials - len(idx))
            idx += [0] * (max_facials - len(idx))
        return idx, valid

    @staticmethod
    def n_tokens_padded(tok, text):
        return len(tok(text, max_length=77, padding="max_length", truncation=False).input_ids)

    @classmethod
    def inference_prompt(cls, prompt, caption, parts, tok, sep):
        marked, parts = cls.process_text_with_markers(caption, dict.fromkeys(parts))
        prompt_face = prompt + sep + marked
        if cls.n_tokens_padded(tok, prompt_face) != 77:
            prompt_face = sep + marked + " Caption:" + prompt
        if len(caption) > 330:
            prompt_face = prompt
        return prompt_face, prompt_face.replace("<|facial|>", "").replace("<|image|>", "")

    @classmethod
    def training_text(cls, llava, llava_face, parts, tok):
        face, parts = cls.process_text_with_markers(llava_face, dict.fromkeys(parts))
        dot = llava.find(".")
        first = (llava[: dot + 1] if dot != -1 else llava).strip()
        text = "Caption:" + first + " Detail:" + face + llava[len(first):-1]
        if cls.n_tokens_padded(tok, text) != 77:
            text = "Detail:" + face + " Caption:" + llava
        if len(face) > 340:
            text = llava
        return text, list(parts)


def _random_caption(rng):
    vocab = ["face", "ears", "eyes", "nose", "mouth", "Face", "Eyes", "EARS", "The", "person", "has", "one",
             "two", "a", "and", "with", "big", "brown", "round", "smile", "is", "her", "face-shaped",
             "don't", "nose's", "eyes.", "mouth,"]
    punct = [",", ".", ";", "!", "?", ":", "-", "\n", "(", "'"]
    toks = [rng.choice(punct) if rng.random() < 0.25 else rng.choice(vocab) for _ in range(rng.randint(0, 40))]
    return rng.choice([" ", "", "  "]).join(toks)


@pytest.fixture(scope="session")
def ours():
    tok = CLIPTokenizer.default()
    assert fp.add_trigger_tokens(tok) == (49408, 49409)
    return tok


@pytest.fixture(scope="session")
def hf(tmp_path_factory):
    """transformers' CLIPTokenizer from an SD1.5-style folder written from the packaged merges."""
    transformers = pytest.importorskip("transformers")
    folder = write_hf_tokenizer(tmp_path_factory.mktemp("sd") / "tokenizer")
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    tok.add_tokens(["<|image|>"], special_tokens=True)  # the reference adds them one at a time
    tok.add_tokens(["<|facial|>"], special_tokens=True)
    assert tok.convert_tokens_to_ids("<|facial|>") == 49409 and tok.model_max_length == 77
    return tok


# ---------------------------------------------------------------------------- marker strings


def test_worked_example():
    parts = list(ALL_FIVE)
    marked, kept = fp.process_text_with_markers(fp.DEFAULT_CAPTION_SD15, parts)
    assert marked == WORKED_EXAMPLE
    assert kept == ALL_FIVE and parts == ALL_FIVE  # input untouched
    assert _Ref.process_text_with_markers(fp.DEFAULT_CAPTION_SD15, dict.fromkeys(ALL_FIVE)) == (WORKED_EXAMPLE, dict.fromkeys(ALL_FIVE))


def test_remove_duplicate_keywords():
    text = "Her face is oval. The FACE has freckles; Eyes: blue, eyes wide (very) -- face-to-face!"
    # words and . , ; ! ? only, single spaces; 2nd+ keyword (any case) blanked -> double spaces.
    want = "Her face is oval . The  has freckles ; Eyes blue ,  wide very  to  !"
    assert fp.remove_duplicate_keywords(text) == want
    assert _Ref.remove_duplicate_keywords(text, _Ref.WORDS) == want


def test_missing_word_drops_its_part():
    # The pre-August-2024 caption has no "face": the Face crop is dropped (spec §6 step 2).
    caption = "The person has one nose, two eyes, two ears, and a mouth."
    marked, kept = fp.process_text_with_markers(caption, ALL_FIVE)
    assert marked == ("two ears <|facial|>, two eyes <|facial|>, The person has one nose <|facial|>, "
                      "and a mouth <|facial|>,")
    assert kept == ["Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]
    # Marking is case-sensitive although the duplicate check is not: "Face" alone doesn't count.
    marked, kept = fp.process_text_with_markers("Face is round, the nose is small.", ["Face", "Nose"])
    assert (marked, kept) == ("the nose <|facial|> is small,", ["Nose"])


def test_shared_clause_and_sdxl_caption():
    marked, kept = fp.process_text_with_markers("Her eyes and nose are small, mouth wide.", ["Left_Eye", "Nose", "Upper_Lip"])
    # eyes and nose share a clause: it is moved once, with both markers.
    assert marked == "Her eyes <|facial|> and nose <|facial|> are small, mouth <|facial|> wide,"
    assert kept == ["Left_Eye", "Nose", "Upper_Lip"]
    marked, _ = fp.process_text_with_markers(fp.DEFAULT_CAPTION_SDXL, ALL_FIVE)
    assert marked.endswith("one nose <|facial|>, and a mouth <|facial|>,")


def test_unknown_part_names_are_rejected():
    with pytest.raises(ValueError, match="WithoutBackground"):
        fp.process_text_with_markers("a face", ["Face", "WithoutBackground"])
    with pytest.raises(TypeError):
        fp.process_text_with_markers("a face", "Face")


def test_markers_match_reference_rendering_on_random_captions():
    rng = random.Random(0)
    names = list(_Ref.MAP)
    for n in range(3000):
        caption = _random_caption(rng)
        parts = sorted(rng.sample(names, rng.randint(0, 6)), key=fp.PART_LABELS.get)
        want_text, want_parts = _Ref.process_text_with_markers(caption, dict.fromkeys(parts))
        got = fp.process_text_with_markers(caption, parts)
        assert got == (want_text, list(want_parts)), (caption, parts)


# ---------------------------------------------------------------------------- tokens and masks


def _check_tokens(got, clean, mask, max_facials=5):
    idx, valid = _Ref.prepare_idx(mask, max_facials)
    np.testing.assert_array_equal(got.input_ids, clean)
    np.testing.assert_array_equal(got.facial_token_mask, mask)
    np.testing.assert_array_equal(got.facial_token_idx, idx)
    np.testing.assert_array_equal(got.facial_token_idx_mask, valid)
    assert got.input_ids.dtype == np.int32 and got.facial_token_idx.dtype == np.int32
    assert got.facial_token_mask.dtype == bool and got.facial_token_idx_mask.dtype == bool


def test_facial_tokens_point_at_the_facial_words(ours, hf):
    prompt_face, prompt_text_only = fp.compose_inference_prompt(PROMPT, fp.DEFAULT_CAPTION_SD15, ours, ALL_FIVE)
    assert prompt_face == PROMPT + "Detail:" + WORKED_EXAMPLE
    assert prompt_text_only == PROMPT + "Detail:" + WORKED_EXAMPLE.replace("<|facial|>", "")
    got = fp.tokenize_facial_prompt(ours, prompt_face)
    words = [ours.decode([got.input_ids[i]]) for i in got.facial_token_idx]
    assert words == ["face", "ears", "eyes", "nose", "mouth"]
    assert got.facial_token_idx_mask.all()
    assert 49409 not in got.input_ids and got.input_ids[-1] == ours.pad_token_id
    # Without the markers the ids are the plain prompt's, EOS included.
    plain = ours.encode(prompt_text_only)
    np.testing.assert_array_equal(got.input_ids[: len(plain)], plain)
    _check_tokens(got, *_Ref.tokenize_and_mask(prompt_face, 49409, hf))
    # A transformers tokenizer works too (duck typing).
    _check_tokens(fp.tokenize_facial_prompt(hf, prompt_face), *_Ref.tokenize_and_mask(prompt_face, 49409, hf))


def test_truncation_loses_eos_and_late_facial_tokens(ours, hf):
    # 78 tokens without markers: every facial word fits, EOS doesn't.
    text = "Caption:" + LLAVA + " Detail:" + WORKED_EXAMPLE
    got = fp.tokenize_facial_prompt(ours, text)
    _check_tokens(got, *_Ref.tokenize_and_mask(text, 49409, hf))
    assert got.facial_token_idx_mask.all() and got.facial_token_idx[-1] == 75
    assert ours.eos_token_id not in got.input_ids
    # A few words more and the last facial tokens fall off too.
    text = "Caption:" + LLAVA + " She looks calm, confident and happy. Detail:" + WORKED_EXAMPLE
    got = fp.tokenize_facial_prompt(ours, text)
    clean, mask = _Ref.tokenize_and_mask(text, 49409, hf)
    _check_tokens(got, clean, mask)
    assert got.input_ids[-1] != ours.eos_token_id and ours.eos_token_id not in got.input_ids
    assert 0 < got.facial_token_idx_mask.sum() < 5
    assert list(got.facial_token_idx_mask) == sorted(got.facial_token_idx_mask, reverse=True)  # prefix
    with pytest.raises(ValueError, match="max_facials"):
        fp.tokenize_facial_prompt(ours, WORKED_EXAMPLE + " extra <|facial|>")
    with pytest.raises(ValueError, match="add_trigger_tokens"):
        fp.tokenize_facial_prompt(CLIPTokenizer.default(), WORKED_EXAMPLE)


def test_tokens_match_reference_rendering_on_random_texts(ours, hf):
    rng = random.Random(1)
    for _ in range(300):
        marked, _ = fp.process_text_with_markers(_random_caption(rng), rng.sample(list(_Ref.MAP), 5))
        text = rng.choice(["", PROMPT, LLAVA]) + rng.choice(["Detail:", "; Detail:", " "]) + marked
        _check_tokens(fp.tokenize_facial_prompt(ours, text), *_Ref.tokenize_and_mask(text, 49409, hf))


# ---------------------------------------------------------------------------- prompt composition


@pytest.mark.parametrize("variant,sep", [("sd15", "Detail:"), ("sdxl", "; Detail:")])
def test_inference_prompt_and_fallbacks(ours, hf, variant, sep):
    caption = fp.DEFAULT_CAPTION_SD15
    got = fp.compose_inference_prompt(PROMPT, caption, ours, ALL_FIVE, variant=variant)
    assert got == _Ref.inference_prompt(PROMPT, caption, ALL_FIVE, hf, sep)
    assert got[0] == PROMPT + sep + WORKED_EXAMPLE

    long_prompt = PROMPT + ", " + LLAVA  # > 77 tokens with the facial text: the facial text goes first
    got = fp.compose_inference_prompt(long_prompt, caption, ours, ALL_FIVE, variant=variant)
    assert got == _Ref.inference_prompt(long_prompt, caption, ALL_FIVE, hf, sep)
    assert got[0] == sep + WORKED_EXAMPLE + " Caption:" + long_prompt
    assert [ours.decode([t.input_ids[i]]) for t in [fp.tokenize_facial_prompt(ours, got[0])]
            for i in t.facial_token_idx] == ["face", "ears", "eyes", "nose", "mouth"]

    long_caption = LLAVA_FACE + " " + LLAVA  # > 330 characters: the prompt alone
    got = fp.compose_inference_prompt(PROMPT, long_caption, ours, ALL_FIVE, variant=variant)
    assert got == (PROMPT, PROMPT) == _Ref.inference_prompt(PROMPT, long_caption, ALL_FIVE, hf, sep)
    assert not fp.tokenize_facial_prompt(ours, got[0]).facial_token_idx_mask.any()


def test_training_text_on_llava_captions(ours, hf):
    text, kept = fp.compose_training_text(LLAVA, LLAVA_FACE, ALL_FIVE, ours)
    assert (text, kept) == _Ref.training_text(LLAVA, LLAVA_FACE, ALL_FIVE, hf)
    facial, _ = fp.process_text_with_markers(LLAVA_FACE, ALL_FIVE)
    assert text == "Detail:" + facial + " Caption:" + LLAVA  # too long for 77 tokens

    short = "A man with a beard. He wears a hat."
    face = "He has a round face, small ears, blue eyes, a big nose and a thin mouth."
    text, kept = fp.compose_training_text(short, face, ALL_FIVE, ours)
    assert (text, kept) == _Ref.training_text(short, face, ALL_FIVE, hf)
    facial, _ = fp.process_text_with_markers(face, ALL_FIVE)
    assert text == "Caption:A man with a beard. Detail:" + facial + " He wears a hat"  # last char dropped

    rambling = "Her face is " + "really " * 50 + "round, her nose small."  # facial text > 340 characters
    text, kept = fp.compose_training_text(LLAVA, rambling, ALL_FIVE, ours)
    assert len(fp.process_text_with_markers(rambling, ALL_FIVE)[0]) > 340
    # The caption alone; the kept parts are still those whose word was found (here face and nose).
    assert (text, kept) == (LLAVA, ["Face", "Nose"]) == _Ref.training_text(LLAVA, rambling, ALL_FIVE, hf)

    rng = random.Random(2)
    for _ in range(150):
        llava = rng.choice(["", " ", "No dot here", LLAVA, " " + short, short]) + _random_caption(rng)
        face = _random_caption(rng) + rng.choice(["", LLAVA_FACE])
        parts = sorted(rng.sample(list(_Ref.MAP), rng.randint(0, 5)), key=fp.PART_LABELS.get)
        assert fp.compose_training_text(llava, face, parts, ours) == _Ref.training_text(llava, face, parts, hf)


# ---------------------------------------------------------------------------- part <-> word pairing


def test_pairing_reference_reproduces_the_ears_eyes_swap(ours):
    marked, kept = fp.process_text_with_markers(fp.DEFAULT_CAPTION_SD15, ALL_FIVE)
    ref = fp.pair_parts_to_words(kept, "reference")
    assert ref == ["Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]  # label order
    assert fp.pair_parts_to_words(list(reversed(kept)), "reference") == ref
    toks = fp.tokenize_facial_prompt(ours, marked)
    words = [ours.decode([toks.input_ids[i]]) for i in toks.facial_token_idx]
    assert list(zip(words, ref))[1:3] == [("ears", "Left_Eye"), ("eyes", "Left_Ear")]


def test_pairing_by_name(ours):
    marked, kept = fp.process_text_with_markers(fp.DEFAULT_CAPTION_SD15, ALL_FIVE)
    assert fp.pair_parts_to_words(kept, "by_name") == ["Face", "Left_Ear", "Left_Eye", "Nose", "Upper_Lip"]
    with pytest.raises(ValueError):
        fp.pair_parts_to_words(kept, "positional")
    # On random captions the k-th facial token's word is the k-th part's word.
    rng = random.Random(3)
    checked = 0
    for _ in range(500):
        parts = sorted(rng.sample(ALL_FIVE, rng.randint(1, 5)), key=fp.PART_LABELS.get)
        marked, kept = fp.process_text_with_markers(_random_caption(rng), parts)
        toks = fp.tokenize_facial_prompt(ours, marked)
        words = [ours.decode([toks.input_ids[i]]) for i, ok in zip(toks.facial_token_idx, toks.facial_token_idx_mask) if ok]
        paired = fp.pair_parts_to_words(kept, "by_name", marked_text=marked)
        assert sorted(paired) == sorted(kept)
        assert [fp.PART_WORDS[p] for p in paired[: len(words)]] == words, (marked, paired)
        checked += len(words) > 1
    assert checked > 100
