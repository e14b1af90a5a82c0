"""Test environment: 8 simulated CPU devices, offline hubs, a persistent compile cache.

Everything here must run before jax (or diffusers/transformers) is imported anywhere.
"""
import os
import pathlib
import sys

# The tests' tiny models run a few steps each, so most of the suite's time is XLA compiling for the
# CPU. Without LLVM's optimisations the demo train step compiles in ~0.7x the time and runs ~2x
# slower, which a few steps do not notice (measured, 2-core CI machine). The operations are the same
# (fused multiply-adds may round differently in the last bit, as on another CPU); a user's own
# XLA_FLAGS replace these.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("USE_TF", "0")  # keep transformers from importing TensorFlow
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # the GCS emulator has no storage-control API
_REPO = pathlib.Path(__file__).resolve().parent.parent
# `configs.*` and `tests.*` import from the repo root; subprocesses inherit it via PYTHONPATH.
sys.path.insert(0, str(_REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))
# Remote inputs are copied into a cache of this test session's own, never the user's ~/.cache.
import tempfile  # noqa: E402

os.environ["CID_JAX_REMOTE_CACHE"] = tempfile.mkdtemp(prefix="cid_jax-test-remote-cache-")
_CACHE = _REPO / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("CID_JAX_COMPILATION_CACHE", str(_CACHE))  # the entry points' cache (cid_jax.runtime)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests (still run in CI)")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory):
    """A run directory as training leaves it: config.json and an exported safetensors of random
    trainable params. (The preset's frozen weights come from the run's "frozen" stream.)"""
    from cid_jax import build as build_lib
    from tests.helpers import abstract_trainable, export_trainable, inference_demo_config, random_params

    config = inference_demo_config()
    workdir = tmp_path_factory.mktemp("demo_run")
    (workdir / "config.json").write_text(config.to_json())
    model = build_lib.build_modules(config)
    trainable = random_params(abstract_trainable(model), seed=7)
    export_trainable(trainable, config, workdir / "consistentid.safetensors")
    return workdir, trainable


# The longest test files, longest first (from CI's --durations). Two xdist workers take whole files in
# collection order, so starting these first keeps one long file from running alone at the end.
LONGEST_FIRST = ("test_pod_path.py", "test_fast_start.py", "test_reliability.py", "test_finetune_and_evaluate.py",
                 "test_train.py", "test_serving.py", "test_aot.py", "test_people.py", "test_generate_parity.py",
                 "test_train_step.py", "test_consistentid_weights.py", "test_generate_sdxl.py", "test_app.py",
                 "test_generate.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
