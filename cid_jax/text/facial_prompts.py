"""ConsistentID's facial prompts: marking the facial words, composing the prompt, token masks.

ConsistentID fuses CLIP features of face-part images into the text-encoder output at the tokens of
the words "face", "ears", "eyes", "nose", "mouth" of a caption. The reference finds those tokens by
rewriting the caption with a marker after each facial word ("... one nose <|facial|>, ..."),
tokenizing it with the marker registered as an added token, and recording the position of the
token *before* each marker while dropping the markers from the ids. This module reproduces that
string logic exactly (the released weights were trained on it; see the spec §6 step 5, §7.2, §8,
§9.7), quirks included:

* duplicate facial words are blanked and the caption is re-spaced as "word ," (§8.1);
* only lower-case whole words are marked (the duplicate check is case-insensitive, the marking is
  not), and a part whose word is missing is dropped (§8.3);
* the clause around each marker is moved to the front in the order face, ears, eyes, nose, mouth;
  the rest of the caption is discarded (§8.4);
* the ids are truncated to 77 *after* the markers are removed, so EOS can be lost (§9.7);
* part images stay in parsing-label order (Face, Eye, Ear, Nose, Lip) while the words are in the
  order face, ears, eyes, nose, mouth, so positional pairing gives the "ears" token the eye crop
  and vice versa (§0, §9.1). `pair_parts_to_words` offers that ("reference") and a by-name pairing.

Everything here is plain Python + numpy; a tokenizer is anything with `encode(text) -> list[int]`
(with BOS/EOS), `pad_token_id`, `unk_token_id` and `convert_tokens_to_ids(token)`: our
`cid_jax.text.tokenizer.CLIPTokenizer` or a transformers one.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import numpy as np

FACIAL_TOKEN = "<|facial|>"
IMAGE_TOKEN = "<|image|>"  # registered by the reference (id 49408) but never used in its prompts
FACIAL_WORDS = ("face", "ears", "eyes", "nose", "mouth")

# Parsing-mask name -> caption word. The key order is the reference's scan order (face, ears, eyes,
# nose, mouth); it decides the order of the facial words in the marked text.
PART_WORDS = {
    "Face": "face",
    "Left_Ear": "ears",
    "Right_Ear": "ears",
    "Left_Eye": "eyes",
    "Right_Eye": "eyes",
    "Nose": "nose",
    "Upper_Lip": "mouth",
    "Lower_Lip": "mouth",
}
# BiSeNet / CelebAMask-HQ label of each part. The reference keeps its part images in ascending label
# order (the order it finds them in the parsing map).
PART_LABELS = {
    "Face": 1,
    "Left_Eye": 4,
    "Right_Eye": 5,
    "Left_Ear": 7,
    "Right_Ear": 8,
    "Nose": 10,
    "Upper_Lip": 12,
    "Lower_Lip": 13,
}
# The fixed face captions of the reference inference pipelines (LLaVA captioning is disabled there).
DEFAULT_CAPTION_SD15 = "The person has one face, one nose, two eyes, two ears, and one mouth."
DEFAULT_CAPTION_SDXL = "The person has one face, one nose, two eyes, two ears, and a mouth."

# Inference: the facial prompt is dropped when the *raw* face caption is longer than this (chars).
INFERENCE_MAX_CAPTION_CHARS = 330
# Training: the caption (the LLaVA answer alone) is used when the *marked* facial text is longer.
TRAINING_MAX_FACIAL_CHARS = 340

# The reference splits captions into words with Python's `re` (so \w and \b are re's definitions);
# every other character (hyphens, apostrophes, colons, quotes, newlines) is dropped here.
_WORDS_AND_PUNCT = re.compile(r"\b\w+\b|[.,;!?]")
_CLAUSE_DELIMITERS = frozenset(",.;")


def _named_marker(word: str) -> str:
    return f"<|{word}|>"


def remove_duplicate_keywords(text: str, keywords: Sequence[str] = FACIAL_WORDS) -> str:
    """Keeps the first occurrence of each keyword (case-insensitive) and blanks the later ones.

    The text is re-tokenised into words and the punctuation marks . , ; ! ? and joined with single
    spaces, so "one nose, two eyes." becomes "one nose , two eyes ." and a blanked word leaves a
    double space. Any other character is dropped.
    """
    words = _WORDS_AND_PUNCT.findall(text)
    for keyword in keywords:  # one pass per keyword, as the reference counts them
        seen = 0
        for i, word in enumerate(words):
            if word.lower() == keyword.lower():
                seen += 1
                if seen > 1:
                    words[i] = ""
    return " ".join(words)


def _check_parts(part_names: Sequence[str]) -> None:
    if isinstance(part_names, str):
        raise TypeError(f"part_names must be a list of part names, got the string {part_names!r}")
    unknown = [p for p in part_names if p not in PART_WORDS]
    if unknown:
        raise ValueError(f"unknown parsing-mask names {unknown}; expected some of {list(PART_WORDS)}")


def _mark_words(text: str, part_names: Sequence[str]) -> tuple[str, list[str], list[str]]:
    """Inserts a per-word marker <|face|>, <|ears|>, ... after the first whole-word occurrence of
    each facial word that has a part. Returns the text, the parts whose word was found, and the
    facial words of all given parts (found or not) in the order face, ears, eyes, nose, mouth."""
    _check_parts(part_names)
    text = remove_duplicate_keywords(text)
    words = list(dict.fromkeys(PART_WORDS[p] for p in PART_WORDS if p in part_names))
    missing = set()
    # The reference inserts in reverse word order; each insertion only touches its own word's first
    # occurrence, so the order doesn't change the text, but we keep it.
    for word in reversed(words):
        marked = re.sub(rf"\b{word}\b", f"{word} {_named_marker(word)}", text, count=1)
        if marked == text:
            missing.add(word)  # no lower-case whole-word match: this part gets no token
        text = marked
    kept = [p for p in part_names if PART_WORDS[p] not in missing]
    return text.replace("\n", ""), kept, words


def _clause_bounds(text: str, pos: int, length: int) -> tuple[int, int]:
    """[start, end) of the clause around text[pos:pos+length]: up to the previous , . ; (exclusive)
    and up to the next one (exclusive)."""
    start, end = pos, pos + length
    while start > 0 and text[start - 1] not in _CLAUSE_DELIMITERS:
        start -= 1
    while end < len(text) and text[end] not in _CLAUSE_DELIMITERS:
        end += 1
    return start, end


def process_text_with_markers(text: str, part_names: Sequence[str]) -> tuple[str, list[str]]:
    """The reference's facial caption rewrite (spec §8). Returns (marked_text, kept_part_names).

    `part_names` are parsing-mask names (e.g. ["Face", "Left_Eye", "Left_Ear", "Nose",
    "Upper_Lip"]); it isn't modified. A part whose facial word is absent from the caption is not in
    `kept_part_names` (which keeps the input order). The marked text is the clause around each
    facial word, with "<|facial|>" after the word, in the order face, ears, eyes, nose, mouth, each
    clause followed by ","; e.g. for `DEFAULT_CAPTION_SD15` and all five parts:
    "The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>,
    one nose <|facial|>, and one mouth <|facial|>,".
    """
    text, kept, words = _mark_words(text, part_names)
    clauses = []
    for word in words:
        marker = _named_marker(word)
        # pos is -1 when the word was missing or its marker already left inside an earlier clause
        # (two facial words in one clause). The reference still scans from -1, i.e. looks at the
        # slice text[-1:end]: empty (skipped) unless the forward scan reaches the end of the text,
        # in which case the last character is cut off as a "clause". Reproduced for parity.
        start, end = _clause_bounds(text, text.find(marker), len(marker))
        clause = text[start:end].strip()
        if clause:
            clauses.append(clause + ",")
            text = text[:start] + text[end:]
    marked = " ".join(clauses)
    for word in FACIAL_WORDS:
        marked = marked.replace(_named_marker(word), FACIAL_TOKEN)
    return marked, kept


def pair_parts_to_words(
    kept_part_names: Sequence[str], mode: str = "reference", marked_text: str | None = None
) -> list[str]:
    """The order in which to feed part images so that the k-th one goes to the k-th facial token.

    The FacialEncoder pairs part images and facial tokens by position.
    * "reference": parts in parsing-label order (Face, Eye, Ear, Nose, Lip), as the reference feeds
      them. With tokens in the order face, ears, eyes, nose, mouth this gives the "ears" token the
      eye crop and the "eyes" token the ear crop. Use it to run or continue the released weights.
    * "by_name": parts reordered to the facial words' order in `marked_text` (the word right before
      each "<|facial|>"; without text, the usual order face, ears, eyes, nose, mouth), so every
      token gets its own part. Parts whose word has no marker go last, in label order.
    """
    _check_parts(kept_part_names)
    by_label = sorted(kept_part_names, key=PART_LABELS.__getitem__)
    if mode == "reference":
        return by_label
    if mode != "by_name":
        raise ValueError(f"mode must be 'reference' or 'by_name', got {mode!r}")
    if marked_text is None:
        word_order = list(FACIAL_WORDS)
    else:
        pattern = r"\b(" + "|".join(FACIAL_WORDS) + r") " + re.escape(FACIAL_TOKEN)
        word_order = list(dict.fromkeys(re.findall(pattern, marked_text)))
    ordered = [p for word in word_order for p in by_label if PART_WORDS[p] == word]
    return ordered + [p for p in by_label if p not in ordered]


class FacialTokens(NamedTuple):
    """Token-level inputs of the FacialEncoder for one prompt (numpy, no batch axis)."""

    input_ids: np.ndarray  # [max_length] int32: markers removed, truncated (EOS may be lost) / padded
    facial_token_mask: np.ndarray  # [max_length] bool: True at the token before each marker
    facial_token_idx: np.ndarray  # [max_facials] int32: positions of the True entries, zero-padded
    facial_token_idx_mask: np.ndarray  # [max_facials] bool: True for the valid prefix of the above


def _added_token_id(tokenizer, token: str) -> int | None:
    idx = tokenizer.convert_tokens_to_ids(token)
    if idx is None or idx == tokenizer.unk_token_id:
        return None
    return int(idx)


def _facial_token_id(tokenizer, facial_token: str) -> int:
    idx = _added_token_id(tokenizer, facial_token)
    if idx is None:
        raise ValueError(f"the tokenizer doesn't know {facial_token!r}; register it first with "
                         f"add_trigger_tokens(tokenizer)")
    return idx


def add_trigger_tokens(tokenizer) -> tuple[int, int]:
    """Registers <|image|> and <|facial|> (in that order, as the reference: ids 49408, 49409 for
    CLIP) on our tokenizer or a transformers one; returns their ids."""
    if hasattr(tokenizer, "add_special_tokens") and not hasattr(tokenizer, "add_tokens"):
        tokenizer.add_special_tokens([IMAGE_TOKEN, FACIAL_TOKEN])
    else:  # transformers
        tokenizer.add_tokens([IMAGE_TOKEN, FACIAL_TOKEN], special_tokens=True)
    return _facial_token_id(tokenizer, IMAGE_TOKEN), _facial_token_id(tokenizer, FACIAL_TOKEN)


def tokenize_facial_prompt(
    tokenizer, marked_text: str, max_length: int = 77, max_facials: int = 5, facial_token: str = FACIAL_TOKEN
) -> FacialTokens:
    """Ids without markers plus the positions of the facial words (reference §6 step 5).

    The text is encoded with BOS/EOS and the markers as single tokens. Each marker is removed and
    the token before it (the last BPE token of the facial word) is flagged. Then the ids are cut to
    `max_length` (no EOS re-added: a long prompt loses it) or padded with the pad token, and flags
    past `max_length` are dropped. <|image|> tokens, if registered and present, are removed too
    (as in the reference's training). Raises if more than `max_facials` tokens are flagged.
    """
    facial_id = _facial_token_id(tokenizer, facial_token)
    image_id = _added_token_id(tokenizer, IMAGE_TOKEN)
    ids = list(tokenizer.encode(marked_text))
    clean: list[int] = []
    # The flags live on the full-length (marker-including) sequence, indexed by clean position, so
    # the reference's index -1 (a marker before any other token) wraps to the last entry.
    flags = [False] * len(ids)
    for idx in ids:
        if idx == facial_id:
            flags[len(clean) - 1] = True
        elif image_id is not None and idx == image_id:
            continue
        else:
            clean.append(idx)
    pad = tokenizer.pad_token_id
    clean = (clean + [pad] * max_length)[:max_length]
    flags = (flags + [False] * max_length)[:max_length]

    positions = np.flatnonzero(np.asarray(flags, dtype=bool))
    if len(positions) > max_facials:
        raise ValueError(f"{len(positions)} facial tokens in {marked_text!r}, more than max_facials={max_facials}")
    facial_token_idx = np.zeros(max_facials, np.int32)
    facial_token_idx[: len(positions)] = positions
    return FacialTokens(
        input_ids=np.asarray(clean, np.int32),
        facial_token_mask=np.asarray(flags, bool),
        facial_token_idx=facial_token_idx,
        facial_token_idx_mask=np.arange(max_facials) < len(positions),
    )


def second_encoder_ids(tokenizer_2, marked_text: str, max_length: int = 77) -> np.ndarray:
    """SDXL encoder 2's ids for a (marked) text, as the reference's SDXL training makes them:
    `tokenizer_2(text.replace("<|facial|>", ""))`, padded with tokenizer_2's pad ("!" = 0) and cut to
    `max_length` keeping EOS. Aligned with encoder 1's ids except where the two tokenizers split
    differently (tokenizer_2 takes every "!" as its own token). <|image|> goes too, as in encoder 1's."""
    text = marked_text.replace(FACIAL_TOKEN, "").replace(IMAGE_TOKEN, "")
    return np.asarray(tokenizer_2([text], max_length=max_length, padding="max_length", truncation=True)[0],
                      np.int32)


def _too_long(tokenizer, text: str, max_length: int) -> bool:
    """The reference's test `len(tokenizer(text, padding="max_length", truncation=False)) != 77`:
    more than `max_length` tokens, counting BOS, EOS and each marker as one."""
    return len(tokenizer.encode(text)) > max_length


def compose_inference_prompt(
    prompt: str,
    caption: str,
    tokenizer,
    part_names: Sequence[str],
    variant: str = "sd15",
    max_length: int = 77,
) -> tuple[str, str]:
    """The prompt of the reference pipelines (spec §6 step 5). Returns (prompt_face, prompt_text_only).

    `caption` is the raw face caption (e.g. DEFAULT_CAPTION_SD15); it is marked with
    `process_text_with_markers(caption, part_names)` (call that too to get the kept parts).
    `part_names` are the parts found in the photo, as `cid_jax.data.masks.part_names` decides them
    for training and inference alike (the first present member of each pair: Right_Eye when there
    is no Left_Eye, and so on).
    * sd15: prompt + "Detail:" + marked (no separator, as the reference); if that has more than 77
      tokens: "Detail:" + marked + " Caption:" + prompt (which the tokenizer then truncates).
    * sdxl: the same with "; Detail:".
    * If the raw caption is longer than 330 characters, the prompt alone (no facial tokens).
    `prompt_text_only` is `prompt_face` without markers (SD1.5's text-only branch encodes it; the
    SDXL reference encodes the bare `prompt` there instead).
    """
    if variant not in ("sd15", "sdxl"):
        raise ValueError(f"variant must be 'sd15' or 'sdxl', got {variant!r}")
    _facial_token_id(tokenizer, FACIAL_TOKEN)  # the length test must count markers as one token
    detail = "Detail:" if variant == "sd15" else "; Detail:"
    marked, _ = process_text_with_markers(caption, part_names)
    prompt_face = prompt + detail + marked
    if _too_long(tokenizer, prompt_face, max_length):
        prompt_face = detail + marked + " Caption:" + prompt
    if len(caption) > INFERENCE_MAX_CAPTION_CHARS:
        prompt_face = prompt
    prompt_text_only = prompt_face.replace(FACIAL_TOKEN, "").replace(IMAGE_TOKEN, "")
    return prompt_face, prompt_text_only


def first_sentence(text: str) -> str:
    """Up to and including the first ".", stripped (the whole text, stripped, if there is none)."""
    end = text.find(".")
    return (text[: end + 1] if end != -1 else text).strip()


def compose_training_text(
    vqa_llva: str,
    vqa_llva_more_face_detail: str,
    part_names: Sequence[str],
    tokenizer,
    max_text_length: int = TRAINING_MAX_FACIAL_CHARS,
    max_length: int = 77,
) -> tuple[str, list[str]]:
    """The training text of the reference dataset (spec §7.2). Returns (text, kept_part_names).

    With `facial = process_text_with_markers(vqa_llva_more_face_detail, part_names)`:
    1. "Caption:" + first sentence of vqa_llva + " Detail:" + facial + the rest of vqa_llva minus
       its last character (the reference slices `vqa_llva[len(first):-1]`; `first` is stripped, so
       leading whitespace shifts that slice, reproduced);
    2. if that has more than 77 tokens (markers count): "Detail:" + facial + " Caption:" + vqa_llva;
    3. if the marked facial text is longer than 340 characters: vqa_llva alone (no facial tokens;
       the kept parts are still returned, as the reference does).
    The 10% caption drop of the reference (text "" and CLIP image zeroed) is the data pipeline's job.
    """
    _facial_token_id(tokenizer, FACIAL_TOKEN)
    facial, kept = process_text_with_markers(vqa_llva_more_face_detail, part_names)
    first = first_sentence(vqa_llva)
    text = "Caption:" + first + " Detail:" + facial + vqa_llva[len(first):-1]
    if _too_long(tokenizer, text, max_length):
        text = "Detail:" + facial + " Caption:" + vqa_llva
    if len(facial) > max_text_length:
        text = vqa_llva
    return text, kept
