"""Generation pipeline and CLI on tiny random models (CPU): the merge switch, the compiled loop,
the CLI end to end with the offline face fallback, and the clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cid_jax import cli
from cid_jax import generate as gen
from cid_jax import inference
from cid_jax import sampling as pl


@pytest.fixture(scope="session")
def loaded(demo_workdir):
    """The demo run directory through the CLI's loader, LoRA kept apart (the trained tensors as they are)."""
    return inference.load(str(demo_workdir[0]), fold_lora=False)


@pytest.fixture(scope="session")
def astronaut():
    import skimage.data

    return skimage.data.astronaut()


def test_merge_switch_is_inclusive():
    text, aug = jnp.zeros((1, 2)), jnp.ones((1, 2))
    picks = [float(pl.conditional_context(i, 2, text, aug)[0, 0]) for i in range(5)]
    assert picks == [0, 0, 0, 1, 1]  # i <= start_merge_step -> text-only


def test_load_workdir_restores_exported_params(demo_workdir, loaded):
    _, trainable = demo_workdir
    assert jax.tree.structure(loaded.trainable) == jax.tree.structure(trainable)
    for a, b in zip(jax.tree.leaves(loaded.trainable), jax.tree.leaves(trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.metadata["pairing"] == "reference"


def test_merge_step_changes_the_result_and_loop_compiles_once(loaded, astronaut):
    from cid_jax.face import template_parse

    face = pl.face_batch(astronaut, template_parse(astronaut), np.ones(512, np.float32) / 512 ** 0.5)
    text = pl.text_batch("a photo", "", loaded.tokenizer, face.part_names)
    assert text.facial_token_idx_mask.sum() == len(face.part_names) == 5
    # Batch of 2 at 64 px, 3 Euler steps with the workdir's noise config: the shapes the CLI test
    # below generates with, so its compilation is a persistent-cache hit of this one.
    inputs = pl.model_inputs([face, face], [text, text])
    noise = pl.initial_noise([0, 1], pl.latent_shape(loaded.model, 64, 64))
    state = pl.scheduler_state("euler", 3, loaded.noise_config)
    g = pl.Generator(loaded.model)
    outs = [np.asarray(g(loaded.frozen, loaded.trainable, inputs, noise, state, m, 5.0)[1]) for m in (-1, 1, 3)]
    assert g.fn._cache_size() == 1  # merge step and guidance are traced: one compilation
    # The three sets differ, so where the switch happens shows in the result: merge -1 (augmented
    # from step 0) vs 1 (text-only for steps 0, 1) vs 3 (text-only throughout 3 steps).
    assert np.abs(outs[0] - outs[1]).max() > 1e-4 and np.abs(outs[1] - outs[2]).max() > 1e-4


def test_cli_end_to_end_on_astronaut(demo_workdir, astronaut, tmp_path, capsys):
    from PIL import Image

    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(photo)
    out = tmp_path / "out.png"
    code = gen.main([f"--checkpoint={demo_workdir[0]}", f"--image={photo}", "--prompt=a portrait",
                     "--steps=3", "--merge_step=1", "--num-images=2", f"--out={out}"])  # both spellings
    assert code == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (64, 128, 3) and img.std() > 0  # a grid of the two seeds
    assert (tmp_path / "out_0.png").exists() and (tmp_path / "out_1.png").exists()


def test_cli_no_face_is_a_clear_error(demo_workdir, tmp_path, capsys):
    from PIL import Image

    photo = tmp_path / "noface.png"
    Image.fromarray(np.full((128, 128, 3), 90, np.uint8)).save(photo)
    code = gen.main([f"--checkpoint={demo_workdir[0]}", f"--image={photo}", "--prompt=x"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_NO_FACE and "no face found" in err and "Traceback" not in err


def test_cli_missing_weights_names_the_folder(tmp_path, astronaut, capsys):
    from PIL import Image

    photo = tmp_path / "a.png"
    Image.fromarray(astronaut).save(photo)
    ckpt = tmp_path / "c.safetensors"
    ckpt.write_bytes(b"")
    code = gen.main([f"--checkpoint={ckpt}", f"--base={tmp_path / 'sd15'}", f"--image={photo}", "--prompt=x"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_MISSING and str(tmp_path / "sd15") in err


def test_cli_inpaints_the_photo_where_the_mask_is_white(demo_workdir, astronaut, tmp_path, capsys):
    """`--mask` repaints the white part of the init image (default: the photo itself, as the
    reference); with strength < 1 the result starts from the noised photo; its PNG records the
    inpainting settings. A mask of another size, a strength without a mask, or one out of (0, 1]
    are one line each, before any work."""
    import json

    from PIL import Image

    photo, mask, out = tmp_path / "astronaut.png", tmp_path / "mask.png", tmp_path / "out.png"
    Image.fromarray(astronaut).save(photo)
    white = np.zeros(astronaut.shape[:2], np.uint8)
    white[40:220, 150:330] = 255
    Image.fromarray(white).save(mask)
    common = [f"--checkpoint={demo_workdir[0]}", f"--image={photo}", "--prompt=a portrait", "--steps=3",
              "--merge_step=1"]
    assert gen.main(common + [f"--mask={mask}", "--strength=0.7", f"--out={out}"]) == 0
    with Image.open(out) as im:
        assert np.asarray(im).shape == (64, 64, 3)
        settings = json.loads(im.text["parameters"])
    assert (settings["strength"], settings["mask"], settings["init_image"]) == (0.7, str(mask), str(photo))

    Image.fromarray(white[::2, ::2]).save(tmp_path / "small_mask.png")
    capsys.readouterr()
    for flags, message in (([f"--mask={tmp_path / 'small_mask.png'}"], "the mask is 256x256 but the init image is "
                                                                          "512x512"),
                           (["--strength=0.5"], "--strength=0.5 applies to inpainting: give --mask"),
                           ([f"--mask={mask}", "--strength=1.5"], "--strength=1.5: must be in (0, 1]"),
                           ([f"--init_image={photo}"], "--init_image without --mask")):
        assert gen.main(common + flags + [f"--out={tmp_path / 'x.png'}"]) == cli.EXIT_USAGE, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def _tiny_controlnet(folder, **unet_changes):
    """A diffusers ControlNet for the demo preset's UNet (its control image enters at the VAE's factor)."""
    import diffusers

    from cid_jax.models import presets

    tiny = presets.get("tiny-sd15")
    levels = len(tiny["vae"]["block_out_channels"])  # the VAE halves the side levels - 1 times
    unet = diffusers.UNet2DConditionModel(**dict(tiny["unet"], **unet_changes))
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16)[:levels])
    net.save_pretrained(folder)
    return folder


def test_cli_controlnets_with_inpainting(demo_workdir, astronaut, tmp_path, capsys):
    """Two ControlNets (an inpainting one fed the masked photo, one fed an edge picture) with
    inpainting, as the reference's demo; a ControlNet of another base model, a control image
    without a ControlNet and 'inpaint' without a mask are one line each."""
    import json

    import skimage.feature
    from PIL import Image

    pytest.importorskip("diffusers")
    photo, mask, edges, out = (tmp_path / n for n in ("astronaut.png", "mask.png", "edges.png", "out.png"))
    Image.fromarray(astronaut).save(photo)
    white = np.zeros(astronaut.shape[:2], np.uint8)
    white[40:220, 150:330] = 255
    Image.fromarray(white).save(mask)
    Image.fromarray((skimage.feature.canny(astronaut.mean(-1)) * 255).astype(np.uint8)).save(edges)
    net = _tiny_controlnet(tmp_path / "controlnet")
    common = [f"--checkpoint={demo_workdir[0]}", f"--image={photo}", "--prompt=a portrait", "--steps=3",
              "--merge_step=1"]
    assert gen.main(common + [f"--mask={mask}", f"--controlnet={net}", "--control_image=inpaint",
                              f"--controlnet={net}", f"--control_image={edges}", "--controlnet_scale=0.8",
                              "--controlnet_scale=0.3", "--control_guidance_end=0.7", f"--out={out}"]) == 0
    with Image.open(out) as im:
        settings = json.loads(im.text["parameters"])
    assert settings["control_image"] == ["inpaint", str(edges)] and settings["controlnet_scale"] == [0.8, 0.3]

    other = _tiny_controlnet(tmp_path / "other", cross_attention_dim=32)
    capsys.readouterr()
    for flags, message in (([f"--controlnet={other}", f"--control_image={edges}"],
                            "was made for another base model (cross_attention_dim: 32 vs the UNet's 64)"),
                           ([f"--control_image={edges}"], "1 --control_image for 0 --controlnet"),
                           ([f"--controlnet={net}", "--control_image=inpaint"], "--control_image=inpaint is made "
                                                                                 "from the init image and --mask")):
        assert gen.main(common + flags + [f"--out={tmp_path / 'x.png'}"]) == cli.EXIT_USAGE, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
