"""Our generation preprocessing judged by the reference repository's own code.

A check that shares code with what it checks cannot catch a shared mistake (our PyTorch runner uses
our preprocessing), so here the judge is JackAILab/ConsistentID itself: its SD1.5 pipeline's
`get_prepare_facemask` (which parts a photo contributes), `encode_prompt_with_trigger_word` (the
facial prompt, token ids and masks) and `get_prepare_clip_image` (the part images, CLIP-normalised),
run on the same photo and parsing map as `cid_jax.sampling.face_batch` / `text_batch`.

The reference code is not part of cid_jax and cannot be downloaded offline, so these tests run when
`CID_REFERENCE_REPO` names a checkout of it (`git clone https://github.com/JackAILab/ConsistentID`)
and skip, saying so, otherwise. Stand-ins only for what cannot exist here: BiSeNet's weights (the
parsing map is given, as `--parsing` gives it to our CLI) and torchvision, which does not load beside
the CPU torch wheel (its two transforms the code path uses, CenterCrop and ToTensor, are re-stated).
"""
import os
import pathlib
import sys
import types

import numpy as np
import pytest

REFERENCE = os.environ.get("CID_REFERENCE_REPO", "")
pytestmark = pytest.mark.skipif(
    not REFERENCE, reason="set CID_REFERENCE_REPO to a checkout of JackAILab/ConsistentID to judge our "
                          "preprocessing by the reference's own code")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("cv2")

from cid_jax import sampling as pl  # noqa: E402
from cid_jax.text import CLIPTokenizer, add_trigger_tokens  # noqa: E402
from tests.helpers import PARTS_CASES as CASES, parts_label_map as label_map, write_hf_tokenizer  # noqa: E402


def _torchvision_stand_in():
    """torchvision.transforms' CenterCrop and ToTensor on PIL images (what the pipeline calls)."""
    class Compose:
        def __init__(self, fns):
            self.fns = fns

        def __call__(self, x):
            for f in self.fns:
                x = f(x)
            return x

    class CenterCrop:
        def __init__(self, size):
            self.size = size

        def __call__(self, img):
            w, h = img.size
            left, top = int(round((w - self.size) / 2.0)), int(round((h - self.size) / 2.0))
            return img.crop((left, top, left + self.size, top + self.size))

    class ToTensor:
        def __call__(self, img):
            a = np.asarray(img, np.float32) / 255.0
            return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())

    transforms = types.SimpleNamespace(Compose=Compose, CenterCrop=CenterCrop, ToTensor=ToTensor,
                                       Normalize=lambda *a, **k: (lambda x: x), ToPILImage=lambda: None)
    import importlib.machinery

    module = types.ModuleType("torchvision")
    module.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    module.transforms = transforms
    return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference SD1.5 pipeline class and a transformers tokenizer as it sets one up."""
    import diffusers  # noqa: F401  (before the stand-in: it probes torchvision's availability)

    sys.modules.setdefault("torchvision", _torchvision_stand_in())
    sys.path.insert(0, str(pathlib.Path(REFERENCE).expanduser()))
    try:
        import pipline_StableDiffusion_ConsistentID as ref_pipeline
    finally:
        sys.path.pop(0)
    tok = transformers.CLIPTokenizer.from_pretrained(str(write_hf_tokenizer(tmp_path_factory.mktemp("tok") / "t")))
    tok.add_tokens(["<|image|>"], special_tokens=True)     # load_ConsistentID_model adds them in this order
    tok.add_tokens(["<|facial|>"], special_tokens=True)
    return ref_pipeline.ConsistentIDStableDiffusionPipeline, tok


def _photo(size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parts_prompt_tokens_and_part_images_equal_the_reference(reference, case):
    from PIL import Image

    pipeline_cls, tok = reference
    photo, lm = _photo(), label_map(CASES[case])
    prompt, caption = "a woman in a garden", "The person has one face, one nose, two eyes, two ears, and one mouth."
    me = types.SimpleNamespace(parsing_face_mask=lambda image: (None, lm), tokenizer=tok, _execution_device="cpu")
    parts, _ = pipeline_cls.get_prepare_facemask(me, Image.fromarray(photo))
    (text_only, clean_ids, parts_aligned, token_mask, idx, idx_mask) = pipeline_cls.encode_prompt_with_trigger_word(
        me, prompt=prompt, face_caption=caption, key_parsing_mask_list=parts, device="cpu")
    clip_images, _ = pipeline_cls.get_prepare_clip_image(me, Image.fromarray(photo), parts_aligned, image_size=64)

    ours_tok = CLIPTokenizer.default()
    add_trigger_tokens(ours_tok)
    face = pl.face_batch(photo, lm)
    text = pl.text_batch(prompt, "", ours_tok, face.part_names, caption, pairing="reference")
    inputs = pl.model_inputs([face], [text])

    assert face.part_names == list(parts)                               # which parts
    assert text.prompt_face.replace("<|facial|>", "") == text_only       # the text-only prompt
    np.testing.assert_array_equal(text.input_ids, clean_ids[0].numpy())
    np.testing.assert_array_equal(text.facial_token_mask, token_mask[0].numpy().astype(bool))
    np.testing.assert_array_equal(inputs["facial_token_idx_mask"][0], idx_mask[0].numpy().astype(bool))
    # The part images in facial-token order, CLIP-normalised: transformers' CLIPImageProcessor on the
    # reference side, ours in numpy/PIL; the same PIL bicubic resize, so float32 rounding apart.
    theirs = clip_images.numpy().transpose(0, 2, 3, 1)                  # [5, 224, 224, 3]
    np.testing.assert_allclose(inputs["part_clip_images"][0], theirs, rtol=0, atol=1e-5)
