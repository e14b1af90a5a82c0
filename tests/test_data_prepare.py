"""`python -m cid_jax.data.prepare`: photos -> the prepared-folder layout the folder builder reads.

A temporary folder with the astronaut (JPEG), a corrupt file and a face-free photo (coffee): one
photo prepared, two failures listed with reasons; a rerun skips the done one; the folder builder
reads the result. A second run goes through the weights paths: random BiSeNet weights from a saved
state dict (batched parsing, padded last batch) and an insightface recognizer with ArcFace's ONNX
signature.
"""
import json
import logging

import numpy as np
import pytest
import skimage.data
from PIL import Image

from cid_jax.data import prepare
from tests.helpers import ASTRONAUT_FACE  # the face box measured on the photo


def write_photos(folder):
    folder.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.jpg", quality=92)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.png")
    (folder / "notes.txt").write_text("not a photo: ignored")
    return folder


def decoded(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_prepare_template_fallback_resume_and_build(tmp_path, caplog):
    photos = write_photos(tmp_path / "photos")
    out = tmp_path / "prepared"
    captions = tmp_path / "captions.csv"
    captions.write_text("file,vqa_llva,vqa_llva_more_face_detail,identity\n"
                        "astronaut.jpg,A woman in a space suit.,\"Her face is round, her eyes are brown.\",eileen\n")
    with caplog.at_level(logging.WARNING):
        code = prepare.main([f"--images={photos}", f"--out={out}", f"--captions={captions}", "--batch-size=2",
                             "--no-progress"])
    assert code == 0
    # Each fallback announced exactly once.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("--parser_weights" in w for w in warnings) == 1
    assert sum("--insightface_models" in w for w in warnings) == 1

    report = json.loads((out / prepare.REPORT_NAME).read_text())
    assert report["num_prepared"] == 1 and report["prepared"] == ["astronaut"]
    reasons = {f["file"]: f["reason"] for f in report["failed"]}
    assert set(reasons) == {"broken.jpg", "coffee.png"}
    assert reasons["broken.jpg"].startswith("undecodable image") and reasons["coffee.png"].startswith("no face")
    assert report["parser"] == "template" and report["embedding"] == "none"

    # The layout: the JPEG kept byte for byte, a label map of the photo's size, no embedding file.
    assert (out / "images" / "astronaut.jpg").read_bytes() == (photos / "astronaut.jpg").read_bytes()
    mask = np.asarray(Image.open(out / "masks" / "astronaut.png"))
    assert mask.dtype == np.uint8 and mask.shape == (512, 512) and mask.max() < 19
    x0, y0, x1, y1 = ASTRONAUT_FACE
    face = mask[y0:y1, x0:x1]
    for label in (1, 4, 5, 10, 12, 13):  # skin, eyes, nose, lips inside the face box
        assert (face == label).sum() > 20, label
    assert (mask[:, :100] == 0).all()  # far from the face: background
    assert not any((out / "embeddings").iterdir())
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert rows == [{"id": "astronaut", "vqa_llva": "A woman in a space suit.",
                     "vqa_llva_more_face_detail": "Her face is round, her eyes are brown.", "identity": "eileen"}]

    # Rerun: the done photo is skipped (not rewritten), the failures are retried and listed again;
    # a half-written last line (a crash mid-append) is dropped.
    mtime = (out / "masks" / "astronaut.png").stat().st_mtime_ns
    with open(out / "captions.jsonl", "a") as f:
        f.write('{"id": "coffee", "vqa_ll')
    again = prepare.prepare_folder(photos, out, progress=False)
    assert again.skipped == ["astronaut"] and again.prepared == []
    assert sorted(f["file"] for f in again.failed) == ["broken.jpg", "coffee.png"]
    assert (out / "masks" / "astronaut.png").stat().st_mtime_ns == mtime
    assert len((out / "captions.jsonl").read_text().splitlines()) == 1

    # The folder builder (b) reads the prepared folder.
    tfds = pytest.importorskip("tensorflow_datasets")
    from cid_jax.data import builder

    tfds.disable_progress_bar()
    built = builder.build_from_folder(out, tmp_path / "tfds")
    assert built.num_examples == {"train": 1} and built.num_bad == 0
    ds = tfds.builder_from_directory(str(built.dataset_dir)).as_dataset(
        split="train", decoders={"image": tfds.decode.SkipDecoding()})
    (ex,) = tfds.as_numpy(ds)
    assert ex["image"] == (photos / "astronaut.jpg").read_bytes()  # the photo's own JPEG bytes
    np.testing.assert_array_equal(ex["parsing"][..., 0], mask)
    assert ex["vqa_llva"].decode() == "A woman in a space suit." and ex["identity"].decode() == "eileen"
    assert not ex["has_id_embedding"] and not ex["id_embedding"].any()


def random_bisenet_state_dict(seed=0):
    """A BiSeNet state dict (torch layout, every weight and BN statistic random) without init compute."""
    import jax

    from cid_jax.face import bisenet as B
    from cid_jax.weights.state_dict import export_from

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        z = rng.standard_normal(leaf.shape)
        if name in ("scale", "bias", "mean"):
            return ((name == "scale") + 0.1 * z).astype(np.float32)
        return (z / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)

    flat, treedef = jax.tree_util.tree_flatten_with_path(B.abstract_params())
    params = jax.tree.unflatten(treedef, [draw(p, x) for p, x in flat])
    return export_from(params, key_fn=B.bisenet_key)


def test_prepare_with_bisenet_weights_and_arcface(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("insightface")
    from insightface.model_zoo import get_model

    from cid_jax.face import ArcFaceEmbedder, load_bisenet, parse_face
    from cid_jax.face import FaceAnalyzer
    from cid_jax.weights.state_dict import write_safetensors_atomic
    from tests.helpers import BIG, StubDetector, expected_embedding, write_toy_arcface

    photos = write_photos(tmp_path / "photos")
    astro = skimage.data.astronaut()
    Image.fromarray(astro[:, ::-1]).save(photos / "mirrored.png")
    Image.fromarray(astro[:400]).save(photos / "cropped.png")
    weights = tmp_path / "face_parsing.safetensors"
    write_safetensors_atomic(random_bisenet_state_dict(), weights)
    w = np.random.default_rng(1).standard_normal((3 * 14 * 14, 512)).astype(np.float32)
    write_toy_arcface(tmp_path / "w600k_r50.onnx", w)
    rec = get_model(str(tmp_path / "w600k_r50.onnx"), providers=["CPUExecutionProvider"])
    rec.prepare(ctx_id=-1)
    analyzer = FaceAnalyzer(str(weights))  # the --parser-weights path: load_bisenet from the file
    analyzer.embedder = ArcFaceEmbedder.from_models(StubDetector([BIG[0]], [BIG[1]]), rec)

    out = tmp_path / "prepared"
    # 3 photos with a face, batches of 2: the second batch is padded.
    report = prepare.prepare_folder(photos, out, analyzer=analyzer, batch_size=2, parse_size=64, progress=False)
    assert sorted(report.prepared) == ["astronaut", "cropped", "mirrored"]
    assert report.parser == "bisenet" and report.embedding == "arcface"
    assert sorted(f["file"] for f in report.failed) == ["broken.jpg", "coffee.png"]
    assert sorted(report.default_captions) == sorted(report.prepared)

    model, params = load_bisenet(weights)
    for rid, src in (("astronaut", "astronaut.jpg"), ("mirrored", "mirrored.png"), ("cropped", "cropped.png")):
        rgb = decoded(out / "images" / (rid + (".jpg" if rid == "astronaut" else ".png")))
        np.testing.assert_array_equal(rgb, decoded(photos / src))
        # Batched (and padded) parsing == parse_face one photo at a time, resized back nearest.
        want = np.asarray(Image.fromarray(parse_face(rgb, model, params, size=64)).resize(
            rgb.shape[1::-1], Image.Resampling.NEAREST))
        mask = np.asarray(Image.open(out / "masks" / f"{rid}.png"))
        np.testing.assert_array_equal(mask, want)
        assert len(np.unique(mask)) > 1  # random weights still give a non-trivial map
        emb = np.load(out / "embeddings" / f"{rid}.npy")
        assert emb.shape == (512,) and emb.dtype == np.float32
        np.testing.assert_allclose(emb, expected_embedding(rgb[..., ::-1], np.float32(BIG[1]), w), atol=1e-5)
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert {r["vqa_llva_more_face_detail"] for r in rows} == {prepare.DEFAULT_FACE_DETAIL}


def test_read_captions_formats(tmp_path):
    want = {"vqa_llva": "a", "vqa_llva_more_face_detail": "b"}
    (tmp_path / "c.json").write_text(json.dumps({"x.jpg": ["a", "b"], "y": want}))
    table = prepare.read_captions(tmp_path / "c.json")
    assert prepare.captions_for("x.jpg", table) == want and prepare.captions_for("y.png", table) == want
    assert prepare.captions_for("z.jpg", table) is None
    (tmp_path / "c.jsonl").write_text(json.dumps(dict(want, image="x.jpg")) + "\n")
    assert prepare.captions_for("x.jpg", prepare.read_captions(tmp_path / "c.jsonl"))["vqa_llva"] == "a"
    (tmp_path / "bad.json").write_text(json.dumps({"x.jpg": "only one caption"}))
    with pytest.raises(ValueError, match="x.jpg"):
        prepare.read_captions(tmp_path / "bad.json")


def test_missing_images_folder_is_a_clear_error(tmp_path, capsys):
    code = prepare.main([f"--images={tmp_path / 'nope'}", f"--out={tmp_path / 'out'}", "--no-progress"])
    assert code == 3 and "nope" in capsys.readouterr().err  # cli.EXIT_MISSING
