"""The tf.data pipeline: known synthetic samples, drops, host sharding, resume, a real photo.

Expected values come from the synthetic generator's truth (drawn masks), transformers'
CLIPImageProcessor, PIL resizing and OpenCV contours, not from the code under test.
"""
import json
import warnings

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cid_jax.data import sample, synthetic

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
transformers = pytest.importorskip("transformers")
cv2 = pytest.importorskip("cv2")
from cid_jax.data import builder, pipeline  # noqa: E402

tfds.disable_progress_bar()
SEED, N, SIZE = 5, 24, 96
WORD_SLOT = {"face": 0, "eyes": 1, "ears": 2, "nose": 3, "mouth": 4}
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fgid")
    report = builder.build_synthetic(out, num=N, seed=SEED, size=SIZE, num_identities=4, num_shards=3,
                                     missing_embedding_prob=0.2)
    assert report.num_examples["train"] == N
    return report.dataset_dir


@pytest.fixture(scope="module")
def sample_of(dataset_dir):
    """record index (file order, what the pipeline's `index` counts) -> synthetic sample number."""
    b = tfds.builder_from_directory(str(dataset_dir))
    ids = [e["source_id"].decode() for e in tfds.as_numpy(b.as_dataset(split="train", shuffle_files=False))]
    return [int(s.rsplit("-", 1)[1]) for s in ids]


@pytest.fixture(scope="module")
def tokenizer():
    return sample.default_tokenizer()


@pytest.fixture(scope="module")
def clip_processor():
    with warnings.catch_warnings():  # the PIL backend, as the reference ran it (see test_data_masks.py)
        warnings.simplefilter("ignore")
        return getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)()


def run(dataset_dir, tokenizer, steps, **kw):
    start = kw.pop("start_step", 0)
    pi, pc = kw.pop("process_index", 0), kw.pop("process_count", 1)
    cfg = pipeline.PipelineConfig(**{"global_batch_size": 4, "resolution": SIZE, "seed": 1, **kw})
    return list(pipeline.batches(dataset_dir, cfg, start_step=start, num_steps=steps, process_index=pi,
                                 process_count=pc, tokenizer=tokenizer))


def rows(batches):
    for b in batches:
        for i in range(len(b["index"])):
            yield {k: v[i] for k, v in b.items()}


def clip_ref(processor, pil_image):
    return processor(images=pil_image, return_tensors="np").pixel_values[0].transpose(1, 2, 0)


def facial_words(tokenizer, row):
    idx = row["facial_token_idx"][row["facial_token_idx_mask"]]
    return [tokenizer.convert_ids_to_tokens(int(row["input_ids"][i])).replace("</w>", "") for i in idx]


@pytest.mark.parametrize("pairing", ["by_name", "reference"])
def test_known_samples(dataset_dir, sample_of, tokenizer, clip_processor, pairing):
    batches = run(dataset_dir, tokenizer, 6, pairing=pairing, drop_prob=0.3)
    b0 = batches[0]
    assert b0["pixel_values"].shape == (4, SIZE, SIZE, 3) and b0["pixel_values"].dtype == np.float32
    assert b0["part_clip_images"].shape == (4, 5, 224, 224, 3)
    assert b0["facial_masks"].shape == (4, 5, SIZE, SIZE) and b0["input_ids"].dtype == np.int32
    n_drop = n_no_ears = n_clip_checked = 0
    for row in rows(batches):
        face = synthetic.render_sample(SEED, sample_of[row["index"]], SIZE, 4, 0.2)
        np.testing.assert_allclose(row["pixel_values"], face.image / 127.5 - 1.0, atol=1e-6)
        np.testing.assert_array_equal(row["foreground_mask"], face.foreground)
        np.testing.assert_array_equal(row["id_embedding"], face.id_embedding)
        assert row["has_id_embedding"] == face.has_id_embedding
        present = [k for k in range(5) if face.slot_labels[k]]
        kept = [k for k in present if k != 2 or face.mentions_ears]   # no "ears" word: Ear part dropped
        n_no_ears += not face.mentions_ears
        if pairing == "by_name":   # part k <-> k-th facial word; the words come in the order below
            expected_order = [WORD_SLOT[w] for w in ("face", "ears", "eyes", "nose", "mouth") if WORD_SLOT[w] in kept]
        else:                      # the reference: parts in label order (ears word gets the eye crop)
            expected_order = kept
        for k in range(5):
            slot = expected_order[k] if k < len(expected_order) else None
            want = face.part_masks[slot] if slot is not None else np.zeros((SIZE, SIZE), bool)
            np.testing.assert_array_equal(row["facial_masks"][k], want)
            if slot is None:
                assert not row["part_clip_images"][k].any()
        if row["drop"]:
            n_drop += 1
            assert not row["clip_image"].any() and not row["facial_token_mask"].any()
            assert not row["facial_token_idx_mask"].any()
            np.testing.assert_array_equal(row["input_ids"][:3], [BOS, EOS, EOS])  # tokenizer("") padded
            assert row["part_clip_images"][0].any()    # part images are not dropped (reference)
        else:
            words = facial_words(tokenizer, row)
            assert words == [w for w in ("face", "ears", "eyes", "nose", "mouth") if WORD_SLOT[w] in kept], words
            assert row["facial_token_mask"].sum() == len(kept)
            assert row["input_ids"][0] == BOS
            if pairing == "by_name":
                assert [WORD_SLOT[w] for w in words] == expected_order   # every token gets its own part
            if n_clip_checked < 2:   # full-image and part CLIP inputs against transformers
                n_clip_checked += 1
                raw = Image.fromarray(face.image)
                assert np.abs(row["clip_image"] - clip_ref(clip_processor, raw)).max() < 1e-5
                for k, slot in enumerate(expected_order):
                    m = Image.fromarray(face.part_masks[slot].astype(np.uint8) * 255)
                    ref = clip_ref(clip_processor, Image.composite(raw, Image.new("RGB", raw.size), m))
                    assert np.abs(row["part_clip_images"][k] - ref).max() < 1e-5
    assert 0 < n_drop < 24 and n_no_ears > 0 and n_clip_checked == 2
    # the per-batch foreground flag is one draw per step
    for b in batches:
        assert len(set(b["use_foreground_loss"].tolist())) == 1


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_two_hosts_are_disjoint_and_together_equal_one_host(dataset_dir, tokenizer):
    kw = dict(resolution=48, mask_resolution=24, foreground_loss_per="sample", drop_prob=0.5)
    single = run(dataset_dir, tokenizer, 6, **kw)  # one epoch: N = 24 = 6 steps of 4
    hosts = [run(dataset_dir, tokenizer, 6, process_index=h, process_count=2, **kw) for h in (0, 1)]
    seen = []
    for s in range(6):
        h0, h1 = hosts[0][s], hosts[1][s]
        assert len(h0["index"]) == 2
        assert not set(h0["index"]) & set(h1["index"])
        seen += list(h0["index"]) + list(h1["index"])
        assert_batches_equal({k: np.concatenate([h0[k], h1[k]]) for k in h0}, single[s])
    assert sorted(seen) == list(range(N))  # within an epoch, every record exactly once
    flags = np.concatenate([b["use_foreground_loss"] for b in single])
    assert 0 < flags.sum() < len(flags)  # per-sample flags vary


def test_resume_equals_uninterrupted_run(dataset_dir, tokenizer):
    kw = dict(resolution=48, mask_resolution=24, drop_prob=0.5)
    full = run(dataset_dir, tokenizer, 9, **kw)       # crosses an epoch boundary (N = 24 = 6 steps)
    resumed = run(dataset_dir, tokenizer, 4, start_step=5, **kw)
    for a, b in zip(full[5:], resumed):
        assert_batches_equal(a, b)
    epoch0 = np.concatenate([b["index"] for b in full[:6]])
    epoch1 = np.concatenate([b["index"] for b in full[6:9]])
    assert sorted(epoch0) == list(range(N))
    assert not np.array_equal(epoch0[:12], epoch1)    # a new permutation each epoch
    other_seed = run(dataset_dir, tokenizer, 2, seed=2, **kw)
    assert not np.array_equal(other_seed[0]["index"], full[0]["index"])


def test_order_functions():
    p = sample.epoch_permutation(3, 0, 1000)
    assert sorted(p) == list(range(1000))
    np.testing.assert_array_equal(p, sample.epoch_permutation(3, 0, 1000))
    assert not np.array_equal(p, sample.epoch_permutation(3, 1, 1000))
    np.testing.assert_array_equal(sample.stream_positions(2, 8, 1, 4), [18, 19])
    with pytest.raises(ValueError, match="divisible"):
        sample.stream_positions(0, 6, 0, 4)


def test_lower_resolution_resize(dataset_dir, sample_of, tokenizer):
    (b,) = run(dataset_dir, tokenizer, 1, resolution=64, mask_resolution=32, drop_prob=0.0)
    assert b["facial_masks"].shape == (4, 5, 32, 32) and b["foreground_mask"].shape == (4, 64, 64)
    for row in rows([b]):
        face = synthetic.render_sample(SEED, sample_of[row["index"]], SIZE, 4, 0.2)
        ref = np.asarray(Image.fromarray(face.image).resize((64, 64), Image.Resampling.BILINEAR), np.float32)
        # PIL rounds its bilinear output to uint8; the pipeline keeps floats
        assert np.abs(row["pixel_values"] - (ref / 127.5 - 1)).max() <= 1.01 / 127.5
        assert 0.0 <= row["facial_masks"].min() and row["facial_masks"].max() <= 1.0
        # the face comes first (by-name pairing; every synthetic caption names the face)
        assert abs(row["facial_masks"][0].mean() - face.part_masks[0].mean()) < 0.01


# ----------------------------------------------------------------------------- a real photo


def astronaut_labels():
    """A hand-made CelebAMask-HQ label map for skimage.data.astronaut() (512 x 512)."""
    lab = Image.new("L", (512, 512), 0)
    d = ImageDraw.Draw(lab)
    ell = lambda c, r, v: d.ellipse([c[0] - r[0], c[1] - r[1], c[0] + r[0], c[1] + r[1]], fill=v)  # noqa: E731
    d.polygon([(60, 512), (110, 175), (390, 175), (440, 512)], fill=16)   # suit
    d.rectangle([186, 150, 261, 190], fill=14)                             # neck
    ell((227, 70), (75, 57), 17)                                           # hair
    ell((270, 118), (7, 13), 7)                                            # her left ear (image right)
    ell((223, 118), (45, 60), 1)                                           # face
    ell((202, 101), (9, 4), 4)
    ell((246, 102), (9, 4), 5)                                             # eyes
    d.polygon([(225, 104), (217, 131), (233, 131)], fill=10)              # nose
    d.chord([203, 136, 244, 152], 180, 360, fill=12)                       # upper lip
    d.chord([205, 140, 242, 156], 0, 180, fill=13)                         # lower lip
    return np.asarray(lab)


def test_astronaut_through_the_pipeline(tmp_path, tokenizer, clip_processor):
    import skimage.data

    photo = skimage.data.astronaut()
    labels = astronaut_labels()
    src = tmp_path / "src"
    for d in ("images", "masks"):
        (src / d).mkdir(parents=True)
    Image.fromarray(photo).save(src / "images" / "astronaut.jpg", quality=92)
    Image.fromarray(labels).save(src / "masks" / "astronaut.png")
    caption = "The person has one face, one nose, two eyes, two ears, and one mouth."
    (src / "captions.jsonl").write_text(json.dumps({
        "id": "astronaut", "vqa_llva": "The image shows a smiling woman astronaut in a space suit. She has short hair.",
        "vqa_llva_more_face_detail": caption}) + "\n")
    report = builder.build_from_folder(src, tmp_path / "out")
    cfg = pipeline.PipelineConfig(global_batch_size=1, resolution=256, mask_resolution=64, drop_prob=0.0)
    (b,) = list(pipeline.batches(report.dataset_dir, cfg, num_steps=1, tokenizer=tokenizer))
    row = next(rows([b]))

    jpeg = Image.open(src / "images" / "astronaut.jpg")  # PIL's decode, as the reference loads it
    assert np.abs(row["clip_image"] - clip_ref(clip_processor, jpeg)).max() < 1e-5
    ref = np.asarray(jpeg.convert("RGB").resize((256, 256), Image.Resampling.BILINEAR), np.float32)
    assert np.abs(row["pixel_values"] - (ref / 127.5 - 1)).max() <= 1.01 / 127.5

    # parts (by-name pairing): face, ears, eyes, nose, mouth, each its own region (cv2-filled)
    assert facial_words(tokenizer, row) == ["face", "ears", "eyes", "nose", "mouth"]
    rgb = jpeg.convert("RGB")
    for k, lab in enumerate([1, 7, 4, 10, 12]):
        binary = (labels == lab).astype(np.uint8) * 255
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        filled = np.zeros_like(binary)
        cv2.drawContours(filled, contours, -1, 255, thickness=cv2.FILLED)
        part = Image.composite(rgb, Image.new("RGB", rgb.size), Image.fromarray(filled))
        assert np.abs(row["part_clip_images"][k] - clip_ref(clip_processor, part)).max() < 1e-5, lab
        small = np.asarray(Image.fromarray(filled).resize((64, 64), Image.Resampling.BILINEAR), np.float32) / 255
        assert np.abs(row["facial_masks"][k] - small).mean() < 0.02, lab
    assert row["facial_masks"][0].sum() > row["facial_masks"][3].sum() > 0   # face region includes the nose
    fg = row["foreground_mask"]
    assert fg[0, 0] == 0 and fg[255, 128] == 1 and 0.2 < fg.mean() < 0.8


def test_record_source_reads_records_in_file_order(dataset_dir):
    src = pipeline.RecordSource(dataset_dir)
    raw = [r.numpy() for r in tf.data.TFRecordDataset(src.files)]
    assert len(src) == len(raw) == N
    for i in (0, 7, 8, 23):  # across the three shards
        assert src.read(i) == raw[i]


def test_text_inputs_on_the_reference_caption(tokenizer):
    caption = "The person has one face, one nose, two eyes, two ears, and one mouth."
    llva = "A woman stands in a park. She smiles."
    slots = [1, 4, 7, 10, 12]
    marked = ("The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, "
              "one nose <|facial|>, and one mouth <|facial|>,")
    ref = sample.text_inputs(tokenizer, llva, caption, slots, drop=False, pairing="reference")
    assert ref.text == "Caption:A woman stands in a park. Detail:" + marked + " She smiles"
    np.testing.assert_array_equal(ref.part_order, [0, 1, 2, 3, 4])   # ears word <- eye crop
    by_name = sample.text_inputs(tokenizer, llva, caption, slots, drop=False, pairing="by_name")
    np.testing.assert_array_equal(by_name.part_order, [0, 2, 1, 3, 4])
    np.testing.assert_array_equal(by_name.input_ids, ref.input_ids)
    words = [tokenizer.convert_ids_to_tokens(int(ref.input_ids[i])) for i in ref.facial_token_idx]
    assert words == ["face</w>", "ears</w>", "eyes</w>", "nose</w>", "mouth</w>"]
    dropped = sample.text_inputs(tokenizer, llva, caption, slots, drop=True)
    assert dropped.text == "" and not dropped.facial_token_mask.any()
    np.testing.assert_array_equal(dropped.input_ids, [BOS] + [EOS] * 76)
    np.testing.assert_array_equal(dropped.part_order, by_name.part_order)  # parts are kept on a drop
    # no "ears" in the caption: the ear part is not kept
    no_ears = sample.text_inputs(tokenizer, llva, caption.replace(" two ears,", ""), slots, drop=False)
    np.testing.assert_array_equal(no_ears.part_order, [0, 1, 3, 4, -1])


def test_sdxl_batches_carry_tokenizer_2_ids(dataset_dir, sample_of, tokenizer, tmp_path):
    """SDXL: encoder 2's ids are the training text as the reference's SDXL training tokenizes it,
    `tokenizer_2(text.replace("<|facial|>", ""))`, with transformers' tokenizer built from an SDXL-style
    tokenizer_2 folder (pad "!") as the judge; every other key is as for SD1.5."""
    from cid_jax.text import FACIAL_TOKEN
    from tests.helpers import write_hf_tokenizer

    hf_2 = transformers.CLIPTokenizer.from_pretrained(str(write_hf_tokenizer(tmp_path / "tokenizer_2", "!")))
    sdxl = run(dataset_dir, tokenizer, 2, drop_prob=0.3, sdxl=True)
    sd15 = run(dataset_dir, tokenizer, 2, drop_prob=0.3)
    n_drop = n_padded = 0
    for row, plain in zip(rows(sdxl), rows(sd15)):
        for k, v in plain.items():
            np.testing.assert_array_equal(row[k], v)
        face = synthetic.render_sample(SEED, sample_of[row["index"]], SIZE, 4, 0.2)
        text = sample.text_inputs(tokenizer, face.vqa_llva, face.vqa_llva_more_face_detail, face.slot_labels,
                                  bool(row["drop"]), "by_name").text
        n_drop += bool(row["drop"])
        want = hf_2(text.replace(FACIAL_TOKEN, ""), padding="max_length", max_length=77, truncation=True).input_ids
        np.testing.assert_array_equal(row["input_ids_2"], want)
        assert EOS in row["input_ids_2"]  # kept by tokenizer_2's truncation, unlike encoder 1's facial ids
        n_padded += row["input_ids_2"][-1] == 0
    assert n_drop and n_padded >= n_drop  # dropped captions at least: "!"-padded rows were seen
    np.testing.assert_array_equal(sdxl[0]["time_ids"][0], [SIZE, SIZE, 0, 0, SIZE, SIZE])
