"""Sharding: the tiny SD1.5-shaped UNet on a ('data','fsdp') mesh of 8 simulated CPU devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from cid_jax import sharding
from cid_jax.models.init import random_params
from cid_jax.models import presets
from cid_jax.models.unet import UNet2DConditionModel, UNetConfig, abstract_unet_params

TINY = UNetConfig.from_dict(presets.get("tiny-sd15")["unet"])


def test_param_partition_specs_follow_the_rules():
    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh(data=4, fsdp=2)
    model = UNet2DConditionModel(TINY)
    shardings = traverse_util.flatten_dict(
        sharding.param_shardings(abstract_unet_params(model, boxed=True), mesh))
    spec = lambda *path: shardings[path].spec  # noqa: E731
    attn = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2")
    assert spec(*attn, "to_q", "kernel") == P("fsdp", None)          # (embed, heads)
    assert spec(*attn, "to_out_0", "kernel") == P(None, "fsdp")      # (heads, embed)
    assert spec("conv_in", "kernel") == P(None, None, None, "fsdp")  # HWIO: output channels
    assert spec(*attn[:3], "ff", "net_0", "proj", "kernel") == P("fsdp", None)
    assert spec("conv_out", "kernel") == P(None, None, None, "fsdp")  # 4 outputs over fsdp=2
    assert all(a is None for a in spec("conv_in", "bias"))           # unannotated: replicated
    # A dimension the fsdp axis does not divide stays replicated instead of failing.
    wide = sharding.param_shardings(abstract_unet_params(model, boxed=True),
                                    sharding.make_mesh(data=1, fsdp=8))
    assert wide["conv_out"]["kernel"].spec == P(None, None, None, None)  # 4 outputs, fsdp=8
    assert wide["conv_in"]["kernel"].spec == P(None, None, None, "fsdp")  # 32 outputs


def test_sharded_forward_equals_unsharded(rng):
    mesh = sharding.make_mesh(data=4, fsdp=2)
    model = UNet2DConditionModel(TINY)
    x = jnp.asarray(rng.standard_normal((8, 16, 16, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((8, 7, TINY.cross_attention_dim)), jnp.float32)
    t = jnp.arange(8) * 100
    params = random_params(abstract_unet_params(model), seed=1)  # no jitted init to compile
    expected = jax.jit(model.apply)({"params": params}, x, t, ctx)

    p_sh = sharding.param_shardings(abstract_unet_params(model, boxed=True), mesh)
    params_sharded = jax.device_put(params, p_sh)
    batch = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in (x, t, ctx)]
    fwd = jax.jit(lambda p, *b: model.apply({"params": p}, *b),
                  in_shardings=(p_sh, *[b.sharding for b in batch]),
                  out_shardings=sharding.batch_sharding(mesh, 4))
    out = fwd(params_sharded, *batch)
    assert out.sharding.spec == P(("data", "fsdp"), None, None, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_checkpoints_of_small_and_large_replicated_arrays_restore_exactly(tmp_path, monkeypatch):
    """The run's checkpoint manager writes a replicated array whose per-replica slice would be under
    `REPLICA_PARALLEL_MIN_BYTES` whole, from one device, and a larger one in a slice per replica
    (orbax's replica-parallel save); both, and an fsdp-sharded array, restore bit for bit onto their
    shardings."""
    import collections

    import ml_collections
    from orbax.checkpoint._src.serialization import replica_slices

    from cid_jax import run as run_lib

    mesh = sharding.make_mesh(data=4, fsdp=2)
    replicated = jax.sharding.NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    rows = 8 * 2 * run_lib.REPLICA_PARALLEL_MIN_BYTES // (4 * 64)  # 8 replicas of twice the floor
    values = dict(big=rng.standard_normal((rows, 64), dtype=np.float32),
                  small=rng.standard_normal((8, 16), dtype=np.float32),
                  sharded=rng.standard_normal((64, 32), dtype=np.float32))
    shardings = dict(big=replicated, small=replicated, sharded=jax.sharding.NamedSharding(mesh, P("fsdp", None)))
    State = collections.namedtuple("State", "step params")
    state = State(step=jax.device_put(np.int32(3), replicated),
                  params={k: jax.device_put(v, shardings[k]) for k, v in values.items()})

    written = {}  # global shape -> the slices this process writes
    pick = replica_slices.get_replica_slices

    def spy(arr, *args, **kwargs):
        result = pick(arr, *args, **kwargs)
        written[tuple(arr.shape)] = len(result.replica_slices)
        return result

    monkeypatch.setattr(replica_slices, "get_replica_slices", spy)
    config = ml_collections.ConfigDict(dict(seed=0, checkpoint=dict(every_steps=1, keep=1, async_save=False)))
    run = run_lib.RunDir.of(tmp_path / "run")
    manager = run_lib.checkpoint_manager(run, config)
    assert run_lib.save(manager, state, config, force=True)
    manager.wait_until_finished()
    assert written[values["big"].shape] == 8 and written[values["small"].shape] == 1, written
    assert written[values["sharded"].shape] == 2  # one per fsdp shard (each held by 4 replicas)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    restored, meta = run_lib.restore(run_lib.checkpoint_manager(run, read_only=True), 3, abstract)
    assert meta["step"] == 3
    for k, v in values.items():
        assert restored.params[k].sharding == shardings[k]
        np.testing.assert_array_equal(np.asarray(restored.params[k]), v)
