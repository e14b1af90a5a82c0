"""Our JAX sampling pipeline against a PyTorch rendering of the reference loop (diffusers UNet +
PyTorch ConsistentID processors), tiny models, every weight perturbed, weights passed through the
real files: diffusers/transformers `save_pretrained` folders read by our loaders, and our exported
ConsistentID safetensors read by the PyTorch modules (strict `load_state_dict`)."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from cid_jax import generate as gen  # noqa: E402
from cid_jax import inference  # noqa: E402
from cid_jax import sampling as pl  # noqa: E402
from tests.helpers import (abstract_trainable, export_trainable, inference_demo_config, load_local_model,  # noqa: E402
                           perturb_torch, random_params, write_tiny_controlnet, write_tiny_sd15)
from tests.torch_reference import consistentid as ref  # noqa: E402
from tests.torch_reference import pipeline as ref_pipeline  # noqa: E402

STEPS = 4
setup_paths = {}


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    from cid_jax.models import presets
    from cid_jax.weights.state_dict import read_state_dict

    tiny = presets.get("tiny-sd15")
    root = tmp_path_factory.mktemp("parity")
    written = write_tiny_sd15(root)
    unet, vae, text, vision = (written[k] for k in ("unet", "vae", "text", "vision"))
    config = inference_demo_config()
    model, frozen = load_local_model(root, config)
    trainable = random_params(abstract_trainable(model), seed=2)
    ckpt = root / "consistentid.safetensors"
    export_trainable(trainable, config, ckpt)
    loaded_trainable, _ = inference.load_trainable_file(ckpt, config)

    # PyTorch ConsistentID modules from the exported file.
    groups = {}
    for k, v in read_state_dict(ckpt).items():
        grp, _, rest = k.partition(".")
        groups.setdefault(grp, {})[rest] = torch.from_numpy(np.array(v))
    fe_cfg = config.model.facial_encoder
    c, d = tiny["unet"]["cross_attention_dim"], tiny["vision"]["hidden_size"]
    fe = ref.FacialEncoder(embedding_dim=d, output_dim=c, embed_dim=c)
    fe.visual_projection = ref.AttentionMLP(d, c, dim=fe_cfg.dim, depth=fe_cfg.depth,
                                            dim_head=fe_cfg.dim // fe_cfg.heads, heads=fe_cfg.heads)
    fe.load_state_dict(groups["FacialEncoder"], strict=True)
    proj = ref.ProjPlusModel(c, 512, d, 4)
    proj.load_state_dict(groups["image_proj_model"], strict=True)  # the flat file's group name
    adapters = ref.set_consistentid_processors(unet, rank=config.model.lora_rank, num_tokens=4)
    adapters.load_state_dict(groups["adapter_modules"], strict=True)
    torch_models = dict(unet=unet.eval(), vae=vae, text=text, vision=vision, fe=fe.eval(), proj=proj.eval())

    # Host inputs: the astronaut with the offline template parse and a random unit ID embedding.
    import skimage.data

    from cid_jax.face import template_parse
    from cid_jax.text import CLIPTokenizer, add_trigger_tokens

    photo = skimage.data.astronaut()
    emb = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    face = pl.face_batch(photo, template_parse(photo), emb / np.linalg.norm(emb))
    tok = CLIPTokenizer.default()
    add_trigger_tokens(tok)
    texts = [pl.text_batch("a woman on the moon", "blurry", tok, face.part_names),
             pl.text_batch("a portrait, cinematic", "", tok, face.part_names)]
    inputs = pl.model_inputs([face, face], texts)
    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    setup_paths["root"] = root
    return model, frozen, loaded_trainable, torch_models, inputs, noise


@pytest.fixture(scope="session")
def torch_sets(setup):
    _, _, _, tm, inputs, _ = setup
    return ref_pipeline.embedding_sets(tm["text"], tm["vision"], tm["fe"], tm["proj"], inputs)


@pytest.fixture(scope="session")
def jax_sets(setup):
    model, frozen, trainable, _, inputs, _ = setup
    return jax.jit(lambda f, t, x: pl.embedding_sets(model, f, t, x))(frozen, trainable, inputs)


def test_embedding_sets_match(jax_sets, torch_sets):
    for name, ours, theirs in zip(("null", "text", "augmented"), jax_sets, torch_sets):
        ours, theirs = np.asarray(ours), theirs.numpy()
        err = np.abs(ours - theirs).max()
        assert err < 1e-4 * np.abs(theirs).max(), f"{name}: max err {err}"
    # The three sets really differ (so the merge switch is observable).
    assert np.abs(np.asarray(jax_sets.text) - np.asarray(jax_sets.augmented)).max() > 1e-3


@pytest.fixture(scope="session")
def jax_sampling(setup, jax_sets):
    """(sampler, merge) -> our (images, per-step guided eps), memoised: one jitted function,
    compiled once per sampler (the merge step and guidance are traced)."""
    model, frozen, trainable, _, _, noise = setup

    @jax.jit
    def run(frozen, trainable, sets, noise, state, merge, guidance):
        x, eps = pl.sample(model, frozen, trainable, pl.EmbeddingSets(*sets), noise, state, merge, guidance,
                           collect=True)
        return pl.decode(model, frozen, x), eps

    memo = {}

    def get(sampler, merge):
        if (sampler, merge) not in memo:
            state = pl.scheduler_state(sampler, STEPS)
            img, eps = run(frozen, trainable, tuple(jax_sets), noise, state, jnp.int32(merge), jnp.float32(5.0))
            memo[sampler, merge] = np.asarray(img), np.asarray(eps)
        return memo[sampler, merge]

    get.run = run
    return get


@pytest.mark.parametrize("sampler,merge", [("euler", 1), ("euler", -1), ("ddim", 1), ("ddim", -1)])
def test_sampling_matches_pytorch(setup, jax_sampling, torch_sets, sampler, merge):
    _, _, _, tm, _, noise = setup
    cls = {"euler": diffusers.EulerDiscreteScheduler, "ddim": diffusers.DDIMScheduler}[sampler]
    from cid_jax.schedulers import SD15_SCHEDULER_CONFIG

    sched = cls.from_config(SD15_SCHEDULER_CONFIG)
    want_img, want_eps = ref_pipeline.sample(tm["unet"], tm["vae"], sched, torch_sets, noise, STEPS, merge, 5.0)
    img, eps = jax_sampling(sampler, merge)
    for i in range(STEPS):
        err = np.abs(eps[i] - want_eps[i]).max()
        assert err < 1e-4 * np.abs(want_eps[i]).max(), f"step {i}: max err {err}"
    err = np.abs(img - want_img).max()
    assert err < 2e-3, f"image max err {err}"
    assert jax_sampling.run._cache_size() <= 2  # one compilation per sampler, whatever the merge step


def _run_pytorch_module():
    """convert/run_pytorch.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "run_pytorch", pathlib.Path(__file__).resolve().parent.parent / "convert" / "run_pytorch.py")
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    return rp


def test_run_pytorch_script_matches_jax(setup, jax_sampling):
    """convert/run_pytorch.py (its own PyTorch modules, loading our exported file and the saved
    diffusers/transformers folders) == our pipeline (Euler, merge step 1, the same inputs and noise)."""
    _, _, _, _, inputs, noise = setup
    root = setup_paths["root"]
    rp = _run_pytorch_module()
    runner = rp.ConsistentIDTorch(root / "consistentid.safetensors", root / "base", root / "clip",
                                  sampler="euler", facial_encoder_heads=inference_demo_config().model.facial_encoder.heads)
    got = runner(inputs, noise, STEPS, 1, 5.0)
    want, _ = jax_sampling("euler", 1)
    err = np.abs(got - want).max()
    assert err < 2e-3, f"image max err {err}"


def test_both_command_lines_keep_right_side_parts(setup, tmp_path, capsys, caplog):
    """`python -m cid_jax.generate` and `convert/run_pytorch.py` end to end on a parsing map whose
    left eye, left ear and upper lip are missing (hair over the face, a closed mouth): both compose
    the facial prompt with all five words, as the reference keeps Right_Eye, Right_Ear and
    Lower_Lip, and both write the same image."""
    import skimage.data
    from PIL import Image

    from cid_jax.face import template_parse
    from cid_jax.face.parsing import L_EAR, L_EYE, R_EAR, R_EYE, SKIN, U_LIP

    root = setup_paths["root"]
    photo = skimage.data.astronaut()
    labels = template_parse(photo)
    assert {R_EYE, R_EAR} <= set(np.unique(labels).tolist())
    labels = np.where(np.isin(labels, [L_EYE, L_EAR, U_LIP]), SKIN, labels).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "face.png")
    Image.fromarray(labels).save(tmp_path / "parsing.png")
    common = [f"--checkpoint={root / 'consistentid.safetensors'}", f"--base={root / 'base'}",
              f"--image_encoder={root / 'clip'}", f"--image={tmp_path / 'face.png'}",
              f"--parsing={tmp_path / 'parsing.png'}", "--prompt=a portrait", "--steps=3", "--merge_step=1",
              "--height=64", "--width=64", "--seed=5"]
    with caplog.at_level("INFO", logger="cid_jax"):  # the line comes from cid_jax.inference
        assert gen.main(common + ["--dtype=float32", f"--out={tmp_path / 'jax.png'}"]) == 0
    ours_prompt = [r.getMessage() for r in caplog.records if r.getMessage().startswith("facial prompt:")]
    rp = _run_pytorch_module()
    heads = inference_demo_config().model.facial_encoder.heads
    (tmp_path / "a_file").write_text("")
    assert rp.main(common + [f"--out={tmp_path / 'a_file' / 'torch.png'}"]) == 2  # refused before any work
    assert "--out=" in capsys.readouterr().err
    assert rp.main(common + [f"--facial_encoder_heads={heads}", f"--out={tmp_path / 'torch.png'}"]) == 0
    theirs_prompt = [line for line in capsys.readouterr().err.splitlines() if line.startswith("facial prompt:")]
    prompts = ours_prompt + theirs_prompt
    assert len(prompts) == 2 and prompts[0] == prompts[1]
    for word in ("face", "ears", "eyes", "nose", "mouth"):
        assert f"{word} <|facial|>" in prompts[0], (word, prompts[0])
    ours, theirs = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("jax", "torch"))
    assert ours.shape == theirs.shape == (64, 64, 3) and np.abs(ours - theirs).max() <= 1


# ------------------------------------------------------------------------------------- inpainting


def _inpainting_case(model):
    """The astronaut at the output size, with a white (repaint) box over her face and hair."""
    import skimage.data

    photo = skimage.data.astronaut()  # 512 x 512
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[30:230, 140:330] = 255
    side = 8 * model.vae.config.downscale  # the 8 x 8 latents of `noise`
    image, small_mask = pl.inpainting_arrays(photo, mask, side, side)
    return np.stack([image, image]), np.stack([small_mask, small_mask])


def _jax_inpaint(model, frozen, trainable, sets, noise, image, mask, sampler, strength, merge, controls=()):
    """Our inpainting run; `controls`: (module, params, control image, scale, keep) each."""
    state = pl.scheduler_state(sampler, STEPS)
    start = pl.first_step(STEPS, strength)
    modules = [c[0] for c in controls]

    @jax.jit
    def run(frozen, trainable, sets, noise, image, mask, control_args):
        inpainting = pl.inpainting_inputs(model, frozen, image, mask)
        steering = [pl.Control(m, *args) for m, args in zip(modules, control_args)]
        x, eps = pl.sample(model, frozen, trainable, pl.EmbeddingSets(*sets), noise, state, jnp.int32(merge),
                           jnp.float32(5.0), collect=True, inpainting=inpainting, start=start, controls=steering)
        return pl.decode(model, frozen, x), eps

    img, eps = run(frozen, trainable, tuple(sets), noise, image, mask, [tuple(c[1:]) for c in controls])
    return np.asarray(img), np.asarray(eps)


def _compare_runs(ours, theirs):
    (img, eps), (want_img, want_eps) = ours, theirs
    assert len(eps) == len(want_eps)
    for i in range(len(eps)):
        err = np.abs(eps[i] - want_eps[i]).max()
        assert err < 1e-4 * np.abs(want_eps[i]).max(), f"step {i}: max err {err}"
    err = np.abs(img - want_img).max()
    assert err < 2e-3, f"image max err {err}"


@pytest.mark.parametrize("sampler,strength", [("euler", 1.0), ("euler", 0.6), ("ddim", 0.75)])
def test_inpainting_with_a_four_channel_unet_matches_the_reference_loop(setup, jax_sets, torch_sets, sampler,
                                                                         strength):
    model, frozen, trainable, tm, _, noise = setup
    image, mask = _inpainting_case(model)
    cls = {"euler": diffusers.EulerDiscreteScheduler, "ddim": diffusers.DDIMScheduler}[sampler]
    from cid_jax.schedulers import SD15_SCHEDULER_CONFIG

    want = ref_pipeline.inpaint(tm["unet"], tm["vae"], cls.from_config(SD15_SCHEDULER_CONFIG), torch_sets, noise,
                                image, mask, STEPS, strength, 1, 5.0)
    ours = _jax_inpaint(model, frozen, trainable, jax_sets, noise, image, mask, sampler, strength, 1)
    _compare_runs(ours, want)


def test_inpainting_with_a_nine_channel_unet_matches_the_reference_loop(setup, torch_sets, tmp_path):
    """An inpainting UNet (runwayml/stable-diffusion-inpainting's layout: 9 input channels) loaded
    through our loader, with the same adapters, against the reference loop."""
    from cid_jax import build as build_lib
    from cid_jax.models import presets
    from cid_jax.weights.state_dict import read_state_dict

    model4, _, trainable, tm, inputs, noise = setup
    root = setup_paths["root"]
    tiny = presets.get("tiny-sd15")
    unet9 = perturb_torch(diffusers.UNet2DConditionModel(**dict(tiny["unet"], in_channels=9)), 5)
    (tmp_path / "base").mkdir()
    unet9.save_pretrained(tmp_path / "base" / "unet")
    for part in ("vae", "text_encoder"):
        (tmp_path / "base" / part).symlink_to(root / "base" / part)
    adapters = ref.set_consistentid_processors(unet9, rank=inference_demo_config().model.lora_rank, num_tokens=4)
    groups = {k.partition(".")[2]: torch.from_numpy(np.array(v))
              for k, v in read_state_dict(root / "consistentid.safetensors").items()
              if k.startswith("adapter_modules.")}
    adapters.load_state_dict(groups, strict=True)

    config = inference_demo_config()
    config.model.preset = ""
    config.model.base, config.model.image_encoder = str(tmp_path / "base"), str(root / "clip")
    model = build_lib.build_modules(config)
    assert model.unet.config.in_channels == 9
    frozen = build_lib.load_frozen(model, config)
    sets = jax.jit(lambda f, t, x: pl.embedding_sets(model, f, t, x))(frozen, trainable, inputs)
    image, mask = _inpainting_case(model)
    from cid_jax.schedulers import SD15_SCHEDULER_CONFIG

    want = ref_pipeline.inpaint(unet9.eval(), tm["vae"], diffusers.EulerDiscreteScheduler.from_config(
        SD15_SCHEDULER_CONFIG), torch_sets, noise, image, mask, STEPS, 1.0, 1, 5.0)
    _compare_runs(_jax_inpaint(model, frozen, trainable, sets, noise, image, mask, "euler", 1.0, 1), want)
    runner = _run_pytorch_module().ConsistentIDTorch(root / "consistentid.safetensors", tmp_path / "base",
                                                     root / "clip", facial_encoder_heads=config.model.facial_encoder.heads)
    err = np.abs(runner(inputs, noise, STEPS, 1, 5.0, inpaint=(image, mask)) - want[0]).max()
    assert err < 2e-3, f"convert/run_pytorch.py: image max err {err}"
    with pytest.raises(Exception, match="inpainting one"):
        pl.sample(model, frozen, trainable, pl.EmbeddingSets(*sets), noise, pl.scheduler_state("euler", STEPS),
                  1, 5.0)


def test_inpainting_arrays_equal_diffusers_processors():
    """The init image and mask as diffusers' VaeImageProcessor makes them for the reference
    (Lanczos resize; the mask grey, binarised), and a mask of another size refused."""
    import skimage.data
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    photo = skimage.data.astronaut()
    mask = np.zeros(photo.shape, np.uint8)
    mask[100:300, 120:400] = (255, 255, 255)
    mask[300:320, 120:400] = (200, 90, 40)  # a coloured band: grey level ~0.45, kept
    image, small = pl.inpainting_arrays(photo, mask, 96, 128)
    want_image = VaeImageProcessor(vae_scale_factor=8).preprocess(Image.fromarray(photo), height=96, width=128)
    want_mask = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True).preprocess(Image.fromarray(mask), height=96, width=128)
    np.testing.assert_allclose(image * 2 - 1, want_image[0].numpy().transpose(1, 2, 0), atol=1e-6)
    np.testing.assert_array_equal(small, want_mask[0].numpy().transpose(1, 2, 0))
    assert 0 < small.mean() < 1
    with pytest.raises(Exception, match="the mask is 256x256 but the init image is 512x512"):
        pl.inpainting_arrays(photo, mask[::2, ::2], 64, 64)


def test_controlnets_with_inpainting_match_the_reference_loop(setup, jax_sets, torch_sets, tmp_path):
    """The reference's ControlNet + inpainting pipeline: an inpainting ControlNet (masked pixels at
    -1) for the whole run and a second one on an edge picture for the middle of it, both through
    our ControlNet loader, with a 4-channel UNet at strength 0.75."""
    from cid_jax.weights.controlnet import load_controlnet

    model, frozen, trainable, tm, _, noise = setup
    image, mask = _inpainting_case(model)
    control_images = [np.stack([pl.inpaint_control(image[0], mask[0])] * 2),
                      np.stack([pl.control_arrays(np.asarray((image[0] * 255).astype(np.uint8))[..., ::-1].copy(),
                                                  *image.shape[1:3])] * 2)]
    settings = [(0.8, 0.0, 1.0), (0.5, 0.25, 0.75)]
    torch_nets, controls = [], []
    for k, (control_image, (scale, begin, end)) in enumerate(zip(control_images, settings)):
        net = write_tiny_controlnet(tmp_path / f"controlnet{k}", 10 + k)
        module, params = load_controlnet(tmp_path / f"controlnet{k}")
        torch_nets.append((net, control_image, scale, begin, end))
        start = pl.first_step(STEPS, 0.75)
        controls.append((module, params, control_image, scale, pl.control_keep(STEPS - start, begin, end)))
    from cid_jax.schedulers import SD15_SCHEDULER_CONFIG

    want = ref_pipeline.inpaint(tm["unet"], tm["vae"], diffusers.DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG),
                                torch_sets, noise, image, mask, STEPS, 0.75, 1, 5.0, controlnets=torch_nets)
    ours = _jax_inpaint(model, frozen, trainable, jax_sets, noise, image, mask, "ddim", 0.75, 1, controls)
    _compare_runs(ours, want)
    without = _jax_inpaint(model, frozen, trainable, jax_sets, noise, image, mask, "ddim", 0.75, 1)
    assert np.abs(ours[1] - without[1]).max() > 1e-3  # the ControlNets steer


def test_both_command_lines_inpaint_with_two_controlnets_alike(setup, tmp_path):
    """`generate` and `convert/run_pytorch.py` with the same inpainting and ControlNet flags (an
    inpainting ControlNet and a canny one for the middle of the run, DDIM, strength 0.75) write the
    same image, and one without the ControlNets differs."""
    import skimage.data
    from PIL import Image

    root = setup_paths["root"]
    photo = skimage.data.astronaut()
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[30:230, 140:330] = 255
    Image.fromarray(photo).save(tmp_path / "face.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    for k in range(2):
        write_tiny_controlnet(tmp_path / f"controlnet{k}", 30 + k)
    common = [f"--checkpoint={root / 'consistentid.safetensors'}", f"--base={root / 'base'}",
              f"--image_encoder={root / 'clip'}", f"--image={tmp_path / 'face.png'}", "--prompt=a portrait",
              "--steps=4", "--merge_step=1", "--height=64", "--width=64", "--seed=5", "--sampler=ddim",
              f"--mask={tmp_path / 'mask.png'}", "--strength=0.75"]
    controls = [f"--controlnet={tmp_path / 'controlnet0'}", "--control_image=inpaint", "--controlnet_scale=0.8",
                f"--controlnet={tmp_path / 'controlnet1'}", "--control_image=canny", "--controlnet_scale=0.5",
                "--control_guidance_start=0.25"]
    assert gen.main(common + controls + ["--dtype=float32", f"--out={tmp_path / 'jax.png'}"]) == 0
    assert gen.main(common + ["--dtype=float32", f"--out={tmp_path / 'plain.png'}"]) == 0
    heads = inference_demo_config().model.facial_encoder.heads
    assert _run_pytorch_module().main(common + controls + [f"--facial_encoder_heads={heads}",
                                                           f"--out={tmp_path / 'torch.png'}"]) == 0
    ours, theirs, plain = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int)
                           for n in ("jax", "torch", "plain"))
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - plain).max() > 8
