"""Serving: the persistent compilation cache across processes, LoRA folding, batched generation
from a prompts file, what a person reads while training runs (curves, progress lines), and no
TPU probing noise without a TPU (tiny demo models, CPU)."""
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cid_jax import generate as gen
from cid_jax import inference
from cid_jax import sampling as pl
from tests.helpers import REPO


@pytest.fixture(scope="module")
def astronaut_file(tmp_path_factory):
    import skimage.data
    from PIL import Image

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(path)
    return path


def _generate_process(workdir, photo, out, cache, *extra):
    env = dict(os.environ)
    env.pop("CID_JAX_COMPILATION_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "cid_jax.generate", f"--checkpoint={workdir}", f"--image={photo}",
                           "--prompt=a portrait", "--steps=2", "--merge_step=0", f"--out={out}",
                           f"--compilation_cache_dir={cache}", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"\((\d+) program\(s\) compiled, (\d+) read from the persistent cache\)", proc.stderr)
    assert m, proc.stderr[-3000:]
    return int(m.group(1)), int(m.group(2)), proc.stderr


def test_a_second_process_compiles_nothing_with_the_cache(demo_workdir, astronaut_file, tmp_path):
    """Counted by jax.monitoring in each process (cid_jax.runtime.CompileStats), not timed."""
    cache = tmp_path / "xla"
    compiled, hits, _ = _generate_process(demo_workdir[0], astronaut_file, tmp_path / "a.png", cache)
    assert compiled > 0 and any(cache.iterdir())
    compiled, hits, log = _generate_process(demo_workdir[0], astronaut_file, tmp_path / "b.png", cache)
    assert compiled == 0 and hits > 0, log[-2000:]
    np.testing.assert_array_equal(np.asarray(_png(tmp_path / "a.png")), np.asarray(_png(tmp_path / "b.png")))
    assert "loaded in" in log and "sampled 1 image(s) in" in log
    # The traced sampler and the modules' param shapes were kept too (one entry each: the keys do not
    # change between processes, so the second process traced nothing of the model).
    assert len(list((cache / "exported").glob("generate-*.bin"))) == 1
    assert {p.name.split("-")[0] for p in (cache / "shapes").glob("*.json")} >= {"frozen", "consistentid"}
    # A damaged entry is traced again (and replaced), with a warning; the image does not change.
    for stored in [*(cache / "exported").iterdir(), *(cache / "shapes").iterdir()]:
        stored.write_bytes(b"\x00 damaged")
    compiled, hits, log = _generate_process(demo_workdir[0], astronaut_file, tmp_path / "d.png", cache)
    assert "unreadable" in log and hits > 0, log[-2000:]
    np.testing.assert_array_equal(np.asarray(_png(tmp_path / "a.png")), np.asarray(_png(tmp_path / "d.png")))
    # 16 bytes flipped inside every file of the cache, sizes kept (XLA's entries too): a program can
    # still deserialize, so the stored digest is what tells; the image still equals the clean one.
    for stored in (p for p in cache.rglob("*") if p.is_file()):
        data = bytearray(stored.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
        stored.write_bytes(bytes(data))
    compiled, hits, log = _generate_process(demo_workdir[0], astronaut_file, tmp_path / "e.png", cache)
    assert "unreadable" in log and "Traceback" not in log, log[-2000:]
    np.testing.assert_array_equal(np.asarray(_png(tmp_path / "a.png")), np.asarray(_png(tmp_path / "e.png")))
    # Off: every program compiled afresh, nothing read.
    compiled, hits, _ = _generate_process(demo_workdir[0], astronaut_file, tmp_path / "c.png", cache,
                                          "--no_compilation_cache")
    assert compiled > 0 and hits == 0


def _png(path):
    from PIL import Image

    return Image.open(path)


def _images(loaded, face, steps=2):
    """Float images (before uint8 rounding) of one 64 px sample."""
    inputs = pl.model_inputs([face], [pl.text_batch("a portrait", "", loaded.tokenizer, face.part_names)])
    noise = pl.initial_noise([0], pl.latent_shape(loaded.model, 64, 64))
    state = pl.scheduler_state("euler", steps, loaded.noise_config)
    images, _ = pl.Generator(loaded.model)(loaded.frozen, loaded.trainable, inputs, noise, state, 0, 5.0)
    return np.asarray(images, np.float64)


@pytest.fixture(scope="module")
def face():
    import skimage.data

    from cid_jax.face import template_parse

    photo = skimage.data.astronaut()
    return pl.face_batch(photo, template_parse(photo), np.ones(512, np.float32) / 512 ** 0.5)


def test_folded_lora_gives_the_unfolded_images(demo_workdir, face):
    """fp32: folding reorders a sum of products (x W + (x down) up vs x (W + down up)); each
    projection then differs by a few ulps of its outputs, and the images by ~1e-5 at most after 2
    steps through the tiny UNet: 1e-4 bounds it with margin. bf16: folding must add no more error
    than bf16 itself (both compared with the fp32 unfolded images)."""
    from cid_jax import build

    workdir = str(demo_workdir[0])
    unfolded = inference.load(workdir, dtype="float32", fold_lora=False)
    folded = inference.load(workdir, dtype="float32", fold_lora=True)
    flat = [k for k in _leaf_paths(folded.trainable["adapter_modules"]) if "_lora" in k]
    assert flat == []  # the folded model has no LoRA parameters left
    # The adapters are non-trivial (random up kernels), so folding has something to fold.
    assert any("_lora" in k for k in _leaf_paths(unfolded.trainable["adapter_modules"]))
    reference = _images(unfolded, face)
    np.testing.assert_allclose(_images(folded, face), reference, atol=1e-4, rtol=0)
    # LoRA on vs off differs by far more than the tolerance, so the comparison above can fail.
    no_lora = dict(unfolded.trainable)
    no_lora["adapter_modules"] = build.fold_lora_weights(unfolded.frozen, unfolded.trainable)[1]["adapter_modules"]
    assert np.abs(_images(inference.Loaded(folded.model, unfolded.frozen, no_lora, unfolded.metadata,
                                     unfolded.tokenizer, unfolded.noise_config), face) - reference).max() > 1e-3
    bf16_unfolded = _images(inference.load(workdir, dtype="bfloat16", fold_lora=False), face)
    bf16_folded = _images(inference.load(workdir, dtype="bfloat16", fold_lora=True), face)
    err_unfolded = np.abs(bf16_unfolded - reference).max()
    err_folded = np.abs(bf16_folded - reference).max()
    assert err_folded <= 2 * err_unfolded + 1e-3, (err_folded, err_unfolded)


def _leaf_paths(tree):
    from flax import traverse_util

    return ["/".join(k) for k in traverse_util.flatten_dict(tree)]


def test_a_prompts_file_in_batches_equals_one_image_at_a_time(demo_workdir, astronaut_file, tmp_path):
    """3 prompts x 2 seeds at batch 4 (two calls, the last padded): the same 6 images as one at a
    time, each PNG carrying its prompt and seed. Batch size changes XLA's blocking of the
    matmuls, so values may differ in the last fp32 bits; on uint8 images that is at most one level
    for a value at a rounding boundary."""
    prompts = ["a portrait", "a person in the snow", "a painting of a person"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "grid.png"
    assert gen.main([f"--checkpoint={demo_workdir[0]}", f"--image={astronaut_file}",
                     f"--prompts_file={tmp_path / 'prompts.txt'}", "--seeds=5,9", "--batch_size=4", "--steps=2",
                     "--merge_step=0", f"--out={out}"]) == 0
    files = [tmp_path / f"grid_{k}.png" for k in range(6)]
    assert all(f.exists() for f in files) and _png(out).size == (4 * 64, 2 * 64)
    made = [(p, s) for p in prompts for s in (5, 9)]
    for f, (prompt, seed) in zip(files, made):
        info = _png(f).text
        assert info["prompt"] == prompt and info["seed"] == str(seed)
        assert json.loads(info["parameters"])["steps"] == 2
    from cid_jax.face import template_parse

    photo = np.asarray(_png(astronaut_file).convert("RGB"))
    loaded = inference.load(str(demo_workdir[0]))
    one_face = pl.face_batch(photo, template_parse(photo, 512), None)
    alone, _ = inference.generate_requests(loaded, [inference.ImageRequest(one_face, p, s) for p, s in made],
                                     negative_prompt=gen.parse_args(["--checkpoint=x", "--image=y"]).negative_prompt,
                                     steps=2, guidance=5.0, merge_step=0, sampler="euler", height=64, width=64,
                                     batch_size=1)
    for f, image in zip(files, alone):
        diff = np.abs(np.asarray(_png(f), np.int16) - image.astype(np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.01, f


def test_loss_curves_have_axes_and_an_ema(tmp_path):
    from cid_jax import observe

    rng = np.random.default_rng(0)
    history = [dict(step=s, loss=0.3 + 0.8 * rng.random(), grad_norm=1.0) for s in range(1, 201)]
    observe.plot_curves(history, ["loss", "facial_loss", "grad_norm"], tmp_path / "curves.png")
    image = _png(tmp_path / "curves.png")
    assert image.text.get("Software", "").startswith("Matplotlib")  # drawn by matplotlib (axes, ticks)
    assert image.size[1] > 2 * 200  # two panels: facial_loss has no value and is left out
    smooth = observe.ema(np.array([r["loss"] for r in history]), 10)
    assert np.std(np.diff(smooth)) < 0.2 * np.std(np.diff([r["loss"] for r in history]))


def test_progress_without_a_terminal_is_a_line_every_n_steps(caplog):
    from cid_jax import observe

    with caplog.at_level("INFO"):
        bar = observe.progress(100, 0, log_every=25, stream=io.StringIO())
        for _ in range(100):
            bar.set_postfix(loss="0.5")
            bar.update(1)
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train ")]
    assert [line.split()[1] for line in lines] == ["25/100", "50/100", "75/100", "100/100"]
    assert "steps/s" in lines[0] and "left" in lines[0] and "loss=0.5" in lines[0]


def test_no_tpu_probe_without_a_tpu(monkeypatch):
    from cid_jax import _platforms

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(_platforms, "_has", lambda m: m == "libtpu")
    monkeypatch.setattr(_platforms, "tpu_present", lambda: False)
    _platforms.skip_absent_tpu()
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")  # the user's choice stays
    _platforms.skip_absent_tpu()
    assert os.environ["JAX_PLATFORMS"] == "tpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(_platforms, "tpu_present", lambda: True)  # a TPU VM: JAX finds it itself
    _platforms.skip_absent_tpu()
    assert "JAX_PLATFORMS" not in os.environ


@pytest.mark.parametrize("imports", ["cid_jax, jax", "jax, cid_jax"])  # JAX imported first too
def test_a_fresh_process_prints_no_tpu_backend_noise(imports):
    if not _has_libtpu():
        pytest.skip("libtpu is not installed: there is no TPU probe to silence")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
    proc = subprocess.run([sys.executable, "-c", f"import {imports}; print(jax.devices()[0].platform)"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "cpu"
    for noise in ("Unable to initialize backend 'tpu'", "TPU_WORKER_HOSTNAMES", "libtpu"):
        assert noise not in proc.stderr, proc.stderr[-2000:]


def _has_libtpu() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None
