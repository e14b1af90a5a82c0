"""Whole UNet with ConsistentID adapters (tiny SD1.5-shaped config) vs diffusers + PyTorch processors.

The PyTorch side is diffusers' own UNet2DConditionModel (perturbed, saved with save_pretrained and
loaded by our `load_unet`) carrying our PyTorch rendering of the reference processors, whose
`adapter_modules` state dict is loaded strictly from *our export* of our random adapter params.
Also: our layout equals the adapter subtrees the real UNet creates, at full size (eval_shape).
"""
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
from flax import traverse_util  # noqa: E402

from cid_jax.models import adapters as A  # noqa: E402
from cid_jax.models import sites  # noqa: E402
from cid_jax.models.trainable import merge, split_trainable  # noqa: E402
from cid_jax.models.unet import SD15_UNET, SDXL_UNET, UNet2DConditionModel  # noqa: E402
from cid_jax.weights import consistentid as W  # noqa: E402
from cid_jax.models.unet import abstract_unet_params  # noqa: E402
from cid_jax.weights.unet import load_unet  # noqa: E402
from tests.torch_reference import consistentid as ref  # noqa: E402

# SD1.5's block structure (3 cross-attention down blocks + 1 plain, mirrored up), tiny widths.
TINY_SD15 = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)
RANK, TEXT, ID_TOKENS = 8, 10, 4


def adapter_values(layout, seed):
    """Random adapter params for every site (scaled like trained weights, LoRA up non-zero)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(W.abstract_params(layout, ["adapter_modules"])["adapter_modules"])
    return traverse_util.unflatten_dict(
        {p: (rng.standard_normal(s.shape) / np.sqrt(s.shape[0])).astype(np.float32) for p, s in flat.items()})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cid_unet")
    torch_unet = diffusers.UNet2DConditionModel(**TINY_SD15)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in torch_unet.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    torch_unet.save_pretrained(tmp / "unet")
    module, base = load_unet(tmp / "unet")

    layout = W.layout_for(module.config, base="tiny-sd15", rank=RANK, num_tokens=ID_TOKENS)
    ours = adapter_values(layout, 1)
    ckpt = tmp / "adapters.bin"
    written = W.save_checkpoint({"adapter_modules": ours}, layout, ckpt, partial=True)
    W.verify_written(ckpt, written, layout)

    adapter_modules = ref.set_consistentid_processors(torch_unet, rank=RANK, num_tokens=ID_TOKENS)
    adapter_modules.load_state_dict(torch.load(ckpt, weights_only=True)["adapter_modules"], strict=True)
    torch_unet.eval()
    return dict(torch_unet=torch_unet, module=module, params=merge(base, ours), layout=layout)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, TEXT + ID_TOKENS, 32)).astype(np.float32)
    idx = np.stack([rng.choice(TEXT, 5, replace=False) for _ in range(2)]).astype(np.int32)
    return x, np.array([17, 803]), ctx, idx


def run_ours(models, capture, x, t, ctx, idx):
    plan = A.consistentid_plan(rank=RANK, num_tokens=ID_TOKENS, capture=capture)
    model = UNet2DConditionModel(models["module"].config, processor_plan=plan)
    apply = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))
    out, state = apply({"params": models["params"]}, x.transpose(0, 2, 3, 1), t, ctx,
                       attention_kwargs={"facial_token_idx": idx})
    return np.asarray(out).transpose(0, 3, 1, 2), A.collect_facial_attn(state.get("intermediates", {}))


def gather(probs, idx):
    """probs [B,h,N,T] at key indices idx [B,5]; indices past T read 0 (our documented choice where
    the reference's gather would fail: facial positions beyond a small layer's pixel count)."""
    b, h, n, t = probs.shape
    index = torch.from_numpy(idx).long()[:, None, None, :].expand(b, h, n, idx.shape[1])
    out = torch.gather(probs, 3, index.clamp(max=t - 1))
    return torch.where(index < t, out, torch.zeros(()))


def check_output(ours, expected):
    err = float(np.max(np.abs(ours - expected.numpy())))
    scale = float(np.max(np.abs(expected.numpy())))
    print(f"UNet+adapters max abs err {err:.3g}, output scale {scale:.3g}")
    assert err <= 1e-4 * scale, (err, scale)


def test_unet_with_adapters_and_cross_capture_matches_torch(models):
    x, t, ctx, idx = inputs(0)
    torch_unet = models["torch_unet"]
    stores = {}
    for name, proc in torch_unet.attn_processors.items():
        site = name[: -len(".processor")]
        if isinstance(proc, ref.ConsistentIPAttProcessor) and sites.block_group(site) in sites.SD15_CAPTURE_GROUPS:
            proc.store = stores[site] = []
    try:
        with torch.no_grad():
            expected = torch_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    finally:
        for proc in torch_unet.attn_processors.values():
            if isinstance(proc, ref.ConsistentIPAttProcessor):
                proc.store = None
    ours, maps = run_ours(models, "cross", x, t, ctx, idx)
    check_output(ours, expected)
    # 7 cross-attentions in down_blocks.1/2, mid_block, up_blocks.1/2 (11 at full size).
    assert list(maps) == sorted(stores, key=sites.processor_order_key) and len(maps) == 7
    for site, arr in maps.items():
        want = gather(stores[site][0], idx)
        assert arr.shape == tuple(want.shape)
        assert float(np.max(np.abs(np.asarray(arr) - want.numpy()))) <= 1e-5, site


def test_self_capture_reproduces_reference_training_hook(models):
    x, t, ctx, idx = inputs(1)
    torch_unet = models["torch_unet"]
    store = {}
    ref.hook_self_attention_scores(torch_unet, store, sites.SD15_CAPTURE_GROUPS)
    try:
        with torch.no_grad():
            expected = torch_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    finally:
        for name, m in torch_unet.named_modules():
            if name.endswith("attn1") and "get_attention_scores" in m.__dict__:
                del m.get_attention_scores
    ours, maps = run_ours(models, "self", x, t, ctx, idx)
    check_output(ours, expected)
    assert set(maps) == set(store) and len(maps) == 7
    assert (idx >= 4).any()  # the mid block (2x2 pixels) sees out-of-range facial positions
    for site, arr in maps.items():
        probs = store[site]
        n = probs.shape[-1]
        want = gather(probs.view(2, -1, n, n), idx)
        assert float(np.max(np.abs(np.asarray(arr) - want.numpy()))) <= 1e-5, site


def test_ip_init_from_unet_and_trainable_split(models):
    frozen, trainable = split_trainable(models["params"])
    assert set(traverse_util.flatten_dict(trainable)) == set(
        traverse_util.flatten_dict(W.abstract_params(models["layout"], ["adapter_modules"])["adapter_modules"]))
    new = A.init_ip_from_base(frozen, trainable)
    flat_new, flat_base = traverse_util.flatten_dict(new), traverse_util.flatten_dict(frozen)
    ip = [p for p in flat_new if p[-2] in ("to_k_ip", "to_v_ip")]
    assert len(ip) == 2 * 10  # every attn2 of the tiny UNet
    for p in ip:
        np.testing.assert_array_equal(flat_new[p], flat_base[p[:-3] + (p[-2][:-3], "kernel")])


@pytest.mark.parametrize("config,layout", [(SD15_UNET, W.SD15), (SDXL_UNET, W.SDXL)], ids=["sd15", "sdxl"])
def test_full_size_unet_adapter_tree_equals_layout(config, layout):
    """Our checkpoint layout and the processors the real UNet creates agree path by path, shape by shape."""
    assert W.layout_for(config, base=layout.base).sites == layout.sites
    unet = UNet2DConditionModel(config, processor_plan=A.consistentid_plan(capture="none"))
    got = traverse_util.flatten_dict(W.processor_subtree(abstract_unet_params(unet)))
    want = traverse_util.flatten_dict(W.abstract_params(layout, ["adapter_modules"])["adapter_modules"])
    assert {p: v.shape for p, v in got.items()} == {p: v.shape for p, v in want.items()}
