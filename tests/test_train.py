"""End-to-end training on the demo architecture: loss falls, checkpoints, export, exact resume,
SIGTERM. (Several processes, preemption across them and resuming on another number of processes:
tests/test_pod_path.py.)"""
import os
import signal

import jax
import numpy as np
import pytest

from cid_jax import export, run, trainer
from tests.helpers import train_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from cid_jax.data import builder

    report = builder.build_synthetic(tmp_path_factory.mktemp("fgid"), num=48, seed=3, size=64,
                                     progress=False)
    return report.dataset_dir


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run_full")
    config = train_config(dataset, 20)
    return config, trainer.train(config, workdir)


@pytest.mark.slow
def test_demo_architecture_trains_end_to_end(full_run):
    config, result = full_run
    hist = result.history
    assert [h["step"] for h in hist] == list(range(1, 21))
    loss = np.array([h["loss"] for h in hist])
    facial = np.array([h["facial_loss"] for h in hist])
    assert np.all(np.isfinite(loss))
    assert loss[-5:].mean() < loss[:5].mean(), loss
    assert facial[-5:].mean() < facial[:5].mean(), facial
    wd = result.workdir
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())[-1] == 20
    assert (wd / "loss_curves.png").exists() and list((wd / "images").glob("attention_*.png"))
    assert list((wd / "tensorboard").iterdir())
    # Export at the end of a run, read back by the reference-layout loader.
    paths = export.export_run(config, result.trainable, run.RunDir(wd), result.step)
    for p in paths:
        assert p.exists() and os.path.getsize(p) > 0
    restored_config, params, step = run.restore_trainable(run.RunDir(wd))
    assert step == 20 and restored_config.train.num_steps == 20
    jax.tree.map(np.testing.assert_array_equal, params, result.trainable)


@pytest.mark.slow
def test_interrupted_run_resumes_bitwise(full_run, dataset, tmp_path):
    _, uninterrupted = full_run
    first = trainer.train(train_config(dataset, 10), tmp_path)      # "killed" after step 10
    assert first.step == 10
    resumed = trainer.train(train_config(dataset, 20), tmp_path)    # same command, longer
    assert resumed.history[0]["step"] == 11
    jax.tree.map(np.testing.assert_array_equal, resumed.trainable, uninterrupted.trainable)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(dataset, tmp_path):
    config = train_config(dataset, 20)
    source = trainer.input_batches(config, run.RunDir(tmp_path))

    def batches(start):
        for i, b in enumerate(source(start)):
            if i == 7:  # a preemption notice arrives while step 7 is being fetched
                os.kill(os.getpid(), signal.SIGTERM)
            yield b

    result = trainer.train(config, tmp_path, batches)
    assert result.preempted and 7 <= result.step < 20
    _, params, step = run.restore_trainable(run.RunDir(tmp_path))
    assert step == result.step
    jax.tree.map(np.testing.assert_array_equal, params, result.trainable)
