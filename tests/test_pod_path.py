"""The pod path against a real GCS API (tests/gcs_emulator.py on 127.0.0.1): a run directory and a
dataset on `gs://`, one writer per run (the lease), coordinated preemption of several processes,
resuming on another number of processes, the readers of a remote run, and a store that fails.

The reference for every "equal" is one uninterrupted single-process run on local files; the
multi-process runs (launch/local_multiprocess.py: 2 processes x 4 CPU devices, the same 8-device
mesh) sum the gradient over processes in another order, so they match it to float32 rounding of a
few AdamW steps, not bit for bit (see `close`)."""
import json
import os
import signal
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")

from cid_jax import cli, export, paths, run, trainer  # noqa: E402
from tests import gcs_emulator  # noqa: E402
from tests.helpers import REPO, train_config  # noqa: E402

BUCKET = "cid-pod"
STEPS = 8  # saved every 2 steps: a preemption after step 4 still leaves steps to stop before the end
LEASE_TTL_S = 4  # subprocesses' lease: a killed run's lease goes stale within seconds


@pytest.fixture(scope="module")
def gcs():
    with gcs_emulator.running(BUCKET) as emu:
        yield emu


@pytest.fixture(scope="module")
def datasets(gcs, tmp_path_factory):
    """(local dataset, the same dataset uploaded to gs://)."""
    from cid_jax.data import builder

    local = builder.build_synthetic(tmp_path_factory.mktemp("fgid"), num=48, seed=3, size=64,
                                    progress=False).dataset_dir
    remote = f"gs://{BUCKET}/datasets/fgid"
    paths.copy_tree(local, remote)
    return local, remote


def config(data, steps=STEPS):
    c = train_config(data, steps)
    c.checkpoint.every_steps = 2
    c.train.image_every = 3
    return c


@pytest.fixture(scope="module")
def reference(datasets, tmp_path_factory):
    """One uninterrupted single-process run on local files: the trainable params every other run must reach."""
    local, _ = datasets
    return trainer.train(config(local), tmp_path_factory.mktemp("reference")).trainable


def close(params, want):
    """Equal up to the order of the cross-process gradient sum (float32): after a few AdamW steps of
    lr 1e-3 a rounding difference in a gradient moves a parameter by far less than 1e-5."""
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params, want)


def two_hosts(workdir, data, steps, wait=False):
    """launch/local_multiprocess.py: 2 processes x 4 CPU devices training `workdir` (the processes,
    or with `wait` their exit code)."""
    sys.path.insert(0, str(REPO / "launch"))
    import local_multiprocess

    env = dict(os.environ, CID_JAX_LEASE_TTL_S=str(LEASE_TTL_S))
    flags = [f"--config={REPO / 'tests' / 'train_test_config.py'}", "--config.checkpoint.every_steps=2",
             "--config.train.image_every=0", f"--workdir={workdir}", f"--config.data.path={data}",
             f"--config.train.num_steps={steps}"]
    if wait:
        return local_multiprocess.launch(2, 4, flags, env=env)
    return local_multiprocess.start(2, 4, flags, env=env)


def wait_for(predicate, timeout=600, what="condition"):
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def steps_saved(workdir) -> list[int]:
    ckpts = paths.path(workdir) / "checkpoints"
    if not ckpts.exists():
        return []
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


# ------------------------------------------------------------------------------------ one host


def test_a_run_and_its_data_on_gcs(gcs, datasets, reference, tmp_path, monkeypatch):
    """Workdir and dataset on gs://: the same params as on local files; every run-level file lands
    in the bucket (nothing in a local folder named `gs:`); the readers take the gs:// run."""
    _, remote = datasets
    monkeypatch.chdir(tmp_path)
    workdir = f"gs://{BUCKET}/runs/single"
    result = trainer.train(config(remote), workdir)
    jax.tree.map(np.testing.assert_array_equal, result.trainable, reference)  # same mesh, same data: bitwise
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())  # no local `gs:` folder

    root = paths.path(workdir)
    assert steps_saved(workdir) == [STEPS - 2, STEPS]  # keep=2 of every 2 steps
    assert json.loads((root / "config.json").read_text())["data"]["path"] == remote
    lines = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    assert list((root / "tensorboard").glob("events.out.tfevents.*"))
    assert (root / "loss_curves.png").exists() and list((root / "images").glob("attention_*.png"))
    assert (root / "frozen.safetensors").exists() and not (root / ".lock").exists()  # the lease is released

    # Readers: restore, export to gs://, generate from the gs:// run with a gs:// photo, to gs://.
    _, params, step = run.restore_trainable(run.RunDir(workdir))
    assert step == STEPS
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    out = f"gs://{BUCKET}/exports/single.safetensors"
    export.to_pytorch(workdir, out)
    from safetensors.numpy import load

    exported = load(paths.path(out).read_bytes())
    assert exported and all(np.isfinite(v).all() for v in exported.values())

    import skimage.data
    from PIL import Image

    from cid_jax import generate

    photo = f"gs://{BUCKET}/photos/astronaut.png"
    paths.write_atomic(photo, lambda tmp: Image.fromarray(skimage.data.astronaut()).save(tmp, format="PNG"))
    image_out = f"gs://{BUCKET}/images/out.png"
    assert generate.main([f"--checkpoint={workdir}", f"--image={photo}", "--prompt=a portrait", "--steps=2",
                          "--merge_step=1", "--height=64", "--width=64", f"--out={image_out}"]) == 0
    with paths.path(image_out).open("rb") as f:
        assert np.asarray(Image.open(f)).shape == (64, 64, 3)
    # evaluate: references and images read from the bucket, the report written to it.
    from cid_jax import evaluate

    paths.copy_file(photo, f"gs://{BUCKET}/eval/refs/astronaut.png")
    paths.copy_file(image_out, f"gs://{BUCKET}/eval/images/astronaut/p00_s1.png")
    assert evaluate.main([f"--generated=gs://{BUCKET}/eval/images", f"--references=gs://{BUCKET}/eval/refs",
                          f"--out=gs://{BUCKET}/eval/out"]) == 0
    assert "| method |" in (paths.path(f"gs://{BUCKET}/eval/out") / "report.md").read_text()
    assert json.loads((paths.path(f"gs://{BUCKET}/eval/out") / "metrics.json").read_text())["clip_i"] == {
        "skipped": "needs --clip_model"}


def test_one_writer_per_run_on_gcs(gcs, datasets, caplog):
    """A live lease refuses a second training command at once; a stale one is taken over, with a log line."""
    _, remote = datasets
    workdir = f"gs://{BUCKET}/runs/leased"
    lease = paths.path(workdir) / ".lock"
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_text(json.dumps(dict(holder="pid 1 on host-a", token="t", renewed=time.time(), ttl_s=300)))
    t0 = time.time()
    with pytest.raises(cli.BusyError, match="host-a"):
        trainer.train(config(remote, 1), workdir)
    assert time.time() - t0 < 30 and not (paths.path(workdir) / "checkpoints").exists()  # refused before any work

    lease.write_text(json.dumps(dict(holder="pid 1 on host-a", token="t", renewed=time.time() - 3600, ttl_s=300)))
    with caplog.at_level("WARNING"):
        assert trainer.train(config(remote, 1), workdir).step == 1
    assert "took over the lease of pid 1 on host-a" in caplog.text
    assert not lease.exists()


def test_store_errors_are_one_line(gcs, datasets, capsys):
    """404 (no bucket, no dataset) and 403 (a bucket the caller may not use): one line naming the
    flag, the path and the store's answer, before any work."""
    _, remote = datasets
    with pytest.raises(cli.InputError, match=r"gs://no-such-bucket-x/run cannot be written \(.*\)"):
        trainer.train(config(remote, 1), "gs://no-such-bucket-x/run")
    with pytest.raises(cli.MissingError, match="gs://cid-pod/nowhere"):
        trainer.validate(config(f"gs://{BUCKET}/nowhere"))

    gcs_emulator.FORBIDDEN_BUCKETS.add("cid-locked")
    try:
        with pytest.raises(cli.InputError, match=r"^--workdir=gs://cid-locked/run cannot be (read|written) \(.*Forbidden.*"
                                                 r"bucket cid-locked\.\)"):
            trainer.train(config(remote, 1), "gs://cid-locked/run")
        with pytest.raises(cli.InputError, match=r"^--config.data.path=gs://cid-locked/fgid cannot be read \(.*"
                                                 r"Forbidden"):
            trainer.validate(config("gs://cid-locked/fgid"))
        # A refusal outside those checks (here a weights file) still reaches the user as one line.
        assert cli.guarded("generate", lambda: paths.local_copy("gs://cid-locked/w.safetensors")) == cli.EXIT_USAGE
    finally:
        gcs_emulator.FORBIDDEN_BUCKETS.discard("cid-locked")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("generate: error: ") and "Forbidden" in err[0] and "cid-locked" in err[0], err
    assert len(err) == 2 and "--debug" in err[1], err


def test_the_store_going_away_mid_save_is_one_line_and_the_rerun_resumes(gcs, datasets, reference, monkeypatch):
    """The emulator stops as step 4 is saved: the run stops with one line naming the failed save and
    the last good step (2); nothing half-written is taken as a checkpoint; once the store is back a
    rerun resumes from step 2 and ends where the uninterrupted run ended."""
    _, remote = datasets
    workdir = f"gs://{BUCKET}/runs/outage"
    monkeypatch.setenv("CID_JAX_STORE_RETRIES", "1")  # fail in seconds, not tensorstore's quarter hour
    monkeypatch.setenv("CID_JAX_LEASE_TTL_S", str(LEASE_TTL_S))  # the lease it could not remove goes stale
    # gcsfs (the run's other files) retries 6 times, backing off 1 s, 2 s, ... 16 s, a fixed number:
    # the same tries, without their minute of waiting.
    import asyncio
    import types

    import gcsfs.retry

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=lambda s: asyncio.sleep(min(s, 0.05))))
    save = run.save

    def save_into_an_outage(manager, state, cfg, force=False):
        if int(state.step) == 4 and not force:
            gcs.stop()
        return save(manager, state, cfg, force=force)

    monkeypatch.setattr(run, "save", save_into_an_outage)
    t0 = time.time()
    try:
        with pytest.raises(trainer.SaveFailed, match=r"step 4 .*The last good checkpoint is step 2") as failure:
            trainer.train(config(remote), workdir)
    finally:
        gcs.start()
    assert "\n" not in str(failure.value) and time.time() - t0 < 300
    monkeypatch.setattr(run, "save", save)
    assert steps_saved(workdir)[-1] == 2  # step 4 was never committed
    time.sleep(LEASE_TTL_S + 1)
    resumed = trainer.train(config(remote), workdir)
    assert resumed.history[0]["step"] == 3 and resumed.step == STEPS
    jax.tree.map(np.testing.assert_array_equal, resumed.trainable, reference)


# ----------------------------------------------------------------------------------- many hosts


def test_one_host_continued_by_two_preempted_on_one_and_resumed_on_one(gcs, datasets, reference):
    """Resume on another slice both ways, with a coordinated preemption between: one process trains
    3 steps; two processes continue the run (1 -> 2); SIGTERM to process 1 only: both save the same
    step and exit 0; one process resumes it (2 -> 1) and ends where the uninterrupted run ended."""
    _, remote = datasets
    workdir = f"gs://{BUCKET}/runs/preempted"
    assert trainer.train(config(remote, 3), workdir).step == 3
    procs = two_hosts(workdir, remote, STEPS)
    try:
        wait_for(lambda: max(steps_saved(workdir), default=0) > 3, what="a checkpoint of the two processes")
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    saved = steps_saved(workdir)
    stopped = saved[-1]
    assert 4 <= stopped < STEPS, saved
    metrics = [json.loads(x)["step"] for x in (paths.path(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1] == stopped  # both stopped at the step they saved

    resumed = trainer.train(config(remote), workdir)  # one process, 8 devices
    assert resumed.history[0]["step"] == stopped + 1 and resumed.step == STEPS
    close(resumed.trainable, reference)


def test_two_hosts_killed_mid_run_and_rerun(gcs, datasets, reference):
    """kill -9 of both processes mid-run: the rerun (here by one process, once the killed run's
    lease is stale) resumes from the last complete step and ends as the uninterrupted run."""
    _, remote = datasets
    killed = f"gs://{BUCKET}/runs/killed"
    procs = two_hosts(killed, remote, STEPS)
    try:
        wait_for(lambda: steps_saved(killed), what="the first checkpoint")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert steps_saved(killed)[-1] < STEPS
    time.sleep(LEASE_TTL_S + 1)  # the killed run's lease goes stale
    resumed = trainer.train(config(remote), killed)
    assert resumed.step == STEPS
    close(resumed.trainable, reference)


def test_metric_models_from_gcs_equal_local(gcs, tmp_path):
    """A metric model folder on gs:// (here DINO, a transformers ViTModel) is copied into the local
    cache and gives the same embeddings as the same folder on disk, also after the remote folder was
    rewritten in place with other weights (the cache is keyed by the objects' versions, not the URL)."""
    import skimage.data
    import torch
    import transformers

    from cid_jax import metrics

    def save_model(seed, folder):
        torch.manual_seed(seed)
        transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64, image_size=64, patch_size=16),
                              add_pooling_layer=False).save_pretrained(folder)
        paths.copy_tree(folder, f"gs://{BUCKET}/models/dino")

    photo = skimage.data.astronaut()
    for seed in (0, 1):  # the second model overwrites the first at the same URL
        save_model(seed, tmp_path / f"dino{seed}")
        remote = metrics.load_metric_models(dino_model=f"gs://{BUCKET}/models/dino").dino
        local = metrics.load_metric_models(dino_model=str(tmp_path / f"dino{seed}")).dino
        np.testing.assert_array_equal(remote.embed(remote.preprocess(photo)[None]),
                                      local.embed(local.preprocess(photo)[None]))
    with pytest.raises(cli.MissingError, match="--dino_model=gs://cid-pod/models/none does not exist"):
        metrics.load_metric_models(dino_model=f"gs://{BUCKET}/models/none")


def test_a_remote_file_is_copied_once_per_version(gcs):
    """`local_copy` reuses its copy while the object is unchanged, fetches a rewrite of the same size,
    and redoes a copy that a killed process left incomplete."""
    url = f"gs://{BUCKET}/cache-test/weights.bin"
    paths.path(url).write_bytes(b"one")
    first = paths.local_copy(url)
    assert first.read_bytes() == b"one" and paths.local_copy(url) == first
    paths.path(url).write_bytes(b"two")
    second = paths.local_copy(url)
    assert second.read_bytes() == b"two" and not first.exists()  # the old version's copy is removed
    (second.parent / ".complete").unlink()
    second.write_bytes(b"tw")  # as a killed copy leaves it
    assert paths.local_copy(url).read_bytes() == b"two"
