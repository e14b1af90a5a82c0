"""FacialEncoder and ProjPlus at full size (SD1.5) vs PyTorch, after our real import path.

The PyTorch side is the spec rendering in tests/torch_reference/consistentid.py (and, for ProjPlus,
also diffusers' own IPAdapterFaceIDPlusImageProjection, an independent implementation). Every weight
is perturbed, the modules are saved as a reference nested `.bin` with torch.save, read back by
`read_groups` + `import_reference`, and run on random inputs: max abs error <= 1e-5 in fp32.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402

from cid_jax.models.facial_encoder import FacialEncoder, part_for_each_token  # noqa: E402
from cid_jax.models.resampler import ProjPlus  # noqa: E402
from cid_jax.weights import consistentid as W  # noqa: E402
from tests.torch_reference import consistentid as ref  # noqa: E402

TOL = 1e-5


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (so a transposed or swapped weight cannot hide), at sane scales."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)   # LayerNorm gain
            else:
                p.copy_(0.2 * noise)


@pytest.fixture(scope="session")
def sd15_modules(tmp_path_factory):
    """Full-size torch FacialEncoder + ProjPlus, saved as a reference .bin and imported by us."""
    torch.manual_seed(0)
    fe, ip = ref.FacialEncoder(), ref.ProjPlusModel(768, 512, 1280, 4)
    perturb(fe, 1)
    perturb(ip, 2)
    fe.eval()
    ip.eval()
    path = tmp_path_factory.mktemp("cid") / "ConsistentID-partial.bin"
    torch.save({"FacialEncoder": fe.state_dict(), "image_proj": ip.state_dict()}, path)
    params = W.import_reference(W.read_groups(path), W.SD15, required=("facial_encoder", "image_proj"))
    assert params["adapter_modules"] is None
    return fe, ip, params, path


def max_err(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs.detach().double().numpy())))


def test_facial_encoder_full_size_matches_reference(sd15_modules):
    fe, _, params, _ = sd15_modules
    rng = np.random.default_rng(0)
    b = 2
    prompt = rng.standard_normal((b, 77, 768)).astype(np.float32)
    parts = rng.standard_normal((b, 5, 257, 1280)).astype(np.float32)
    token_mask = np.zeros((b, 77), bool)
    token_mask[0, [5, 9, 14, 20, 30]] = True      # all five facial words
    token_mask[1, [3, 7, 40]] = True              # three (e.g. an old caption without face)
    valid = np.zeros((b, 5), bool)
    valid[0, :5] = True
    valid[1, :3] = True

    with torch.no_grad():
        expected = fe(torch.from_numpy(prompt), torch.from_numpy(parts), torch.from_numpy(token_mask),
                      torch.from_numpy(valid))
    ours = jax.jit(FacialEncoder(embed_dim=768).apply)(
        {"params": params["facial_encoder"]}, prompt, parts, token_mask, valid)
    err = max_err(ours, expected)
    print(f"FacialEncoder max abs err {err:.3g}")
    assert err <= TOL, err
    # Unmarked tokens are passed through bit-identically; marked ones really changed.
    np.testing.assert_array_equal(np.asarray(ours)[~token_mask], prompt[~token_mask])
    assert np.abs(np.asarray(ours)[token_mask] - prompt[token_mask]).mean(axis=-1).min() > 0.1


def test_projplus_full_size_matches_reference(sd15_modules):
    _, ip, params, _ = sd15_modules
    rng = np.random.default_rng(1)
    ids = rng.standard_normal((2, 1, 512)).astype(np.float32)
    clip = rng.standard_normal((2, 257, 1280)).astype(np.float32)
    model = ProjPlus(cross_attention_dim=768)
    apply = jax.jit(model.apply, static_argnames="shortcut")
    for shortcut, scale in ((False, 1.0), (True, 0.7)):  # SD1.5 (v1) and SDXL/PlusV2 style
        with torch.no_grad():
            expected = ip(torch.from_numpy(ids), torch.from_numpy(clip), shortcut=shortcut, scale=scale)
        ours = apply({"params": params["image_proj"]}, ids, clip, shortcut=shortcut, scale=scale)
        assert ours.shape == (2, 4, 768)
        err = max_err(ours, expected)
        print(f"ProjPlus shortcut={shortcut} max abs err {err:.3g}")
        assert err <= TOL, err


def test_projplus_matches_diffusers_faceid_plus(sd15_modules):
    """diffusers' own FaceID-Plus projection, built by diffusers' converter from the same state dict."""
    from diffusers import UNet2DConditionModel

    _, ip, params, _ = sd15_modules
    proj = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        None, ip.state_dict(), low_cpu_mem_usage=False).eval()
    rng = np.random.default_rng(2)
    ids = rng.standard_normal((2, 512)).astype(np.float32)
    clip = rng.standard_normal((2, 257, 1280)).astype(np.float32)
    proj.clip_embeds = torch.from_numpy(clip)[:, None]
    with torch.no_grad():
        expected = proj(torch.from_numpy(ids))
    ours = jax.jit(ProjPlus(cross_attention_dim=768).apply)({"params": params["image_proj"]}, ids, clip)
    err = max_err(ours, expected)
    print(f"ProjPlus vs diffusers max abs err {err:.3g}")
    assert err <= TOL, err


def test_fusion_pairs_kth_token_with_kth_valid_part():
    """The rank gather reproduces masked_scatter's pairing, including non-prefix valid masks."""
    mask = np.zeros((2, 12), bool)
    mask[0, [2, 5, 9]] = True
    mask[1, [1, 4]] = True
    valid = np.array([[True, True, True, False, False], [False, True, False, True, False]])
    part, fuse = jax.jit(part_for_each_token)(mask, valid)
    np.testing.assert_array_equal(np.asarray(fuse), mask)
    np.testing.assert_array_equal(np.asarray(part)[0, [2, 5, 9]], [0, 1, 2])
    np.testing.assert_array_equal(np.asarray(part)[1, [1, 4]], [1, 3])
    # More marked tokens than valid parts: the extra ones stay unfused.
    _, fuse = part_for_each_token(mask, np.array([[True, True, False, False, False]] * 2))
    np.testing.assert_array_equal(np.asarray(fuse)[0], mask[0] & (np.cumsum(mask[0]) <= 2))
