"""AutoencoderKL parity with diffusers' PyTorch model, through our loaders (safetensors, .bin, msgpack)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cid_jax.models.presets import SD15_VAE as SD15_VAE_CONFIG
from cid_jax.models.vae import (SD15_VAE, AutoencoderKL, DiagonalGaussian, VAEConfig,
                                abstract_vae_params)
from cid_jax.weights.flax_msgpack import write_msgpack_atomic
from cid_jax.weights.state_dict import WeightsError, torch_key
from cid_jax.weights.vae import FLAX_ATTENTION_RENAMES, load_vae

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32, latent_channels=4,
            sample_size=32, down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=0.5, shift_factor=0.1)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _assert_close(ours, ref, what, rel=1e-4):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= rel * scale, f"{what}: max abs err {err:.3g} > {rel} x scale {scale:.3g}"


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A perturbed tiny diffusers VAE saved as safetensors, plus its reference outputs."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # every weight moves: a wrong layout cannot hide
            std = p.std().item() if p.dim() > 1 else 0.3
            p.add_(torch.randn_like(p) * std)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    ref.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = rng.normal(size=(2, 16, 16, 4)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(_nchw(images)).latent_dist
        outputs = dict(mean=_nhwc(dist.mean), logvar=_nhwc(dist.logvar),
                       decoded=_nhwc(ref.decode(_nchw(latents)).sample))
    return dict(ref=ref, folder=folder, images=images, latents=latents, outputs=outputs)


@pytest.fixture(scope="session")
def loaded(tiny_vae):
    return load_vae(tiny_vae["folder"])


def test_encode_decode_match_diffusers(tiny_vae, loaded):
    module, params = loaded
    assert module.config.scaling_factor == 0.5 and module.config.shift_factor == 0.1
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))
    dist = encode(params, tiny_vae["images"])
    ref = tiny_vae["outputs"]
    _assert_close(dist.mean, ref["mean"], "encode mean")
    _assert_close(dist.logvar, ref["logvar"], "encode logvar")
    _assert_close(decode(params, tiny_vae["latents"]), ref["decoded"], "decode")


def test_bin_checkpoint_loads_same_params(tiny_vae, loaded, tmp_path):
    """The pickled format (torch.save of the state dict) gives the same tree as safetensors."""
    (tmp_path / "config.json").write_text((tiny_vae["folder"] / "config.json").read_text())
    torch.save(tiny_vae["ref"].state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    _, params = load_vae(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_flax_msgpack_with_diffusers_flax_attention_names(loaded, tiny_vae, tmp_path):
    """A diffusers-Flax VAE file (query/key/value/proj_attn) loads into our names."""
    old = {v: k for k, v in FLAX_ATTENTION_RENAMES.items()}
    flat = traverse_util.flatten_dict(loaded[1])
    renamed = {tuple(old.get(p, p) for p in path): v for path, v in flat.items()}
    assert any("proj_attn" in path for path in renamed)
    (tmp_path / "config.json").write_text((tiny_vae["folder"] / "config.json").read_text())
    write_msgpack_atomic(traverse_util.unflatten_dict(renamed), tmp_path / "diffusion_flax_model.msgpack")
    _, params = load_vae(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_pipeline_folder_and_strict_errors(tiny_vae, tmp_path):
    """A pipeline root with vae/ is accepted; a missing weight is named in the error."""
    root = tmp_path / "pipe"
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text((tiny_vae["folder"] / "config.json").read_text())
    state = {k: v for k, v in tiny_vae["ref"].state_dict().items()
             if k != "encoder.mid_block.attentions.0.to_out.0.weight"}
    torch.save(state, root / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"encoder\.mid_block\.attentions\.0\.to_out\.0\.weight"):
        load_vae(root)


def test_full_size_sd15_names_and_shapes_match_diffusers():
    """Every SD1.5 VAE param maps to a diffusers key of the right shape (meta device: no memory)."""
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL.from_config(SD15_VAE_CONFIG)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    flat = traverse_util.flatten_dict(abstract_vae_params(AutoencoderKL(SD15_VAE)))
    ours = {}
    for path, leaf in flat.items():
        shape = tuple(leaf.shape)
        if path[-1] == "kernel":  # Flax layout -> torch layout
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        ours[torch_key(path, len(shape))] = shape
    assert ours == ref_shapes
    n = sum(int(np.prod(leaf.shape)) for leaf in flat.values())
    assert n == sum(int(np.prod(s)) for s in ref_shapes.values()) == 83_653_863


def test_bf16_compute_keeps_fp32_params_and_moments():
    module = AutoencoderKL(VAEConfig.from_dict(TINY), dtype=jnp.bfloat16)
    params = abstract_vae_params(module)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    dist = jax.eval_shape(lambda p, x: module.apply({"params": p}, x, method=module.encode),
                          params, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert dist.mean.dtype == jnp.float32 and dist.mean.shape == (1, 16, 16, 4)
    img = jax.eval_shape(lambda p, z: module.apply({"params": p}, z, method=module.decode),
                         params, jax.ShapeDtypeStruct((1, 16, 16, 4), jnp.float32))
    assert img.dtype == jnp.bfloat16 and img.shape == (1, 32, 32, 3)


def test_diagonal_gaussian_matches_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(1)
    moments = rng.normal(scale=20.0, size=(2, 4, 4, 8)).astype(np.float32)  # logvar beyond the clip
    ref = DiagonalGaussianDistribution(_nchw(moments))
    ours = DiagonalGaussian.from_moments(jnp.asarray(moments))
    _assert_close(ours.mean, _nhwc(ref.mean), "mean", rel=1e-6)
    _assert_close(ours.logvar, _nhwc(ref.logvar), "logvar", rel=1e-6)
    _assert_close(ours.std, _nhwc(ref.std), "std", rel=1e-6)
    np.testing.assert_allclose(ours.kl(), ref.kl().numpy(), rtol=1e-5)
    np.testing.assert_array_equal(ours.mode(), ours.mean)
    a = ours.sample(jax.random.key(0))
    assert a.shape == ours.mean.shape and not np.allclose(a, ours.sample(jax.random.key(1)))


def test_latent_scaling_round_trip_and_config_errors():
    cfg = VAEConfig.from_dict(TINY)
    z = jnp.linspace(-2, 2, 8)
    np.testing.assert_allclose(cfg.scale_latents(z), (z - 0.1) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(cfg.unscale_latents(cfg.scale_latents(z)), z, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_dict({**TINY, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_dict({**TINY, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig.from_dict({**TINY, "norm_num_groups": 24})
    assert json.loads(json.dumps(SD15_VAE_CONFIG))["block_out_channels"] == [128, 256, 512, 512]
