"""Fine-tuning from existing weights (`model.init_from`) and the evaluation harness (metrics as the
paper's Table 3), on the demo architecture and tiny random metric models in their real formats."""
import csv
import json
import pathlib

import jax
import numpy as np
import pytest

from cid_jax import cli, export, run
from cid_jax.weights import consistentid as cw
from tests.helpers import BIG, StubDetector, train_config, write_metric_models

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from cid_jax.data import builder

    return builder.build_synthetic(tmp_path_factory.mktemp("fgid"), num=16, seed=6, size=64,
                                   progress=False).dataset_dir


def with_training_eval(config):
    """Evaluation at the last step: one held-out face, two prompts, random metric nets."""
    config.eval.every_steps = 100
    config.eval.random_metric_models = True
    config.eval.num_references = 1
    config.eval.steps = 2
    config.eval.merge_step = 1
    return config


@pytest.fixture(scope="module")
def first_run(dataset, tmp_path_factory):
    """A short demo run (evaluated at its end) and its export (.bin)."""
    from cid_jax import trainer

    workdir = tmp_path_factory.mktemp("first")
    config = with_training_eval(train_config(dataset, 3))
    result = trainer.train(config, workdir)
    out = workdir / "export" / "first.bin"
    export.export_run(config, result.trainable, run.RunDir(workdir), result.step, out=out, dtype="fp32")
    return config, out


def _tensors(path):
    return {g: {k: v.numpy().copy() for k, v in sd.items()} for g, sd in torch.load(path, weights_only=True).items()}


def test_training_time_evaluation_logs_metrics_and_images(first_run):
    _, first = first_run
    workdir = first.parent.parent
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if any(k.startswith("eval/") for k in line)]
    assert [e["step"] for e in evals] == [3]  # not a multiple of every_steps: the last step
    for m in ("clip_t", "clip_i", "dino", "fgis", "seconds"):
        assert np.isfinite(evals[0][f"eval/{m}"]), m
    assert "eval/facesim" not in evals[0]  # no ArcFace: not measured rather than made up
    from PIL import Image

    grid = Image.open(workdir / "images" / "eval_0000003.png")
    assert grid.size == (64 * 3, 64)  # the reference, then its two generations


def test_init_from_our_export_with_lr_zero_exports_the_same_tensors(first_run, dataset, tmp_path, caplog):
    from cid_jax import trainer

    config, first = first_run
    config = train_config(dataset, 2)
    config.model.init_from = str(first)
    config.optim.lr = 0.0
    config.eval.every_steps, config.eval.random_metric_models = 100, False  # asked for, no metric models: off
    with caplog.at_level("INFO"):
        result = trainer.train(config, tmp_path / "second")
    assert "evaluation during training is off: no metric models" in caplog.text
    out = tmp_path / "second.bin"
    export.export_run(config, result.trainable, run.RunDir(tmp_path / "second"), result.step, out=out, dtype="fp32")
    a, b = _tensors(first), _tensors(out)
    assert list(a) == list(b)
    for g in a:
        assert list(a[g]) == list(b[g])
        for k in a[g]:
            np.testing.assert_array_equal(a[g][k], b[g][k], err_msg=f"{g}.{k}")


def _reference_modules(config):
    """The reference PyTorch modules (tests/torch_reference) at the demo's sizes, random, as a
    released-format nested .bin would hold them."""
    from tests.torch_reference import consistentid as ref

    layout = export.layout_for_config(config)
    torch.manual_seed(0)
    c = layout.cross_attention_dim
    fe = ref.FacialEncoder(embedding_dim=layout.clip_dim, output_dim=c, embed_dim=c)
    fe.visual_projection = ref.AttentionMLP(layout.clip_dim, c, dim=layout.fe_dim, depth=layout.fe_depth,
                                            dim_head=layout.fe_dim // layout.fe_heads, heads=layout.fe_heads)
    proj = ref.ProjPlusModel(c, 512, layout.clip_dim, layout.num_tokens)
    groups = {"FacialEncoder": fe.state_dict(), "image_proj": proj.state_dict()}
    groups["adapter_modules"] = {}
    for s in layout.sites:
        kin = c if s.is_cross else s.hidden_size
        for name, (fan_in, fan_out) in {"to_q": (s.hidden_size, s.hidden_size), "to_k": (kin, s.hidden_size),
                                        "to_v": (kin, s.hidden_size), "to_out": (s.hidden_size, s.hidden_size)}.items():
            groups["adapter_modules"][f"{s.index}.{name}_lora.down.weight"] = torch.randn(layout.rank, fan_in) / layout.rank
            groups["adapter_modules"][f"{s.index}.{name}_lora.up.weight"] = torch.randn(fan_out, layout.rank) * 0.01
        if s.is_cross:
            groups["adapter_modules"][f"{s.index}.to_k_ip.weight"] = torch.randn(s.hidden_size, c) * 0.05
            groups["adapter_modules"][f"{s.index}.to_v_ip.weight"] = torch.randn(s.hidden_size, c) * 0.05
    for g in groups:
        groups[g] = {k: v.detach().clone() for k, v in groups[g].items()}
    return groups


def _initial(config):
    from cid_jax import build

    model = build.build_modules(config)
    frozen = build.random_frozen(model, build.stream_seed(config, "frozen"))
    return run.initial_trainable(model, config, frozen["unet"], run.read_init_from(config))


def test_a_released_format_bin_initialises_training_to_its_tensors(dataset, tmp_path):
    config = train_config(dataset, 1)
    config.data.pairing = "reference"   # the released weights' pairing (their file has no metadata)
    groups = _reference_modules(config)
    torch.save(groups, tmp_path / "ConsistentID-v1.bin")
    config.model.init_from = str(tmp_path / "ConsistentID-v1.bin")
    trainable = _initial(config)
    back = cw.export_reference(trainable, export.layout_for_config(config))
    for g, sd in groups.items():
        for k, v in sd.items():
            np.testing.assert_array_equal(back[g][k], v.numpy(), err_msg=f"{g}.{k}")
    # The pairing must agree: the released weights learned the positional ("reference") pairing.
    config.data.pairing = "by_name"
    with pytest.raises(cli.InputError, match="--config.data.pairing=reference"):
        run.read_init_from(config)


def test_an_ip_adapter_faceid_plus_file_initialises_its_groups(dataset, tmp_path, caplog):
    config = train_config(dataset, 1)
    groups = _reference_modules(config)
    torch.save({"image_proj": groups["image_proj"], "ip_adapter": groups["adapter_modules"]},
               tmp_path / "ip-adapter-faceid-plus.bin")
    config.model.init_from = str(tmp_path / "ip-adapter-faceid-plus.bin")
    with caplog.at_level("INFO"):
        trainable = _initial(config)
    assert "image_proj, adapter_modules from the file; facial_encoder initialised" in caplog.text
    back = cw.export_reference(trainable, export.layout_for_config(config))
    for k, v in groups["image_proj"].items():
        np.testing.assert_array_equal(back["image_proj"][k], v.numpy())
    for k, v in groups["adapter_modules"].items():
        np.testing.assert_array_equal(back["adapter_modules"][k], v.numpy())
    from cid_jax import build

    model = build.build_modules(config)
    fresh = run.initial_trainable(model, config, build.random_frozen(model, build.stream_seed(config, "frozen"))["unet"])
    jax.tree.map(np.testing.assert_array_equal, trainable["facial_encoder"], fresh["facial_encoder"])


def test_a_mismatched_init_from_fails_before_compiling_naming_the_key(first_run, dataset, tmp_path):
    from cid_jax import trainer

    _, first = first_run
    top = torch.load(first, weights_only=True)
    key = "0.to_q_lora.down.weight"
    top["adapter_modules"][key] = torch.zeros(3, 5)
    torch.save(top, tmp_path / "bad.bin")
    config = train_config(dataset, 1)
    config.model.init_from = str(tmp_path / "bad.bin")
    with pytest.raises(cw.WeightsError, match=r"0\.to_q_lora\.down\.weight"):
        trainer.train(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()  # nothing left behind, not even a folder holding the lock


# ------------------------------------------------------------------------------------ metrics


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    from cid_jax import metrics

    paths = write_metric_models(tmp_path_factory.mktemp("metric_models"))
    return paths, metrics.load_metric_models(**paths)


def _photos():
    import skimage.data
    from PIL import Image

    astronaut = skimage.data.astronaut()
    other = np.asarray(Image.fromarray((skimage.data.lfw_subset()[7] * 255).astype(np.uint8)).convert("RGB")
                       .resize((256, 256), Image.BICUBIC))
    return astronaut, other


def test_identical_images_score_one_and_fid_of_a_set_with_itself_is_zero(metric_models):
    from cid_jax import metrics

    _, models = metric_models
    astronaut, other = _photos()
    ref = metrics.describe_reference(models, "astronaut", astronaut)
    (same,) = metrics.score_images(models, ref, [astronaut], ["a woman in a spacesuit"])
    for m in ("clip_i", "dino", "fgis"):
        assert abs(same[m] - 1.0) < 1e-5, (m, same[m])
    assert same["fgis_regions"] == 5
    (diff,) = metrics.score_images(models, ref, [other], ["a woman in a spacesuit"])
    assert diff["clip_i"] < 1 - 1e-4 and diff["dino"] < 1 - 1e-4
    feats = models.inception([astronaut, other, astronaut[::-1], other[:, ::-1]])
    assert abs(metrics.fid(feats, feats)) < 1e-3 * max(1.0, metrics.fid(feats[:2], feats[2:]))
    assert metrics.fid(feats[:2], feats[2:]) > 0


def _fid_by_eigenvalues(a, b):
    """FID by another route: tr sqrt(A B) = sum of sqrt(eig(sqrt(A) B sqrt(A))), symmetric throughout
    (sqrt(A) from A's eigendecomposition, exact for a singular A too, unlike sqrtm)."""
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    ra = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.clip(np.linalg.eigvalsh(ra @ cb @ ra), 0, None)
    return np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(eig).sum()


def _kid_by_pairs(a, b):
    """KID from its definition, pair by pair."""
    d = a.shape[1]
    k = lambda x, y: (float(np.dot(x, y)) / d + 1) ** 3  # noqa: E731
    m, n = len(a), len(b)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_fid_and_kid_agree_with_their_definitions():
    from cid_jax import metrics

    rng = np.random.default_rng(3)
    a = rng.standard_normal((40, 8))
    b = rng.standard_normal((30, 8)) * 1.5 + 0.3
    # Both routes are float64 on well-conditioned 8x8 covariances: agreement to ~1e-9 relative.
    assert metrics.fid(a, b) == pytest.approx(_fid_by_eigenvalues(a, b), rel=1e-8)
    assert metrics.kid(a, b) == pytest.approx(_kid_by_pairs(a, b), rel=1e-9)
    same = rng.standard_normal((200, 8))
    assert abs(metrics.kid(same[:100], same[100:])) < 0.1 * metrics.kid(a, b)


def test_fid_with_fewer_images_than_dimensions_is_exact():
    """Paper-sized sets (tens of images, 2048 features): the covariance product is rank-deficient.
    The result equals the symmetric eigenvalue route and pytorch-fid's formula (sqrtm of the
    product, its known inaccuracy on a singular product bounding the agreement), and a set against
    itself is 0 to float64 rounding of the traces."""
    from scipy import linalg

    from cid_jax import metrics

    rng = np.random.default_rng(5)
    d = 256
    a = rng.standard_normal((30, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
    b = rng.standard_normal((20, d)) * 1.3 + 0.2
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # The eigenvalue route takes sqrt of the D - rank eigenvalues that are zero up to rounding
    # (|err| ~ eps * lambda_max each): together at most 2 * D * sqrt(eps * lambda_max) of the trace.
    lam_max = np.linalg.eigvalsh(ca).max() * np.linalg.eigvalsh(cb).max()
    assert metrics.fid(a, b) == pytest.approx(_fid_by_eigenvalues(a, b),
                                              abs=4 * d * np.sqrt(np.finfo(np.float64).eps * lam_max))
    # pytorch-fid's calculate_frechet_distance:
    root, _ = linalg.sqrtm(ca @ cb, disp=False)
    pytorch_fid = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb) - 2 * np.trace(root.real)
    assert metrics.fid(a, b) == pytest.approx(pytorch_fid, rel=1e-3)
    scale = np.trace(ca)  # the rounding of a float64 trace of this size: ~1e-16 x d x scale
    assert abs(metrics.fid(a, a)) < 1e-10 * scale


def _stub_detector_for(image):
    """SCRFD stood in for (its weights do not exist offline): the LBP cascade's face box, with the
    five landmarks placed in it as they sit in the astronaut's box (BIG)."""
    from cid_jax.face.detect import detect_largest_face

    box = detect_largest_face(image)
    big_box, big_kps = np.array(BIG[0][:4], float), np.array(BIG[1], float)
    rel = (big_kps - big_box[:2]) / (big_box[2:] - big_box[:2])
    new = np.array([box.x0, box.y0, box.x1, box.y1], float)
    return StubDetector([[*new, 0.9]], [new[:2] + rel * (new[2:] - new[:2])])


def test_facesim_ranks_the_same_face_above_another_person(tmp_path):
    """ArcFace through insightface's loader (the toy ONNX recognizer): the same photo scores 1, the
    same photo re-encoded as JPEG above another person (insightface's Tom Hanks sample); a generated
    image without a face scores 0 and is counted."""
    import io
    import os

    import insightface
    import skimage.data
    from PIL import Image

    from cid_jax import metrics
    from cid_jax.face.arcface import ArcFaceEmbedder
    from tests.helpers import write_toy_arcface

    write_toy_arcface(tmp_path / "w600k_r50.onnx", np.random.default_rng(0).standard_normal((588, 512)).astype(np.float32))
    recognizer = insightface.model_zoo.get_model(str(tmp_path / "w600k_r50.onnx"), providers=["CPUExecutionProvider"])

    def facesim(reference, image):
        ref = metrics.describe_reference(
            metrics.MetricModels(face=ArcFaceEmbedder.from_models(_stub_detector_for(reference), recognizer)),
            "ref", reference)
        models = metrics.MetricModels(face=ArcFaceEmbedder.from_models(_stub_detector_for(image), recognizer))
        return metrics.score_images(models, ref, [image], [None])[0]["facesim"]

    astronaut = skimage.data.astronaut()
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, "JPEG", quality=70)
    again = np.asarray(Image.open(buf).convert("RGB"))
    hanks_file = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "Tom_Hanks_54745.png")
    hanks = np.asarray(Image.open(hanks_file).convert("RGB").resize((512, 512), Image.BICUBIC))
    same, jpeg, other = facesim(astronaut, astronaut), facesim(astronaut, again), facesim(astronaut, hanks)
    assert abs(same - 1.0) < 1e-5
    assert other < jpeg - 0.05, (jpeg, other)
    empty = metrics.MetricModels(face=ArcFaceEmbedder.from_models(StubDetector(np.zeros((0, 5)), np.zeros((0, 5, 2))),
                                                                  recognizer))
    ref = metrics.describe_reference(
        metrics.MetricModels(face=ArcFaceEmbedder.from_models(_stub_detector_for(astronaut), recognizer)), "a", astronaut)
    (none,) = metrics.score_images(empty, ref, [astronaut], [None])
    assert none["facesim"] == 0.0 and none["no_face"]


def test_evaluate_command_line_on_a_demo_checkpoint_and_on_a_folder(first_run, metric_models, tmp_path):
    from PIL import Image

    from cid_jax import evaluate

    config, _ = first_run
    paths, _ = metric_models
    refs = tmp_path / "refs"
    refs.mkdir()
    astronaut, other = _photos()
    Image.fromarray(astronaut).save(refs / "astronaut.png")
    Image.fromarray(np.asarray(Image.fromarray(astronaut).transpose(Image.FLIP_LEFT_RIGHT))).save(refs / "mirror.png")
    (refs / "class_words.json").write_text(json.dumps({"astronaut": "woman"}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <class word> in the snow\na painting of a <class word>\n")
    workdir = first_run[1].parent.parent
    out = tmp_path / "eval"
    flags = [f"--{k}={v}" for k, v in paths.items()]
    assert evaluate.main([f"--checkpoint={workdir}", f"--references={refs}", f"--prompts={prompts}", "--seeds=1",
                          "--steps=2", "--merge_step=0", "--batch_size=3", f"--out={out}", *flags]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert list(result) == ["clip_t", "clip_i", "dino", "facesim", "fgis", "fid", "kid", "s_per_image"]
    assert result["facesim"] == {"skipped": "needs --face_models"}
    for m in ("clip_t", "clip_i", "dino", "fgis"):
        assert result[m]["identities"] == 2 and np.isfinite(result[m]["mean"])
    assert np.isfinite(result["fid"]["value"]) and result["s_per_image"]["value"] > 0
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert result["fgis"]["no_face"] == sum(r["fgis_regions"] == "0" for r in rows)  # counted as FaceSim counts
    assert len(rows) == 4 and {r["prompt"] for r in rows} == {"a woman in the snow", "a painting of a woman",
                                                                  "a person in the snow", "a painting of a person"}
    assert (out / "contact_sheet.png").exists() and "| CLIP-T" in (out / "report.md").read_text()
    # The same images scored as a folder made elsewhere: the same numbers.
    out2 = tmp_path / "eval2"
    assert evaluate.main([f"--generated={out / 'images'}", f"--references={refs}", f"--prompts={prompts}",
                          f"--out={out2}", *flags]) == 0
    again = json.loads((out2 / "metrics.json").read_text())
    for m in ("clip_t", "clip_i", "dino", "fgis"):
        assert again[m]["mean"] == pytest.approx(result[m]["mean"], abs=1e-6)
    assert again["s_per_image"] == {"skipped": "images made elsewhere (--generated)"}


def test_eval_config_problems_are_named_before_any_work(tmp_path):
    from cid_jax import config_base
    from tests.helpers import small_train_config

    c = small_train_config()
    c.eval.references = str(tmp_path / "missing")
    c.eval.sampler = "heun"
    c.eval.steps = 0
    c.eval.prompts = ()
    problems = "\n".join(config_base.config_problems(c))
    for fragment in ("--config.eval.references=", "--config.eval.sampler='heun'", "--config.eval.steps=0",
                     "--config.eval.prompts=()"):
        assert fragment in problems, fragment


def test_training_evaluation_takes_references_from_the_validation_split(tmp_path):
    """A dataset built with a `validation` split gives the evaluation its identities (distinct, with
    their stored parsing maps); one without gives None (then the held-out synthetic faces)."""
    from cid_jax import train_eval
    from cid_jax.data import builder
    from cid_jax.data.pipeline import RecordSource
    from tests.helpers import small_train_config
    from tests.test_data_builder import write_reference_fixture

    src = tmp_path / "src"
    src.mkdir()
    write_reference_fixture(src)
    report = builder.build_from_reference_json({"train": src / "data.json", "validation": src / "data.json"},
                                               tmp_path / "built", progress=False)
    config = small_train_config()
    config.data.path = str(report.dataset_dir)
    config.eval.num_references = 3
    refs = train_eval.dataset_references(config)
    source = RecordSource(report.dataset_dir, "validation")
    records = [source.features.deserialize_example_np(source.read(i)) for i in range(len(source))]
    identities = list(dict.fromkeys(r["identity"].decode() for r in records))
    assert [r.name for r in refs] == identities[:3]
    for ref in refs:
        first = next(r for r in records if r["identity"].decode() == ref.name)
        np.testing.assert_array_equal(ref.image, first["image"])
    only_train = builder.build_from_reference_json(src / "data.json", tmp_path / "train_only", progress=False)
    config.data.path = str(only_train.dataset_dir)
    assert train_eval.dataset_references(config) is None


def test_the_reference_prompt_sheet_is_the_reference_repositorys():
    """`--prompts=reference` with the sheet's class words reproduces the reference repository's
    evaluation/EvaluationIMGs_stars_prompts.csv (kept in tests/data as it is there) row for row."""
    from cid_jax import scoring

    with open(pathlib.Path(__file__).parent / "data" / "EvaluationIMGs_stars_prompts.csv", newline="") as f:
        sheet = [(r["Image_Name"], r["Prompt"]) for r in csv.DictReader(f)]
    prompts = scoring.read_prompts("reference")
    words = scoring.class_words(pathlib.Path(__file__).parent, "reference")  # tests/ has no class_words.json
    ours = [(f"{name}.png", scoring.fill(p, words[name])) for name in scoring.REFERENCE_CLASS_WORDS for p in prompts]
    assert len(sheet) == 675 and ours == sheet
    assert sum("img" in p.split() for p in prompts) == 13  # PhotoMaker's trigger word, kept verbatim


def _processor_inputs(processor, image) -> np.ndarray:
    return np.transpose(processor(images=image, return_tensors="np")["pixel_values"][0], (1, 2, 0))


# Our float32 rescale-and-normalise against transformers' (rescale in float64, then float32): a few
# float32 roundings of values |x| <= 3 (2^-22 relative each), far below 2e-6.
PREPROCESS_ATOL = 2e-6


@pytest.mark.parametrize("kind", ["clip", "vit_bilinear", "vit_int_size"])
def test_metric_preprocessing_is_read_from_the_model_folder(tmp_path, kind):
    """Size, crop, resample and statistics come from preprocessor_config.json (transformers' image
    processors, the judge, read the same file); without one, today's defaults hold."""
    import json

    import skimage.data
    import transformers

    from cid_jax import metrics
    from cid_jax.data import clip_preprocess as clip_lib

    image = skimage.data.astronaut()[40:440, 60:360]  # 400 x 300: shortest side and crop both matter
    if kind == "clip":
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                                    resample=2, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25])
        default = metrics.clip_image_processing(224)
    elif kind == "vit_bilinear":  # facebook/dino-vits16's: bilinear 224 square
        processor = transformers.ViTImageProcessor(size={"height": 224, "width": 224}, resample=2)
        default = metrics.dino_image_processing(224)
    else:  # an older ViTFeatureExtractor-style file: an int size means a square
        processor = transformers.ViTImageProcessor(size={"height": 96, "width": 96}, resample=3)
        default = metrics.dino_image_processing(224)
    processor.save_pretrained(tmp_path)
    if kind == "vit_int_size":
        cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
        cfg.update(size=96, feature_extractor_type="ViTFeatureExtractor")
        cfg.pop("image_processor_type", None)
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
        processor = transformers.ViTImageProcessor.from_pretrained(tmp_path)
    ours = metrics.read_image_processing(tmp_path, default)(image)
    want = _processor_inputs(processor, image)
    assert ours.shape == want.shape
    np.testing.assert_allclose(ours, want, atol=PREPROCESS_ATOL, rtol=0)
    # No file: the defaults. CLIP's are CLIPImageProcessor's own (and the data pipeline's function).
    empty = tmp_path / "empty"
    empty.mkdir()
    assert metrics.read_image_processing(empty, default) == default
    if kind == "clip":
        np.testing.assert_allclose(default(image), _processor_inputs(transformers.CLIPImageProcessor(), image),
                                   atol=PREPROCESS_ATOL, rtol=0)
        np.testing.assert_array_equal(default(image), clip_lib.clip_preprocess(image))
