"""The facial localization loss against a direct numpy computation, and its gradient's direction."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cid_jax import losses


def numpy_balanced_l1(attn, masks, valid):
    """Spec §7.5 written out with loops: attn [B,H,N,K], masks [B,K,N], valid [B,K]."""
    b_, h_, n_, k_ = attn.shape
    total = 0.0
    for b in range(b_):
        for h in range(h_):
            num, den = 0.0, 0.0
            for k in range(k_):
                a = attn[b, h, :, k] / (attn[b, h, :, k].max() + 1e-5)
                m = masks[b, k]
                bg = (a * (1 - m)).sum() / ((1 - m).sum() + 1e-5)
                fg = (a * m).sum() / (m.sum() + 1e-5)
                num += (bg - fg) * valid[b, k]
                den += valid[b, k]
            total += num / (den + 1e-5)
    return total / (b_ * h_)


def test_matches_numpy_on_a_captured_map(rng):
    attn = rng.dirichlet(np.ones(16), size=(2, 3, 5)).transpose(0, 1, 3, 2).astype(np.float32)  # [2,3,16,5]
    masks = (rng.uniform(size=(2, 5, 4, 4)) > 0.6).astype(np.float32)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    want = numpy_balanced_l1(attn, masks.reshape(2, 5, 16), valid)
    got = losses.balanced_l1_one_layer(jnp.asarray(attn), jnp.asarray(masks.reshape(2, 5, 16)), valid)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)
    # Through the layer-averaging entry point (masks at the map's own resolution: resize is exact).
    two_layers = losses.facial_localization_loss({"a": attn, "b": attn[:, :2]}, masks, valid)
    want2 = (want + numpy_balanced_l1(attn[:, :2], masks.reshape(2, 5, 16), valid)) / 2
    np.testing.assert_allclose(float(two_layers), want2, rtol=1e-5)


def test_mask_resize_matches_torch_antialiased_bilinear(rng):
    torch = pytest.importorskip("torch")
    masks = (rng.uniform(size=(2, 5, 64, 64)) > 0.5).astype(np.float32)
    ours = np.asarray(losses.resize_masks(jnp.asarray(masks), 16)).reshape(2, 5, 16, 16)
    ref = torch.nn.functional.interpolate(torch.from_numpy(masks), (16, 16), mode="bilinear",
                                          antialias=True).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-2)  # kernels differ slightly at the borders
    assert np.abs(ours - ref).mean() < 2e-3


def test_gradient_moves_facial_attention_into_the_masks():
    """Toy cross-attention: pixel logits over 8 text tokens, 3 facial words with disjoint masks."""
    side, tokens = 6, 8
    idx = jnp.array([[2, 4, 5]])
    masks = np.zeros((1, 3, side, side), np.float32)
    masks[0, 0, :2], masks[0, 1, 2:4, :3], masks[0, 2, 4:, 3:] = 1, 1, 1
    valid = jnp.ones((1, 3), bool)
    logits = jax.random.normal(jax.random.key(0), (1, 1, side * side, tokens))

    def gathered(lg):
        probs = jax.nn.softmax(lg, axis=-1)
        return jnp.take_along_axis(probs, idx[:, None, None, :].repeat(side * side, 2), axis=-1)

    def loss(lg):
        return losses.facial_localization_loss([gathered(lg)], jnp.asarray(masks), valid)

    def inside_minus_outside(lg):
        a = np.asarray(gathered(lg))[0, 0]                    # [N, 3]
        m = masks[0].reshape(3, -1).T
        return [(a[:, k] * m[:, k]).sum() / m[:, k].sum() - (a[:, k] * (1 - m[:, k])).sum() / (1 - m[:, k]).sum()
                for k in range(3)]

    before, l0 = inside_minus_outside(logits), float(loss(logits))
    grad = jax.jit(jax.grad(loss))
    for _ in range(50):
        logits = logits - 20.0 * grad(logits)
    after, l1 = inside_minus_outside(logits), float(loss(logits))
    assert l1 < l0
    assert all(a > b + 0.05 for a, b in zip(after, before)), (before, after)


def test_noise_mse_foreground_masking():
    pred = jnp.ones((2, 4, 4, 4))
    target = jnp.zeros((2, 4, 4, 4))
    fg = jnp.zeros((2, 32, 32)).at[:, :16].set(1.0)  # top half is foreground
    plain = losses.noise_mse(pred, target)
    masked = losses.noise_mse(pred, target, fg, jnp.array([True, False]))
    assert float(plain) == pytest.approx(1.0)
    # Sample 0 keeps only its top half (mean over all elements, masked ones included): 0.5; sample 1: 1.
    assert float(masked) == pytest.approx(0.75, abs=1e-6)
