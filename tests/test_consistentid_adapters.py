"""ConsistentID processors on one attention vs the PyTorch reference processors.

The PyTorch side is diffusers' own `Attention` module carrying our rendering of the reference
`Consistent_AttProcessor` / `Consistent_IPAttProcessor`. Every weight is perturbed; the processors'
state dict is saved as a reference `adapter_modules` group (torch.save) and read back through our
import path; the base attention weights go through the foundation's `load_into`.
"""
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from diffusers.models.attention_processor import Attention as TorchAttention  # noqa: E402

from cid_jax.models import adapters as A  # noqa: E402
from cid_jax.models import sites  # noqa: E402
from cid_jax.models.attention import Attention, DefaultProcessor  # noqa: E402
from cid_jax.models.sites import AttentionSite, ProcessorSite  # noqa: E402
from cid_jax.models.trainable import merge, split_trainable  # noqa: E402
from cid_jax.weights import consistentid as W  # noqa: E402
from cid_jax.weights.state_dict import load_into  # noqa: E402
from tests.torch_reference import consistentid as ref  # noqa: E402

HIDDEN, HEADS, CTX, RANK, TEXT, ID_TOKENS = 64, 2, 48, 8, 10, 4
SELF_NAME = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
CROSS_NAME = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
TOL = 1e-5


def perturb(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise / p.shape[-1] ** 0.5 if p.ndim >= 2 else 0.2 * noise)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Torch attn1/attn2 with processors, and our params imported from the saved files."""
    attn1 = TorchAttention(HIDDEN, None, heads=HEADS, dim_head=HIDDEN // HEADS)
    attn2 = TorchAttention(HIDDEN, CTX, heads=HEADS, dim_head=HIDDEN // HEADS)
    p1 = ref.ConsistentAttProcessor(HIDDEN, None, rank=RANK)
    p2 = ref.ConsistentIPAttProcessor(HIDDEN, CTX, rank=RANK, scale=0.8, num_tokens=ID_TOKENS)
    attn1.set_processor(p1)
    attn2.set_processor(p2)
    for i, m in enumerate((attn1, attn2)):
        perturb(m, i)  # includes the processors (their LoRA `up` starts at zero)
        m.eval()

    # The reference checkpoint group for these two sites, in the real on-disk format.
    layout = W.CheckpointLayout("test", "image_proj", CTX, (ProcessorSite(0, SELF_NAME, False, HIDDEN),
                                                            ProcessorSite(1, CROSS_NAME, True, HIDDEN)),
                                rank=RANK, num_tokens=ID_TOKENS)
    path = tmp_path_factory.mktemp("adapters") / "adapters.bin"
    torch.save({"adapter_modules": torch.nn.ModuleList([p1, p2]).state_dict()}, path)
    ours = W.import_reference(W.read_groups(path), layout, required=("adapter_modules",))["adapter_modules"]

    params = {}
    for name, m in ((SELF_NAME, attn1), (CROSS_NAME, attn2)):
        base_sd = {k: v.numpy() for k, v in m.state_dict().items() if not k.startswith("processor.")}
        shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
        kin = m.to_k.in_features
        abstract = {"to_q": {"kernel": shape(HIDDEN, HIDDEN)}, "to_k": {"kernel": shape(kin, HIDDEN)},
                    "to_v": {"kernel": shape(kin, HIDDEN)},
                    "to_out_0": {"kernel": shape(HIDDEN, HIDDEN), "bias": shape(HIDDEN)}}
        base = load_into(abstract, base_sd, what=name)
        node = ours
        for part in sites.site_name_to_flax_path(name):
            node = node[part]
        params[name] = merge(base, node)
    return dict(attn1=attn1, attn2=attn2, p2=p2, params=params, layout=layout)


def flax_attention(name, is_cross, **plan_kw):
    site = AttentionSite(name, is_cross, HIDDEN, CTX if is_cross else HIDDEN, HEADS, HIDDEN // HEADS)
    plan = A.consistentid_plan(rank=RANK, num_tokens=ID_TOKENS, scale=0.8, **plan_kw)
    return Attention(HIDDEN, HEADS, HIDDEN // HEADS, site=site, processor_plan=plan)


def inputs(seed=0, batch=2, pixels=16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, pixels, HIDDEN)).astype(np.float32)
    ctx = rng.standard_normal((batch, TEXT + ID_TOKENS, CTX)).astype(np.float32)
    idx = np.stack([rng.choice(TEXT, 5, replace=False) for _ in range(batch)]).astype(np.int32)
    return x, ctx, idx


def err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b.detach().double().numpy())))


@pytest.mark.parametrize("capture", ["none", "self"])
def test_self_processor_matches_reference(pair, capture):
    x, _, idx = inputs()
    store = {}
    attn1 = pair["attn1"]
    original = attn1.get_attention_scores

    def hooked(q, k, mask=None):  # the reference training hook (spec §7.5)
        store["probs"] = original(q, k, mask)
        return store["probs"]

    attn1.get_attention_scores = hooked
    try:
        with torch.no_grad():
            expected = attn1(torch.from_numpy(x))
    finally:
        del attn1.get_attention_scores
    module = flax_attention(SELF_NAME, False, capture=capture)
    out, state = jax.jit(functools.partial(module.apply, mutable=["intermediates"]))(
        {"params": pair["params"][SELF_NAME]}, x, None, facial_token_idx=idx)
    e = err(out, expected)
    print(f"self processor (capture={capture}) max abs err {e:.3g}")
    assert e <= TOL, e
    if capture == "self":
        captured = state["intermediates"]["processor"][A.CAPTURE_NAME][0]
        b, n = x.shape[:2]
        probs = store["probs"].view(b, HEADS, n, n)
        want = torch.gather(probs, 3, torch.from_numpy(idx).long()[:, None, None, :].expand(b, HEADS, n, 5))
        assert captured.shape == (b, HEADS, n, 5)
        assert err(captured, want) <= 1e-6
    else:
        assert "intermediates" not in state or not state["intermediates"]


@pytest.mark.parametrize("capture", ["none", "cross"])
def test_cross_processor_matches_reference(pair, capture):
    x, ctx, idx = inputs(1)
    p2 = pair["p2"]
    p2.store = []
    try:
        with torch.no_grad():
            expected = pair["attn2"](torch.from_numpy(x), torch.from_numpy(ctx))
        probs = p2.store[0]
    finally:
        p2.store = None
    module = flax_attention(CROSS_NAME, True, capture=capture)
    out, state = jax.jit(functools.partial(module.apply, mutable=["intermediates"]))(
        {"params": pair["params"][CROSS_NAME]}, x, ctx, facial_token_idx=idx)
    e = err(out, expected)
    print(f"cross processor (capture={capture}) max abs err {e:.3g}")
    assert e <= TOL, e
    if capture == "cross":
        captured = state["intermediates"]["processor"][A.CAPTURE_NAME][0]
        b, n = x.shape[:2]
        want = torch.gather(probs, 3, torch.from_numpy(idx).long()[:, None, None, :].expand(b, HEADS, n, 5))
        assert captured.shape == (b, HEADS, n, 5)
        assert err(captured, want) <= 1e-6


def test_ip_branch_and_scale_really_matter(pair):
    """The ID tokens change the output, and `ip_scale=0` reduces the processor to LoRA text attention."""
    x, ctx, _ = inputs(2)
    module = flax_attention(CROSS_NAME, True)
    params = {"params": pair["params"][CROSS_NAME]}
    out = module.apply(params, x, ctx)
    ctx2 = ctx.copy()
    ctx2[:, -ID_TOKENS:] += 1.0
    assert not np.allclose(out, module.apply(params, x, ctx2), atol=1e-3)
    p2 = pair["p2"]
    p2.scale = 0.0
    try:
        with torch.no_grad():
            expected = pair["attn2"](torch.from_numpy(x), torch.from_numpy(ctx))
    finally:
        p2.scale = 0.8
    assert err(module.apply(params, x, ctx, ip_scale=0.0), expected) <= TOL


def test_fresh_adapters_change_nothing_and_ip_init_copies_base():
    """LoRA up starts at zero: a freshly initialised self processor equals the plain attention;
    init_ip_from_base copies attn2's to_k/to_v into to_k_ip/to_v_ip."""
    x, ctx, _ = inputs(3)
    module = flax_attention(SELF_NAME, False)
    variables = jax.jit(module.init)(jax.random.key(0), x)
    plain = Attention(HIDDEN, HEADS, HIDDEN // HEADS)
    base = {k: v for k, v in variables["params"].items() if k != "processor"}
    np.testing.assert_allclose(module.apply(variables, x), plain.apply({"params": base}, x), atol=1e-6)
    down = np.asarray(jax.tree.leaves(variables["params"]["processor"]["to_q_lora"]["down"])[0])
    assert abs(down.std() - 1 / RANK) < 0.2 / RANK

    cross = flax_attention(CROSS_NAME, True)
    attn2 = nn.meta.unbox(jax.jit(cross.init)(jax.random.key(1), x, ctx)["params"])
    tree = {"down_blocks_1": {"attentions_0": {"transformer_blocks_0": {"attn2": attn2}}}}
    frozen, trainable = split_trainable(tree)
    new = A.init_ip_from_base(frozen, trainable)
    node = new["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn2"]["processor"]
    base = frozen["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn2"]
    np.testing.assert_array_equal(node["to_k_ip"]["kernel"], base["to_k"]["kernel"])
    np.testing.assert_array_equal(node["to_v_ip"]["kernel"], base["to_v"]["kernel"])
    assert not np.array_equal(node["to_k_ip"]["kernel"], trainable["down_blocks_1"]["attentions_0"][
        "transformer_blocks_0"]["attn2"]["processor"]["to_k_ip"]["kernel"])
    # A shape mismatch is named, not silently broadcast.
    bad = jax.tree.map(np.asarray, trainable)
    bad["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn2"]["processor"]["to_k_ip"][
        "kernel"] = np.zeros((CTX + 1, HIDDEN), np.float32)
    with pytest.raises(ValueError, match="to_k_ip"):
        A.init_ip_from_base(frozen, bad)


def test_split_and_merge_partition_by_path():
    tree = {"unet": {"down_blocks_0": {"attn1": {"to_q": {"kernel": 1},
                                                 "processor": {"to_q_lora": {"down": {"kernel": 2}}}}}},
            "facial_encoder": {"fuse_module": {"layer_norm": {"scale": 3}}},
            "image_proj": {"norm": {"bias": 4}}, "vae": {"conv_in": {"kernel": 5}}}
    frozen, trainable = split_trainable(tree)
    assert frozen == {"unet": {"down_blocks_0": {"attn1": {"to_q": {"kernel": 1}}}}, "vae": {"conv_in": {"kernel": 5}}}
    assert trainable["unet"]["down_blocks_0"]["attn1"]["processor"]["to_q_lora"]["down"]["kernel"] == 2
    assert set(trainable) == {"unet", "facial_encoder", "image_proj"}
    assert merge(frozen, trainable) == tree
    with pytest.raises(ValueError, match="more than one"):
        merge(tree, trainable)


def test_plan_routes_processors_and_capture_sites():
    sd15_sites = W.SD15.sites
    for mode, want_cross in (("cross", True), ("self", False)):
        plan = A.consistentid_plan(capture=mode)
        captured = [s.name for s in sd15_sites
                    if plan(AttentionSite(s.name, s.is_cross, s.hidden_size, 768, 8, 40)).keywords["capture"]]
        # 11 attentions per kind in the five middle groups (spec §7.5), all of the requested kind.
        assert len(captured) == 11
        assert all(n.endswith("attn2" if want_cross else "attn1") for n in captured)
        assert {sites.block_group(n) for n in captured} == set(sites.SD15_CAPTURE_GROUPS)
    plan = A.consistentid_plan(capture="none")
    kinds = {plan(AttentionSite(s.name, s.is_cross, s.hidden_size, 768, 8, 40)).func for s in sd15_sites}
    assert kinds == {A.ConsistentSelfProcessor, A.ConsistentCrossProcessor}
    assert sites.SDXL_CAPTURE_GROUPS == ("down_blocks.2", "mid_block", "up_blocks.1")
    with pytest.raises(ValueError):
        A.consistentid_plan(capture="attn3")
    with pytest.raises(ValueError):
        A.consistentid_plan(capture_groups=("down_blocks.9",))


def test_default_processor_untouched():
    """The plan leaves no DefaultProcessor behind (every site gets an adapter)."""
    plan = A.consistentid_plan()
    assert plan(AttentionSite(SELF_NAME, False, 64, 64, 2, 32)).func is not DefaultProcessor
