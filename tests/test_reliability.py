"""Reliability, as a demanding user finds it: every bad input is one line naming the fix with a
documented exit code (no traceback), and checkpoints survive damage, a second writer and a full disk.

One small demo run directory is trained once through the real command line and shared; the
command-line checks of bad input stop before anything is built, so they are quick.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cid_jax import cli
from cid_jax.weights.consistentid import read_metadata
from tests.helpers import REPO, train_config

TRAIN_CONFIG = REPO / "tests" / "train_test_config.py"   # helpers.train_config, 64 px, as a CLI config


def run_cli(*args, timeout=600, env=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_cli(workdir, dataset, *flags, timeout=600):
    return run_cli("-m", "cid_jax.train", f"--config={TRAIN_CONFIG}", f"--workdir={workdir}",
                   f"--config.data.path={dataset}", *flags, timeout=timeout)


def one_line_error(proc, code: int, *needles: str):
    """Exit `code`, an error line naming each needle, and no traceback."""
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert lines, err[-3000:]
    text = err[err.index(lines[0]):]
    for needle in needles:
        assert needle in text, (needle, text[-2000:])
    return text


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from cid_jax.data import builder

    return builder.build_synthetic(tmp_path_factory.mktemp("fgid"), num=16, seed=5, size=64,
                                   progress=False).dataset_dir


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A run directory trained for 4 steps with checkpoints at 2 and 4, through the command line."""
    workdir = tmp_path_factory.mktemp("run") / "w"
    proc = train_cli(workdir, dataset, "--config.train.num_steps=4", "--config.checkpoint.every_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def copy_run(src, tmp_path) -> pathlib.Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- training flags


@pytest.mark.parametrize("flags,code,needles", [
    (["--config.train.num_steps=-5", "--config.optim.lr=nan"], 2,
     ["--config.train.num_steps=-5: must be >= 1", "--config.optim.lr=nan: must be finite"]),
    (["--config.model.lora_rnk=4"], 2, ["--config.model.lora_rnk", "did you mean --config.model.lora_rank"]),
    (["--config.train.global_batch=12"], 2, ["global_batch=12", "multiple of 8"]),
    (["--config.data.path=/nonexistent/fgid"], 3, ["/nonexistent/fgid does not exist"]),
    (["--config.model.preset=", "--config.model.base=/nonexistent/sd15"], 3, ["/nonexistent/sd15/unet/config.json"]),
], ids=["ranges_and_nan", "unknown_field", "indivisible_batch", "missing_data", "missing_weights"])
def test_bad_training_config_is_one_line_before_any_work(dataset, tmp_path, flags, code, needles):
    workdir = tmp_path / "w"
    t0 = time.perf_counter()
    proc = train_cli(workdir, dataset, *flags)
    one_line_error(proc, code, *needles)
    assert time.perf_counter() - t0 < 60  # nothing was built or compiled
    assert not (workdir / "checkpoints").exists()


def test_unwritable_workdir(dataset):
    proc = train_cli("/proc/cid_jax_run", dataset)  # not writable, even by root
    one_line_error(proc, 2, "--workdir=/proc/cid_jax_run cannot be written")


# ------------------------------------------------------------------------------ checkpoints


def _damage_newest(workdir) -> int:
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    newest = steps[-1]
    biggest = max((p for p in (workdir / "checkpoints" / str(newest) / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(1000)
    return newest


def test_damaged_newest_checkpoint_resumes_from_the_previous_one(trained, dataset, tmp_path):
    workdir = copy_run(trained, tmp_path)
    bad = _damage_newest(workdir)                              # step 4
    # The converters read the newest readable step, saying which.
    out = tmp_path / "w.safetensors"
    proc = run_cli("convert/to_pytorch.py", f"--checkpoint={workdir}", f"--out={out}")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"checkpoint {bad} cannot be read" in proc.stderr and "using checkpoint 2 instead" in proc.stderr
    assert read_metadata(out)["step"] == "2"
    # Resume: the damaged step is moved aside (kept), training goes on from step 2 and finishes.
    proc = train_cli(workdir, dataset, "--config.train.num_steps=6", "--config.checkpoint.every_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and f"checkpoint {bad} cannot be read" in proc.stderr
    assert "resumed from step 2" in proc.stderr
    kept = list((workdir / "corrupt").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith(f"{bad}-")
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6
    rows = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-4:] == [3, 4, 5, 6]


def test_a_second_writer_is_refused_while_the_first_finishes(trained, dataset, tmp_path):
    workdir = copy_run(trained, tmp_path)
    before = (workdir / "metrics.jsonl").read_text().splitlines()
    first = subprocess.Popen([sys.executable, "-m", "cid_jax.train", f"--config={TRAIN_CONFIG}",
                              f"--workdir={workdir}", f"--config.data.path={dataset}",
                              "--config.train.num_steps=8", "--config.checkpoint.every_steps=4"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = workdir / ".lock"
    deadline = time.time() + 300
    while time.time() < deadline and not (lock.exists() and lock.read_text().startswith("pid")):
        time.sleep(0.2)
    assert lock.read_text().startswith(f"pid {first.pid} ")
    second = train_cli(workdir, dataset, "--config.train.num_steps=8", "--config.checkpoint.every_steps=4")
    one_line_error(second, cli.EXIT_BUSY, "is being trained by another process", f"pid {first.pid}")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    rows = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    added = rows[len(before):]
    assert added == [5, 6, 7, 8]  # one writer: every step once
    assert lock.read_text() == ""  # released


def test_resume_with_another_lora_rank_is_refused_with_the_field(trained, dataset, tmp_path):
    workdir = copy_run(trained, tmp_path)
    proc = train_cli(workdir, dataset, "--config.model.lora_rank=4")
    one_line_error(proc, 2, "model.lora_rank: 8 -> 4", "another model or optimizer")
    # A data-order change needs the explicit switch; run length and logging do not.
    proc = train_cli(workdir, dataset, "--config.seed=3", "--config.train.num_steps=4")
    one_line_error(proc, 2, "seed: 0 -> 3", "--config.train.allow_config_change=True")


def test_a_full_disk_stops_the_run_with_the_last_good_checkpoint_intact(dataset, tmp_path, monkeypatch):
    """The second save fails (ENOSPC): the run stops at the next step with one clear error, the
    first checkpoint is intact and no unfinished save folder is left."""
    import errno

    import orbax.checkpoint as ocp

    from cid_jax import run as run_lib
    from cid_jax import trainer

    real_save = ocp.CheckpointManager.save
    saved = []

    def save(self, step, *args, **kwargs):
        if self.should_save(step) or kwargs.get("force"):
            if saved:  # the disk is full now, after orbax has created its temporary folder
                (pathlib.Path(self.directory) / f"{step}.orbax-checkpoint-tmp-1").mkdir(parents=True)
                raise OSError(errno.ENOSPC, "No space left on device")
            saved.append(step)
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    config = train_config(dataset, 6)
    config.checkpoint.every_steps = 2
    with pytest.raises(trainer.SaveFailed, match="No space left on device") as failed:
        trainer.train(config, tmp_path / "w")
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    assert f"last good checkpoint is step {saved[0]}" in str(failed.value)
    ckpt = tmp_path / "w" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == [str(saved[0])]   # no temporary folder left
    _, params, step = run_lib.restore_trainable(run_lib.RunDir(tmp_path / "w"))
    assert step == saved[0] and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------- converters, exports


def test_export_leaves_no_temporary_file_on_failure(trained, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which the CLI guard turns into the same) mid-write: no temporary file,
    the previous export intact; a temporary file a killed process left is removed by the next write."""
    sys.path.insert(0, str(REPO / "convert"))
    try:
        import to_pytorch
    finally:
        sys.path.pop(0)
    from cid_jax.weights.state_dict import read_state_dict

    def contents(path):  # tensors and metadata (the header's metadata order is not fixed)
        return {k: v.tobytes() for k, v in read_state_dict(path).items()}, read_metadata(path)

    out = tmp_path / "model.safetensors"
    assert to_pytorch.main([f"--checkpoint={trained}", f"--out={out}"]) == 0
    good = contents(out)
    real = pathlib.Path.write_bytes

    def interrupted(self, data):  # the export's bytes, half written when Ctrl-C arrives
        real(self, data[:len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_bytes", interrupted)
    assert to_pytorch.main([f"--checkpoint={trained}", f"--out={out}"]) == 130
    monkeypatch.setattr(pathlib.Path, "write_bytes", real)
    assert contents(out) == good and not list(tmp_path.glob(".model.safetensors.*"))
    stale = tmp_path / ".model.safetensors.k1ll3d.tmp"   # what SIGKILL mid-write leaves
    stale.write_bytes(b"x" * 1000)
    assert to_pytorch.main([f"--checkpoint={trained}", f"--out={out}"]) == 0
    assert not stale.exists() and contents(out) == good


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_a_full_disk_under_the_converter_is_one_line(trained, tmp_path, suffix):
    """A real OS limit on the converter's process (RLIMIT_FSIZE: writes past 200 kB fail with EFBIG,
    as a full disk fails with ENOSPC): one line naming the file, exit 2, nothing left behind."""
    import resource
    import signal

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / f"w{suffix}"
    proc = subprocess.run([sys.executable, "convert/to_pytorch.py", f"--checkpoint={trained}", f"--out={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size)
    one_line_error(proc, 2, f"File too large: {out}")
    assert list(tmp_path.iterdir()) == []


def test_converter_errors_are_one_line(trained, tmp_path, capsys):
    import torch

    sys.path.insert(0, str(REPO / "convert"))
    try:
        import from_pytorch
        import to_pytorch
    finally:
        sys.path.pop(0)
    from cid_jax import export, run

    config, trainable, _ = run.restore_trainable(run.RunDir(trained))
    layout = export.layout_for_config(config)
    # A truncated .safetensors (an int64 tensor for a float weight: test_consistentid_weights).
    flat = tmp_path / "good.safetensors"
    export.save(trainable, layout, flat, metadata={"pairing": "by_name"})
    (tmp_path / "cut.safetensors").write_bytes(flat.read_bytes()[:5000])
    assert to_pytorch.main([f"--checkpoint={tmp_path / 'cut.safetensors'}", f"--out={tmp_path / 'y.bin'}"]) == 2
    assert "truncated" in capsys.readouterr().err
    # A malicious pickle: refused, nothing runs, and no advice to turn the safety off.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"FacialEncoder": {"x": Evil()}}, tmp_path / "evil.bin")
    assert from_pytorch.main([f"--checkpoint={tmp_path / 'evil.bin'}", f"--out={tmp_path / 'z.msgpack'}"]) == 2
    err = capsys.readouterr().err
    assert "refused to unpickle" in err and "weights_only" not in err and not marker.exists()
    # A run directory whose only checkpoints are damaged.
    broken = copy_run(trained, tmp_path)
    for step in (2, 4):
        shutil.rmtree(broken / "checkpoints" / str(step) / "state" / "ocdbt.process_0")
    assert to_pytorch.main([f"--checkpoint={broken}", f"--out={tmp_path / 'w.bin'}"]) == 2
    assert "cannot be read" in capsys.readouterr().err


# ------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.astronaut()).save(root / "face.jpg", quality=95)
    (root / "notes.txt").write_text("not a photo")
    (root / "cut.jpg").write_bytes((root / "face.jpg").read_bytes()[:4000])
    return root


@pytest.mark.parametrize("flags,code,needles", [
    (["--guidance=nan"], 2, ["--guidance=nan: must be a finite number"]),
    (["--steps=0"], 2, ["--steps=0: must be >= 1"]),
    (["--steps=-1", "--num_images=0"], 2, ["--steps=-1", "--num_images=0"]),
    (["--height=60"], 2, ["--height=60: must be a positive multiple of 8"]),
    (["IMAGE=notes.txt"], 2, ["notes.txt is not a readable image"]),
    (["IMAGE=cut.jpg"], 2, ["cut.jpg is not a readable image"]),
    (["IMAGE=missing.jpg"], 3, ["missing.jpg does not exist"]),
    (["--prompts_file=PHOTOS/face.jpg"], 2, ["face.jpg is not a UTF-8 text file"]),
    (["--out=/proc/cid_jax/out.png"], 2, ["--out=/proc/cid_jax cannot be written"]),
    (["--out=PHOTOS"], 2, ["is a folder; give the PNG file"]),
], ids=["nan_guidance", "zero_steps", "negative_steps", "height", "not_an_image", "truncated_jpeg", "missing",
        "binary_prompts", "unwritable_out", "out_is_a_folder"])
def test_bad_generation_input_is_one_line(trained, photos, flags, code, needles, capsys):
    """Each refused before any model is loaded (an unwritable --out too: not after the images are made)."""
    from cid_jax import generate

    image = next((f.split("=", 1)[1] for f in flags if f.startswith("IMAGE=")), "face.jpg")
    flags = [f.replace("PHOTOS", str(photos)) for f in flags if not f.startswith("IMAGE=")]
    rc = generate.main([f"--checkpoint={trained}", f"--image={photos / image}", "--prompt=a portrait", *flags])
    err = capsys.readouterr().err
    assert rc == code and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


# ------------------------------------------------------------------------------------- evaluation


@pytest.fixture
def scored_folder(photos, tmp_path):
    """--references (one identity) and --generated (a manifest.csv) folders, both well formed."""
    refs, generated = tmp_path / "refs", tmp_path / "generated"
    refs.mkdir()
    generated.mkdir()
    shutil.copy(photos / "face.jpg", refs / "astronaut.jpg")
    shutil.copy(photos / "face.jpg", generated / "0.jpg")
    (generated / "manifest.csv").write_text("image,reference,prompt,seed\n0.jpg,astronaut,a portrait,1\n")
    return refs, generated


@pytest.mark.parametrize("damage,code,needle", [
    ("out_is_a_file", 2, "is a file; give a folder"),
    ("manifest_without_image", 2, "manifest.csv has no image column"),
    ("seed_not_a_number", 2, "line 2: seed='abc' is not an integer"),
    ("binary_prompts", 2, "is not a UTF-8 text file"),
    ("bad_class_words", 2, "class_words.json is not valid JSON"),
])
def test_bad_evaluation_input_is_one_line(scored_folder, tmp_path, damage, code, needle, capsys):
    """Refused before any metric model is loaded or image scored; nothing written to --out."""
    from cid_jax import evaluate

    refs, generated = scored_folder
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a portrait\n")
    if damage == "out_is_a_file":
        out.write_text("taken")
    elif damage == "manifest_without_image":
        (generated / "manifest.csv").write_text("picture,reference\n0.jpg,astronaut\n")
    elif damage == "seed_not_a_number":
        (generated / "manifest.csv").write_text("image,reference,seed\n0.jpg,astronaut,abc\n")
    elif damage == "binary_prompts":
        prompts.write_bytes(bytes(range(128, 256)))
    elif damage == "bad_class_words":
        (refs / "class_words.json").write_text("{astronaut: woman")
    rc = evaluate.main([f"--generated={generated}", f"--references={refs}", f"--prompts={prompts}", f"--out={out}"])
    err = capsys.readouterr().err
    assert rc == code and "Traceback" not in err and needle in err, err
    assert not (out.is_dir() and any(out.iterdir()))


def test_metrics_json_is_valid_json_with_one_identity():
    from cid_jax import metrics, scoring

    result = {"clip_i": metrics.mean_and_interval({"astronaut": [0.5, 0.7]})}
    assert result["clip_i"]["ci95"][0] != result["clip_i"]["ci95"][0]  # NaN: an interval of one identity
    text = json.dumps(scoring.finite_or_null(result), allow_nan=False)
    assert json.loads(text)["clip_i"] == {"mean": 0.6, "ci95": [None, None], "identities": 1}


@pytest.mark.parametrize("error,code", [
    (OSError(28, "No space left on device", "/full/w.safetensors"), 2),
    (OSError(30, "Read-only file system", "/ro/out.png"), 2),
    (FileExistsError(17, "File exists", "/x"), 2),
    (FileNotFoundError(2, "No such file or directory", "/nowhere"), 3),
])
def test_every_os_error_is_one_line(error, code, capsys):
    def fail():
        raise error

    assert cli.guarded("tool", fail) == code
    err = capsys.readouterr().err
    assert f"tool: error: {error.strerror}: {error.filename}" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------- data


def test_data_tool_errors_are_one_line(tmp_path, capsys):
    from cid_jax.data import builder

    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        builder.main(["synthetic", f"--out={tmp_path}", "--num=0"])
    assert e.value.code == 2 and "--num must be at least 1" in capsys.readouterr().err
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "captions.jsonl").write_text("\n".join(json.dumps({"id": i, "vqa_llva": "a", "vqa_llva_more_face_detail": "b"})
                                                  for i in ("a", "b")))
    (src / "images" / "a.jpg").write_text("garbage")
    assert builder.main(["folder", f"--src={src}", f"--out={tmp_path / 'out'}", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "no record could be read" in err and "a: BadRecord: image: cannot decode" in err
    assert "b: BadRecord: image: missing file" in err and "Traceback" not in err


# ---------------------------------------------------------------------- quiet surprises


def test_several_faces_and_a_long_prompt_are_announced(caplog):
    import skimage.data

    from cid_jax import sampling as pl
    from cid_jax.face.arcface import ArcFaceEmbedder
    from cid_jax.text import CLIPTokenizer, add_trigger_tokens
    from tests.helpers import BIG, SMALL, StubDetector

    class Recognizer:
        def get(self, img, face):
            face.embedding = np.ones(512, np.float32)

    photo = skimage.data.astronaut()
    embedder = ArcFaceEmbedder.from_models(StubDetector([SMALL[0], BIG[0]], [SMALL[1], BIG[1]]), Recognizer())
    with caplog.at_level("INFO"):
        embedder.embed(photo)
        tok = CLIPTokenizer.default()
        add_trigger_tokens(tok)
        pl.text_batch("a portrait of a woman reading in a garden " * 8, "", tok, ["Face", "Nose"])
    text = caplog.text
    assert "2 faces in the photo; the identity comes from the largest one (box x 180..280, y 60..170)" in text
    assert "the text encoder reads 77: it is cut after" in text
