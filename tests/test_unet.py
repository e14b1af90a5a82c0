"""UNet parity: diffusers' PyTorch UNet2DConditionModel (saved with save_pretrained) vs ours."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cid_jax.models import attention as attn_lib
from cid_jax.models import presets
from cid_jax.models.unet import SD15_UNET, SDXL_UNET, UNet2DConditionModel, UNetConfig
from cid_jax.weights.state_dict import WeightsError
from cid_jax.models.unet import abstract_unet_params
from cid_jax.weights.unet import load_unet
from tests.helpers import perturb_torch

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY_SD15 = presets.get("tiny-sd15")["unet"]   # 3 levels, context 64
TINY_SDXL = presets.get("tiny-sdxl")["unet"]   # text_time added embedding, context 64, pooled 32


def _save(tmp_path_factory, cfg, seed, safe=True):
    model = perturb_torch(diffusers.UNet2DConditionModel(**cfg), seed, 0.1)
    folder = tmp_path_factory.mktemp("unet")
    model.save_pretrained(folder, safe_serialization=safe)
    return model, folder


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return _save(tmp_path_factory, TINY_SD15, 0)


def _inputs(rng, batch, size, text_len, ctx_dim):
    x = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
    ctx = rng.standard_normal((batch, text_len, ctx_dim)).astype(np.float32)
    return x, ctx


def _compare(ours, ref):
    ref = ref.numpy().transpose(0, 2, 3, 1)
    err = float(np.max(np.abs(np.asarray(ours) - ref)))
    scale = float(np.max(np.abs(ref)))
    assert err <= 1e-4 * scale, f"max abs err {err:.3g} vs output scale {scale:.3g}"


def test_sd15_shaped_unet_matches_diffusers(sd15, rng):
    torch_model, folder = sd15
    module, params = load_unet(folder)
    x, ctx = _inputs(rng, 2, 16, 7, 64)
    t = np.array([10, 741])
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    ours = jax.jit(module.apply)({"params": params}, x.transpose(0, 2, 3, 1), t, ctx)
    _compare(ours, ref)


def test_sdxl_shaped_unet_matches_diffusers(tmp_path_factory, rng):
    torch_model, folder = _save(tmp_path_factory, TINY_SDXL, 1, safe=False)  # the .bin path
    module, params = load_unet(folder)
    x, ctx = _inputs(rng, 2, 16, 5, 64)
    t = np.array([3, 999])
    text_embeds = rng.standard_normal((2, 32)).astype(np.float32)
    time_ids = np.array([[512, 512, 0, 0, 512, 512], [1024, 768, 16, 8, 1024, 1024]], np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                          added_cond_kwargs=dict(text_embeds=torch.from_numpy(text_embeds),
                                                 time_ids=torch.from_numpy(time_ids))).sample
    ours = jax.jit(module.apply)({"params": params}, x.transpose(0, 2, 3, 1), t, ctx,
                                 dict(text_embeds=text_embeds, time_ids=time_ids))
    _compare(ours, ref)


class _AddKnownTerm(nn.Module):
    """A test processor: the default attention plus a known constant on the output."""
    term: float

    @nn.compact
    def __call__(self, attn, hidden, context=None, mask=None, **kw):
        return attn_lib.DefaultProcessor()(attn, hidden, context, mask) + self.term


def test_processor_swap_changes_output_exactly(sd15, rng):
    """Swapping the core of one attention adds exactly what the processor adds."""
    _, folder = sd15
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"

    def plan(site):
        return functools.partial(_AddKnownTerm, 0.5) if site.name == target else attn_lib.DefaultProcessor

    base, params = load_unet(folder)
    swapped = UNet2DConditionModel(base.config, processor_plan=plan)
    x, ctx = _inputs(rng, 1, 16, 7, 64)
    x = x.transpose(0, 2, 3, 1)

    # The swapped attention's own output must be the default output plus exactly the term, and
    # everything downstream must change.
    def run(model):
        return model.apply({"params": params}, x, 5, ctx, mutable=["intermediates"],
                           capture_intermediates=lambda m, _: m.name == "attn2")

    out_a, inter_a = run(base)
    out_b, inter_b = run(swapped)
    path = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "__call__")
    get = lambda tree: functools.reduce(lambda t, k: t[k], path, tree["intermediates"])[0]  # noqa: E731
    np.testing.assert_allclose(np.asarray(get(inter_b)) - np.asarray(get(inter_a)), 0.5, atol=1e-5)
    other = ("up_blocks_1", "attentions_0", "transformer_blocks_0", "attn2", "__call__")
    assert not np.allclose(functools.reduce(lambda t, k: t[k], other, inter_a["intermediates"])[0],
                           functools.reduce(lambda t, k: t[k], other, inter_b["intermediates"])[0])
    assert not np.allclose(out_a, out_b)


def test_captured_probabilities_shape_and_normalisation(sd15, rng):
    _, folder = sd15
    plan = lambda site: functools.partial(attn_lib.DefaultProcessor, capture=site.is_cross)  # noqa: E731
    base, params = load_unet(folder)
    model = UNet2DConditionModel(base.config, processor_plan=plan)
    x, ctx = _inputs(rng, 2, 16, 7, 64)
    out, state = model.apply({"params": params}, x.transpose(0, 2, 3, 1), 5, ctx,
                             mutable=["intermediates"])
    probs = state["intermediates"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"][
        "processor"]["attn_probs"][0]
    assert probs.shape == (2, 2, 16 * 16, 7)  # (batch, heads, query pixels, text tokens)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
    # Capturing does not change the result.
    np.testing.assert_allclose(out, base.apply({"params": params}, x.transpose(0, 2, 3, 1), 5, ctx),
                               atol=1e-5)


def test_loader_names_missing_and_mismatched_keys(sd15, tmp_path):
    from safetensors.numpy import load_file, save_file
    import shutil

    _, folder = sd15
    broken = tmp_path / "unet"
    shutil.copytree(folder, broken)
    state = load_file(str(broken / "diffusion_pytorch_model.safetensors"))
    del state["conv_in.weight"]
    state["conv_out.bias"] = np.zeros(5, np.float32)
    save_file(state, str(broken / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightsError) as e:
        load_unet(broken)
    assert "conv_in.weight" in str(e.value) and "conv_out.bias" in str(e.value)


def test_full_size_parameter_counts():
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert abs(count(abstract_unet_params(UNet2DConditionModel(SD15_UNET))) - 859.52e6) < 0.01e6
    assert abs(count(abstract_unet_params(UNet2DConditionModel(SDXL_UNET))) - 2567.5e6) < 0.1e6
