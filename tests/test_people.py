"""Several people in one image (`cid_jax.people`): each person's photo acts only inside their region.

- exact: at every cross-attention site of the UNet, given the same input, the outputs at the pixels
  where person B has no weight do not change when B's photo and ID embedding change (bitwise);
- one person with a full-image region gives today's single-identity image;
- the prompt carries one facial caption per person, each person's facial words flagged apart;
- `python -m cid_jax.generate` with two photos and two --region boxes (or a --layout picture) writes
  the image; bad regions are one line.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cid_jax import inference, people
from cid_jax import sampling as pl
from cid_jax.models.adapters import ConsistentCrossProcessor, Regions

SIDE = 64


@pytest.fixture(scope="module")
def loaded(demo_workdir):
    return inference.load(str(demo_workdir[0]))


def _faces():
    """Two different people: the astronaut with a random ID embedding, and the camera man (a
    grey picture made RGB) with another."""
    import skimage.data

    from cid_jax.face import template_parse

    rng = np.random.default_rng(0)
    out = []
    for photo in (skimage.data.astronaut(), np.repeat(skimage.data.camera()[..., None], 3, -1)):
        emb = rng.standard_normal(512).astype(np.float32)
        out.append(pl.face_batch(photo, template_parse(photo), emb / np.linalg.norm(emb)))
    return out


def test_each_person_gets_their_own_facial_words(loaded):
    a, b = _faces()
    texts = people.group_texts("two friends", "", loaded.tokenizer, [a.part_names, b.part_names])
    first, second = (np.flatnonzero(t.facial_token_mask) for t in texts)
    assert len(first) == texts[0].facial_token_idx_mask.sum() == 5
    assert len(second) == texts[1].facial_token_idx_mask.sum() == 5
    assert first.max() < second.min()                       # person 1's words come first
    np.testing.assert_array_equal(texts[0].input_ids, texts[1].input_ids)  # one shared token sequence
    assert texts[0].prompt_face.count("<|facial|>") == 10
    with pytest.raises(Exception, match="longer than the text encoder's 77 tokens"):
        people.group_texts("a very long prompt " * 6, "", loaded.tokenizer, [a.part_names] * 3)


def _people_inputs(loaded, faces, masks, batch=1):
    texts = people.group_texts("two friends in a park", "blurry", loaded.tokenizer, [f.part_names for f in faces])
    return people.group_inputs(faces, texts, people.latent_masks(masks, loaded.model.vae.config.downscale), batch)


def test_a_persons_pixels_do_not_depend_on_the_other_photo_at_any_attention_site(loaded):
    """Run the UNet on person A + person B, then on A + another B, feeding every cross-attention
    the first run's input (so only the photos differ): at each site, the output rows where B's
    region weight is 0 are bitwise unchanged, and the rows in B's region do change."""
    a, b = _faces()
    other_b = b._replace(id_embedding=-b.id_embedding, part_clip_images=b.part_clip_images[::-1].copy(),
                         clip_image=b.clip_image[::-1].copy())
    masks = people.box_masks([(0, 0, 24, 64), (40, 0, 64, 64)], SIDE, SIDE)
    model, frozen, trainable = loaded.model, loaded.frozen, loaded.trainable
    noise = pl.initial_noise([0], pl.latent_shape(model, SIDE, SIDE))
    state = pl.scheduler_state("euler", 4, loaded.noise_config)

    def unet_once(inputs, replay):
        """One UNet call of the sampler's (step 2, after the merge), recording each cross-attention's
        input and output; `replay` holds inputs to feed instead."""
        seen = {}

        def intercept(next_fun, args, kwargs, context):
            if not (isinstance(context.module, ConsistentCrossProcessor) and context.method_name == "__call__"):
                return next_fun(*args, **kwargs)
            key = "/".join(context.module.path)
            args = list(args)
            if replay is not None:
                args[1] = replay[key][0]  # (attn, hidden, context)
            out = next_fun(*args, **kwargs)
            seen[key] = (args[1], out, kwargs["regions"].weights[args[1].shape[1]])
            return out

        per_person = [inputs[f"person_{k}"] for k in range(2)]
        sets, stacked = pl.people_sets(model, frozen, trainable, per_person)
        weights = pl.region_weights(jnp.concatenate([inputs["region_masks"]] * 2), 3)
        regions = Regions(jnp.concatenate([stacked.null, stacked.augmented]), weights)
        context = jnp.concatenate([sets.null, sets.augmented])
        x = jnp.concatenate([noise, noise]) * state.init_noise_sigma
        with nn.intercept_methods(intercept):
            model.predict_noise(frozen, trainable, x, state.timesteps[2], context, capture=False, regions=regions)
        return seen

    first = unet_once(_people_inputs(loaded, [a, b], masks), None)
    second = unet_once(_people_inputs(loaded, [a, other_b], masks), first)
    assert len(first) == len(second) >= 7  # every cross-attention of the tiny UNet (down, mid, up)
    for key, (_, out, weights) in first.items():
        b_weight = np.asarray(weights)[:, 1]                              # [2B, L]
        outside_b = b_weight == 0
        changed = np.asarray(out) != np.asarray(second[key][1])           # [2B, L, C]
        assert outside_b.any() and not changed[outside_b].any(), key
        assert changed[~outside_b].any(), key


def test_one_person_with_the_whole_image_is_the_single_identity_image(loaded):
    import skimage.data

    from cid_jax.face import template_parse

    photo = skimage.data.astronaut()
    face = _faces()[0]
    common = dict(steps=3, guidance=5.0, merge_step=1, sampler="euler", height=SIDE, width=SIDE)
    group, _ = inference.generate_group(loaded, [face], np.ones((1, SIDE, SIDE), np.float32), "a portrait", "",
                                        [1, 2], **common)
    single = inference.generate(loaded, photo, template_parse(photo), face.id_embedding, ["a portrait"], "", [1, 2],
                                **common)
    # The same arithmetic but for the person's attention running in a batch folded with the base
    # context's: at most a rounding step apart before the uint8 conversion.
    assert np.abs(group.astype(int) - single.astype(int)).max() <= 1


def test_region_errors_are_one_line():
    with pytest.raises(Exception, match=r"--region=10,10,80,40 is not a box inside the 64x64 image"):
        people.parse_box("10,10,80,40", 64, 64)
    with pytest.raises(Exception, match="give x0,y0,x1,y1"):
        people.parse_box("10,10,40", 64, 64)
    with pytest.raises(Exception, match="persons 1 and 2 overlap"):
        people.check_masks(people.box_masks([(0, 0, 40, 64), (30, 0, 64, 64)], 64, 64))
    layout = np.zeros((32, 32), np.uint8)
    layout[:, :10], layout[:, 20:] = 80, 160
    masks = people.layout_masks(layout, 2, 64, 64)
    assert masks.shape == (2, 64, 64) and masks[0, :, :20].all() and masks[1, :, 40:].all()
    with pytest.raises(Exception, match="2 grey level"):
        people.layout_masks(layout, 3, 64, 64)


def test_generate_command_line_with_two_people(demo_workdir, tmp_path, capsys):
    import skimage.data
    from PIL import Image

    from cid_jax import generate as gen

    workdir, _ = demo_workdir
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "a.png")
    Image.fromarray(skimage.data.camera()).convert("RGB").save(tmp_path / "b.png")
    layout = np.zeros((64, 64), np.uint8)
    layout[:, :28], layout[:, 36:] = 100, 200
    Image.fromarray(layout).save(tmp_path / "layout.png")
    common = [f"--checkpoint={workdir}", f"--image={tmp_path / 'a.png'}", f"--image={tmp_path / 'b.png'}",
              "--prompt=two friends", "--steps=2", "--merge_step=0", "--seed=3"]
    assert gen.main(common + ["--region=0,0,28,64", "--region=36,0,64,64", f"--out={tmp_path / 'boxes.png'}"]) == 0
    assert gen.main(common + [f"--layout={tmp_path / 'layout.png'}", f"--out={tmp_path / 'layout_out.png'}"]) == 0
    boxes, laid = (np.asarray(Image.open(tmp_path / n)) for n in ("boxes.png", "layout_out.png"))
    assert boxes.shape == (64, 64, 3) and np.array_equal(boxes, laid)  # the same regions, drawn two ways
    assert "regions" in Image.open(tmp_path / "boxes.png").info.get("parameters", "")
    assert gen.main(common + ["--region=0,0,28,64", f"--out={tmp_path / 'x.png'}"]) == 2
    Image.fromarray(skimage.data.coffee()).save(tmp_path / "cup.png")  # no face: the photo is named
    no_face = [a.replace("b.png", "cup.png") for a in common]
    assert gen.main(no_face + ["--region=0,0,28,64", "--region=36,0,64,64", f"--out={tmp_path / 'x.png'}"]) == 2
    assert "cup.png: no face found" in capsys.readouterr().err
    assert gen.main(common + ["--region=0,0,40,64", "--region=30,0,64,64", f"--out={tmp_path / 'x.png'}"]) == 2


def test_pytorch_runner_draws_the_same_two_people(tmp_path):
    """`convert/run_pytorch.py` (PyTorch + diffusers, its own regional processor) and `generate`
    with the same two photos and regions write the same image, from tiny models saved in
    diffusers' format and our exported ConsistentID file."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import importlib.util

    import skimage.data
    from PIL import Image

    from cid_jax import generate as gen
    from tests.helpers import (REPO, abstract_trainable, export_trainable, inference_demo_config, load_local_model,
                               random_params, write_tiny_sd15)

    write_tiny_sd15(tmp_path)
    config = inference_demo_config()
    model, _ = load_local_model(tmp_path, config)
    export_trainable(random_params(abstract_trainable(model), seed=5), config, tmp_path / "cid.safetensors")
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "a.png")
    Image.fromarray(skimage.data.camera()).convert("RGB").save(tmp_path / "b.png")
    common = [f"--checkpoint={tmp_path / 'cid.safetensors'}", f"--base={tmp_path / 'base'}",
              f"--image_encoder={tmp_path / 'clip'}", f"--image={tmp_path / 'a.png'}", f"--image={tmp_path / 'b.png'}",
              "--region=0,8,28,64", "--region=36,0,64,56", "--prompt=two friends", "--steps=3", "--merge_step=1",
              "--height=64", "--width=64", "--seed=4"]
    assert gen.main(common + ["--dtype=float32", f"--out={tmp_path / 'jax.png'}"]) == 0
    spec = importlib.util.spec_from_file_location("run_pytorch", REPO / "convert" / "run_pytorch.py")
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    heads = config.model.facial_encoder.heads
    assert rp.main(common + [f"--facial_encoder_heads={heads}", f"--out={tmp_path / 'torch.png'}"]) == 0
    ours, theirs = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("jax", "torch"))
    assert ours.shape == theirs.shape == (64, 64, 3) and np.abs(ours - theirs).max() <= 1


def test_evaluate_scores_each_persons_crop_against_the_group(demo_workdir, tmp_path):
    """`evaluate --people=2` on the demo checkpoint: two references generated together side by side,
    each crop scored against both; people.json / people.md / people.csv written. (The demo's models are
    random, so its margins say nothing about identity; the numbers for real models come from the same
    command with --face_models/--dino_model/--clip_model.)"""
    pytest.importorskip("torch")
    import json

    import skimage.data
    from PIL import Image

    from cid_jax import evaluate
    from tests.helpers import write_metric_models

    workdir, _ = demo_workdir
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(refs / "astronaut.png")
    Image.fromarray(skimage.data.camera()).convert("RGB").save(refs / "cameraman.png")
    (tmp_path / "prompts.txt").write_text("a photo of a <class word> in a park\n")
    models = write_metric_models(tmp_path / "metric_models")
    out = tmp_path / "eval"
    assert evaluate.main([f"--checkpoint={workdir}", f"--references={refs}", f"--prompts={tmp_path / 'prompts.txt'}",
                          "--people=2", "--seeds=2", "--steps=2", "--merge_step=0", f"--out={out}",
                          f"--dino_model={models['dino_model']}", f"--clip_model={models['clip_model']}"]) == 0
    summary = json.loads((out / "people.json").read_text())
    assert set(summary) == {"dino", "clip_i"}
    for s in summary.values():
        assert s["crops"] == 2 * 2 and -1 <= s["margin"]["mean"] <= 1 and 0 <= s["closer_to_own"] <= 1
    assert len(list((out / "images" / "astronaut+cameraman").glob("*.png"))) == 2
    assert "closer to own" in (out / "people.md").read_text()
    assert evaluate.main([f"--generated={out / 'images'}", f"--references={refs}", "--people=2",
                          f"--out={tmp_path / 'x'}"]) == 2
    assert evaluate.main([f"--checkpoint={workdir}", f"--references={refs}", f"--prompts={tmp_path / 'prompts.txt'}",
                          "--people=2", "--region=0,0,40,64", "--region=30,0,64,64", f"--out={tmp_path / 'y'}"]) == 2
