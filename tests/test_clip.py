"""CLIP text/vision encoders: parity with transformers (PyTorch) through our real loaders.

Every reference model gets all of its weights perturbed, is written in a real on-disk format
(transformers 5 `save_pretrained`, sharded safetensors, a transformers-4-style `pytorch_model.bin`,
a full CLIPModel folder), loaded with cid_jax.weights.clip, and compared in fp32 on random inputs.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cid_jax.models import presets
from cid_jax.models import clip as C
from cid_jax.weights import clip as W
from cid_jax.weights.state_dict import WeightsError, read_state_dict, write_safetensors_atomic

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, IMAGE = 1000, 16, 32
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=LENGTH, projection_dim=24,
            bos_token_id=0, pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE, patch_size=8, projection_dim=24, hidden_act="gelu")


def perturb(model: "torch.nn.Module", seed: int) -> None:
    """Replaces every parameter with random values (norm scales around 1), so no layout error hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim <= 1:  # biases, class embedding, logit_scale
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / np.sqrt(p[0].numel()))


def assert_close(ours, ref, what: str, rel: float = 1e-4) -> None:
    ours = np.asarray(ours, np.float32)
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= rel * scale, f"{what}: max abs err {err:.3g} > {rel} x scale {scale:.3g}"


def text_ids(rng: np.random.Generator, eos: int) -> np.ndarray:
    """Two rows of ids with EOS at different places, padded with EOS (as CLIP tokenizers do).

    Ids above `eos` (when eos < VOCAB-1) and the id 2 elsewhere make the two pooling rules of
    transformers (argmax of ids vs first EOS) pick different positions, so using the wrong one fails.
    """
    ids = rng.integers(3, VOCAB, size=(2, LENGTH))
    ids[0, 6:] = eos
    ids[1, -1] = eos
    ids[:, 2] = 2
    if eos != VOCAB - 1:
        ids[1, 3] = VOCAB - 1
    return ids


def run(model, params, *args, **kw):
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kw))(params, *args)


# ------------------------------------------------------------------------------ saved folders


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """Tiny transformers models, perturbed and saved in each layout the loaders accept."""
    root = tmp_path_factory.mktemp("clip")
    tf = transformers
    out = {}
    torch.manual_seed(0)

    # SD1.5-like text encoder: quick_gelu, legacy eos_token_id 2; transformers 5 writes bare keys.
    m = tf.CLIPTextModel(tf.CLIPTextConfig(**TEXT, eos_token_id=2, hidden_act="quick_gelu")).eval()
    perturb(m, 1)
    m.save_pretrained(root / "text")
    out["text"] = (m, root / "text")

    # SDXL text_encoder_2-like: gelu, eos_token_id != 2 (first-EOS pooling); a transformers-4 style
    # pytorch_model.bin (transformers 5 save_pretrained only writes safetensors), with the
    # position_ids buffer that transformers < 4.31 saved.
    m = tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(**TEXT, eos_token_id=500, hidden_act="gelu")).eval()
    perturb(m, 2)
    folder = root / "text_proj_bin"
    m.config.save_pretrained(folder)
    sd = dict(m.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(LENGTH)[None]
    torch.save(sd, folder / "pytorch_model.bin")
    out["text_proj"] = (m, folder)

    # ViT-H-like image encoder, sharded safetensors with an index.
    m = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**VISION)).eval()
    perturb(m, 3)
    m.save_pretrained(root / "vision", max_shard_size="40KB")
    out["vision"] = (m, root / "vision")

    # A full CLIPModel folder, as laion/CLIP-ViT-H-14-laion2B-s32B-b79K is published.
    cfg = tf.CLIPConfig(text_config=dict(TEXT, eos_token_id=2, hidden_act="gelu"),
                        vision_config=VISION, projection_dim=24)
    m = tf.CLIPModel(cfg).eval()
    perturb(m, 4)
    m.save_pretrained(root / "full")
    out["full"] = (m, root / "full")
    return out


# ------------------------------------------------------------------------------------ parity


def test_text_model_quick_gelu_bare_keys(saved):
    ref, folder = saved["text"]
    assert not any(k.startswith("text_model.") for k in read_state_dict(folder / "model.safetensors"))
    model, params = W.load_clip_text(folder)
    assert model.config.hidden_act == "quick_gelu" and model.config.eos_token_id == 2
    ids = text_ids(np.random.default_rng(0), eos=VOCAB - 1)
    ours = run(model, params, jnp.asarray(ids))
    with torch.no_grad():
        r = ref(torch.as_tensor(ids), output_hidden_states=True)
    assert len(ours.hidden_states) == len(r.hidden_states) == TEXT["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, r.hidden_states)):
        assert_close(a, b, f"hidden_states[{i}]")
    assert_close(ours.last_hidden_state, r.last_hidden_state, "last_hidden_state")
    assert_close(ours.pooler_output, r.pooler_output, "pooler_output (argmax of ids)")
    assert ours.text_embeds is None


def test_text_with_projection_gelu_from_bin(saved):
    ref, folder = saved["text_proj"]
    # The hand-written .bin is a format transformers itself reads (prefixed keys, old buffer).
    reloaded = transformers.CLIPTextModelWithProjection.from_pretrained(folder).eval()
    model, params = W.load_clip_text_with_projection(folder)
    assert model.config.hidden_act == "gelu" and model.config.eos_token_id == 500
    ids = text_ids(np.random.default_rng(1), eos=500)
    mask = np.ones_like(ids)
    mask[0, 9:] = 0
    for attention_mask in (None, mask):
        kw = {} if attention_mask is None else {"attention_mask": torch.as_tensor(attention_mask)}
        ours = run(model, params, jnp.asarray(ids),
                   None if attention_mask is None else jnp.asarray(attention_mask))
        with torch.no_grad():
            r = ref(torch.as_tensor(ids), output_hidden_states=True, **kw)
            r2 = reloaded(torch.as_tensor(ids), **kw)
        tag = "padded " if attention_mask is not None else ""
        assert_close(ours.last_hidden_state, r.last_hidden_state, tag + "last_hidden_state")
        assert_close(ours.hidden_states[-2], r.hidden_states[-2], tag + "hidden_states[-2]")
        assert_close(ours.text_embeds, r.text_embeds, tag + "text_embeds (first EOS)")
        assert_close(ours.text_embeds, r2.text_embeds, tag + "text_embeds vs transformers' own load")


def test_vision_with_projection_sharded(saved):
    ref, folder = saved["vision"]
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    model, params = W.load_clip_vision_with_projection(folder)
    pixels = np.random.default_rng(2).standard_normal((2, 3, IMAGE, IMAGE)).astype(np.float32)
    ours = run(model, params, jnp.asarray(pixels.transpose(0, 2, 3, 1)))  # NCHW -> NHWC
    with torch.no_grad():
        r = ref(torch.as_tensor(pixels), output_hidden_states=True)
    assert len(ours.hidden_states) == len(r.hidden_states) == VISION["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, r.hidden_states)):
        assert_close(a, b, f"vision hidden_states[{i}]")
    assert_close(ours.last_hidden_state, r.last_hidden_state, "vision last_hidden_state")
    assert_close(ours.image_embeds, r.image_embeds, "image_embeds")


def test_towers_from_full_clip_model(saved):
    """laion's ViT-H repo is a full CLIPModel: compare with transformers loading the same folder."""
    _, folder = saved["full"]
    ref_v = transformers.CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    ref_t = transformers.CLIPTextModel.from_pretrained(folder).eval()
    vision, vparams = W.load_clip_vision_with_projection(folder)
    text, tparams = W.load_clip_text(folder)
    pixels = np.random.default_rng(3).standard_normal((1, 3, IMAGE, IMAGE)).astype(np.float32)
    ids = text_ids(np.random.default_rng(4), eos=VOCAB - 1)
    ov = run(vision, vparams, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    ot = run(text, tparams, jnp.asarray(ids))
    with torch.no_grad():
        rv = ref_v(torch.as_tensor(pixels), output_hidden_states=True)
        rt = ref_t(torch.as_tensor(ids))
    assert_close(ov.hidden_states[-2], rv.hidden_states[-2], "full CLIP vision hidden_states[-2]")
    assert_close(ov.image_embeds, rv.image_embeds, "full CLIP image_embeds")
    assert_close(ot.last_hidden_state, rt.last_hidden_state, "full CLIP text last_hidden_state")
    assert_close(ot.pooler_output, rt.pooler_output, "full CLIP text pooler_output")


# ------------------------------------------------------------------------------- strictness


def _copy_with(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    shutil.copytree(src, dst)
    sd = edit(read_state_dict(src / "model.safetensors"))
    write_safetensors_atomic(sd, dst / "model.safetensors")
    return dst


def test_loading_is_strict(saved, tmp_path):
    _, folder = saved["text"]
    key = "encoder.layers.1.mlp.fc2.weight"
    missing = _copy_with(folder, tmp_path / "missing", lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(WeightsError, match="missing.*text_model.encoder.layers.1.mlp.fc2.weight"):
        W.load_clip_text(missing)
    extra = _copy_with(folder, tmp_path / "extra", lambda sd: {**sd, "encoder.layers.2.mlp.fc2.weight": sd[key]})
    with pytest.raises(WeightsError, match="unexpected.*text_model.encoder.layers.2.mlp.fc2.weight"):
        W.load_clip_text(extra)
    # A config that disagrees with the weights (wrong FFN width) names the key and both shapes.
    wrong = tmp_path / "wrong"
    shutil.copytree(folder, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(WeightsError, match=r"mlp.fc1.weight: checkpoint \(64, 32\)"):
        W.load_clip_text(wrong)
    # A text-with-projection checkpoint is not silently cut down to a plain text model.
    _, proj_folder = saved["text_proj"]
    with pytest.raises(WeightsError, match="unexpected.*text_projection.weight"):
        W.load_clip_text(proj_folder)


# ------------------------------------------------------------------------- options and sizes


def test_remat_bf16_and_logical_sharding(saved):
    from cid_jax.sharding import make_mesh, param_shardings

    _, folder = saved["vision"]
    model, params = W.load_clip_vision_with_projection(folder)
    pixels = jnp.asarray(np.random.default_rng(5).standard_normal((8, IMAGE, IMAGE, 3)), jnp.float32)
    loss = lambda m: jax.jit(jax.value_and_grad(
        lambda p: jnp.sum(m.apply({"params": p}, pixels).hidden_states[-2] ** 2)))
    value, grads = loss(model)(params)
    model_r = C.CLIPVisionModelWithProjection(model.config, remat=True)
    value_r, grads_r = loss(model_r)(params)
    assert_close(value_r, value, "remat loss", rel=1e-5)
    for (path, g), gr in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_r)):
        assert_close(gr, g, f"remat grad {jax.tree_util.keystr(path)}", rel=1e-4)

    ref = run(model, params, pixels)
    low = C.CLIPVisionModelWithProjection(model.config, dtype=jnp.bfloat16)
    out = run(low, params, pixels)
    assert out.hidden_states[-2].dtype == jnp.bfloat16
    assert_close(out.hidden_states[-2], ref.hidden_states[-2], "bf16 hidden_states[-2]", rel=5e-2)

    boxed = C.abstract_params(model)
    q = boxed["vision_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, nn.LogicallyPartitioned) and q.names == ("embed", "heads")
    assert boxed["vision_model"]["embeddings"]["patch_embedding"]["kernel"].names == (
        "conv_h", "conv_w", "conv_in", "embed")
    assert jax.tree.structure(nn.meta.unbox(boxed)) == jax.tree.structure(params)
    mesh = make_mesh(data=4, fsdp=2)
    shardings = param_shardings(boxed, mesh)
    assert tuple(shardings["vision_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"].spec) \
        == ("fsdp", None)
    sharded = jax.device_put(params, shardings)
    out = run(model, sharded, pixels)
    assert_close(out.image_embeds, ref.image_embeds, "image_embeds with fsdp-sharded params", rel=1e-5)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_full_size_shapes():
    """The real configs, by shape only (eval_shape): the parameter counts of the published models."""
    text = C.CLIPTextModel(C.CLIPTextConfig.from_dict(presets.CLIP_L_TEXT))
    p = C.abstract_params(text, boxed=False)
    assert _count(p) == 123_060_480  # CLIP-L text, 123.1 M
    o = jax.eval_shape(lambda p, x: text.apply({"params": p}, x), p, *text.dummy_inputs(2))
    assert o.last_hidden_state.shape == (2, 77, 768) and len(o.hidden_states) == 13

    big = C.CLIPTextModelWithProjection(C.CLIPTextConfig.from_dict(presets.OPENCLIP_BIGG_TEXT))
    p = C.abstract_params(big, boxed=False)
    assert _count(p) == 694_659_840  # SDXL text_encoder_2
    o = jax.eval_shape(lambda p, x: big.apply({"params": p}, x), p, *big.dummy_inputs(1))
    assert o.hidden_states[-2].shape == (1, 77, 1280) and o.text_embeds.shape == (1, 1280)

    vision = C.CLIPVisionModelWithProjection(C.CLIPVisionConfig.from_dict(presets.CLIP_VIT_H_14_VISION))
    p = C.abstract_params(vision, boxed=False)
    assert _count(p["vision_model"]) == 630_766_080  # ViT-H/14 tower, 630.8 M
    assert _count(p) == 632_076_800  # plus visual_projection 1280 x 1024
    o = jax.eval_shape(lambda p, x: vision.apply({"params": p}, x), p, *vision.dummy_inputs(1))
    assert o.hidden_states[-2].shape == (1, 257, 1280) and o.image_embeds.shape == (1, 1024)
