"""SDXL generation: our `generate()` against convert/run_pytorch.py's PyTorch SDXL path (diffusers
SDXL-style UNet with `text_time` added conditioning, two CLIP text encoders, ProjPlus shortcut),
tiny perturbed models written with `save_pretrained` and read by each side's loader, the
ConsistentID weights through our exporter's file."""
import importlib.util

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from cid_jax import export  # noqa: E402
from cid_jax import inference  # noqa: E402
from cid_jax import sampling as pl  # noqa: E402
from cid_jax.data.batch import sdxl_time_ids  # noqa: E402
from cid_jax.models import presets  # noqa: E402
from tests.helpers import REPO, abstract_trainable, perturb_torch, random_params  # noqa: E402

STEPS = 4
TINY = presets.get("tiny-sdxl")  # context 32 + 32 (two tiny text encoders); pooled 32 + 6 time ids x 8


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    import ml_collections

    from cid_jax import build as build_lib
    from cid_jax import run

    root = tmp_path_factory.mktemp("sdxl")
    torch.manual_seed(0)
    models = {
        "base/unet": diffusers.UNet2DConditionModel(**TINY["unet"]),
        "base/vae": diffusers.AutoencoderKL(**TINY["vae"]),
        "base/text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY["text"][0])),
        "base/text_encoder_2": transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**TINY["text"][1])),
        "clip": transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY["vision"])),
    }
    for seed, (sub, m) in enumerate(models.items()):
        perturb_torch(m, seed).save_pretrained(root / sub)

    config = inference.base_config(str(root / "base"), str(root / "clip"))  # detects SDXL: text_encoder_2/
    assert config.model.variant == "sdxl" and config.model.projplus_shortcut
    config.model.lora_rank = TINY["lora_rank"]
    config.model.facial_encoder = ml_collections.ConfigDict(TINY["facial_encoder"])
    config = inference.inference_config(config, "float32")
    model = build_lib.build_modules(config)
    frozen = build_lib.load_frozen(model, config)
    trainable = random_params(abstract_trainable(model), seed=3)
    (ckpt,) = export.export_run(config, trainable, run.RunDir(root), step=0, out=root / "consistentid.safetensors")
    loaded_trainable, _ = inference.load_trainable_file(ckpt, config)  # image_proj_model, SDXL layout
    tok, tok_2 = build_lib.tokenizers_for(config)  # no tokenizer folders: the packaged vocabulary, pads <|endoftext|> / "!"
    loaded = inference.Loaded(model, frozen, loaded_trainable, {"pairing": "reference"}, tok,
                              inference.noise_config_for(config), tok_2)
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
    assert inference.variant("unused", str(root / "base")) == "sdxl" and inference.variant(str(root), None) == "sd15"
    photo, labels, emb = _face()
    face = pl.face_batch(photo, labels, emb)
    t = pl.text_batch("a woman on the moon", "", loaded.tokenizer, face.part_names, variant="sdxl",
                      tokenizer_2=loaded.tokenizer_2)
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
    ours = inference.generate(loaded, photo, labels, emb, [prompt], negative, seeds, steps=STEPS, guidance=7.5,
                        merge_step=merge, sampler="euler", height=64, width=64)

    # The PyTorch side gets the same host inputs (what run_pytorch.py's main builds).
    face = pl.face_batch(photo, labels, emb)
    text = pl.text_batch(prompt, negative, loaded.tokenizer, face.part_names, None, "reference", "sdxl",
                         loaded.tokenizer_2)
    inputs = pl.model_inputs([face] * 2, [text] * 2)
    inputs["time_ids"] = sdxl_time_ids(2, 64, 64)
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
    text = pl.text_batch("a woman on the moon", "blurry", loaded.tokenizer, face.part_names, variant="sdxl",
                         tokenizer_2=loaded.tokenizer_2)
    inputs = pl.model_inputs([face], [text])
    with pytest.raises(ValueError, match="time_ids"):
        pl.embedding_sets(loaded.model, loaded.frozen, loaded.trainable, inputs)
    inputs["time_ids"] = sdxl_time_ids(1, 64, 64)
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
    assert rp.main([f"--checkpoint={ckpt}", f"--base={root / 'base'}", f"--image_encoder={root / 'clip'}",
                    f"--image={tmp_path / 'face.png'}", "--prompt=a portrait", "--steps=2", "--merge-step=0",
                    "--height=64", "--width=64", "--device=cpu",
                    f"--facial-encoder-heads={loaded.model.facial_encoder.heads}", f"--out={out}"]) == 0
    assert np.asarray(Image.open(out)).shape == (64, 64, 3)


def test_sdxl_inpainting_with_a_controlnet_matches_pytorch(sdxl_run, tmp_path):
    """The inpainting + ControlNet path on SDXL: an SDXL ControlNet (text_time added embedding: the
    pooled embedding and time ids of the conditional half, switched at the merge step) through our
    loader, strength 0.75 on a 4-channel UNet, against run_pytorch.py with diffusers' ControlNetModel."""
    root, ckpt, loaded = sdxl_run
    photo, labels, emb = _face()
    net = diffusers.ControlNetModel.from_unet(diffusers.UNet2DConditionModel.from_pretrained(root / "base" / "unet"))
    perturb_torch(net, 9, 0.1).save_pretrained(tmp_path / "controlnet")
    ((module, params),) = inference.load_controlnets([str(tmp_path / "controlnet")], loaded)
    assert module.config.unet.addition_embed_type == "text_time"
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[30:230, 140:330] = 255
    image, small_mask = pl.inpainting_arrays(photo, mask, 64, 64)
    control = pl.control_arrays(pl.canny_control(photo), 64, 64)
    face = pl.face_batch(photo, labels, emb)
    prompt, negative, seed, merge = "a woman on the moon", "blurry", 3, 1
    ours, _ = inference.generate_requests(
        loaded, [inference.ImageRequest(face, prompt, seed)], negative_prompt=negative, steps=STEPS, guidance=7.5,
        merge_step=merge, sampler="euler", height=64, width=64, inpaint=(image, small_mask), strength=0.75,
        controls=[inference.ControlRequest(module, params, control, 0.7, 0.0, 0.75)])

    text = pl.text_batch(prompt, negative, loaded.tokenizer, face.part_names, None, "reference", "sdxl",
                         loaded.tokenizer_2)
    inputs = pl.model_inputs([face], [text])
    inputs["time_ids"] = sdxl_time_ids(1, 64, 64)
    noise = pl.initial_noise([seed], pl.latent_shape(loaded.model, 64, 64))
    spec = importlib.util.spec_from_file_location("run_pytorch", REPO / "convert" / "run_pytorch.py")
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    runner = rp.ConsistentIDTorch(ckpt, root / "base", root / "clip", sampler="euler",
                                  facial_encoder_heads=loaded.model.facial_encoder.heads)
    keep = pl.control_keep(STEPS - pl.first_step(STEPS, 0.75), 0.0, 0.75)
    theirs = pl.to_uint8(runner(inputs, noise, STEPS, merge, 7.5, inpaint=(image[None], small_mask[None]),
                                strength=0.75, controls=[(net.eval(), control[None], 0.7, keep)]))
    plain = pl.to_uint8(runner(inputs, noise, STEPS, merge, 7.5, inpaint=(image[None], small_mask[None]),
                               strength=0.75))
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= 1, f"max uint8 diff {diff.max()}"
    assert np.abs(plain.astype(int) - theirs.astype(int)).max() > 8  # the ControlNet steers


@pytest.fixture(scope="module")
def diffusers_sdxl(sdxl_run, tmp_path_factory):
    """diffusers' own StableDiffusionXLPipeline over the same tiny base, with SDXL's two real-style
    tokenizers (tokenizer/: pad <|endoftext|>; tokenizer_2/: pad "!"), and the ids text_encoder_2 was
    called with, recorded by a forward hook: diffusers, not our runner, is the judge of what encoder 2 reads."""
    from tests.helpers import write_hf_tokenizer

    root, _, _ = sdxl_run
    tok_root = tmp_path_factory.mktemp("sdxl_tokenizers")
    base = root / "base"
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(base / "vae"),
        text_encoder=transformers.CLIPTextModel.from_pretrained(base / "text_encoder"),
        text_encoder_2=transformers.CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2"),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(write_hf_tokenizer(tok_root / "tokenizer")),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(write_hf_tokenizer(tok_root / "tokenizer_2", "!")),
        unet=diffusers.UNet2DConditionModel.from_pretrained(base / "unet"),
        scheduler=diffusers.EulerDiscreteScheduler())
    assert pipe.text_encoder_2.config.eos_token_id == 2  # the published config's stale value, as in SDXL
    seen = []
    pipe.text_encoder_2.register_forward_pre_hook(lambda m, args: seen.append(args[0].numpy().copy()))
    return pipe, seen


@pytest.mark.parametrize("prompt,negative", [("a woman on the moon", "blurry, low quality"),
                                             ("a woman on the moon! wow!!", "! blurry !")])
def test_encoder_2_reads_what_diffusers_sdxl_encode_prompt_feeds_it(sdxl_run, diffusers_sdxl, prompt, negative):
    """The text-only and negative branches: our encoder-2 ids, embeddings and pooled embeddings equal
    diffusers' `encode_prompt` (ids exactly; states to fp32 rounding)."""
    _, _, loaded = sdxl_run
    pipe, seen = diffusers_sdxl
    seen.clear()
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative)
    want_ids = np.concatenate(seen)  # [prompt, negative]
    assert want_ids.shape == (2, 77) and (want_ids[:, -1] == 0).all()  # "!"-padded
    photo, labels, emb = _face()
    t = pl.text_batch(prompt, negative, loaded.tokenizer, pl.face_batch(photo, labels, emb).part_names,
                      variant="sdxl", tokenizer_2=loaded.tokenizer_2)
    ids_2 = np.stack([t.text_only_ids_2, t.negative_ids_2])
    np.testing.assert_array_equal(ids_2, want_ids)

    ours, ours_pooled = jax.jit(loaded.model.encode_text)(loaded.frozen, np.stack([t.text_only_ids, t.negative_ids]),
                                                          ids_2)
    theirs = torch.cat([embeds, neg_embeds]).numpy()
    theirs_pooled = torch.cat([pooled, neg_pooled]).numpy()
    # Two 2-layer encoders of width 32 in fp32: errors of a few ulps of the activations' scale.
    for a, b in ((ours, theirs), (ours_pooled, theirs_pooled)):
        a = np.asarray(a)
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max()), np.abs(a - b).max()


@pytest.mark.parametrize("prompt", ["a woman on the moon", "a woman on the moon!", "!!!"])
def test_encoder_2_reads_the_facial_prompt_as_the_reference_trained(sdxl_run, diffusers_sdxl, prompt):
    """The facial branch: the reference's SDXL training tokenizes it for encoder 2 as
    `tokenizer_2(text.replace("<|facial|>", ""))` (aligned with encoder 1, spec §9): our ids equal
    that, from diffusers' pipeline's real tokenizer_2."""
    from cid_jax.text import FACIAL_TOKEN

    _, _, loaded = sdxl_run
    pipe, _ = diffusers_sdxl
    photo, labels, emb = _face()
    t = pl.text_batch(prompt, "", loaded.tokenizer, pl.face_batch(photo, labels, emb).part_names, variant="sdxl",
                      tokenizer_2=loaded.tokenizer_2)
    assert FACIAL_TOKEN in t.prompt_face
    want = pipe.tokenizer_2(t.prompt_face.replace(FACIAL_TOKEN, ""), padding="max_length", max_length=77,
                            truncation=True).input_ids
    assert want[-1] == 0
    np.testing.assert_array_equal(t.input_ids_2, want)
