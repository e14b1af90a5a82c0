"""SDXL generation: our `generate()` against convert/run_pytorch.py's PyTorch SDXL path (diffusers
SDXL-style UNet with `text_time` added conditioning, two CLIP text encoders, ProjPlus shortcut),
tiny perturbed models written with `save_pretrained` and read by each side's loader, the
ConsistentID weights through our exporter's file."""
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from cid_jax import export  # noqa: E402
from cid_jax import generate as gen  # noqa: E402
from cid_jax import pipeline as pl  # noqa: E402
from tests.test_generate import abstract_trainable, random_params, tiny_config  # noqa: E402
from tests.test_unet import TINY_SDXL  # noqa: E402

STEPS = 4
REPO = pathlib.Path(__file__).resolve().parent.parent
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, eos_token_id=49407)
# test_unet's SDXL-shaped UNet with a context of 32 + 32 (the two tiny text encoders) and an added
# embedding of encoder 2's 32-wide pooled output + 6 time ids x 8.
UNET = dict(TINY_SDXL, cross_attention_dim=64, projection_class_embeddings_input_dim=32 + 6 * 8)


def _perturbed(module, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    from cid_jax.models import build as build_lib
    from cid_jax.text import CLIPTokenizer, add_trigger_tokens

    root = tmp_path_factory.mktemp("sdxl")
    demo = tiny_config().model.tiny
    torch.manual_seed(0)
    models = {
        "base/unet": diffusers.UNet2DConditionModel(**UNET),
        "base/vae": diffusers.AutoencoderKL(**dict(demo.vae, scaling_factor=0.13025)),
        "base/text_encoder": transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**TEXT, hidden_act="quick_gelu")),
        "base/text_encoder_2": transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**TEXT, hidden_act="gelu", projection_dim=32)),
        "clip": transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**dict(demo.vision))),
    }
    for seed, (sub, m) in enumerate(models.items()):
        _perturbed(m, seed).save_pretrained(root / sub)

    config = gen.base_config(str(root / "base"), str(root / "clip"))  # detects SDXL: text_encoder_2/
    assert config.model.variant == "sdxl" and config.model.projplus_shortcut
    demo_config = tiny_config()
    config.model.lora_rank = demo_config.model.lora_rank
    config.model.facial_encoder = demo_config.model.facial_encoder
    config = gen.inference_config(config, "float32")
    model = build_lib.build_modules(config)
    frozen = build_lib.load_frozen_pretrained(model, config)
    trainable = random_params(abstract_trainable(model, frozen), seed=3)
    (ckpt,) = export.export_run(config, trainable, root, step=0, out=root / "consistentid.safetensors")
    loaded_trainable, _ = gen.load_trainable_file(ckpt, config, model)  # image_proj_model, SDXL layout
    tok = CLIPTokenizer.default()
    add_trigger_tokens(tok)
    loaded = gen.Loaded(model, frozen, loaded_trainable, {"pairing": "reference"}, tok, dict(config.noise))
    return root, ckpt, loaded


def _face():
    import skimage.data

    from cid_jax.face import template_parse

    photo = skimage.data.astronaut()
    emb = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    return photo, template_parse(photo), emb / np.linalg.norm(emb)


def test_sdxl_text_batch_encodes_the_bare_prompt_for_the_text_only_branch(sdxl_run):
    root, _, loaded = sdxl_run
    # The CLI knows the variant before loading (it parses the photo at 1280 px for SDXL).
    assert gen.is_sdxl("unused", str(root / "base")) and not gen.is_sdxl(str(root), None)
    photo, labels, emb = _face()
    face = pl.face_batch(photo, labels, emb)
    t = pl.text_batch("a woman on the moon", "", loaded.tokenizer, face.part_names, variant="sdxl")
    assert "; Detail:" in t.prompt_face and "a mouth" in t.prompt_face  # the SDXL caption
    want = np.asarray(loaded.tokenizer(["a woman on the moon"], max_length=77, padding="max_length",
                                       truncation=True)[0], np.int32)
    np.testing.assert_array_equal(t.text_only_ids, want)
    assert t.facial_token_mask.sum() > 0


@pytest.mark.parametrize("merge", [1, -1])
def test_sdxl_generation_matches_pytorch(sdxl_run, merge):
    root, ckpt, loaded = sdxl_run
    photo, labels, emb = _face()
    prompt, negative, seeds = "a woman on the moon", "blurry", [0, 1]
    ours = gen.generate(loaded, photo, labels, emb, [prompt], negative, seeds, steps=STEPS, guidance=7.5,
                        merge_step=merge, sampler="euler", height=64, width=64)

    # The PyTorch side gets the same host inputs (what run_pytorch.py's main builds).
    face = pl.face_batch(photo, labels, emb)
    text = pl.text_batch(prompt, negative, loaded.tokenizer, face.part_names, None, "reference", "sdxl")
    inputs = pl.model_inputs([face] * 2, [text] * 2)
    inputs["time_ids"] = pl.sdxl_time_ids(2, 64, 64)
    noise = pl.initial_noise(seeds, pl.latent_shape(loaded.model, 64, 64))
    spec = importlib.util.spec_from_file_location("run_pytorch", REPO / "convert" / "run_pytorch.py")
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    runner = rp.ConsistentIDTorch(ckpt, root / "base", root / "clip", sampler="euler",
                                  facial_encoder_heads=loaded.model.facial_encoder.heads)
    assert runner.sdxl
    theirs = pl.to_uint8(runner(inputs, noise, STEPS, merge, 7.5))
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= 1, f"max uint8 diff {diff.max()}"
    assert ours.std() > 5  # a real image, not a constant


def test_sdxl_pooled_embedding_switches_at_the_merge_step(sdxl_run):
    """The text-only and facial sets differ in their pooled embeddings too, so a pipeline that kept
    one pooled embedding across the merge would not match the test above."""
    _, _, loaded = sdxl_run
    photo, labels, emb = _face()
    face = pl.face_batch(photo, labels, emb)
    text = pl.text_batch("a woman on the moon", "blurry", loaded.tokenizer, face.part_names, variant="sdxl")
    inputs = pl.model_inputs([face], [text])
    with pytest.raises(ValueError, match="time_ids"):
        pl.embedding_sets(loaded.model, loaded.frozen, loaded.trainable, inputs)
    inputs["time_ids"] = pl.sdxl_time_ids(1, 64, 64)
    sets = jax.jit(lambda f, t, x: pl.embedding_sets(loaded.model, f, t, x))(loaded.frozen, loaded.trainable, inputs)
    assert sets.null.shape == (1, 81, 64) and sets.text_pooled.shape == (1, 32)
    assert np.abs(np.asarray(sets.text_pooled) - np.asarray(sets.augmented_pooled)).max() > 1e-3


def test_run_pytorch_cli_on_sdxl(sdxl_run, tmp_path):
    """convert/run_pytorch.py end to end on an SDXL base: detection, SDXL defaults, time ids, image out."""
    import skimage.data
    from PIL import Image

    root, ckpt, loaded = sdxl_run
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "face.png")
    spec = importlib.util.spec_from_file_location("run_pytorch", REPO / "convert" / "run_pytorch.py")
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    out = tmp_path / "out.png"
    assert rp.main([f"--checkpoint={ckpt}", f"--base={root / 'base'}", f"--image-encoder={root / 'clip'}",
                    f"--image={tmp_path / 'face.png'}", "--prompt=a portrait", "--steps=2", "--merge-step=0",
                    "--height=64", "--width=64", "--device=cpu",
                    f"--facial-encoder-heads={loaded.model.facial_encoder.heads}", f"--out={out}"]) == 0
    assert np.asarray(Image.open(out)).shape == (64, 64, 3)
