"""Fast start at full size: building the SD1.5 architecture with random weights compiles no model
forward (host-side init from the abstract shapes), the host init gives the tree, shapes, dtypes and
shardings flax's jitted init gives, and the remat modes change memory, not the step's result."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cid_jax import build as build_lib
from cid_jax import runtime, run as run_lib, sharding
from cid_jax.models.init import random_params
from tests.helpers import small_train_config
from tests.test_train_step import random_batch, run_one_step


def _at(tree, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def test_sd15_architecture_builds_without_compiling_a_model_forward():
    """The real SD1.5 + CLIP-H sizes, random, as the benchmarks and AOT need them: the frozen tree
    (bf16, ~3.5 GB of host memory) and the trainable one, whose to_k_ip/to_v_ip are copies of the
    base weights. Counted by jax.monitoring: not one program compiled."""
    config = small_train_config()
    config.model.preset = "sd15"
    config.model.facial_encoder = {}  # the reference's FacialEncoder
    config.model.lora_rank = 128
    config.model.dtype = "bfloat16"
    with runtime.CompileStats() as stats:
        model = build_lib.build_modules(config)
        frozen = build_lib.random_frozen(model, build_lib.stream_seed(config, "frozen"), dtype=jnp.bfloat16)
        trainable = run_lib.initial_trainable(model, config, frozen["unet"])
    assert stats.requested == 0, stats
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    assert 1.5e9 < n_frozen < 2.0e9 and 1.5e8 < n_trainable < 2.5e8, (n_frozen, n_trainable)
    site = "down_blocks_0/attentions_0/transformer_blocks_0/attn2"
    for name in ("to_k", "to_v"):
        np.testing.assert_array_equal(
            np.asarray(_at(trainable["adapter_modules"], f"{site}/processor/{name}_ip/kernel"), np.float32),
            np.asarray(_at(frozen["unet"], f"{site}/{name}/kernel"), np.float32))


def test_host_init_matches_flax_init_in_tree_shapes_dtypes_and_shardings():
    """Against what construction did before: flax's module inits, jitted onto the shardings."""
    model = build_lib.build_modules(small_train_config())
    mesh = sharding.make_mesh(4, 2)
    for flax_init, abstract, dtype in (
            (build_lib.flax_init_frozen(model), build_lib.abstract_frozen(model), None),
            (build_lib.flax_init_trainable(model), build_lib.abstract_trainable(model), jnp.float32)):
        shardings = sharding.param_shardings(abstract, mesh)
        host = random_params(abstract, 0, dtype=dtype, shardings=shardings)
        flax_values = jax.jit(lambda key: nn.meta.unbox(flax_init(key)), out_shardings=shardings)(jax.random.key(0))
        assert jax.tree.structure(host) == jax.tree.structure(flax_values)
        for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(flax_values)):
            assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)
        assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(host))


@pytest.fixture(scope="module")
def no_remat_step():
    config = small_train_config()
    model, frozen, trainable = build_lib.build(config)
    batch = random_batch(config)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    return config, frozen, trainable, batch, mesh, run_one_step(config, mesh, model, frozen, trainable, batch)


@pytest.mark.parametrize("mode", ["attention", "full"])
def test_remat_modes_give_the_same_step(mode, no_remat_step):
    """Recomputing activations in the backward pass changes memory, not the arithmetic: loss and
    updates equal to the no-remat step up to XLA's re-association of the recomputed ops (Adam's
    first update is ~lr * sign(g), so a parameter may move by up to 2 lr where |g| ~ eps)."""
    config, frozen, trainable, batch, mesh, (p0, m0, _) = no_remat_step
    config = config.copy_and_resolve_references()
    config.model.remat = mode
    p1, m1, _ = run_one_step(config, mesh, build_lib.build_modules(config), frozen, trainable, batch)
    for k in ("loss", "noise_loss", "facial_loss", "grad_norm"):
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, atol=1e-7, err_msg=k)
    lr = config.optim.lr
    diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0))])
    assert diffs.max() <= 2 * lr and np.mean(diffs > 0.2 * lr) < 1e-4


def test_large_random_frozen_weights_are_redrawn_not_stored(tmp_path, monkeypatch):
    """A preset run stores its random frozen weights for generation; past the size limit (a full-size
    architecture: gigabytes to write) it stores nothing, and drawing them again gives the same values."""
    config = small_train_config()
    model = build_lib.build_modules(config)
    small = run_lib.RunDir.of(tmp_path / "small")
    small.root.mkdir(parents=True)
    stored = run_lib.frozen_weights(model, config, small)
    assert small.frozen_file.exists()
    monkeypatch.setattr(run_lib, "STORE_RANDOM_FROZEN_MAX_BYTES", 0)
    large = run_lib.RunDir.of(tmp_path / "large")
    large.root.mkdir(parents=True)
    first = run_lib.frozen_weights(model, config, large)
    assert not large.frozen_file.exists()
    again = run_lib.frozen_weights(model, config, large)
    for a, b, c in zip(jax.tree.leaves(stored), jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, c)
