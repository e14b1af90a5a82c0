"""ControlNet parity: diffusers' PyTorch ControlNetModel (saved with save_pretrained, loaded through
our loader) vs ours; its residuals in our UNet vs diffusers' UNet with the same residuals; several
ControlNets vs diffusers' MultiControlNetModel.

Tolerance: float32 through a few dozen convolutions, attention and group norms, each rounding at
~6e-8 relative and summed in another order by XLA and oneDNN: errors stay orders of magnitude
below 1e-4 of the output's scale (the bound the UNet parity tests use)."""
import jax
import numpy as np
import pytest

from cid_jax.errors import InputError
from cid_jax.models import presets
from cid_jax.models.controlnet import sum_controls
from cid_jax.weights.controlnet import load_controlnet
from cid_jax.weights.state_dict import WeightsError
from cid_jax.weights.unet import load_unet
from tests.helpers import perturb_torch

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY_SD15 = presets.get("tiny-sd15")["unet"]   # 3 levels, context 64
COND_CHANNELS = (8, 16, 16, 32)                 # the control image enters at 8x the latents' side
LATENT = 8


def _save_unet(tmp_path_factory, seed):
    model = perturb_torch(diffusers.UNet2DConditionModel(**TINY_SD15), seed, 0.1)
    folder = tmp_path_factory.mktemp("unet")
    model.save_pretrained(folder)
    return model, folder


def _save_controlnet(tmp_path_factory, unet, seed, safe=True, **config):
    model = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CHANNELS, **config)
    model = perturb_torch(model, seed, 0.1)  # the zero-initialised convs become non-zero
    folder = tmp_path_factory.mktemp("controlnet")
    model.save_pretrained(folder, safe_serialization=safe)
    return model, folder


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    return _save_unet(tmp_path_factory, 0)


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory, unet):
    return _save_controlnet(tmp_path_factory, unet[0], 1)


def _inputs(seed, batch=2, text_len=7):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, LATENT, LATENT)).astype(np.float32)
    ctx = rng.standard_normal((batch, text_len, 64)).astype(np.float32)
    image = rng.uniform(0, 1, (batch, 3, 8 * LATENT, 8 * LATENT)).astype(np.float32)
    return x, np.array([10, 741]), ctx, image


def nhwc(x):
    return x.transpose(0, 2, 3, 1)


def _close(ours, ref):
    ref = ref.detach().numpy()
    ref = nhwc(ref) if ref.ndim == 4 else ref
    err = float(np.max(np.abs(np.asarray(ours) - ref)))
    scale = float(np.max(np.abs(ref)))
    assert scale > 0 and err <= 1e-4 * scale, f"max abs err {err:.3g} vs output scale {scale:.3g}"


def _torch_residuals(model, x, t, ctx, image, scale, guess_mode=False):
    with torch.no_grad():
        out = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), torch.from_numpy(image),
                    conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
    return list(out[0]), out[1]


def _our_residuals(module, params, x, t, ctx, image, scale, guess_mode=False):
    return jax.jit(module.apply, static_argnames="guess_mode")(
        {"params": params}, nhwc(x), t, ctx, nhwc(image), scale, guess_mode=guess_mode)


def test_controlnet_matches_diffusers(controlnet):
    torch_model, folder = controlnet
    module, params = load_controlnet(folder)
    x, t, ctx, image = _inputs(0)
    ref_down, ref_mid = _torch_residuals(torch_model, x, t, ctx, image, 0.7)
    down, mid = _our_residuals(module, params, x, t, ctx, image, 0.7)
    levels = len(TINY_SD15["block_out_channels"])
    assert len(down) == len(ref_down) == 1 + levels * TINY_SD15["layers_per_block"] + levels - 1  # conv_in,
    # each level's layers, the downsamplers
    for ours, ref in zip(down, ref_down):
        _close(ours, ref)
    _close(mid, ref_mid)


def test_guess_mode_bgr_and_a_bin_file_match_diffusers(tmp_path_factory, unet):
    torch_model, folder = _save_controlnet(tmp_path_factory, unet[0], 2, safe=False,
                                           controlnet_conditioning_channel_order="bgr")
    module, params = load_controlnet(folder)
    x, t, ctx, image = _inputs(1)
    ref_down, ref_mid = _torch_residuals(torch_model, x, t, ctx, image, 1.3, guess_mode=True)
    down, mid = _our_residuals(module, params, x, t, ctx, image, 1.3, guess_mode=True)
    for ours, ref in zip(down, ref_down):
        _close(ours, ref)
    _close(mid, ref_mid)


def test_unet_with_two_controlnets_matches_diffusers(tmp_path_factory, unet, controlnet):
    """Two ControlNets (diffusers' MultiControlNetModel sums them) steering the UNet: the noise
    prediction equals diffusers' UNet given the same residuals."""
    torch_unet, unet_folder = unet
    second_torch, second_folder = _save_controlnet(tmp_path_factory, torch_unet, 3)
    x, t, ctx, image = _inputs(2)
    image2 = np.ascontiguousarray(image[:, :, ::-1])  # another control image (flipped)
    multi = diffusers.models.controlnets.MultiControlNetModel([controlnet[0], second_torch])
    with torch.no_grad():
        down, mid = multi(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                          [torch.from_numpy(image), torch.from_numpy(image2)], [0.8, 0.5], return_dict=False)
        ref = torch_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                         down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    controls = []
    for (_, folder), img, scale in ((controlnet, image, 0.8), (("", second_folder), image2, 0.5)):
        module, params = load_controlnet(folder)
        controls.append(_our_residuals(module, params, x, t, ctx, img, scale))
    unet_module, unet_params = load_unet(unet_folder)
    ours = jax.jit(unet_module.apply)({"params": unet_params}, nhwc(x), t, ctx, control=sum_controls(controls))
    _close(ours, ref)


def test_a_unet_folder_is_not_a_controlnet(unet, tmp_path):
    with pytest.raises(InputError, match="holds a diffusers UNet2DConditionModel, not a ControlNetModel"):
        load_controlnet(unet[1])
    # Without the class name, the weights themselves say it: keys named, strictly.
    (tmp_path / "config.json").write_text((unet[1] / "config.json").read_text().replace(
        '"_class_name": "UNet2DConditionModel"', '"_class_name": "ControlNetModel"'))
    (tmp_path / "diffusion_pytorch_model.safetensors").symlink_to(unet[1] / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match="missing key.*controlnet_cond_embedding"):
        load_controlnet(tmp_path)


def test_a_controlnet_of_another_base_model_is_refused(controlnet):
    from cid_jax.models.controlnet import ControlNetConfig
    from cid_jax.weights.controlnet import check_fits
    from cid_jax.models.unet import SD15_UNET, UNetConfig

    config = ControlNetConfig.from_json(controlnet[1] / "config.json")
    check_fits(config, UNetConfig.from_dict(TINY_SD15))  # its own base model
    with pytest.raises(InputError, match=r"--controlnet=x was made for another base model \(block_out_channels: "
                                         r".*cross_attention_dim: 64 vs the UNet's 768"):
        check_fits(config, SD15_UNET, "--controlnet=x")
