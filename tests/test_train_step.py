"""The jitted train step: sharded over ('data','fsdp') = (4, 2) it equals the 1-device step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cid_jax import build as build_lib
from cid_jax import sharding, trainer
from cid_jax.data.batch import spec_for_config
from tests.helpers import small_train_config as tiny_config


def random_batch(config, seed=0):
    r = np.random.default_rng(seed)
    spec = spec_for_config(config)
    out = {}
    for k, s in spec.items():
        if s.dtype == bool:
            out[k] = r.uniform(size=s.shape) < 0.5
        elif np.issubdtype(s.dtype, np.integer):
            out[k] = r.integers(1, 70, size=s.shape).astype(s.dtype)
        else:
            out[k] = r.uniform(-1, 1, size=s.shape).astype(s.dtype)
    out["facial_masks"] = (out["facial_masks"] > 0.3).astype(np.float32)
    out["facial_token_idx_mask"] = np.ones_like(out["facial_token_idx_mask"])
    return out


def run_one_step(config, mesh, model, frozen, trainable, batch):
    tx = trainer.make_optimizer(config)
    placement = trainer.make_placement(model, tx, mesh)
    state, frozen = trainer.place(trainable, frozen, tx, placement)
    gb = trainer.global_batch(batch, placement)
    step = trainer.jit_train_step(model, tx, config, placement, {k: v.ndim for k, v in gb.items()})
    state, metrics = step(state, frozen, gb, jax.random.key(7))
    return jax.device_get(state.params), jax.device_get(metrics), state


@pytest.mark.slow
def test_sharded_step_equals_single_device_step():
    config = tiny_config()
    model, frozen, trainable = build_lib.build(config)
    batch = random_batch(config)
    one = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    eight = sharding.make_mesh(4, 2)
    p1, m1, _ = run_one_step(config, one, model, frozen, trainable, batch)
    p8, m8, state8 = run_one_step(config, eight, model, frozen, trainable, batch)
    # The trainable tree really is sharded over fsdp somewhere.
    specs = [x.sharding.spec for x in jax.tree.leaves(state8.params)]
    assert any("fsdp" in str(s) for s in specs)
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=k)
    # Adam's first update is ~lr * g / (|g| + eps): where |g| is near eps (1e-8) the reduction order
    # of the sharded sums alone can move it by up to a whole step (lr). So: every parameter within
    # two steps, and all but a handful (< 1e-4 of them) within a fifth of a step.
    lr = config.optim.lr
    diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1))])
    assert diffs.max() <= 2 * lr, diffs.max()
    assert np.mean(diffs > 0.2 * lr) < 1e-4, np.sort(diffs)[-10:]
    assert np.isfinite(m1["loss"]) and m1["facial_loss"] != 0.0


def test_frozen_weights_stored_in_the_compute_dtype_change_nothing():
    """bf16 compute: frozen weights stored bf16 (the default) give the fp32-stored step's results,
    since every layer casts its weights to the compute dtype anyway; they take half the memory."""
    config = tiny_config()
    config.model.dtype = "bfloat16"
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    results = {}
    for storage in ("float32", ""):
        config.model.frozen_dtype = storage
        model, frozen, trainable = build_lib.build(config)
        leaves = jax.tree.leaves(frozen)
        assert {x.dtype for x in leaves} == {jnp.dtype(storage or "bfloat16")}
        results[storage] = run_one_step(config, mesh, model, frozen, trainable, random_batch(config))
    (p32, m32, _), (p16, m16, _) = results["float32"], results[""]
    assert np.isfinite(m32["loss"]) and m16["loss"] == pytest.approx(m32["loss"], rel=1e-6, abs=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p16, p32)
    config.model.frozen_dtype = "float8"
    with pytest.raises(ValueError, match="frozen_dtype"):
        trainer.validate(config)
