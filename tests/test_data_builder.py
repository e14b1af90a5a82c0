"""tfds builders: synthetic, the reference JSON layout (with bad records), our folder layout."""
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from cid_jax.data import synthetic

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
from cid_jax.data import builder  # noqa: E402  (needs tensorflow_datasets)

tfds.disable_progress_bar()


def read_back(dataset_dir):
    b = tfds.builder_from_directory(str(dataset_dir))
    return list(tfds.as_numpy(b.as_dataset(split="train", shuffle_files=False)))


def by_source(examples):
    return {e["source_id"].decode(): e for e in examples}


def test_synthetic_build_round_trip(tmp_path):
    report = builder.build_synthetic(tmp_path, num=6, seed=4, size=96, num_identities=3,
                                     missing_embedding_prob=0.3, num_shards=2)
    assert report.num_examples == {"train": 6} and report.num_bad == 0
    assert report.dataset_dir == tmp_path / "fgid_synthetic" / "n6_seed4_px96_ids3_miss300" / "1.0.0"
    assert builder.dataset_dirs(tmp_path) == [report.dataset_dir]
    got = by_source(read_back(report.dataset_dir))
    assert len(got) == 6
    for i in range(6):
        face = synthetic.render_sample(4, i, 96, 3, 0.3)
        ex = got[face.source_id]
        np.testing.assert_array_equal(ex["image"], face.image)          # PNG: lossless
        np.testing.assert_array_equal(ex["parsing"][..., 0], face.parsing)
        assert ex["vqa_llva"].decode() == face.vqa_llva
        assert ex["vqa_llva_more_face_detail"].decode() == face.vqa_llva_more_face_detail
        assert ex["has_id_embedding"] == face.has_id_embedding
        np.testing.assert_array_equal(ex["id_embedding"], face.id_embedding)
        assert ex["identity"].decode() == face.identity
    assert not all(e["has_id_embedding"] for e in got.values())  # the missing case was exercised


def write_reference_fixture(root):
    """The reference training's layout: JSON list + images, parsing PNGs, torch-saved embeddings."""
    torch = pytest.importorskip("torch")
    for d in ("FGID_resize", "FGID_parsing_mask", "FGID_faceID"):
        (root / d).mkdir()
    items, faces = [], []
    for i in range(7):
        face = synthetic.render_sample(9, i, size=80, num_identities=4)
        faces.append(face)
        name = f"{i:05d}"
        Image.fromarray(face.image).save(root / "FGID_resize" / f"{name}.jpg", quality=95)
        Image.fromarray(face.parsing).save(root / "FGID_parsing_mask" / f"{name}.png")
        torch.save(torch.from_numpy(face.id_embedding[None].copy()), root / "FGID_faceID" / f"{name}.bin")
        item = {"resize_IMG": f"FGID_resize/{name}.jpg", "parsing_mask_IMG": f"FGID_parsing_mask/{name}.png",
                "vqa_llva": face.vqa_llva, "vqa_llva_more_face_detail": face.vqa_llva_more_face_detail,
                "id_embed_file_resize": f"FGID_faceID/{name}.bin", "origin_IMG": "unused"}
        items.append(item)
    (root / "FGID_resize" / "00002.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # corrupt image
    (root / "FGID_faceID" / "00004.bin").unlink()                                             # missing embedding
    Image.fromarray(faces[5].parsing[:40]).save(root / "FGID_parsing_mask" / "00005.png")      # wrong-size mask
    del items[6]["id_embed_file_resize"]           # no embedding key at all: zeros, has_id_embedding False
    items[1]["id_embed_file_origin"] = "FGID_faceID/00001.bin"  # origin takes precedence (same file here)
    (root / "data.json").write_text(json.dumps(items))
    return faces


def test_reference_json_builder_skips_and_reports_bad_records(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    faces = write_reference_fixture(src)
    report = builder.build_from_reference_json(src / "data.json", tmp_path / "out")
    assert report.num_examples == {"train": 4}
    bad = {r["source_id"]: r["reason"] for r in report.bad_records["train"]}
    assert set(bad) == {"FGID_resize/00002.jpg", "FGID_resize/00004.jpg", "FGID_resize/00005.jpg"}, bad
    assert "cannot decode" in bad["FGID_resize/00002.jpg"]
    assert "missing file" in bad["FGID_resize/00004.jpg"] and "00004.bin" in bad["FGID_resize/00004.jpg"]
    assert "size" in bad["FGID_resize/00005.jpg"]
    on_disk = json.loads((report.dataset_dir / "bad_records-train.json").read_text())
    assert len(on_disk) == 3 and "3 bad records skipped" in report.summary()

    got = by_source(read_back(report.dataset_dir))
    assert set(got) == {f"FGID_resize/{i:05d}.jpg" for i in (0, 1, 3, 6)}
    for i in (0, 1, 3, 6):
        ex, face = got[f"FGID_resize/{i:05d}.jpg"], faces[i]
        assert ex["image"].shape == (80, 80, 3)
        np.testing.assert_array_equal(ex["parsing"][..., 0], face.parsing)
        assert ex["vqa_llva"].decode() == face.vqa_llva
        if i == 6:
            assert not ex["has_id_embedding"] and not ex["id_embedding"].any()
        else:
            assert ex["has_id_embedding"]
            np.testing.assert_array_equal(ex["id_embedding"], face.id_embedding)
    # raw record bytes: the image feature holds the original file's bytes
    raw = tf.data.TFRecordDataset([str(p) for p in sorted(report.dataset_dir.glob("*.tfrecord*"))])
    stored = {tf.train.Example.FromString(r.numpy()).features.feature["image"].bytes_list.value[0] for r in raw}
    assert (src / "FGID_resize" / "00000.jpg").read_bytes() in stored


def test_folder_builder_csv_and_max_side(tmp_path):
    src = tmp_path / "src"
    for d in ("images", "masks", "embeddings"):
        (src / d).mkdir(parents=True)
    rows = []
    for i in range(4):
        face = synthetic.render_sample(2, i, size=120)
        rid = f"p{i}"
        Image.fromarray(face.image).save(src / "images" / f"{rid}.png")
        if i != 2:  # missing mask -> bad record
            Image.fromarray(face.parsing).save(src / "masks" / f"{rid}.png")
        if i != 1:  # no embedding file -> has_id_embedding False (embeddings are optional here)
            np.save(src / "embeddings" / f"{rid}.npy", face.id_embedding[None])
        rows.append({"id": rid, "vqa_llva": face.vqa_llva, "vqa_llva_more_face_detail": face.vqa_llva_more_face_detail,
                     "identity": face.identity})
    rows.append({"id": "ghost", "vqa_llva": "x", "vqa_llva_more_face_detail": "y"})  # no files at all
    with open(src / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    # through the CLI (`python -m cid_jax.data.builder folder ...`)
    assert builder.main(["folder", f"--src={src}", f"--out={tmp_path / 'out'}", "--max_side=64", "--no_progress"]) == 0
    (dataset_dir,) = builder.dataset_dirs(tmp_path / "out")
    report = builder.report_of(dataset_dir)
    assert report.num_examples == {"train": 3}
    assert sorted(r["source_id"] for r in report.bad_records["train"]) == ["ghost", "p2"]
    got = by_source(read_back(report.dataset_dir))
    assert set(got) == {"p0", "p1", "p3"}
    for rid, ex in got.items():
        assert ex["image"].shape == (64, 64, 3) and ex["parsing"].shape == (64, 64, 1)  # downscaled
        face = synthetic.render_sample(2, int(rid[1:]), size=120)
        small = np.asarray(Image.fromarray(face.parsing).resize((64, 64), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(ex["parsing"][..., 0], small)
        assert ex["identity"].decode() == face.identity
        assert bool(ex["has_id_embedding"]) == (rid != "p1")


def test_validate_record_rejects_bad_inputs():
    from cid_jax.data.features import BadRecord, validate_record

    img = np.zeros((32, 32, 3), np.uint8)
    good = dict(image=img, parsing=np.zeros((32, 32), np.uint8), vqa_llva="a", vqa_llva_more_face_detail="b")
    assert validate_record(good)["has_id_embedding"] is False
    assert validate_record({**good, "parsing": Image.fromarray(img)})  # gray saved as RGB is accepted
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    for change, msg in [(dict(parsing=np.full((32, 32), 19, np.uint8)), "out of range"),
                        (dict(parsing=Image.fromarray(np.dstack([img[..., 0], img[..., 1] + 1, img[..., 2]]))),
                         "single-channel"),
                        (dict(id_embedding=np.zeros(511)), "512"),
                        (dict(id_embedding=np.full(512, np.nan)), "non-finite"),
                        (dict(vqa_llva=None), "string"),
                        (dict(image=b"garbage"), "cannot decode")]:
        with pytest.raises(BadRecord, match=msg):
            validate_record({**good, **change})


def test_cli_writes_a_dataset(tmp_path, capsys, monkeypatch):
    """`python -m cid_jax.data.builder synthetic ...`, and `python -m cid_jax.data.synthetic ...`
    (the same command under its older name)."""
    import runpy

    assert builder.main(["synthetic", f"--out={tmp_path / 'a'}", "--num=3", "--size=64", "--no_progress"]) == 0
    assert "3 examples written" in capsys.readouterr().out
    (dataset_dir,) = builder.dataset_dirs(tmp_path / "a")
    assert len(read_back(dataset_dir)) == 3
    monkeypatch.setattr("sys.argv", ["synthetic", f"--out={tmp_path / 'b'}", "--num=3", "--size=64", "--no-progress"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("cid_jax.data.synthetic", run_name="__main__")
    assert done.value.code == 0 and "3 examples written" in capsys.readouterr().out
    assert builder.dataset_dirs(tmp_path / "b")[0].name == dataset_dir.name


def test_beam_build_with_direct_runner_equals_the_plain_build(tmp_path):
    """The at-scale path: the same records and the same bad-record report through Beam's local runner."""
    pytest.importorskip("apache_beam", reason="the `beam` extra is not installed")
    src = tmp_path / "src"
    src.mkdir()
    write_reference_fixture(src)
    plain = builder.build_from_reference_json(src / "data.json", tmp_path / "plain")
    # The Beam build through the CLI, as a user at scale would start it.
    assert builder.main(["reference", f"--json={src / 'data.json'}", f"--out={tmp_path / 'beam'}",
                         "--beam_runner=DirectRunner", "--no_progress"]) == 0
    (beam_dir,) = builder.dataset_dirs(tmp_path / "beam")
    beamed = builder.report_of(beam_dir)
    assert beamed.num_examples == plain.num_examples == {"train": 4}
    assert list(beamed.dataset_dir.glob("bad_records-train-*.jsonl"))  # written by the pipeline
    def rows(report):
        return sorted((r["key"], r["source_id"], r["reason"]) for r in report.bad_records["train"])
    assert rows(beamed) == rows(plain) and len(rows(beamed)) == 3
    got, want = by_source(read_back(beamed.dataset_dir)), by_source(read_back(plain.dataset_dir))
    assert set(got) == set(want)
    for sid, ex in want.items():
        for name, value in ex.items():
            np.testing.assert_array_equal(got[sid][name], value, err_msg=f"{sid}: {name}")
