"""Face detection fallback (skimage cascade + template) and the insightface ArcFace embedder.

Real photos: skimage's astronaut (one frontal face, public domain) and coffee (no face).
ArcFace: no ArcFace/SCRFD weights ship offline, so the test writes a small ONNX graph with ArcFace's
input/output signature (input 'data' [N, 3, 112, 112] float, output [N, 512]) that insightface's own
router loads as an `ArcFaceONNX` recognizer. Detection through SCRFD needs weights we don't have: the
embedder is driven by a stub detector returning fixed boxes + 5 keypoints (insightface's detector
API), and the real detection code path of this package is tested through the skimage cascade.
The expected embedding is computed independently: insightface's `norm_crop` alignment, then the
graph's maths in numpy.
"""
import numpy as np
import pytest
from skimage import data

from cid_jax.face import detect as D
from cid_jax.face.arcface import ArcFaceEmbedder, ArcFaceModelsError  # imports insightface lazily
from cid_jax.face import parsing as P
from cid_jax.face.detect import FaceBox, NoFaceFoundError
from tests.helpers import ASTRONAUT_FACE, BIG, SMALL, StubDetector, expected_embedding, write_toy_arcface



def iou(a: FaceBox, b: FaceBox) -> float:
    ix = max(0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = ix * iy
    return inter / (a.area + b.area - inter)


# ------------------------------------------------------------------------------ skimage detector


def test_detects_the_astronaut_face():
    box = D.detect_largest_face(data.astronaut())
    assert iou(box, ASTRONAUT_FACE) > 0.6, box
    # Larger than the max_side: scanned downscaled, box mapped back to input pixels.
    big = np.repeat(np.repeat(data.astronaut(), 2, axis=0), 2, axis=1)
    box2 = D.detect_largest_face(big)
    assert iou(box2, ASTRONAUT_FACE.scaled(2, 2)) > 0.6, box2


@pytest.mark.parametrize("image", [data.coffee(), np.full((256, 256, 3), 128, np.uint8)],
                         ids=["coffee", "flat_gray"])
def test_no_face_raises_clear_error(image):
    assert D.detect_faces(image) == []
    with pytest.raises(NoFaceFoundError, match="no face found.*frontal") as e:
        D.detect_largest_face(image)
    assert isinstance(e.value, ValueError)
    with pytest.raises(NoFaceFoundError):
        D.template_parse(image)


def test_detect_rejects_non_images():
    with pytest.raises(ValueError, match=r"shape \(4, 4, 5\)"):
        D.detect_faces(np.zeros((4, 4, 5), np.uint8))


# ------------------------------------------------------------------------------------ template


def centroid(labels, k):
    ys, xs = np.nonzero(labels == k)
    assert ys.size, f"label {k} ({P.LABEL_NAMES[k]}) missing"
    return xs.mean(), ys.mean()


def test_template_layout():
    box = FaceBox(100, 80, 200, 180)
    labels = D.template_label_map((300, 320, 3), box)
    assert labels.shape == (300, 320) and labels.dtype == np.uint8
    want = {P.BACKGROUND, P.SKIN, P.L_BROW, P.R_BROW, P.L_EYE, P.R_EYE, P.L_EAR, P.R_EAR, P.NOSE,
            P.U_LIP, P.L_LIP, P.HAIR}
    assert set(np.unique(labels).tolist()) == want
    c = {k: centroid(labels, k) for k in want - {P.BACKGROUND}}
    # Left/right pairs mirror about the box centre; the vertical order is brow, eye, nose, lips.
    for left, right in [(P.L_EYE, P.R_EYE), (P.L_BROW, P.R_BROW), (P.L_EAR, P.R_EAR)]:
        assert c[left][0] < 150 < c[right][0]
        assert abs((c[left][0] + c[right][0]) / 2 - 150) < 1 and abs(c[left][1] - c[right][1]) < 1
    assert c[P.HAIR][1] < c[P.L_BROW][1] < c[P.L_EYE][1] < c[P.NOSE][1] < c[P.U_LIP][1] < c[P.L_LIP][1]
    assert abs(c[P.SKIN][0] - 150) < 1 and 110 < c[P.SKIN][1] < 150
    assert c[P.L_EAR][0] < c[P.L_EYE][0] and 100 <= c[P.L_EAR][0] < 115
    # Nothing painted far outside the box; hair only above the mid-forehead.
    ys, xs = np.nonzero(labels)
    assert xs.min() >= 100 - 25 and xs.max() < 200 + 25 and ys.max() < 180 + 10
    assert np.nonzero(labels == P.HAIR)[0].max() <= 80 + 0.32 * 100 + 1


def test_template_clips_at_the_border_and_rejects_empty_boxes():
    labels = D.template_label_map((50, 50), FaceBox(-20, -30, 40, 30))
    assert labels.shape == (50, 50) and P.SKIN in labels
    with pytest.raises(ValueError, match="empty face box"):
        D.template_label_map((50, 50), FaceBox(10, 10, 10, 40))


def test_template_parse_on_the_astronaut():
    img = data.astronaut()
    box = D.detect_largest_face(img)
    full = D.template_parse(img, size=512)  # 512x512 photo: the same grid
    np.testing.assert_array_equal(full, D.template_label_map(img.shape, box))
    # The eyes land on the photo's eye band (measured: y ~ 95..110, x ~ 200..260).
    ex, ey = centroid(full, P.L_EYE)
    assert 195 < ex < 235 and 92 < ey < 112
    ex, ey = centroid(full, P.R_EYE)
    assert 235 < ex < 270 and 92 < ey < 112
    # A non-square photo is squashed to size x size, like the reference's parsing step.
    crop = img[20:320, 100:500]
    small = D.template_parse(crop, size=128)
    assert small.shape == (128, 128)
    sx, sy = centroid(small, P.SKIN)
    assert abs(sx - (225 - 100) * 128 / 400) < 8 and abs(sy - (115 - 20) * 128 / 300) < 8


# --------------------------------------------------------------------------------------- ArcFace

@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    pytest.importorskip("onnx")  # the 'face' extra; CI installs it
    pytest.importorskip("insightface")
    d = tmp_path_factory.mktemp("buffalo_toy")
    weight = np.random.default_rng(0).standard_normal((3 * 14 * 14, 512)).astype(np.float32)
    write_toy_arcface(d / "w600k_r50.onnx", weight)
    return d, weight


@pytest.fixture(scope="module")
def recognizer(toy_dir):
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    rec = get_model(str(toy_dir[0] / "w600k_r50.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(rec, ArcFaceONNX) and rec.taskname == "recognition"
    assert (rec.input_mean, rec.input_std, rec.input_size) == (127.5, 127.5, (112, 112))
    rec.prepare(ctx_id=-1)
    return rec


def test_embeds_the_largest_face_in_bgr(toy_dir, recognizer):
    _, weight = toy_dir
    rgb = data.astronaut()
    det = StubDetector([SMALL[0], BIG[0]], [SMALL[1], BIG[1]])
    emb, box = ArcFaceEmbedder.from_models(det, recognizer).analyze(rgb)
    np.testing.assert_array_equal(det.seen, rgb[..., ::-1])  # insightface got BGR
    assert emb.shape == (512,) and emb.dtype == np.float32
    assert abs(np.linalg.norm(emb) - 1) < 1e-5
    np.testing.assert_allclose(emb, expected_embedding(rgb[..., ::-1], np.float32(BIG[1]), weight), atol=1e-5)
    assert box == FaceBox(180, 60, 280, 170)


def test_reference_switches(toy_dir, recognizer):
    _, weight = toy_dir
    rgb = data.astronaut()
    det = StubDetector([SMALL[0], BIG[0]], [SMALL[1], BIG[1]])
    # The reference's SD1.5 quirk: insightface gets the RGB array as if it were BGR.
    quirk = ArcFaceEmbedder.from_models(det, recognizer, reference_rgb_quirk=True).embed(rgb)
    np.testing.assert_array_equal(det.seen, rgb)
    want = expected_embedding(rgb, np.float32(BIG[1]), weight)
    np.testing.assert_allclose(quirk, want, atol=1e-5)
    assert np.abs(quirk - ArcFaceEmbedder.from_models(det, recognizer).embed(rgb)).max() > 1e-3
    # The reference's faces[0]: the first (highest-score) detection, here the small patch.
    first = ArcFaceEmbedder.from_models(det, recognizer, pick="first").embed(rgb)
    np.testing.assert_allclose(first, expected_embedding(rgb[..., ::-1], np.float32(SMALL[1]), weight), atol=1e-5)
    with pytest.raises(ValueError, match="pick must be one of"):
        ArcFaceEmbedder.from_models(det, recognizer, pick="best")


def test_no_face_and_bad_input(recognizer):
    empty = StubDetector(np.zeros((0, 5)), np.zeros((0, 5, 2)))
    emb = ArcFaceEmbedder.from_models(empty, recognizer)
    with pytest.raises(NoFaceFoundError, match="no face found"):
        emb.embed(data.coffee())
    with pytest.raises(ValueError, match="RGB uint8"):
        emb.embed(data.coffee().astype(np.float32))


def test_model_folder_errors_name_missing_files(tmp_path, toy_dir):
    with pytest.raises(ArcFaceModelsError, match="does not exist.*det_10g.onnx"):
        ArcFaceEmbedder(tmp_path / "nowhere")  # and no download attempt
    with pytest.raises(ArcFaceModelsError) as e:
        ArcFaceEmbedder(tmp_path, ctx_id=-1, providers=["CPUExecutionProvider"])
    msg = str(e.value)
    assert str(tmp_path) in msg and "no .onnx files" in msg
    assert "Missing by name: det_10g.onnx, w600k_r50.onnx" in msg
    # A recognizer alone: insightface loads it, then finds no detector.
    with pytest.raises(ArcFaceModelsError, match=r"no detection model.*w600k_r50\.onnx.*Missing by name: det_10g\.onnx"):
        ArcFaceEmbedder(toy_dir[0], ctx_id=-1, providers=["CPUExecutionProvider"])
