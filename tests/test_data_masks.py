"""Region masks, foreground, part images and CLIP preprocessing (numpy; no TensorFlow).

The references are written here independently of cid_jax: the reference repo's mask logic with
OpenCV contours (`masks_for_unique_values` + the key selection of `MyDataset`), PIL's
`Image.composite` for part images, and transformers' `CLIPImageProcessor` for CLIP inputs.
"""
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cid_jax.data import clip_preprocess, masks, synthetic

cv2 = pytest.importorskip("cv2")

REF_NAMES = {0: "Background", 1: "Face", 4: "Left_Eye", 5: "Right_Eye", 7: "Left_Ear", 8: "Right_Ear",
             10: "Nose", 12: "Upper_Lip", 13: "Lower_Lip"}


def cv2_fill(binary):
    """Filled external contours, as the reference's masks_for_unique_values draws them."""
    img = binary.astype(np.uint8) * 255
    contours, _ = cv2.findContours(img, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros_like(img)
    for c in contours:
        cv2.drawContours(out, [c], -1, 255, thickness=cv2.FILLED)
    return out == 255


def reference_part_masks(label_map):
    """The reference: per-label filled masks, then the first of each L/R pair, in label order."""
    per_label = {}
    for v in np.unique(label_map):
        filled = cv2_fill(label_map == v)
        if v == 0:
            per_label["WithoutBackground"] = ~filled
        if int(v) in REF_NAMES:
            per_label[REF_NAMES[int(v)]] = filled
    keys = ["Face", "Left_Ear", "Right_Ear", "Left_Eye", "Right_Eye", "Nose", "Upper_Lip", "Lower_Lip"]
    kept, seen = {}, set()
    for k, m in per_label.items():
        if k in keys:
            if "_" in k:
                if k.split("_")[1] in seen:
                    continue
                seen.add(k.split("_")[1])
            kept[k] = m
    return kept, per_label.get("WithoutBackground")


def test_fill_holes_matches_opencv_contours(rng):
    cases = []
    for _ in range(150):  # smooth blobs with holes, and salt-and-pepper noise (8- vs 4-connectivity)
        n = int(rng.integers(8, 80))
        sm = ndimage.gaussian_filter(rng.random((n, n)), rng.uniform(0.5, 3))
        cases.append(sm > np.quantile(sm, rng.uniform(0.3, 0.8)))
        cases.append(rng.random((int(rng.integers(4, 30)),) * 2) < rng.uniform(0.3, 0.7))
    ring = np.zeros((40, 50), bool)
    ring[5:30, 5:40] = True
    ring[10:20, 10:30] = False  # one hole
    cases += [ring, ~ring, np.zeros((9, 9), bool), np.ones((9, 9), bool)]
    for m in cases:
        np.testing.assert_array_equal(masks.fill_holes(m), cv2_fill(m))
    assert masks.fill_holes(ring).sum() == ring.sum() + 200


@pytest.mark.parametrize("seed", [0, 3])
def test_region_masks_match_reference_and_generator_truth(seed):
    seen = {"hidden_left_eye": 0, "one_ear": 0, "lower_lip_only": 0}
    for i in range(40):
        face = synthetic.render_sample(seed, i, size=160)
        got, slot_labels = masks.region_masks(face.parsing)
        # the generator's truth (drawn shapes, holes inside the face filled, occluders removed)
        np.testing.assert_array_equal(slot_labels, face.slot_labels)
        np.testing.assert_array_equal(got, face.part_masks)
        np.testing.assert_array_equal(masks.foreground_mask(face.parsing), face.foreground)
        # the reference's names, order and masks
        ref, ref_fg = reference_part_masks(face.parsing)
        assert masks.part_names(slot_labels) == list(ref)
        present = [k for k in range(5) if slot_labels[k]]
        for k, name in zip(present, ref):
            np.testing.assert_array_equal(got[k], ref[name])
        np.testing.assert_array_equal(masks.foreground_mask(face.parsing), ref_fg)
        # the face mask includes the eyes, nose and lips (holes of the skin label)
        assert got[0].sum() > (face.parsing == 1).sum()
        seen["hidden_left_eye"] += slot_labels[1] == 5
        seen["one_ear"] += slot_labels[2] == 8
        seen["lower_lip_only"] += slot_labels[4] == 13
    assert seen["hidden_left_eye"] and seen["one_ear"], seen  # the pair fallbacks were exercised


def test_foreground_edge_cases():
    labels = np.zeros((20, 20), np.uint8)
    labels[8:20, 5:15] = 1          # figure touching the bottom border
    labels[2:5, 2:5] = 17           # a floating blob: the background fill swallows it
    labels[12:14, 9:11] = 0         # a background hole inside the figure stays background
    fg = masks.foreground_mask(labels)
    expected = labels != 0
    expected[2:5, 2:5] = False
    np.testing.assert_array_equal(fg, expected)
    _, ref_fg = reference_part_masks(labels)
    np.testing.assert_array_equal(fg, ref_fg)
    # no background label: the reference has no mask (KeyError); here everything is foreground
    assert masks.foreground_mask(np.ones((6, 6), np.uint8)).all()
    # a figure enclosed by background: the reference's mask is empty; we fall back to label != 0
    enclosed = np.zeros((10, 10), np.uint8)
    enclosed[3:7, 3:7] = 1
    assert not reference_part_masks(enclosed)[1].any()
    np.testing.assert_array_equal(masks.foreground_mask(enclosed), enclosed != 0)


def test_part_images_match_pil_composite(rng):
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    m = np.zeros((2, 48, 64), bool)
    m[0, 10:30, 20:40] = True
    m[1, 5:9, 1:60] = True
    got = masks.part_images(image, m)
    for k in range(2):
        alpha = Image.fromarray(m[k].astype(np.uint8) * 255)
        ref = Image.composite(Image.fromarray(image), Image.new("RGB", (64, 48)), alpha)
        np.testing.assert_array_equal(got[k], np.asarray(ref))
    # a mask at another resolution (inference: BiSeNet runs at 512) is resized bicubic, as the reference
    small = np.zeros((1, 24, 32), bool)
    small[0, 5:15, 10:20] = True
    got = masks.part_images(image, small)
    alpha = Image.fromarray(small[0].astype(np.uint8) * 255).resize((64, 48))  # PIL default: bicubic
    ref = Image.composite(Image.fromarray(image), Image.new("RGB", (64, 48)), alpha)
    np.testing.assert_array_equal(got[0], np.asarray(ref))


def test_part_order_and_arrange():
    order = masks.part_order(["Face", "Left_Ear", "Right_Eye", "Nose", "Upper_Lip"])
    np.testing.assert_array_equal(order, [0, 2, 1, 3, 4])
    np.testing.assert_array_equal(masks.part_order(["Nose"]), [3, -1, -1, -1, -1])
    vals = np.arange(5)[:, None] * np.ones((5, 2))
    np.testing.assert_array_equal(masks.arrange_parts(vals, np.array([3, 0, -1, -1, -1]))[:, 0], [3, 0, 0, 0, 0])
    with pytest.raises(KeyError, match="unknown part name"):
        masks.part_order(["Mouth"])


@pytest.fixture(scope="module")
def clip_processor():
    transformers = pytest.importorskip("transformers")
    import warnings

    # The PIL backend is what the reference (transformers 4.31) ran; transformers 5 picks it for
    # CLIPImageProcessor() only when torchvision is absent, so ask for it by name when it exists.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)()


def test_clip_preprocess_matches_transformers(clip_processor):
    import skimage.data

    photo = skimage.data.astronaut()
    for im in (photo, photo[:400, :300], photo[37:, :], photo[:333, :451], photo[:224, :230],
               Image.fromarray(np.ascontiguousarray(photo[::-1, :, 0]))):  # grayscale -> RGB
        ref = clip_processor(images=im, return_tensors="np").pixel_values[0].transpose(1, 2, 0)
        got = clip_preprocess.clip_preprocess(im)
        assert got.shape == (224, 224, 3) and got.dtype == np.float32
        err = np.abs(got - ref).max()
        assert err < 1e-5, f"{im.shape}: max |diff| {err}"


def test_face_inputs_match_reference_part_images(clip_processor):
    face = synthetic.render_sample(1, 5, size=200)
    fi = masks.face_inputs(face.image, face.parsing)
    ref, _ = reference_part_masks(face.parsing)
    present = [k for k in range(5) if fi.slot_labels[k]]
    raw = Image.fromarray(face.image)
    for k, (name, m) in zip(present, ref.items()):
        composite = Image.composite(raw, Image.new("RGB", raw.size), Image.fromarray(m.astype(np.uint8) * 255))
        expected = clip_processor(images=composite, return_tensors="np").pixel_values[0].transpose(1, 2, 0)
        assert np.abs(fi.part_clip_images[k] - expected).max() < 1e-5, name
    for k in set(range(5)) - set(present):
        assert not fi.part_clip_images[k].any()
    # packing/reordering for the model: by name (ears before eyes), padding zeros
    assert fi.part_names == list(ref)
    parts, pmasks = fi.arranged([n for n in ("Face", "Left_Ear", "Right_Ear", "Left_Eye", "Right_Eye")
                                 if n in fi.part_names])
    np.testing.assert_array_equal(parts[0], fi.part_clip_images[0])
    np.testing.assert_array_equal(pmasks[1], fi.part_masks[2])   # the ear slot comes second
    np.testing.assert_array_equal(parts[1], fi.part_clip_images[2])
    assert not parts[3:].any() and not pmasks[3:].any()
    full = clip_processor(images=raw, return_tensors="np").pixel_values[0].transpose(1, 2, 0)
    assert np.abs(fi.clip_image - full).max() < 1e-5


def test_synthetic_is_deterministic_and_varied():
    a, b = synthetic.render_sample(7, 3, size=96), synthetic.render_sample(7, 3, size=96)
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y
    c = synthetic.render_sample(7, 4, size=96)
    assert not np.array_equal(a.image, c.image)
    for face in (a, c):
        assert set(np.unique(face.parsing)) >= {0, 1, 10, 14, 16}
        for word in ("face", "eyes", "nose", "mouth"):
            assert word in face.vqa_llva_more_face_detail
        assert abs(np.linalg.norm(face.id_embedding) - 1) < 1e-5
    # the embedding is a function of the identity only
    same = [synthetic.render_sample(7, i, size=64, num_identities=2) for i in range(6)]
    by_id = {}
    for f in same:
        by_id.setdefault(f.identity, f.id_embedding)
        np.testing.assert_array_equal(by_id[f.identity], f.id_embedding)
    assert len(by_id) == 2
