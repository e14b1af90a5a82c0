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
from cid_jax import pipeline as pl  # noqa: E402
from tests.test_generate import abstract_trainable, export_trainable, random_params, tiny_config  # noqa: E402
from tests.torch_reference import consistentid as ref  # noqa: E402
from tests.torch_reference import pipeline as ref_pipeline  # noqa: E402

STEPS = 4
setup_paths = {}


def _perturb_torch(module, gen_, scale=0.02):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen_))
    return module


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    from cid_jax.models import build as build_lib
    from cid_jax.weights.state_dict import read_state_dict

    tiny = tiny_config().model.tiny
    root = tmp_path_factory.mktemp("parity")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    unet = _perturb_torch(diffusers.UNet2DConditionModel(**dict(tiny.unet)), g)
    vae = _perturb_torch(diffusers.AutoencoderKL(**dict(tiny.vae)), g)
    text = _perturb_torch(transformers.CLIPTextModel(transformers.CLIPTextConfig(**dict(tiny.text[0]))), g)
    vision = _perturb_torch(transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**dict(tiny.vision))), g)
    for m, sub in ((unet, "base/unet"), (vae, "base/vae"), (text, "base/text_encoder"), (vision, "clip")):
        m.eval()
        m.save_pretrained(root / sub)

    config = tiny_config()
    config.model.tiny = None
    config.model.base, config.model.image_encoder = str(root / "base"), str(root / "clip")
    config = gen.inference_config(config, "float32")
    model = build_lib.build_modules(config)
    frozen = build_lib.load_frozen_pretrained(model, config)
    trainable = random_params(abstract_trainable(model, frozen), seed=2)
    ckpt = root / "consistentid.safetensors"
    export_trainable(trainable, model, ckpt)
    loaded_trainable, _ = gen.load_trainable_file(ckpt, config, model)

    # PyTorch ConsistentID modules from the exported file.
    groups = {}
    for k, v in read_state_dict(ckpt).items():
        grp, _, rest = k.partition(".")
        groups.setdefault(grp, {})[rest] = torch.from_numpy(np.array(v))
    fe_cfg = config.model.facial_encoder
    c, d = tiny.unet["cross_attention_dim"], tiny.vision["hidden_size"]
    fe = ref.FacialEncoder(embedding_dim=d, output_dim=c, embed_dim=c)
    fe.visual_projection = ref.AttentionMLP(d, c, dim=fe_cfg.dim, depth=fe_cfg.depth,
                                            dim_head=fe_cfg.dim // fe_cfg.heads, heads=fe_cfg.heads)
    fe.load_state_dict(groups["FacialEncoder"], strict=True)
    proj = ref.ProjPlusModel(c, 512, d, 4)
    proj.load_state_dict(groups["image_proj"], strict=True)
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


def test_run_pytorch_script_matches_jax(setup, jax_sampling):
    """convert/run_pytorch.py (its own PyTorch modules, loading our exported file and the saved
    diffusers/transformers folders) == our pipeline (Euler, merge step 1, the same inputs and noise)."""
    import importlib.util

    _, _, _, _, inputs, noise = setup
    root = setup_paths["root"]
    spec = importlib.util.spec_from_file_location(
        "run_pytorch", pathlib.Path(__file__).resolve().parent.parent / "convert" / "run_pytorch.py")
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    runner = rp.ConsistentIDTorch(root / "consistentid.safetensors", root / "base", root / "clip",
                                  sampler="euler", facial_encoder_heads=tiny_config().model.facial_encoder.heads)
    got = runner(inputs, noise, STEPS, 1, 5.0)
    want, _ = jax_sampling("euler", 1)
    err = np.abs(got - want).max()
    assert err < 2e-3, f"image max err {err}"
