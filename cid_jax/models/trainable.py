"""Trainable / frozen split of a parameter tree by regular expressions over '/'-joined paths.

As in big_vision: a leaf is trainable when its path (`down_blocks_0/attentions_0/.../processor/
to_q_lora/down/kernel`) fully matches one of the patterns. The two halves are sparse trees with
disjoint leaves; `merge` puts them back together. The optimizer sees only `trainable`; the frozen
UNet/VAE/CLIP weights are never differentiated nor given optimizer state.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

from flax import traverse_util

# ConsistentID: the attention adapters wherever they sit (`<attention>/processor/...`), and the two
# encoder groups of the composite model's tree.
ADAPTER_PATTERN = r"(.*/)?processor/.*"
TRAINABLE_PATTERNS = (ADAPTER_PATTERN, r"facial_encoder/.*", r"image_proj/.*")


def path_str(path: Sequence[str]) -> str:
    return "/".join(str(p) for p in path)


def is_trainable(path: Sequence[str], patterns: Sequence[str] = TRAINABLE_PATTERNS) -> bool:
    s = path_str(path)
    return any(re.fullmatch(p, s) for p in patterns)


def split_trainable(params: Mapping, patterns: Sequence[str] = TRAINABLE_PATTERNS) -> tuple[dict, dict]:
    """params -> (frozen, trainable): two nested dicts whose leaves partition those of `params`."""
    compiled = [re.compile(p) for p in patterns]
    frozen, trainable = {}, {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        s = path_str(path)
        (trainable if any(c.fullmatch(s) for c in compiled) else frozen)[path] = leaf
    return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(trainable)


def merge(*trees: Mapping) -> dict:
    """Inverse of `split_trainable` (any number of trees); a leaf present in two trees is an error."""
    out = {}
    for tree in trees:
        for path, leaf in traverse_util.flatten_dict(tree).items():
            if path in out:
                raise ValueError(f"merge: {path_str(path)} is in more than one tree")
            out[path] = leaf
    return traverse_util.unflatten_dict(out)
