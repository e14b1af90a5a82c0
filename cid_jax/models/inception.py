"""The FID Inception-v3 (pytorch-fid's `InceptionV3(use_fid_inception=True)`) in Flax linen, NHWC.

FID and KID compare the 2048-d average-pooled activations after Mixed_7c of the TF-slim
Inception-v3 of 2015-12-05, as ported to PyTorch by pytorch-fid (`pt_inception-2015-12-05-6726825d.pth`).
The network is torchvision's `Inception3` layout built with `num_classes=1008, aux_logits=False`,
with pytorch-fid's FID blocks, which reproduce the TF graph's pooling:

    Conv2d_1a_3x3 (3->32, /2) -> Conv2d_2a_3x3 (32) -> Conv2d_2b_3x3 (64, pad 1) -> maxpool 3/2
    Conv2d_3b_1x1 (80) -> Conv2d_4a_3x3 (192) -> maxpool 3/2                        (35x35x192)
    Mixed_5b/5c/5d  FIDInceptionA(pool_features 32, 64, 64)                       (35x35x256/288/288)
    Mixed_6a        InceptionB                                                     (17x17x768)
    Mixed_6b..6e    FIDInceptionC(channels_7x7 128, 160, 160, 192)                 (17x17x768)
    Mixed_7a        InceptionD                                                     (8x8x1280)
    Mixed_7b        FIDInceptionE_1: pool branch = average pool, padding not counted (8x8x2048)
    Mixed_7c        FIDInceptionE_2: pool branch = max pool 3x3, stride 1, pad 1    (8x8x2048)
    global average pool -> [B, 2048]  (the FID features);  fc -> [B, 1008] logits (not used by FID)

Every conv is torchvision's BasicConv2d: conv without bias -> BatchNorm(eps=0.001) -> ReLU. The
pooling branches of the A, C and E_1 blocks are 3x3/1 average pools with padding 1 that divide by
the number of *real* pixels in the window (`count_include_pad=False`: TF's SAME average pool);
torchvision's InceptionB/D keep their stride-2 max pools without padding. Max pools pad with -inf,
as torch does. Padding everywhere is torch's explicit symmetric padding, never 'SAME'.

Input: `fid_preprocess` is pytorch-fid's input path as a separate pure function: RGB in [0, 1]
(or uint8, divided by 255 as torchvision's ToTensor does) -> bilinear resize to 299x299 with
`align_corners=False` -> 2x - 1. The module itself takes the preprocessed [B, 299, 299, 3].
`pool_features(params, images)` is the whole pipeline.

BatchNorm runs in inference mode as a fixed affine map of the running statistics, which are kept
as *params* (`FrozenBatchNorm`: `scale` = bn.weight, `bias` = bn.bias, `mean` = running_mean,
`var` = running_var), so the model is applied with a single `{'params': params}` tree and no mutable
collections. `num_batches_tracked` carries no information at inference and has no counterpart.

Parameter names are the checkpoint's module names (`Mixed_6b/branch7x7_2/conv/kernel`,
`Mixed_6b/branch7x7_2/bn/var`, `fc/kernel`); cid_jax.weights.inception maps them onto the
PyTorch keys (`Mixed_6b.branch7x7_2.conv.weight`, `...bn.running_var`, `fc.weight`).

Precision: `param_dtype` is the storage dtype of the parameters (fp32), `dtype` the compute dtype
of the convs; BatchNorm, pooling and the final average are computed in fp32. Sharding: conv and fc
kernels carry the logical names of `cid_jax.sharding` (`conv_init` / `dense_init`), so `model.init`
returns boxed leaves; `abstract_params(model, boxed=False)` gives the plain tree the loader fills.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cid_jax.models.layers import FrozenBatchNorm
from cid_jax.sharding import conv_init, dense_init

Dtype = Any

FID_SIZE = 299            # pytorch-fid resizes every image to 299x299
BN_EPS = 0.001            # torchvision's BasicConv2d (the TF graph's epsilon)
FEATURES = 2048           # the pool features FID and KID use
NUM_CLASSES = 1008        # the TF graph's classifier width (1000 ImageNet classes + 8 unused)

# ------------------------------------------------------------------------------------ preprocess

_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)  # torchvision's ToTensor


def fid_preprocess(images: jax.Array) -> jax.Array:
    """pytorch-fid's input path: [B, H, W, 3] RGB -> [B, 299, 299, 3] float32 in [-1, 1].

    uint8 images are divided by 255 (torchvision's ToTensor, which pytorch-fid's loader applies);
    float images are taken to be in [0, 1] already. Then `F.interpolate(size=(299, 299),
    mode='bilinear', align_corners=False)` and `2x - 1`, in that order, as pytorch-fid does.

    The resize is `jax.image.resize(method='linear', antialias=False)`: half-pixel centres
    (`src = (dst + 0.5) * in / out - 0.5`), two taps per axis, edges clamped — torch's
    align_corners=False rule, for upsampling and downsampling alike. jax's default antialias=True
    widens the kernel when downsampling, which torch's bilinear (antialias=False) does not do.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images [B, H, W, 3], got shape {images.shape}")
    if images.dtype == jnp.uint8:
        # A table of the 256 correctly rounded quotients: XLA's CPU `x / 255` comes out 1 ulp off
        # torch's `div(255)` for 126 of them (measured; a multiply by the reciprocal, presumably).
        x = jnp.asarray(_UINT8_TO_UNIT)[images]
    else:
        x = images.astype(jnp.float32)
    b = x.shape[0]
    if x.shape[1:3] != (FID_SIZE, FID_SIZE):  # torch's interpolate to the same size is the identity
        x = jax.image.resize(x, (b, FID_SIZE, FID_SIZE, 3), method="linear", antialias=False,
                             precision=jax.lax.Precision.HIGHEST)
    return 2.0 * x - 1.0


# ---------------------------------------------------------------------------------------- pooling


def _pads(padding: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((padding, padding), (padding, padding))


def max_pool_3x3(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """torch `F.max_pool2d(x, 3, stride, padding)` (floor mode): the padding is -inf, never chosen."""
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=_pads(padding))


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """torch `F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)`, in fp32.

    Each output is the mean over the window's pixels inside the image (4 at a corner, 6 on an
    edge, 9 inside): the FID blocks' patch for TF's SAME average pool.
    """
    y = nn.avg_pool(x.astype(jnp.float32), (3, 3), strides=(1, 1), padding=_pads(1),
                    count_include_pad=False)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------- layers


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> FrozenBatchNorm -> ReLU; names `conv`, `bn`.

    `kernel`, `stride`, `padding` are (h, w) pairs as in torch (`kernel=(1, 7), padding=(0, 3)`
    is the 1x7 conv of the 17x17 blocks); the padding is symmetric, as torch's.
    """
    features: int
    kernel: Sequence[int] = (1, 1)
    stride: int = 1
    padding: Sequence[int] = (0, 0)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, tuple(self.kernel), strides=(self.stride, self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=conv_init(), name="conv")(x)
        x = FrozenBatchNorm(BN_EPS, dtype=jnp.float32, param_dtype=self.param_dtype, name="bn")(x)
        return nn.relu(x).astype(self.dtype)


def _square(k: int) -> tuple[int, int]:
    return (k, k)


class _Block(nn.Module):
    """Shared plumbing: `self.conv(name, features, kernel, ...)` builds a named BasicConv2d."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def conv(self, name: str, features: int, kernel=(1, 1), *, stride: int = 1, padding=(0, 0)):
        kernel = _square(kernel) if isinstance(kernel, int) else kernel
        padding = _square(padding) if isinstance(padding, int) else padding
        return BasicConv2d(features, kernel, stride, padding, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=name)


class FIDInceptionA(_Block):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(no pad count)-1x1."""
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 64)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48)(x))
        b3 = self.conv("branch3x3dbl_1", 64)(x)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
        bp = self.conv("branch_pool", self.pool_features)(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3/2 (torchvision's, unchanged)."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
        bd = self.conv("branch3x3dbl_1", 64)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
        bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
        return jnp.concatenate([b3, bd, max_pool_3x3(x, stride=2)], axis=-1)


class FIDInceptionC(_Block):
    """17x17 block (Mixed_6b-e) with 7x7 convs factorised into 1x7 and 7x1; 4 x 192 channels."""
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = self.conv("branch1x1", 192)(x)
        b7 = self.conv("branch7x7_1", c7)(x)
        b7 = self.conv("branch7x7_2", c7, **row)(b7)
        b7 = self.conv("branch7x7_3", 192, **col)(b7)
        bd = self.conv("branch7x7dbl_1", c7)(x)
        bd = self.conv("branch7x7dbl_2", c7, **col)(bd)
        bd = self.conv("branch7x7dbl_3", c7, **row)(bd)
        bd = self.conv("branch7x7dbl_4", c7, **col)(bd)
        bd = self.conv("branch7x7dbl_5", 192, **row)(bd)
        bp = self.conv("branch_pool", 192)(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3/2 (torchvision's)."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_2", 320, 3, stride=2)(self.conv("branch3x3_1", 192)(x))
        b7 = self.conv("branch7x7x3_1", 192)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
        return jnp.concatenate([b3, b7, max_pool_3x3(x, stride=2)], axis=-1)


class FIDInceptionE(_Block):
    """8x8 block (Mixed_7b/7c): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1 -> 2048.

    pool='avg' is FIDInceptionE_1 (Mixed_7b: 3x3/1 average pool, padding not counted);
    pool='max' is FIDInceptionE_2 (Mixed_7c: 3x3/1 max pool, padding 1).
    """
    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = self.conv("branch1x1", 320)(x)
        s = self.conv("branch3x3_1", 384)(x)
        b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, **row)(s),
                              self.conv("branch3x3_2b", 384, **col)(s)], axis=-1)
        d = self.conv("branch3x3dbl_1", 448)(x)
        d = self.conv("branch3x3dbl_2", 384, 3, padding=1)(d)
        bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, **row)(d),
                              self.conv("branch3x3dbl_3b", 384, **col)(d)], axis=-1)
        if self.pool == "avg":
            pooled = avg_pool_3x3_exclude_pad(x)
        elif self.pool == "max":
            pooled = max_pool_3x3(x, stride=1, padding=1)
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        bp = self.conv("branch_pool", 192)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# ------------------------------------------------------------------------------------------ model


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3. Input: [B, 299, 299, 3] from `fid_preprocess` (values in [-1, 1]).

    `__call__(x)` returns the [B, 2048] pool features (fp32); `logits=True` returns the [B, 1008]
    classifier output instead (eval mode: the dropout before `fc` is the identity). `fc` is part of
    the weights file, so it is part of the model; under jit the unused head costs nothing.

    Another input size runs too (the network is fully convolutional down to the global pool),
    but FID is defined at 299 px, which `fid_preprocess` guarantees.
    """
    num_classes: int = NUM_CLASSES
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, logits: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = functools.partial(BasicConv2d, **kw)
        x = x.astype(self.dtype)
        x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = max_pool_3x3(x, stride=2)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = max_pool_3x3(x, stride=2)
        x = FIDInceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = FIDInceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = FIDInceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(channels_7x7=c7, name=name, **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = FIDInceptionE(pool="avg", name="Mixed_7b", **kw)(x)
        x = FIDInceptionE(pool="max", name="Mixed_7c", **kw)(x)
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # adaptive_avg_pool2d to 1x1
        # fc is created at init even when unused, so the param tree always matches the weights file.
        if logits or self.is_initializing():
            out = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                           kernel_init=dense_init(("embed", "vocab")), name="fc")(features)
            if logits:
                return out
        return features

    @staticmethod
    def dummy_inputs(batch: int = 1) -> tuple[jax.Array]:
        return (jnp.zeros((batch, FID_SIZE, FID_SIZE, 3), jnp.float32),)


def abstract_params(model: FIDInceptionV3 | None = None, *, boxed: bool = True):
    """The parameter tree of `model` as ShapeDtypeStructs, without allocating or computing anything.

    boxed=True keeps the `nn.LogicallyPartitioned` wrappers (for `cid_jax.sharding.param_shardings`);
    boxed=False gives the plain tree `apply` takes and `load_into` fills.
    """
    model = model or FIDInceptionV3()
    params = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
    return params if boxed else nn.meta.unbox(params)


@functools.partial(jax.jit, static_argnames=("model",))
def features_at_299(model: FIDInceptionV3, params, x: jax.Array) -> jax.Array:
    return model.apply({"params": params}, x)


def pool_features(params, images: jax.Array, model: FIDInceptionV3 | None = None) -> jax.Array:
    """The FID/KID features: [B, H, W, 3] RGB (uint8, or float in [0, 1]) -> [B, 2048] fp32.

    `fid_preprocess` then the network. The network part is jitted on its own, on the 299 px batch,
    so batches of different input sizes share one compilation per batch size.
    """
    model = model or FIDInceptionV3()
    return features_at_299(model, params, fid_preprocess(jnp.asarray(images)))
