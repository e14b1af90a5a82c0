"""Our CLIP BPE tokenizer against transformers' CLIPTokenizer built from the same files.

The test derives vocab.json / merges.txt from the packaged merge file itself (OpenAI's recipe,
written out here independently of cid_jax), writes SD-style tokenizer folders, and loads them with
transformers; both sides then get the ConsistentID trigger tokens. Ids, batches and decoded text
must be identical on curated prompts and on random strings that mix ASCII, punctuation, digits,
unusual whitespace, accents, CJK, emoji and the trigger tokens.
"""
import json
import pickle
import random

import numpy as np
import pytest

from cid_jax.text.tokenizer import CLIPTokenizer
from tests.helpers import write_hf_tokenizer

transformers = pytest.importorskip("transformers")

TRIGGERS = ["<|image|>", "<|facial|>"]

PROMPTS = [
    "a photo of a cat",
    "cinematic photo,a woman in the snow, 50mm photograph, half-length portrait, film, bokeh, "
    "professional, 4k, highly detailedDetail:The person has one face <|facial|>, two ears <|facial|>, "
    "two eyes <|facial|>, one nose <|facial|>, and one mouth <|facial|>,",
    "The person has one face, one nose, two eyes, two ears, and one mouth.",
    "The image features a young woman with long, wavy brown hair. She's smiling; she doesn't wear "
    "glasses, and she'll probably laugh. It's 3:45pm on 12/31/2023 -- (temp: -3.5°C)!!!",
    "don't can't won't I'm you're we've they'll he'd IT'S DON'T",
    "Numbers 1234567890 3.14159 1e-5 #42 $100 50% x2",
    "   leading and trailing   spaces\tand\ttabs\nand\r\nnewlines   ",
    "Ünïcödé café naïve résumé Straße façade ΑΣ Σ ας İstanbul ǅ ﬁ e\u0301",
    "日本語のテキスト 中文 한국어 русский текст عربى",
    "emoji 😀👍🏽 ❤️ 🇺🇸 and symbols ©®™ → ← ≥ ≤",
    "odd spaces a\xa0b\u2009c\u3000d\u2028e\x85f zero\u200bwidth \ufeffbom \x1c\x1d\x1e\x1f",
    "markers <|facial|><|image|> glued<|facial|>text <|FACIAL|> <|startoftext|> <|endoftext|>",
    "specials as SD's config declares them (normalized): <|STARTOFTEXT|> <|EndOfText|>",
    "&amp; &lt;html&gt; \\backslash/ \"quotes\" 'single' `tick` [brackets] {braces}",
    "aaaaaaaaaaaa bbbbbbbbbbbbbbbbbbbb supercalifragilisticexpialidocious",
    "",
    " ",
]


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"sd": write_hf_tokenizer(root / "tokenizer", "<|endoftext|>"),
            "sdxl2": write_hf_tokenizer(root / "tokenizer_2", "!")}


@pytest.fixture(scope="session")
def pair(folders):
    """(ours, transformers) for SD1.5's tokenizer, both with the trigger tokens added."""
    hf = transformers.CLIPTokenizer.from_pretrained(str(folders["sd"]))
    hf.add_tokens(TRIGGERS, special_tokens=True)
    ours = CLIPTokenizer.default()
    assert ours.add_special_tokens(TRIGGERS) == [49408, 49409]
    assert hf.convert_tokens_to_ids(TRIGGERS) == [49408, 49409]
    return ours, hf


def _random_texts(n, seed=0):
    rng = random.Random(seed)
    pool = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789      .,;:!?'\"-()[]<>|/\\@#$%&*_+=~`\t\n")
    pool += list("éüßçñøåΣσςΑΩжЖİ中文日本語한국어😀👍🏽\u0301\u200b\xa0\u3000\x85\x1c")
    pool += ["<|facial|>", "<|image|>", "'s", "'ll", "'T", "<|endoftext|>", "<|ENDOFTEXT|>", "<|StartOfText|>", "face", "eyes"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 80))) for _ in range(n)]


def test_known_ids_and_specials(pair):
    ours, hf = pair
    # CLIP's well-known ids: 320 "a</w>", 1125 "photo</w>", 539 "of</w>", 2368 "cat</w>".
    assert ours.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (49406, 49407, 49407)
    assert (ours.vocab_size, len(ours), ours.model_max_length) == (49408, 49410, 77)
    assert (hf.vocab_size, len(hf)) == (ours.vocab_size, len(ours))
    assert ours.get_vocab() == hf.get_vocab()


def test_encode_matches_transformers(pair):
    ours, hf = pair
    texts = PROMPTS + _random_texts(1500)
    for add in (True, False):
        bad = [(t, ours.encode(t, add), hf.encode(t, add_special_tokens=add))
               for t in texts if ours.encode(t, add) != hf.encode(t, add_special_tokens=add)]
        assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]}"


def test_decode_matches_transformers(pair):
    ours, hf = pair
    for text in PROMPTS + _random_texts(300, seed=1):
        ids = hf.encode(text)
        for skip in (False, True):
            want = hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert ours.decode(ids, skip_special_tokens=skip) == want, (text, skip)


def test_batch_call_matches_transformers(pair):
    ours, hf = pair
    long_text = " ".join(PROMPTS[1:5]) * 2  # well over 77 tokens
    batch = PROMPTS + [long_text] + _random_texts(40, seed=2)
    got = ours(batch, max_length=77, padding="max_length", truncation=True)
    want = np.asarray(hf(batch, max_length=77, padding="max_length", truncation=True).input_ids)
    assert got.dtype == np.int32 and got.shape == (len(batch), 77)
    np.testing.assert_array_equal(got, want)
    assert got[len(PROMPTS), -1] == ours.eos_token_id  # truncation keeps EOS

    got = ours(batch[:5], max_length=77, padding="longest", truncation=True)
    np.testing.assert_array_equal(got, hf(batch[:5], max_length=77, padding="longest", truncation=True).input_ids)
    for text in (PROMPTS[0], long_text):  # the reference's "too long" test uses truncation=False
        want = hf(text, max_length=77, padding="max_length", truncation=False).input_ids
        np.testing.assert_array_equal(ours(text, truncation=False)[0], want)
    np.testing.assert_array_equal(ours("a photo", max_length=10)[0], hf("a photo", max_length=10, padding="max_length").input_ids)


def test_added_tokens_are_verbatim(pair):
    ours, _ = pair
    assert ours.encode("face <|facial|>, x") == [49406, 1710, 49409, 267, 343, 49407]
    assert ours.encode("ab<|facial|>cd<|image|>") == [49406, 3937, 49409, 4480, 49408, 49407]
    assert 49409 not in ours.encode("face <|FACIAL|>")  # case-sensitive, as special added tokens are
    assert ours.add_special_tokens(["<|facial|>"]) == [49409]  # idempotent
    assert ours.convert_tokens_to_ids("<|nope|>") == ours.unk_token_id


def test_from_pretrained_sd_and_sdxl_folders(folders, pair):
    ours_default, _ = pair
    for name, pad_id in (("sd", 49407), ("sdxl2", 0)):
        hf = transformers.CLIPTokenizer.from_pretrained(str(folders[name]))
        hf.add_tokens(TRIGGERS, special_tokens=True)
        ours = CLIPTokenizer.from_pretrained(folders[name])
        ours.add_special_tokens(TRIGGERS)
        assert (ours.pad_token_id, hf.pad_token_id) == (pad_id, pad_id)
        assert ours.model_max_length == hf.model_max_length == 77
        assert ours.get_vocab() == ours_default.get_vocab()
        texts = PROMPTS + ["hello! wow!? <|STARTOFTEXT|> x"] + _random_texts(200, seed=3)
        for text in texts:
            assert ours.encode(text) == hf.encode(text), (name, text)
        np.testing.assert_array_equal(ours(texts), hf(texts, max_length=77, padding="max_length", truncation=True).input_ids)
    # SDXL tokenizer_2 quirk: its pad token "!" is a special token, so "!" in text is id 0.
    assert CLIPTokenizer.from_pretrained(folders["sdxl2"]).encode("hello!") == [49406, 3306, 0, 49407]


def test_from_pretrained_reads_a_transformers5_save(pair, tmp_path):
    """transformers 5 save_pretrained writes tokenizer.json (+ config) only, added tokens included."""
    _, hf = pair
    hf.save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists()
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    assert ours.convert_tokens_to_ids(TRIGGERS) == [49408, 49409]
    for text in PROMPTS + _random_texts(100, seed=4):
        assert ours.encode(text) == hf.encode(text), text


def test_pickle_round_trip(pair):
    ours, _ = pair
    again = pickle.loads(pickle.dumps(ours))
    for text in PROMPTS:
        assert again.encode(text) == ours.encode(text)
