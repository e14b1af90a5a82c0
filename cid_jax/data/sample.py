"""Per-sample logic of a training example that is plain Python/numpy (no TensorFlow).

pipeline.py calls these through `tf.numpy_function`; inference and tests call them directly.

* `text_inputs`: the training text of spec §7.2 (`compose_training_text` from the prompt module),
  the caption drop, tokenisation with the facial token masks, and the order in which the part
  slots pair with the facial tokens (`pair_parts_to_words`, "reference" or "by_name").
* `stream_positions` / `epoch_permutation` / `record_indices`: which records a host reads at a
  step. The stream is the concatenation of per-epoch permutations of all records, a pure function
  of (seed, epoch); global step s covers stream positions [s*G, (s+1)*G) and host h of P takes the
  contiguous slice [s*G + h*G/P, s*G + (h+1)*G/P). So hosts are disjoint, their union is the
  single-host batch, and any step can be produced without replaying earlier ones (exact resume).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from cid_jax.data import masks as masks_lib
from cid_jax.text import facial_prompts

PAIRINGS = ("reference", "by_name")


class TextInputs(NamedTuple):
    input_ids: np.ndarray              # int32 [L]
    facial_token_mask: np.ndarray      # bool [L]
    facial_token_idx: np.ndarray       # int32 [F]
    facial_token_idx_mask: np.ndarray  # bool [F]
    part_order: np.ndarray             # int32 [F]: slot feeding facial position k, -1 = padding
    text: str                          # the marked text that was tokenised ("" when dropped)


def default_tokenizer(pad_token: str = "<|endoftext|>"):
    """SD1.5's CLIP tokenizer (`pad_token="!"`: SDXL's tokenizer_2) with the reference's trigger
    tokens registered."""
    from cid_jax.text.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.default(pad_token=pad_token)
    facial_prompts.add_trigger_tokens(tok)
    return tok


def text_inputs(tokenizer, vqa_llva: str, vqa_llva_more_face_detail: str, slot_labels: Sequence[int],
                drop: bool, pairing: str = "by_name", max_text_length: int = 340,
                max_length: int = 77, max_facials: int = masks_lib.MAX_PARTS) -> TextInputs:
    """Text, token masks and part order for one example (reference `MyDataset.__getitem__`).

    The parts present in the parsing map (`slot_labels`) go through the caption rewrite, which
    keeps those whose word the caption names; their images are then ordered by `pairing`. A drop
    empties the text (so no facial tokens) but, as in the reference, keeps the kept parts'
    images and masks.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    names = masks_lib.part_names(slot_labels)
    text, kept = facial_prompts.compose_training_text(
        vqa_llva, vqa_llva_more_face_detail, names, tokenizer, max_text_length=max_text_length,
        max_length=max_length)
    ordered = facial_prompts.pair_parts_to_words(kept, pairing, marked_text=text)
    order = masks_lib.part_order(ordered, max_facials)
    if drop:
        text = ""
    tok = facial_prompts.tokenize_facial_prompt(tokenizer, text, max_length=max_length, max_facials=max_facials)
    return TextInputs(tok.input_ids.astype(np.int32), tok.facial_token_mask.astype(bool),
                      tok.facial_token_idx.astype(np.int32), tok.facial_token_idx_mask.astype(bool),
                      order, text)


# ------------------------------------------------------------------------ deterministic order

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a fixed, version-independent 64-bit mixing function."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """int64 [N]: the record order of `epoch`, a pure function of (seed, epoch, N).

    Sorting hash keys gives a uniform random permutation that does not depend on numpy's RNG
    streams, so every host, and a job resumed on another numpy, computes the same order.
    """
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x100000001B3) + np.uint64(epoch))
    keys = _splitmix64(np.arange(num_records, dtype=np.uint64) ^ key)
    return np.argsort(keys, kind="stable").astype(np.int64)


def stream_positions(step: int, global_batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> np.ndarray:
    """int64 [G/P]: the stream positions host `process_index` reads at global `step`."""
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local = global_batch_size // process_count
    start = int(step) * global_batch_size + process_index * local
    return np.arange(start, start + local, dtype=np.int64)


class RecordOrder:
    """Maps stream positions to record indices, caching the current epoch's permutation."""

    def __init__(self, seed: int, num_records: int):
        if num_records <= 0:
            raise ValueError("the dataset has no records")
        self.seed, self.num_records = int(seed), int(num_records)
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._cache.get(epoch)
        if perm is None:
            if len(self._cache) >= 2:  # steps are consumed in order: keep this epoch and the next
                self._cache.pop(min(self._cache))
            perm = self._cache[epoch] = epoch_permutation(self.seed, epoch, self.num_records)
        return perm

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        epochs, offsets = np.divmod(positions, self.num_records)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return out
