"""Helpers shared by the test modules (tests import helpers from here, never from each other)."""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ configs


def demo_config(seed: int = 0):
    """configs/demo.py as a user runs it (the tiny-sd15 preset)."""
    from configs import demo

    c = demo.get_config()
    c.seed = seed
    return c


def inference_demo_config(seed: int = 0):
    """The demo config without attention capture (generation)."""
    c = demo_config(seed)
    c.model.facial_loss_mode = "none"
    return c


def small_train_config():
    """The demo at 64 px with 32 px masks and 8 samples: the train-step and end-to-end tests' size."""
    c = demo_config()
    c.data.resolution = 64
    c.data.mask_resolution = 32
    c.train.global_batch = 8
    c.eval.every_steps = 0    # the tests that evaluate during training turn it on
    return c


def train_config(data_path, num_steps: int):
    """`small_train_config` on a built dataset, logging every step (the end-to-end training tests
    and their CLI config file, tests/train_test_config.py)."""
    c = small_train_config()
    c.data.path = str(data_path)
    c.data.synthetic = 0
    c.train.num_steps = num_steps
    c.train.log_every = 1
    c.train.image_every = 10
    c.checkpoint.every_steps = 5
    c.checkpoint.async_save = False
    c.optim.lr = 1e-3   # a short run should visibly learn
    return c


# ----------------------------------------------------------------------------------- weights


def random_params(abstract, seed: int, scale: float = 0.05) -> dict:
    """Random host values for an abstract param tree, drawn with numpy (no compilation): every
    weight non-trivial (LoRA `up` kernels and IP copies included, so a transposed or misrouted
    kernel cannot hide), at init-like scales so tiny models stay well conditioned:
    LayerNorm scale 1 + N(0, scale), bias N(0, scale), kernels N(0, 1 / fan_in), latents N(0, 1 / dim)."""
    rng = np.random.default_rng(seed)
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        z = rng.standard_normal(leaf.shape)
        if name == "scale":
            x = 1 + scale * z
        elif name == "bias":
            x = scale * z
        else:
            x = z / np.sqrt(np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else leaf.shape[-1])
        return x.astype(leaf.dtype)

    return jax.tree.unflatten(treedef, [draw(p, leaf) for p, leaf in paths])


def abstract_trainable(model) -> dict:
    """Shapes of the trainable tree (adapter_modules, facial_encoder, image_proj), traced only."""
    from cid_jax import build

    return build.abstract_trainable(model, boxed=False)


def export_trainable(trainable, config, path, pairing: str = "reference"):
    """Our trainable tree -> a reference-layout checkpoint file through the public exporter."""
    from cid_jax import export

    layout = export.layout_for_config(config)
    config = config.copy_and_resolve_references()
    config.data.pairing = pairing
    return export.save(trainable, layout, path, metadata=export.run_metadata(config, layout, 0, "fp32"))


def perturb_torch(module, seed: int, scale: float = 0.02):
    """Adds N(0, scale^2) to every parameter of a torch module (random init alone can hide a
    transposed kernel); returns the module in eval mode."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def write_tiny_sd15(root: pathlib.Path, unet_in_channels: int = 4, seed: int = 0) -> dict:
    """The tiny-sd15 preset's models in diffusers/transformers' own on-disk format, every weight
    perturbed: root/base/{unet,vae,text_encoder} and root/clip. Returns the torch modules (eval)."""
    import diffusers
    import torch
    import transformers

    from cid_jax.models import presets

    tiny = presets.get("tiny-sd15")
    torch.manual_seed(seed)
    modules = dict(
        unet=perturb_torch(diffusers.UNet2DConditionModel(**dict(tiny["unet"], in_channels=unet_in_channels)), seed),
        vae=perturb_torch(diffusers.AutoencoderKL(**tiny["vae"]), seed + 1),
        text=perturb_torch(transformers.CLIPTextModel(transformers.CLIPTextConfig(**tiny["text"][0])), seed + 2),
        vision=perturb_torch(transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(**tiny["vision"])), seed + 3))
    for name, sub in (("unet", "base/unet"), ("vae", "base/vae"), ("text", "base/text_encoder"), ("vision", "clip")):
        modules[name].save_pretrained(root / sub)
    return modules


def write_tiny_controlnet(where: pathlib.Path, seed: int):
    """A random ControlNet for the tiny-sd15 UNet (its conditioning embedding down to the VAE's
    factor 8), every weight perturbed, saved in diffusers' format. Returns the torch module."""
    import diffusers

    from cid_jax.models import presets

    plain = diffusers.UNet2DConditionModel(**presets.get("tiny-sd15")["unet"])
    net = diffusers.ControlNetModel.from_unet(plain, conditioning_embedding_out_channels=(8, 16, 16, 16))
    net = perturb_torch(net, seed, 0.1)
    net.save_pretrained(where)
    return net


def load_local_model(root: pathlib.Path, config=None):
    """(model, frozen) of our build from the folders `write_tiny_sd15` wrote, through our loaders."""
    from cid_jax import build

    config = config or inference_demo_config()
    config.model.preset = ""
    config.model.base, config.model.image_encoder = str(root / "base"), str(root / "clip")
    model = build.build_modules(config)
    return model, build.load_frozen(model, config)


# --------------------------------------------------------------------------------- tokenizer


def rendered_vocab_and_merges():
    """OpenAI's CLIP recipe, written out here independently of cid_jax from the packaged merge file:
    byte alphabet, </w> forms, merges[1:48895], specials -> (vocab, merges)."""
    import gzip

    from cid_jax.text.tokenizer import _ASSET

    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in printable]
    chars += [chr(256 + n) for n in range(256 - len(printable))]
    lines = gzip.open(_ASSET).read().decode("utf-8").split("\n")
    merges = lines[1: 49152 - 256 - 2 + 1]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def _special(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_hf_tokenizer(path: pathlib.Path, pad_token="<|endoftext|>") -> pathlib.Path:
    """An SD-style transformers tokenizer folder (SD1.5 tokenizer/: pad <|endoftext|>; SDXL
    tokenizer_2/: "!") built from the packaged vocabulary."""
    vocab, merges = rendered_vocab_and_merges()
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": _special("<|startoftext|>"), "eos_token": _special("<|endoftext|>"),
                "unk_token": _special("<|endoftext|>"), "pad_token": pad_token}
    config = dict(specials, model_max_length=77, do_lower_case=True, errors="replace",
                  tokenizer_class="CLIPTokenizer", add_prefix_space=False)
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ face models

# Parsing maps with chosen parts present (the facial-part tests and the reference judge).
def parts_label_map(labels) -> np.ndarray:
    """A 64x64 parsing map: skin everywhere on a background frame, each label as its own square."""
    m = np.zeros((64, 64), np.uint8)
    m[4:60, 4:60] = 1
    spots = {4: (10, 10), 5: (10, 40), 7: (30, 6), 8: (30, 52), 10: (28, 28), 12: (44, 24), 13: (50, 24)}
    for lab in labels:
        y, x = spots[lab]
        m[y:y + 6, x:x + 6] = lab
    return m


PARTS_CASES = {
    "all": (4, 5, 7, 8, 10, 12, 13),
    "right_side_only": (5, 8, 10, 13),         # left eye and ear hidden, upper lip not parsed
    "mixed": (4, 8, 10, 13),
    "no_ears_no_nose": (5, 12),
    "face_only": (),
}



# The astronaut's face (skimage.data.astronaut()), measured by eye (hairline..chin, cheek..cheek).
def _astronaut_face():
    from cid_jax.face.detect import FaceBox

    return FaceBox(175, 55, 275, 170)


ASTRONAUT_FACE = _astronaut_face()

POOL = 8  # 112 / 8 = 14: the toy recognizer is avg-pool -> flatten -> matmul


def write_toy_arcface(path, weight: np.ndarray):
    """ArcFace's ONNX signature: input 'data' [N, 3, 112, 112], one output [N, 512]."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("AveragePool", ["data"], ["pooled"], name="pool", kernel_shape=[POOL, POOL],
                         strides=[POOL, POOL]),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "fc_w"], ["fc1"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "toy_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 512])],
        initializer=[helper.make_tensor("fc_w", TensorProto.FLOAT, weight.shape, weight.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def expected_embedding(image_as_fed: np.ndarray, kps: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """insightface alignment of the array insightface receives, then the toy graph in numpy."""
    from insightface.utils import face_align

    crop = face_align.norm_crop(image_as_fed, landmark=kps, image_size=112)
    x = (crop[..., ::-1].astype(np.float32) - 127.5) / 127.5  # ArcFace swaps BGR -> RGB
    x = x.transpose(2, 0, 1).reshape(3, 14, POOL, 14, POOL).mean(axis=(2, 4)).reshape(-1)
    e = x @ weight
    return e / np.linalg.norm(e)


class StubDetector:
    """insightface's detector API with fixed detections (SCRFD needs weights we don't have)."""

    def __init__(self, bboxes, kpss):
        self.bboxes, self.kpss, self.seen = np.asarray(bboxes, np.float32), np.asarray(kpss, np.float32), None

    def detect(self, img, max_num=0, metric="default"):
        self.seen = img
        return self.bboxes, self.kpss


# Two faces on the astronaut photo: the first (highest score, insightface's faces[0]) is a small
# patch; the second is the real, larger face with eye/nose/mouth-corner keypoints measured by eye.
SMALL = ([400, 420, 440, 460, 0.99], [[410, 432], [430, 432], [420, 440], [412, 450], [428, 450]])
BIG = ([180, 60, 280, 170, 0.80], [[211, 103], [247, 101], [230, 121], [214, 140], [245, 139]])


# ---------------------------------------------------------------------------- metric models


def write_metric_models(root: pathlib.Path) -> dict:
    """Tiny random metric models in their standard on-disk formats: a transformers CLIPModel folder
    (with its tokenizer files), a transformers ViTModel folder (DINO's layout) and a pytorch-fid
    style Inception `.pth` (full size: the FID network's widths are fixed)."""
    import torch
    import transformers

    from tests.torch_reference.fid_inception import FIDInceptionV3Ref, randomize_

    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1),  # openai/clip-vit-large-patch14's ids: eos 2 is stale
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32), projection_dim=16))
    perturb_torch(clip, 1).save_pretrained(root / "clip")
    write_hf_tokenizer(root / "clip")
    dino = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64,
        patch_size=16, qkv_bias=True), add_pooling_layer=False)
    perturb_torch(dino, 2).save_pretrained(root / "dino")
    torch.save(randomize_(FIDInceptionV3Ref(), 3).state_dict(), root / "pt_inception.pth")
    return {"clip_model": str(root / "clip"), "dino_model": str(root / "dino"),
            "inception": str(root / "pt_inception.pth")}
