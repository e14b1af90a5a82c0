"""CLIP byte-level BPE tokenizer, self-contained (numpy + regex, no transformers/tokenizers).

Stable Diffusion's text encoders are fed ids from the CLIP tokenizer. We tokenize in the data
pipeline and at generation time without pulling in transformers, so this module re-implements it.
The goal is id-for-id equality with the tokenizer that `transformers.CLIPTokenizer.from_pretrained`
builds in the tested environment (transformers 5.x: a `tokenizers`-library BPE), which is what the
project's PyTorch references use. That tokenizer does, in order:

1. **Added / special tokens** (`<|startoftext|>`, `<|endoftext|>`, the pad and unk tokens and
   whatever `add_special_tokens` registered, e.g. `<|image|>`, `<|facial|>`) are cut out of the text
   verbatim before anything else, so they are never lower-cased or BPE-split. Tokens flagged
   `normalized` in a tokenizer config are matched after normalisation instead (with SD1.5's
   config that is <|startoftext|> only, see `_register`).
   A quirk follows: SDXL's `tokenizer_2` has pad token "!" (id 0), so every "!" in a prompt becomes
   id 0 rather than the BPE token "!</w>" (256). We reproduce it.
2. **Normalisation**: Unicode NFC, every run of whitespace -> one space, lower-case *per code
   point* (so a word-final capital sigma becomes "σ", not "ς", unlike Python's `str.lower`).
   transformers 5 does NOT run ftfy here even though ftfy is installed (ftfy + `html.unescape` were
   used by OpenAI's original tokenizer and by transformers 4's slow tokenizer; transformers 4 without
   ftfy used a BERT BasicTokenizer clean-up instead). All of them agree on ordinary prompts; they
   differ on mojibake, HTML entities ("&amp;"), control characters and CJK spacing.
3. **Pre-tokenisation** with CLIP's regex (then GPT-2's, which only re-splits stray special
   strings, see `_BYTE_LEVEL_SPLIT`): contractions ('s 't 're 've 'm 'll 'd), runs of letters,
   single digits, runs of other non-space symbols. Whitespace is dropped.
4. **Byte-level BPE**: each piece's UTF-8 bytes are mapped to printable unicode characters
   (GPT-2's `bytes_to_unicode`), the last symbol gets the end-of-word suffix `</w>`, and the
   lowest-ranked adjacent pair is merged until none is in the merge table.

The packaged vocabulary `cid_jax/assets/bpe_simple_vocab_16e6.txt.gz` is OpenAI's merge list; the
49408-entry vocabulary is derived from it the way CLIP does (see `_vocab_from_merge_lines`).
"""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import unicodedata
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import regex

from cid_jax import errors

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's text encoders have 77 positions; SD tokenizer configs set model_max_length to it.
CLIP_MAX_LENGTH = 77
# OpenAI's vocabulary is 256 byte symbols, their </w> forms, 48894 merges and 2 specials = 49408.
_NUM_MERGES = 49152 - 256 - 2

_ASSET = pathlib.Path(__file__).resolve().parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

# Unicode White_Space: what Oniguruma's \s (used by the `tokenizers` normaliser and splitter)
# matches. Python's own \s would also match U+001C..U+001F, which the reference tokenizes as symbols.
_WS = r"\p{White_Space}"
_WHITESPACE_RUN = regex.compile(_WS + "+")
# CLIP's pre-tokeniser: the two special strings, contractions, letter runs, single digits, runs of
# other symbols. (A special string reaches it only if it escaped added-token matching, e.g.
# "<|ENDOFTEXT|>" once lower-cased.)
_PIECE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^" + _WS + r"\p{L}\p{N}]+"
)
# transformers 5 then runs the tokenizers library's byte-level pre-tokeniser, which splits each piece
# again with GPT-2's pattern. On CLIP's pieces that is a no-op except for the special strings:
# "<|endoftext|>" becomes "<|", "endoftext", "|>". We apply it the same way.
_BYTE_LEVEL_SPLIT = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^" + _WS + r"\p{L}\p{N}]+|" + _WS + r"+(?!\S)|" + _WS + "+"
)

# BPE results per pre-token piece; captions repeat words a lot. Bounded so a long training run over
# free-form captions can't grow it without limit.
_CACHE_LIMIT = 200_000


def bytes_to_unicode() -> dict[int, str]:
    """Maps every byte to a printable unicode character (GPT-2/CLIP byte-level alphabet).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, NBSP, soft
    hyphen) are shifted to U+0100 onwards, so that a BPE symbol never is whitespace or a control.
    The iteration order (printable bytes first) is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def normalize(text: str) -> str:
    """NFC, whitespace runs -> " ", per-code-point lower-case (the transformers 5 CLIP normaliser)."""
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE_RUN.sub(" ", text)
    return "".join(c.lower() for c in text)


def _vocab_from_merge_lines(merge_lines: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """CLIP's recipe: the packaged file is a header line then merges; the vocab is built from them.

    ids 0..255 byte symbols, 256..511 the same with `</w>`, then one id per merge (the merged
    string), then <|startoftext|> and <|endoftext|>.
    """
    merges = [tuple(line.split()) for line in merge_lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"expected {_NUM_MERGES} two-symbol merges after the header, got {len(merges)}")
    byte_symbols = list(_BYTE_TO_CHAR.values())
    vocab = byte_symbols + [s + END_OF_WORD for s in byte_symbols]
    vocab += [a + b for a, b in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    return vocab, merges


class AddedToken(NamedTuple):
    """A token cut out of the text verbatim before BPE (transformers' AddedToken, reduced).

    `normalized=False` (the default for tokens added with `add_special_tokens`): matched on the raw
    text, case-sensitive. `normalized=True` (SD's configs for bos/eos/unk): matched on the
    normalised (lower-cased) text.
    """

    content: str
    special: bool = True
    normalized: bool = False


def _token_spec(value) -> AddedToken | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it (str or dict)."""
    if value is None:
        return None
    if isinstance(value, str):
        return AddedToken(value)
    if isinstance(value, dict) and "content" in value:
        return AddedToken(value["content"], bool(value.get("special", True)), bool(value.get("normalized", False)))
    raise ValueError(f"cannot read special token entry {value!r}")


class CLIPTokenizer:
    """CLIP BPE tokenizer giving the ids of transformers' `CLIPTokenizer` (see module docstring).

    Build it with `CLIPTokenizer.default()` (the packaged OpenAI vocabulary, SD1.5's tokenizer:
    pad = eos = 49407) or `CLIPTokenizer.from_pretrained(folder)` (a transformers tokenizer folder,
    e.g. SD's `tokenizer/` or SDXL's `tokenizer_2/`, whose pad token is "!" = id 0).

    `vocab_size` is the base vocabulary (49408) as in transformers; `len(tokenizer)` also counts
    tokens added with `add_special_tokens`.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str | AddedToken = BOS_TOKEN,
        eos_token: str | AddedToken = EOS_TOKEN,
        pad_token: str | AddedToken | None = EOS_TOKEN,
        unk_token: str | AddedToken = EOS_TOKEN,
        model_max_length: int = CLIP_MAX_LENGTH,
    ):
        self._vocab = dict(vocab)
        self._base_vocab_size = len(self._vocab)
        self._ranks = {}
        for rank, (a, b) in enumerate(merges):
            if a + b not in self._vocab:
                raise ValueError(f"merge #{rank} {a!r} {b!r} produces {a + b!r}, which is not in the vocabulary")
            self._ranks.setdefault((a, b), rank)
        self._id_to_token = {i: t for t, i in self._vocab.items()}
        self.model_max_length = int(model_max_length)
        self._cache: dict[str, tuple[int, ...]] = {}

        as_spec = lambda t: t if isinstance(t, AddedToken) or t is None else AddedToken(t)  # noqa: E731
        self._specials = {"bos": as_spec(bos_token), "eos": as_spec(eos_token), "unk": as_spec(unk_token),
                          "pad": as_spec(pad_token)}
        self._added: dict[str, AddedToken] = {}  # content -> spec, in registration order
        for spec in self._specials.values():
            if spec is not None:
                self._register(spec)

    # ------------------------------------------------------------------ construction

    @classmethod
    def default(cls, pad_token: str = EOS_TOKEN) -> "CLIPTokenizer":
        """OpenAI's CLIP vocabulary (the one in SD1.5's `tokenizer/`), from the packaged merge file.

        Special tokens as SD1.5's tokenizer_config.json declares them: bos/eos/unk "normalized"
        dicts, pad the bare string <|endoftext|> (pad = eos = 49407). `pad_token="!"` gives SDXL's
        `tokenizer_2` (pad = "!" = 0, a special token: a "!" in the text is always id 0).
        """
        with gzip.open(_ASSET, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        vocab, merges = _vocab_from_merge_lines(lines)
        normalized = lambda s: AddedToken(s, special=True, normalized=True)  # noqa: E731
        return cls({t: i for i, t in enumerate(vocab)}, merges, bos_token=normalized(BOS_TOKEN),
                   eos_token=normalized(EOS_TOKEN), unk_token=normalized(EOS_TOKEN), pad_token=AddedToken(pad_token))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "CLIPTokenizer":
        """Reads a transformers tokenizer folder.

        The vocabulary comes from `vocab.json` + `merges.txt` (how SD repos ship it) or else from
        `tokenizer.json` (what transformers 5 `save_pretrained` writes). Special tokens and
        `model_max_length` come from `tokenizer_config.json`, overridden by
        `special_tokens_map.json` (transformers' precedence); extra added tokens from
        `added_tokens_decoder` in the config, `added_tokens.json`, or `tokenizer.json`.
        """
        folder = pathlib.Path(folder)

        def read_json(name: str) -> dict:
            path = folder / name
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

        config = read_json("tokenizer_config.json")
        config.update({k: v for k, v in read_json("special_tokens_map.json").items() if v is not None})
        tokenizer_json = read_json("tokenizer.json")

        extra: dict[int, AddedToken] = {}
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = read_json("vocab.json")
            merges = _read_merges_txt(folder / "merges.txt")
        elif tokenizer_json:
            model = tokenizer_json.get("model", {})
            if model.get("type") != "BPE":
                raise ValueError(f"{folder}/tokenizer.json: expected a BPE model, got {model.get('type')!r}")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        else:
            raise errors.MissingError(f"{folder}: need vocab.json + merges.txt or tokenizer.json")
        for entry in tokenizer_json.get("added_tokens", []):
            extra[int(entry["id"])] = AddedToken(entry["content"], bool(entry.get("special", True)),
                                                 bool(entry.get("normalized", False)))
        for idx, entry in (config.get("added_tokens_decoder") or {}).items():
            extra[int(idx)] = _token_spec(entry)
        for content, idx in read_json("added_tokens.json").items():
            extra.setdefault(int(idx), AddedToken(content))

        max_len = config.get("model_max_length", CLIP_MAX_LENGTH)
        if not isinstance(max_len, (int, float)) or max_len > 10**6:
            # transformers writes ~1e30 ("no limit") when a folder had no length; CLIP has 77.
            max_len = CLIP_MAX_LENGTH
        # A special token given as a bare string takes its flags (e.g. normalized) from the token
        # table when it has them (transformers 5 writes strings in the config, flags in tokenizer.json).
        declared = {spec.content: spec for spec in extra.values()}

        def special(name: str, fallback: str) -> AddedToken:
            value = config.get(f"{name}_token")
            spec = _token_spec(value) or AddedToken(fallback)
            if not isinstance(value, dict) and spec.content in declared:
                return declared[spec.content]
            return spec

        # transformers' CLIPTokenizer defaults: unk = pad = <|endoftext|>.
        tok = cls(
            vocab, merges,
            bos_token=special("bos", BOS_TOKEN),
            eos_token=special("eos", EOS_TOKEN),
            unk_token=special("unk", EOS_TOKEN),
            pad_token=special("pad", EOS_TOKEN),
            model_max_length=int(max_len),
        )
        for idx in sorted(extra):
            spec = extra[idx]
            got = tok._register(spec)
            if got != idx:
                raise ValueError(f"{folder}: added token {spec.content!r} has id {idx} in the config but "
                                 f"would get id {got}; added ids must follow the base vocabulary in order")
        return tok

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without added tokens), as transformers reports it."""
        return self._base_vocab_size

    def __len__(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def bos_token_id(self) -> int:
        return self._vocab[self._specials["bos"].content]

    @property
    def eos_token_id(self) -> int:
        return self._vocab[self._specials["eos"].content]

    @property
    def unk_token_id(self) -> int:
        return self._vocab[self._specials["unk"].content]

    @property
    def pad_token_id(self) -> int | None:
        pad = self._specials["pad"]
        return None if pad is None else self._vocab[pad.content]

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._id_to_token.get(int(idx))

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]):
        """transformers' method: unknown tokens give `unk_token_id`."""
        if isinstance(tokens, str):
            return self._vocab.get(tokens, self.unk_token_id)
        return [self._vocab.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]):
        if isinstance(ids, (int, np.integer)):
            return self._id_to_token[int(ids)]
        return [self._id_to_token[int(i)] for i in ids]

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Registers tokens that are matched verbatim (case-sensitive) and never BPE-split.

        Like transformers' `add_tokens(tokens, special_tokens=True)`: a token already in the
        vocabulary keeps its id, a new one gets the next free id (49408, 49409, ... for CLIP).
        Returns the ids. The text encoder's embedding table is not resized; ConsistentID removes
        its markers from the ids before encoding.
        """
        if isinstance(tokens, str):
            raise TypeError("add_special_tokens takes a list of strings, e.g. ['<|image|>', '<|facial|>']")
        return [self._register(AddedToken(t)) for t in tokens]

    def _register(self, spec: AddedToken) -> int:
        if not spec.content:
            raise ValueError("an added token can't be empty")
        if spec.content not in self._vocab:
            idx = len(self._vocab)
            self._vocab[spec.content] = idx
            self._id_to_token[idx] = spec.content
        known = self._added.get(spec.content)
        if known is not None:
            # One string declared several times (SD: eos = unk = pad = <|endoftext|>). transformers
            # then matches it on the normalised text only if every declaration says normalized
            # (SD1.5 declares pad as a bare string, so "<|ENDOFTEXT|>" is not eos but
            # "<|STARTOFTEXT|>" is bos).
            spec = AddedToken(spec.content, known.special or spec.special, known.normalized and spec.normalized)
        self._added[spec.content] = spec
        self._splitters = None  # rebuilt lazily
        return self._vocab[spec.content]

    def _added_splitters(self):
        """Two alternations of added tokens: raw-text ones and normalised-text ones.

        Longest first, so that at a given position the longest token wins (leftmost-longest, as
        the tokenizers library's Aho-Corasick matcher does).
        """
        if self._splitters is None:
            def alternation(contents):
                contents = sorted(set(contents), key=len, reverse=True)
                return regex.compile("|".join(regex.escape(c) for c in contents)) if contents else None
            raw = [s.content for s in self._added.values() if not s.normalized]
            normed = {normalize(s.content): s.content for s in self._added.values() if s.normalized}
            self._splitters = (alternation(raw), alternation(normed), normed)
        return self._splitters

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_splitters"] = None  # rebuilt after unpickling (tf.data / multiprocessing workers)
        return state

    # ------------------------------------------------------------------ encoding

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-token piece (already normalised), with a cache."""
        ids = self._cache.get(piece)
        if ids is None:
            ids = tuple(i for word in _BYTE_LEVEL_SPLIT.findall(piece) for i in self._bpe(word))
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Byte-level BPE of one word."""
        symbols = [_BYTE_TO_CHAR[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        ranks = self._ranks
        while len(symbols) > 1:
            # The adjacent pair with the lowest merge rank wins; merge every occurrence of it,
            # scanning left to right (overlaps like "a a a" resolve to the leftmost pair).
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        unk = self.unk_token_id
        return [self._vocab.get(s, unk) for s in symbols]

    def _encode_plain(self, text: str, out: list[int]) -> None:
        """Text that contains no raw-matched added token: normalise, cut normalised added tokens,
        pre-tokenise and BPE the rest."""
        _, normed_re, normed_map = self._added_splitters()
        text = normalize(text)
        start = 0
        for m in (normed_re.finditer(text) if normed_re is not None else ()):
            self._encode_pieces(text[start:m.start()], out)
            out.append(self._vocab[normed_map[m.group()]])
            start = m.end()
        self._encode_pieces(text[start:], out)

    def _encode_pieces(self, text: str, out: list[int]) -> None:
        for piece in _PIECE.findall(text):
            out.extend(self._encode_piece(piece))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with <|startoftext|> ... <|endoftext|> around it by default.

        No truncation and no padding (the ConsistentID marker logic needs the full sequence).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        raw_re, _, _ = self._added_splitters()
        ids: list[int] = [self.bos_token_id] if add_special_tokens else []
        start = 0
        for m in (raw_re.finditer(text) if raw_re is not None else ()):
            self._encode_plain(text[start:m.start()], ids)
            ids.append(self._vocab[m.group()])
            start = m.end()
        self._encode_plain(text[start:], ids)
        if add_special_tokens:
            ids.append(self.eos_token_id)
        return ids

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = CLIP_MAX_LENGTH,
        padding: str | bool = "max_length",
        truncation: bool = True,
    ) -> np.ndarray:
        """Batch tokenisation as `tokenizer(texts, max_length=..., padding=..., truncation=...).input_ids`.

        Returns int32 `[B, L]`. Truncation keeps BOS and EOS (the content is cut to max_length - 2),
        as transformers does. padding="max_length" pads to `max_length`; "longest" to the longest
        row. With `truncation=False` a longer text is kept whole and the batch is padded to the
        longest row (a single text then gives transformers' list length, so
        `tokenizer(text, truncation=False).shape[1] != 77` is the reference's "too long" test).
        """
        single = isinstance(texts, str)
        rows = [self.encode(t) for t in ([texts] if single else texts)]
        if max_length is None:
            max_length = self.model_max_length
        if truncation:
            if max_length < 2:
                raise ValueError(f"max_length={max_length} leaves no room for <|startoftext|> and <|endoftext|>")
            rows = [r if len(r) <= max_length else r[: max_length - 1] + [r[-1]] for r in rows]
        longest = max((len(r) for r in rows), default=0)
        if padding == "max_length":
            length = max(max_length, longest)
        elif padding is True or padding == "longest":
            length = longest
        elif padding is False or padding == "do_not_pad":
            if len({len(r) for r in rows}) > 1:
                raise ValueError("rows have different lengths; pass padding='longest' or 'max_length'")
            length = longest
        else:
            raise ValueError(f"padding must be 'max_length', 'longest' or False, got {padding!r}")
        pad = self.pad_token_id
        if pad is None and any(len(r) < length for r in rows):
            raise ValueError("this tokenizer has no pad token; can't pad")
        out = np.full((len(rows), length), pad if pad is not None else 0, dtype=np.int32)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` as transformers decodes it (clean_up_tokenization_spaces off).

        Byte symbols are turned back into UTF-8 (invalid sequences -> U+FFFD), a token that isn't
        made of byte symbols (an added token) contributes its own text, `</w>` becomes a space
        and the result is stripped.
        """
        special = {self._vocab[c] for c, s in self._added.items() if s.special}
        data = bytearray()
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in special:
                continue
            token = self._id_to_token[i]
            try:
                data.extend(_CHAR_TO_BYTE[c] for c in token)
            except KeyError:
                data.extend(token.encode("utf-8"))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()


def _read_merges_txt(path: pathlib.Path) -> list[tuple[str, str]]:
    """merges.txt as HF writes it: an optional '#version' header, then 'a b' per line."""
    merges = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n")):
        if not line or (n == 0 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}:{n + 1}: expected two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges
