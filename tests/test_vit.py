"""DINO ViT encoder: parity with transformers' PyTorch `ViTModel` through our real loader.

Tiny reference models get every parameter perturbed, are written as transformers writes them
(`save_pretrained`: config.json + model.safetensors; a sharded folder; a `vit.`-prefixed
classification checkpoint as a `pytorch_model.bin`), loaded with cid_jax.weights.vit, and compared
in fp32 on random images. The full ViT-S/16 (facebook/dino-vits16) is checked by shape only.

Tolerance: the outputs follow a final LayerNorm, so they are O(1) (`scale` = max |ref|, at least 1).
fp32 rounds at u = 6e-8; the longest reduction is the patch conv (3 * 16 * 16 = 768 terms), whose
error grows like sqrt(768) * u ~ 2e-6 in the worst realistic case, and each of the two blocks and
the LayerNorms add a few u more. Different summation orders (torch vs XLA, AVX2 vs AVX-512) change
results within that budget, so 1e-5 * scale leaves a wide margin while any real mistake (a
transposed kernel, a wrong eps, a tanh GELU, a misplaced position) is orders of magnitude larger.
"""
from __future__ import annotations

import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cid_jax import cli, sharding
from cid_jax.models import vit as V
from cid_jax.weights import vit as W
from cid_jax.weights.state_dict import WeightsError, read_state_dict, write_safetensors_atomic
from tests.helpers import perturb_torch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE, PATCH = 64, 16
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=IMAGE, patch_size=PATCH, hidden_act="gelu", qkv_bias=True)
REL_TOL = 1e-5
# facebook/dino-vits16's config.json (the fields that define the network).
DINO_VITS16_JSON = dict(architectures=["ViTModel"], model_type="vit", hidden_size=384,
                        num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                        hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16,
                        num_channels=3, qkv_bias=True, attention_probs_dropout_prob=0.0,
                        hidden_dropout_prob=0.0, initializer_range=0.02)

ERRORS: dict[str, float] = {}  # what -> max abs error / scale, for the summary below


@functools.partial(jax.jit, static_argnums=(0, 3))
def forward(model, params, pixels, interpolate=False):
    """One jitted apply per (model, shape): equal models hit the same cache entry."""
    hidden = model.apply({"params": params}, pixels, interpolate)
    return hidden, model.apply({"params": params}, pixels, interpolate, method="cls_embedding")


def assert_close(ours, ref, what: str) -> None:
    ours = np.asarray(ours, np.float32)
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    ERRORS[what] = err / scale
    assert err <= REL_TOL * scale, f"{what}: max abs err {err:.3g} > {REL_TOL} x scale {scale:.3g}"


def images(seed: int, batch: int = 2, height: int = IMAGE, width: int = IMAGE) -> np.ndarray:
    """Random NCHW images (as transformers takes them), roughly normalised."""
    return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


def nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def compare(ref, model, params, pixels: np.ndarray, what: str, interpolate: bool = False) -> None:
    hidden, cls = forward(model, params, nhwc(pixels), interpolate)
    with torch.no_grad():
        r = ref(torch.as_tensor(pixels), interpolate_pos_encoding=interpolate)
    assert_close(hidden, r.last_hidden_state, f"{what} last_hidden_state")
    assert_close(cls, r.last_hidden_state[:, 0], f"{what} cls_embedding")


# ------------------------------------------------------------------------------ saved folders


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Perturbed tiny ViTs written in the layouts the loader accepts."""
    root = tmp_path_factory.mktemp("vit")
    tf = transformers
    torch.manual_seed(0)
    out = {}

    # The DINO layout: ViTModel without pooler, one model.safetensors.
    m = perturb_torch(tf.ViTModel(tf.ViTConfig(**TINY), add_pooling_layer=False), seed=1, scale=0.05)
    m.save_pretrained(root / "plain")
    out["plain"] = (m, root / "plain")

    # With the pooling layer (ignored by the loader), sharded safetensors with an index, and a
    # LayerNorm eps far from both 1e-12 and Flax's 1e-6: the eps must come from config.json.
    # (At 1e-12 the eps barely shows: Flax's default would move the outputs by only ~2e-5.)
    config = tf.ViTConfig(**TINY, layer_norm_eps=1e-3)
    m = perturb_torch(tf.ViTModel(config, add_pooling_layer=True), seed=2, scale=0.05)
    m.save_pretrained(root / "pooler", max_shard_size="20KB")
    out["pooler"] = (m, root / "pooler")

    # A classification checkpoint (`vit.` prefix + classifier) as a pytorch_model.bin, written
    # from the on-disk keys save_pretrained produced (transformers 5 only writes safetensors).
    m = perturb_torch(tf.ViTForImageClassification(tf.ViTConfig(**TINY, num_labels=5)), seed=3, scale=0.05)
    folder = root / "classifier_bin"
    m.save_pretrained(folder)
    sd = {k: torch.as_tensor(v) for k, v in read_state_dict(folder / "model.safetensors").items()}
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    out["classifier_bin"] = (m, folder)
    return out


@pytest.fixture(scope="module")
def loaded(saved):
    return W.load_vit(saved["plain"][1])


# ------------------------------------------------------------------------------------ parity


def test_on_disk_keys_are_the_legacy_layout(saved):
    """save_pretrained writes `encoder.layer.N.attention.attention.query` (as the hub files), not
    transformers 5's in-memory `layers.N.attention.q_proj`: the layout our names follow."""
    keys = set(read_state_dict(saved["plain"][1] / "model.safetensors"))
    assert "encoder.layer.1.attention.attention.query.weight" in keys
    assert "embeddings.patch_embeddings.projection.weight" in keys
    assert not any(k.startswith("layers.") for k in keys)


def test_parity_with_transformers(saved, loaded):
    ref, _ = saved["plain"]
    model, params = loaded
    assert model.config == V.ViTConfig(**TINY)  # layer_norm_eps 1e-12 is transformers' default
    hidden, _ = forward(model, params, nhwc(images(0)))
    assert hidden.shape == (2, 1 + (IMAGE // PATCH) ** 2, TINY["hidden_size"])
    compare(ref, model, params, images(0), "plain")
    compare(ref, model, params, images(1) * 3.0, "plain x3")  # LayerNorm-dominated regime


def test_pooler_and_sharded_checkpoint(saved, loaded):
    ref, folder = saved["pooler"]
    assert (folder / "model.safetensors.index.json").exists()
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "pooler.dense.weight" in weight_map and len(set(weight_map.values())) > 1
    model, params = W.load_vit(folder)
    assert model.config.layer_norm_eps == 1e-3
    compare(ref, model, params, images(2), "pooler/sharded, eps 1e-3")


def test_classification_checkpoint_bin_with_vit_prefix(saved, loaded):
    ref, folder = saved["classifier_bin"]
    keys = set(read_state_dict(folder / "pytorch_model.bin"))
    assert "vit.encoder.layer.0.intermediate.dense.weight" in keys and "classifier.weight" in keys
    model, params = W.load_vit(folder)
    compare(ref.vit, model, params, images(3), "vit.-prefixed .bin")


@pytest.mark.parametrize("height,width", [(96, 96), (48, 80), (32, 32)])
def test_interpolated_position_embeddings(saved, loaded, height, width):
    """Upsampled, non-square and downsampled patch grids, vs `interpolate_pos_encoding=True`."""
    ref, _ = saved["plain"]
    model, params = loaded
    compare(ref, model, params, images(4, 1, height, width), f"{height}x{width} interpolated",
            interpolate=True)


@pytest.mark.parametrize("in_size,out_size", [(4, 4), (4, 7), (14, 32), (14, 9), (5, 2), (3, 1)])
def test_bicubic_matrix_is_torch_bicubic(in_size, out_size):
    """Our resize matrix reproduces torch's bicubic (A=-0.75, half-pixel, clamped borders)."""
    x = torch.randn(1, 3, in_size, in_size, generator=torch.Generator().manual_seed(in_size + out_size))
    want = torch.nn.functional.interpolate(x, size=(out_size, out_size), mode="bicubic",
                                           align_corners=False).numpy()
    m = V.bicubic_resize_matrix(in_size, out_size).astype(np.float64)
    got = np.einsum("hi,wj,cij->chw", m, m, x[0].numpy().astype(np.float64))
    np.testing.assert_allclose(got, want[0], rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


def test_image_size_must_match_without_interpolation(loaded):
    model, params = loaded
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, jnp.zeros((1, 96, 96, 3)))
    with pytest.raises(ValueError, match="3 channels"):
        jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, jnp.zeros((1, 64, 64, 1)))


# ------------------------------------------------------------------------------- full size


def vit_parameter_count(c: V.ViTConfig) -> int:
    """ViTModel without pooler, counted from the architecture (not from our module)."""
    d, f, p = c.hidden_size, c.intermediate_size, c.patch_size
    patch = c.num_channels * p * p * d + d
    embeddings = patch + d + ((c.image_size // p) ** 2 + 1) * d
    attention = 3 * (d * d + (d if c.qkv_bias else 0)) + d * d + d
    block = attention + (d * f + f) + (f * d + d) + 2 * 2 * d
    return embeddings + c.num_hidden_layers * block + 2 * d


def test_dino_vits16_shapes_without_compiling():
    config = V.ViTConfig.from_dict(DINO_VITS16_JSON)
    assert config == V.DINO_VITS16 and config.num_positions == 197
    model = V.ViTModel(config)
    params = V.abstract_params(model, boxed=False)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert count == vit_parameter_count(config) == 21_665_664  # "21.7 M"
    out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method="cls_embedding"),
                         params, *model.dummy_inputs(4))
    assert out.shape == (4, 384) and out.dtype == jnp.float32
    # The logical names resolve on a (data, fsdp) mesh: kernels' model width over fsdp.
    mesh = sharding.make_mesh(fsdp=2)
    shardings = sharding.param_shardings(V.abstract_params(model), mesh)
    q = shardings["encoder"]["layer_0"]["attention"]["attention"]["query"]["kernel"]
    assert tuple(q.spec) == ("fsdp", None)


# ------------------------------------------------------------------------- refused inputs


def _copy_with(folder, tmp_path, edit) -> pathlib.Path:
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    sd = read_state_dict(out / "model.safetensors")
    edit(sd)
    write_safetensors_atomic(sd, out / "model.safetensors")
    return out


def test_missing_key_is_named(saved, tmp_path):
    key = "encoder.layer.1.output.dense.bias"
    folder = _copy_with(saved["plain"][1], tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(WeightsError, match=r"missing key.*" + key.replace(".", r"\.")):
        W.load_vit(folder)


def test_wrong_shape_is_named(saved, tmp_path):
    key = "encoder.layer.0.intermediate.dense.weight"

    def edit(sd):
        sd[key] = sd[key][:-1]

    with pytest.raises(WeightsError, match=r"shape mismatch.*" + key.replace(".", r"\.")):
        W.load_vit(_copy_with(saved["plain"][1], tmp_path, edit))


def test_unexpected_key_is_named(saved, tmp_path):
    def edit(sd):
        sd["embeddings.mask_token"] = np.zeros((1, 1, 32), np.float32)

    with pytest.raises(WeightsError, match=r"unexpected key.*embeddings\.mask_token"):
        W.load_vit(_copy_with(saved["plain"][1], tmp_path, edit))


def test_not_a_vit_folder(saved, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(saved["plain"][1], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="clip_vision_model",
                                                        architectures=["CLIPVisionModel"])))
    with pytest.raises(cli.InputError, match="not a ViT checkpoint.*clip_vision_model"):
        W.load_vit(folder)
    with pytest.raises(cli.MissingError, match="no config.json"):
        W.load_vit(tmp_path / "nowhere")


@pytest.mark.parametrize("field,value,message", [
    ("hidden_act", "swish", "hidden_act"),
    ("image_size", [224, 160], "only square"),
    ("head_dim", 8, "head_dim"),
    ("image_size", 100, "not a multiple"),
])
def test_unsupported_config_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        V.ViTConfig.from_dict(dict(DINO_VITS16_JSON, **{field: value}))


def test_report_errors():
    """Runs last (file order): prints the measured errors, for the record."""
    if ERRORS:
        worst = max(ERRORS, key=ERRORS.get)
        print(f"\nmax |ours - torch| / scale: {ERRORS[worst]:.3g} ({worst}); tolerance {REL_TOL}")
