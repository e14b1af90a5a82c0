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
