"""FID Inception-v3: parity with a PyTorch rendering of pytorch-fid's network through our real loader.

The reference (tests/torch_reference/fid_inception.py, our own code with the key names of
`pt_inception-2015-12-05-6726825d.pth`) gets every weight and BatchNorm statistic randomised, is
written with torch.save as the real file is, loaded with cid_jax.weights.inception, and compared
end to end (pytorch-fid's resize + normalisation included) on images that are not 299 px: 64x64
(upsampled), 512x512 (downsampled) and a non-square uint8 batch.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import traverse_util  # noqa: E402

from cid_jax.models import inception as I  # noqa: E402
from cid_jax.weights import inception as W  # noqa: E402
from cid_jax.weights.state_dict import WeightsError  # noqa: E402
from tests.torch_reference.fid_inception import FIDInceptionV3Ref, randomize_  # noqa: E402

# Tolerance on the 2048-d features, relative to their scale (max |reference|), from the arithmetic:
# torch (oneDNN) and XLA sum each conv's K = kh*kw*Cin products (K <= 3*3*448 = 4032) in different
# orders, each correct to about sqrt(K) * 2^-24 ~ 4e-6 relative per output in the typical
# random-walk case. The deepest path has 47 convs (stem 5, Mixed_5b-d 3x3, 6a 3, 6b-e 4x5, 7a 4,
# 7b/7c 2x3), and the He-scaled random weights keep the gain per layer ~1 (BN, ReLU and the pools
# do not amplify), so the per-layer errors add in quadrature: sqrt(47) * 4e-6 ~ 3e-5 as a
# pessimistic estimate, independent of the SIMD width (AVX2 and AVX-512 only change the order of
# the sums). Measured (max error / scale): 5e-7 to 8e-7 for every input here, with torch and XLA
# both on AVX-512 and with both held to AVX2 (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2,
# --xla_cpu_max_isa=AVX2).
# 1e-4 is 3x above the estimate and >100x above the measurement, and still >100x below the
# smallest deviation a real mistake produces here (BatchNorm eps 1e-5 instead of 1e-3: 1.7e-2;
# count_include_pad=True in the FID pools: 5.6e-2; an antialiased downsample: 0.38).
REL_TOL = 1e-4
BATCH = 2


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    return randomize_(FIDInceptionV3Ref(), seed=1)


@pytest.fixture(scope="module")
def checkpoint(torch_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("fid_inception") / "pt_inception.pth"
    torch.save(torch_model.state_dict(), path)  # a plain state dict, num_batches_tracked included
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return W.load_fid_inception(checkpoint)


def _nchw(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _reference_features(torch_model, images01: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch_model(_nchw(images01.astype(np.float32))).numpy()


def _assert_features_close(ours, ref, what: str) -> None:
    ours = np.asarray(ours)
    assert ours.shape == ref.shape == (BATCH, I.FEATURES), f"{what}: {ours.shape} vs {ref.shape}"
    scale = float(np.abs(ref).max())
    assert scale > 1.0 and (ref > 0).mean() > 0.5, f"{what}: degenerate reference features"
    err = float(np.abs(ours - ref).max())
    assert err <= REL_TOL * scale, f"{what}: max abs error {err:.3g} > {REL_TOL} x scale {scale:.3g}"


def test_key_set_is_the_checkpoints(torch_model, loaded):
    _, params = loaded
    ours = {W.fid_inception_key(path, v.ndim) for path, v in traverse_util.flatten_dict(params).items()}
    expected = {k for k in torch_model.state_dict() if not k.endswith(".num_batches_tracked")}
    assert ours == expected
    assert len(ours) == 94 * 5 + 2  # 94 BasicConv2d (conv + 4 BN tensors) and fc


@pytest.mark.parametrize("size", [(64, 64), (512, 512), (40, 300), (299, 299)])
def test_preprocess_matches_torch_interpolate(size):
    x = np.random.default_rng(sum(size)).random((2,) + size + (3,), dtype=np.float32)
    ref = 2 * F.interpolate(_nchw(x), size=(299, 299), mode="bilinear", align_corners=False) - 1
    ours = np.asarray(jax.jit(I.fid_preprocess)(jnp.asarray(x)))
    assert ours.shape == (2, 299, 299, 3)
    # A few ulps of [-1, 1]: both compute the same two-tap weights, in a different order.
    np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), rtol=0, atol=2e-6)


def test_preprocess_uint8_is_totensor():
    x = np.random.default_rng(0).integers(0, 256, (1, 17, 23, 3), dtype=np.uint8)
    # Exactly torch's `img.float().div(255)` (correctly rounded), so bit-equal to the float path.
    np.testing.assert_array_equal(np.asarray(I.fid_preprocess(jnp.asarray(x))),
                                  np.asarray(I.fid_preprocess(jnp.asarray(x.astype(np.float32) / 255))))


def test_pools_match_torch():
    x = np.random.default_rng(0).standard_normal((2, 8, 7, 5)).astype(np.float32)
    xt, xj = _nchw(x), jnp.asarray(x)
    to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    avg = F.avg_pool2d(xt, 3, stride=1, padding=1, count_include_pad=False)
    np.testing.assert_allclose(np.asarray(I.avg_pool_3x3_exclude_pad(xj)), to_nhwc(avg), atol=1e-6)
    for stride, padding in [(1, 1), (2, 0)]:
        mx = F.max_pool2d(xt, 3, stride=stride, padding=padding)
        np.testing.assert_array_equal(np.asarray(I.max_pool_3x3(xj, stride, padding)), to_nhwc(mx))


def test_pool_features_match_torch(torch_model, loaded):
    model, params = loaded
    rng = np.random.default_rng(0)
    up = rng.random((BATCH, 64, 64, 3), dtype=np.float32)
    down = rng.random((BATCH, 512, 512, 3), dtype=np.float32)
    photo = rng.integers(0, 256, (BATCH, 80, 120, 3), dtype=np.uint8)  # uint8, non-square
    with jax.default_matmul_precision("highest"):
        # One compilation of the network: every batch reaches it as [BATCH, 299, 299, 3].
        ours = [I.pool_features(params, jnp.asarray(x), model) for x in (up, down, photo)]
    refs = [_reference_features(torch_model, x) for x in (up, down, photo.astype(np.float32) / 255)]
    for what, o, r in zip(["64px upsampled", "512px downsampled", "80x120 uint8"], ours, refs):
        _assert_features_close(o, r, what)


def test_logits_match_torch(torch_model, loaded):
    model, params = loaded
    x = np.random.default_rng(1).random((BATCH, 299, 299, 3), dtype=np.float32)
    with torch.no_grad():
        ref = torch_model.logits(torch_model(_nchw(x))).numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(lambda p, v: model.apply({"params": p}, I.fid_preprocess(v), logits=True))(
            params, jnp.asarray(x)))
    assert ours.shape == ref.shape == (BATCH, I.NUM_CLASSES)
    scale = float(np.abs(ref).max())
    assert float(np.abs(ours - ref).max()) <= REL_TOL * scale


# ------------------------------------------------------------------------------- loader strictness


@pytest.fixture(scope="module")
def numpy_state_dict(torch_model):
    return {k: v.numpy() for k, v in torch_model.state_dict().items()}


def test_wrong_shape_names_the_key(numpy_state_dict):
    sd = dict(numpy_state_dict)
    key = "Mixed_6b.branch7x7_2.conv.weight"  # a 1x7 kernel given as 7x1
    sd[key] = np.ascontiguousarray(sd[key].transpose(0, 1, 3, 2))
    with pytest.raises(WeightsError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight: checkpoint \(128, 128, 7, 1\)"):
        W.params_from_state_dict(sd)


def test_missing_and_unexpected_keys_are_named(numpy_state_dict):
    sd = {k: v for k, v in numpy_state_dict.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)  # torchvision's aux head: not FID's
    with pytest.raises(WeightsError) as e:
        W.params_from_state_dict(sd)
    assert "Mixed_7c.branch_pool.bn.running_var" in str(e.value)
    assert "AuxLogits.fc.weight" in str(e.value)


def test_num_batches_tracked_is_optional_and_dataparallel_prefix_accepted(numpy_state_dict, loaded):
    _, params = loaded
    sd = {f"module.{k}": v for k, v in numpy_state_dict.items() if not k.endswith("num_batches_tracked")}
    again = W.params_from_state_dict(sd)
    for path, v in traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(traverse_util.flatten_dict(again)[path], np.asarray(v))
