"""Flax msgpack checkpoints (diffusers-Flax / transformers-Flax format) into our param trees."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from cid_jax.models.vae import AutoencoderKL, VAEConfig, abstract_vae_params
from cid_jax.weights.flax_msgpack import load_msgpack_into, read_msgpack, write_msgpack_atomic
from cid_jax.weights.state_dict import WeightsError

TINY = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32)


@pytest.fixture(scope="module")
def abstract():
    return abstract_vae_params(AutoencoderKL(TINY))


@pytest.fixture(scope="module")
def params(abstract):
    """Random values of the model's shapes (every leaf distinct, so a swapped leaf cannot pass)."""
    rng = np.random.default_rng(0)
    return _map(lambda v: rng.normal(size=v.shape).astype(np.float32), abstract)


def _map(fn, tree):
    return traverse_util.unflatten_dict({k: fn(v) for k, v in traverse_util.flatten_dict(tree).items()})


def _write(tree, path):
    """The format as diffusers-Flax's save_pretrained writes it: msgpack_serialize of the dict."""
    path.write_bytes(serialization.msgpack_serialize(tree))
    return path


def _assert_trees_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))


def test_round_trip_exact(abstract, params, tmp_path):
    path = _write(params, tmp_path / "diffusion_flax_model.msgpack")
    loaded = load_msgpack_into(abstract, path, what="tiny VAE")
    _assert_trees_equal(loaded, params)
    assert all(v.dtype == np.float32 for v in traverse_util.flatten_dict(loaded).values())


def test_params_wrapper_bf16_and_our_writer(abstract, params, tmp_path):
    """A {'params': ...} wrapper is removed; bf16 files widen exactly; our writer reads back."""
    bf16 = _map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)), params)
    path = _write({"params": bf16}, tmp_path / "flax_model.msgpack")
    loaded = load_msgpack_into(abstract, path, what="bf16")
    _assert_trees_equal(loaded, _map(lambda x: np.asarray(x, np.float32), bf16))
    ours = tmp_path / "ours.msgpack"
    write_msgpack_atomic(params, ours)
    _assert_trees_equal(read_msgpack(ours), params)
    assert not list(tmp_path.glob(".*.tmp"))


def test_rename_table_and_function(abstract, params, tmp_path):
    flat = traverse_util.flatten_dict(params)
    old = traverse_util.unflatten_dict({tuple("proj_attn" if p == "to_out_0" else p for p in k): v
                                        for k, v in flat.items()})
    path = _write(old, tmp_path / "old.msgpack")
    with pytest.raises(WeightsError, match="proj_attn"):
        load_msgpack_into(abstract, path, what="old names")
    _assert_trees_equal(load_msgpack_into(abstract, path, what="t", rename={"proj_attn": "to_out_0"}),
                        params)
    fn = lambda p: tuple("to_out_0" if x == "proj_attn" else x for x in p)  # noqa: E731
    _assert_trees_equal(load_msgpack_into(abstract, path, what="f", rename=fn), params)


def test_errors_name_missing_unexpected_and_misshaped(abstract, params, tmp_path):
    flat = dict(traverse_util.flatten_dict(params))
    del flat[("encoder", "conv_in", "bias")]
    flat[("decoder", "conv_out", "kernel")] = np.zeros((3, 3, 32, 5), np.float32)
    flat[("decoder", "extra", "kernel")] = np.zeros((2,), np.float32)
    path = _write(traverse_util.unflatten_dict(flat), tmp_path / "bad.msgpack")
    with pytest.raises(WeightsError) as e:
        load_msgpack_into(abstract, path, what="broken VAE")
    msg = str(e.value)
    assert "broken VAE" in msg
    assert "1 missing path(s): encoder/conv_in/bias" in msg
    assert "decoder/conv_out/kernel: checkpoint (3, 3, 32, 5) vs model (3, 3, 32, 3)" in msg
    assert "1 unexpected path(s): decoder/extra/kernel" in msg
    with pytest.raises(FileNotFoundError):
        load_msgpack_into(abstract, tmp_path / "nope.msgpack", what="x")
