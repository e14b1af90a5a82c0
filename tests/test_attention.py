"""The CPU attention kernel (query-chunked, deferred normalisation) equals the fused kernel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cid_jax.models import attention


@pytest.mark.parametrize("lq,lk", [(1024, 1024), (4096, 77 * 16)])
def test_chunked_attention_equals_fused(rng, lq, lk):
    q = jnp.asarray(rng.standard_normal((2, lq, 4, 40)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, lk, 4, 40)), jnp.float32) for _ in range(2))
    ref = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(attention._chunked_attention(q, k, v, 128), ref, atol=2e-6)
    chunked = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, kernel="chunked"))
    np.testing.assert_allclose(chunked(q, k, v), ref, atol=2e-6)
    with pytest.raises(ValueError, match="kernel"):
        attention.dot_product_attention(q, k, v, kernel="flash9")


def test_kernel_is_a_module_field_jit_sees(rng):
    """The kernel is part of the module definition (no global state): two UNet attentions with
    different kernels trace different programs, and each equals XLA's attention."""
    from cid_jax.models.sites import AttentionSite

    site = AttentionSite("mid_block.attentions.0.transformer_blocks.0.attn1", False, 64, 64, 1, 64)
    x = jnp.asarray(rng.standard_normal((1, 1024, 64)), jnp.float32)
    outs = {}
    for kernel in ("fused", "chunked"):
        attn = attention.Attention(64, 1, 64, site=site, kernel=kernel)
        params = jax.jit(attn.init)(jax.random.key(0), x)
        fn = jax.jit(attn.apply)
        outs[kernel] = fn(params, x)
        hlo = fn.lower(params, x).as_text()
        assert ("while" in hlo) == (kernel == "chunked")  # lax.map over query blocks
    np.testing.assert_allclose(outs["chunked"], outs["fused"], atol=2e-6)


def test_auto_kernel_uses_xla_or_chunked_off_gpu(rng):
    """'auto' only tries cuDNN on a GPU; elsewhere bf16 attention is XLA's (or the chunked kernel)."""
    assert not attention.cudnn_attention_works(256, 77, 4, 40, "bfloat16")
    assert not attention._probe_cudnn_attention(128, 77, 2, 40, "bfloat16")  # refused, logged, no raise
    q, k, v = (jnp.asarray(rng.standard_normal((1, 256, 4, 40)), jnp.bfloat16) for _ in range(3))
    ref = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_array_equal(jax.jit(attention.dot_product_attention)(q, k, v), jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))(q, k, v))
    assert ref.dtype == jnp.bfloat16


def test_cpu_block_shrinks_with_batch_and_heads_and_divides_the_queries(rng):
    """The CPU kernel's query block keeps its logits block bounded as batch x heads grow (a fixed
    block made batched generation slower per image), divides the query count, and stays exact."""
    assert attention.cpu_chunk(2, 1024, 8, 1024) == 64
    assert attention.cpu_chunk(8, 1024, 8, 1024) == 64
    assert attention.cpu_chunk(8, 4096, 8, 4096) == 16
    assert attention.cpu_chunk(2, 1040, 8, 1040) == 16  # 1040 = 16 x 65
    assert attention.cpu_chunk(2, 1000, 8, 1000) == 0   # no power-of-two block divides it: XLA's kernel
    for b in (2, 8):
        q, k, v = (jnp.asarray(rng.standard_normal((b, 1024, 8, 8)), jnp.float32) for _ in range(3))
        out = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, kernel="chunked"))(q, k, v)
        np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=2e-6)
