"""BiSeNet face parsing: parity with a PyTorch rendering of the standard checkpoint's network.

The reference (tests/torch_reference/bisenet.py, our own code with the key names of zllrunning's
`79999_iter.pth`) gets every weight and BN statistic randomised, is saved with torch.save, loaded
through our loader, and compared head by head on a non-square, non-multiple-of-32 input (which
exercises torch's nearest-upsample index rule and the align_corners bilinear upsample).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import traverse_util  # noqa: E402
from PIL import Image  # noqa: E402

from cid_jax.face import bisenet as B  # noqa: E402
from cid_jax.face.parsing import IMAGENET_MEAN, IMAGENET_STD, parse_face  # noqa: E402
from cid_jax.weights.state_dict import WeightsError  # noqa: E402
from tests.torch_reference.bisenet import BiSeNetRef, perturb_  # noqa: E402


@pytest.fixture(scope="session")
def torch_model():
    torch.manual_seed(0)
    return perturb_(BiSeNetRef(19), seed=1)


@pytest.fixture(scope="session")
def checkpoint(torch_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("bisenet") / "79999_iter.pth"
    torch.save(torch_model.state_dict(), path)  # includes num_batches_tracked, as the real file
    return path


@pytest.fixture(scope="session")
def loaded(checkpoint):
    return B.load_bisenet(checkpoint)


@pytest.mark.parametrize("src,dst", [((3, 5), (5, 9)), ((2, 4), (4, 8)), ((5, 3), (9, 7)), ((4, 4), (3, 5))])
def test_resamplers_match_torch(src, dst):
    x = np.random.default_rng(0).standard_normal((2, 3) + src).astype(np.float32)
    xt = torch.from_numpy(x)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    near = F.interpolate(xt, size=dst, mode="nearest").numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(B.resize_nearest(xj, dst)), near)
    bil = F.interpolate(xt, size=dst, mode="bilinear", align_corners=True).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(B.resize_bilinear_align_corners(xj, dst)), bil, atol=1e-6)


def test_all_heads_match_torch(torch_model, loaded):
    model, params = loaded
    x = np.random.default_rng(0).standard_normal((2, 3, 72, 56)).astype(np.float32)
    with torch.no_grad():
        ref = [t.numpy().transpose(0, 2, 3, 1) for t in torch_model(torch.from_numpy(x))]
    apply = jax.jit(model.apply, static_argnames="return_aux")
    ours = apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), return_aux=True)
    assert len(ours) == 3
    for name, r, o in zip(["out", "out16", "out32"], ref, ours):
        o = np.asarray(o)
        assert o.shape == r.shape == (2, 72, 56, 19)
        scale = np.abs(r).max()
        err = np.abs(o - r).max()
        assert scale > 1e-3, f"{name}: degenerate reference output"
        assert err <= 1e-4 * scale, f"{name}: max abs error {err:.3g} vs output scale {scale:.3g}"
    # The default call returns the main head only.
    np.testing.assert_array_equal(np.asarray(apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))),
                                  np.asarray(ours[0]))


def test_parse_face_matches_torch_pipeline(torch_model, loaded):
    """Spec §6 step 3 rendered in torch: PIL bilinear resize, ImageNet norm, out[0], argmax."""
    from skimage import data

    model, params = loaded
    photo = data.astronaut()[40:300, 100:340]  # non-square: the resize squashes it like the reference
    size = 64
    labels = parse_face(photo, model, params, size=size)
    assert labels.shape == (size, size) and labels.dtype == np.uint8

    pil = np.asarray(Image.fromarray(photo).resize((size, size), Image.BILINEAR), np.float32) / 255.0
    x = (pil - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(x.transpose(2, 0, 1)[None]))[0][0].numpy()
    ref = logits.argmax(0)
    disagree = labels != ref
    # Ties within float noise may flip; anything else is a real difference.
    top2 = np.sort(logits, axis=0)[-2:]
    margin = (top2[1] - top2[0])[disagree]
    assert disagree.mean() < 0.01 and (margin.size == 0 or margin.max() < 1e-4 * np.abs(logits).max()), (
        f"{disagree.sum()} labels differ; largest margin {margin.max() if margin.size else 0}")
    assert len(np.unique(labels)) > 1


def test_loader_is_strict_and_names_keys(torch_model, tmp_path):
    sd = {k: v.clone() for k, v in torch_model.state_dict().items()}
    missing = dict(sd)
    del missing["cp.arm16.bn_atten.running_var"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"cp\.arm16\.bn_atten\.running_var"):
        B.load_bisenet(tmp_path / "missing.pth")

    extra = dict(sd, **{"cp.resnet.fc.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"unexpected.*cp\.resnet\.fc\.weight"):
        B.load_bisenet(tmp_path / "extra.pth")

    bad = dict(sd, **{"conv_out.conv_out.weight": torch.zeros(18, 256, 1, 1)})  # 18 classes
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"conv_out\.conv_out\.weight.*\(18, 256, 1, 1\)"):
        B.load_bisenet(tmp_path / "bad.pth")

    # nn.DataParallel checkpoints ('module.' prefix) load to the same params.
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "dp.pth")
    _, p_dp = B.load_bisenet(tmp_path / "dp.pth")
    np.testing.assert_array_equal(np.asarray(p_dp["cp"]["resnet"]["layer2_0"]["downsample_1"]["var"]),
                                  sd["cp.resnet.layer2.0.downsample.1.running_var"].numpy())
    np.testing.assert_array_equal(np.asarray(p_dp["conv_out16"]["conv_out"]["kernel"]),
                                  sd["conv_out16.conv_out.weight"].numpy().transpose(2, 3, 1, 0))


def test_full_size_shapes_match_the_checkpoint_layout(torch_model):
    """eval_shape only: every torch tensor (bar num_batches_tracked) has a Flax param of its shape."""
    abstract = B.abstract_params()
    flat = {B.bisenet_key(p, len(v.shape)): v.shape for p, v in traverse_util.flatten_dict(abstract).items()}
    ref = {k: tuple(v.shape) for k, v in torch_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(flat) == set(ref)
    for k, shape in flat.items():
        want = ref[k] if len(ref[k]) != 4 else (ref[k][2], ref[k][3], ref[k][1], ref[k][0])
        assert tuple(shape) == want, k
    n = sum(int(np.prod(s)) for s in flat.values())
    assert 13_000_000 < n < 13_500_000, n  # face_parsing.pth is 53.3 MB of fp32
    out = jax.eval_shape(lambda p, x: B.BiSeNet().apply({"params": p}, x), abstract,
                         jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32))
    assert out.shape == (1, 512, 512, 19)
