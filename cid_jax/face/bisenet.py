"""BiSeNet face parsing (19 CelebAMask-HQ classes) in Flax linen, NHWC, inference only.

This is the network behind the standard face-parsing checkpoint, zllrunning's `79999_iter.pth`,
which the reference ConsistentID repo re-hosts as `face_parsing.pth` (spec §6 step 3):

    ResNet18 context path -> feat8 (1/8, 128 ch), feat16 (1/16, 256 ch), feat32 (1/32, 512 ch)
    global context: avg-pool(feat32) -> 1x1 ConvBNReLU -> broadcast
    ARM32(feat32) + context -> nearest up to 1/16 -> ConvBNReLU   (= feat_cp16)
    ARM16(feat16) + that    -> nearest up to 1/8  -> ConvBNReLU   (= feat_cp8)
    FFM(concat[feat8, feat_cp8]) -> head `conv_out` (main), heads `conv_out16/32` on feat_cp8/16
    every head: bilinear (align_corners=True) upsample to the input size.

There is no separate spatial path: the checkpoint replaces it with ResNet's 1/8 feature.

Parameter names follow the checkpoint's PyTorch module names (`cp.resnet.layer1.0.conv1.weight`);
`bisenet_key` maps a Flax path onto them. BatchNorm runs in inference mode with the running statistics
kept as *params* (`FrozenBatchNorm`: `scale`, `bias`, `mean`, `var`), so the model is applied with a
single `{'params': params}` tree and no mutable collections. `num_batches_tracked` buffers in a
checkpoint carry no information at inference and are dropped; every other key must match.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cid_jax.models.layers import FrozenBatchNorm
from cid_jax.weights.state_dict import StateDict, load_into, read_state_dict

NUM_CLASSES = 19

# ------------------------------------------------------------------------------------ resampling


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """Source rows of torch's legacy `F.interpolate(mode='nearest', size=...)`: floor(i * in/out).

    torch computes the scale in float32, so we do too (it matters only for non-integer ratios).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
    return np.minimum(idx, in_size - 1)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC nearest resize with torch's index rule (not jax.image.resize's half-pixel centres)."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    x = jnp.take(x, _nearest_index(h, size[0]), axis=1)
    return jnp.take(x, _nearest_index(w, size[1]), axis=2)


def _align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] linear-interpolation weights of torch's bilinear `align_corners=True`."""
    m = np.zeros((out_size, in_size), np.float64)
    if in_size == 1 or out_size == 1:
        m[:, 0] = 1.0
        return m.astype(np.float32)
    pos = np.arange(out_size) * (in_size - 1) / (out_size - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), in_size - 2)
    frac = pos - lo
    m[np.arange(out_size), lo] = 1.0 - frac
    m[np.arange(out_size), lo + 1] += frac
    return m.astype(np.float32)


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC bilinear resize with `align_corners=True`, as two exact separable matmuls.

    jax.image.resize has no align_corners mode; the corner-aligned grid is a different sampling
    lattice, so it is written out as [out, in] weight matrices (static, built in numpy).
    """
    h, w = x.shape[1:3]
    mh = jnp.asarray(_align_corners_matrix(h, size[0]), x.dtype)
    mw = jnp.asarray(_align_corners_matrix(w, size[1]), x.dtype)
    x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,nowc->nopc", mw, x, precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------------------- layers


def _conv(features: int, kernel: int, name: str, *, stride: int = 1, padding: int | None = None,
          dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Conv:
    """torch Conv2d(bias=False) in NHWC; padding defaults to kernel // 2 as in the checkpoint."""
    p = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name)


class ConvBNReLU(nn.Module):
    """conv (no bias) -> BN -> ReLU; torch names `conv`, `bn`."""
    features: int
    kernel: int = 3
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(self.features, self.kernel, "conv", **kw)(x)
        return nn.relu(FrozenBatchNorm(name="bn", **kw)(x))


class BasicBlock(nn.Module):
    """ResNet basic block; the 1x1 projection is torch's `downsample` Sequential (conv, BN)."""
    features: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        r = _conv(self.features, 3, "conv1", stride=self.stride, **kw)(x)
        r = nn.relu(FrozenBatchNorm(name="bn1", **kw)(r))
        r = _conv(self.features, 3, "conv2", **kw)(r)
        r = FrozenBatchNorm(name="bn2", **kw)(r)
        shortcut = x
        if x.shape[-1] != self.features or self.stride != 1:
            shortcut = _conv(self.features, 1, "downsample_0", stride=self.stride, padding=0, **kw)(x)
            shortcut = FrozenBatchNorm(name="downsample_1", **kw)(shortcut)
        return nn.relu(shortcut.astype(r.dtype) + r)


class ResNet18(nn.Module):
    """The context path's backbone; returns the 1/8, 1/16 and 1/32 features (128, 256, 512 ch)."""
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(64, 7, "conv1", stride=2, **kw)(x)
        x = nn.relu(FrozenBatchNorm(name="bn1", **kw)(x))
        # torch MaxPool2d(3, 2, padding=1) pads with -inf, as nn.max_pool does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        feats = []
        for i, (features, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
            x = BasicBlock(features, stride, name=f"layer{i}_0", **kw)(x)
            x = BasicBlock(features, 1, name=f"layer{i}_1", **kw)(x)
            feats.append(x)
        return feats[1], feats[2], feats[3]


class AttentionRefinementModule(nn.Module):
    """ConvBNReLU, then channel attention sigmoid(BN(1x1 conv(global mean))) multiplies the feature."""
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        feat = ConvBNReLU(self.features, 3, name="conv", **kw)(x)
        att = jnp.mean(feat, axis=(1, 2), keepdims=True)
        att = _conv(self.features, 1, "conv_atten", padding=0, **kw)(att)
        att = nn.sigmoid(FrozenBatchNorm(name="bn_atten", **kw)(att))
        return feat * att


class ContextPath(nn.Module):
    """ResNet18 + two ARMs + global context; returns (feat8, feat_cp8, feat_cp16)."""
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        feat8, feat16, feat32 = ResNet18(name="resnet", **kw)(x)
        avg = jnp.mean(feat32, axis=(1, 2), keepdims=True)
        avg = ConvBNReLU(128, 1, name="conv_avg", **kw)(avg)  # 1x1 -> broadcast = nearest upsample

        feat32_sum = AttentionRefinementModule(128, name="arm32", **kw)(feat32) + avg
        feat32_up = resize_nearest(feat32_sum, feat16.shape[1:3])
        feat32_up = ConvBNReLU(128, 3, name="conv_head32", **kw)(feat32_up)

        feat16_sum = AttentionRefinementModule(128, name="arm16", **kw)(feat16) + feat32_up
        feat16_up = resize_nearest(feat16_sum, feat8.shape[1:3])
        feat16_up = ConvBNReLU(128, 3, name="conv_head16", **kw)(feat16_up)
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    """1x1 ConvBNReLU on concat[spatial, context]; squeeze-excite style attention; residual add."""
    features: int = 256
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, fsp, fcp):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        feat = ConvBNReLU(self.features, 1, name="convblk", **kw)(jnp.concatenate([fsp, fcp], -1))
        att = jnp.mean(feat, axis=(1, 2), keepdims=True)
        att = nn.relu(_conv(self.features // 4, 1, "conv1", padding=0, **kw)(att))
        att = nn.sigmoid(_conv(self.features, 1, "conv2", padding=0, **kw)(att))
        return feat * att + feat


class BiSeNetOutput(nn.Module):
    """ConvBNReLU(3x3, mid) -> 1x1 conv to class logits; torch names `conv`, `conv_out`."""
    mid_features: int
    num_classes: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvBNReLU(self.mid_features, 3, name="conv", **kw)(x)
        return _conv(self.num_classes, 1, "conv_out", padding=0, **kw)(x)


class BiSeNet(nn.Module):
    """BiSeNet face parser. Input: NHWC float, ImageNet-normalised RGB. Output: NHWC logits.

    `__call__(x)` returns the main head's logits at the input resolution (the reference uses
    only `out[0]`); `return_aux=True` returns (main, out16, out32), all at the input resolution.
    The auxiliary heads always exist (the checkpoint has them); under jit their unused compute is
    dropped.
    """
    num_classes: int = NUM_CLASSES
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, return_aux: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        size = x.shape[1:3]
        feat8, feat_cp8, feat_cp16 = ContextPath(name="cp", **kw)(x.astype(self.dtype))
        fused = FeatureFusionModule(256, name="ffm", **kw)(feat8, feat_cp8)
        out = BiSeNetOutput(256, self.num_classes, name="conv_out", **kw)(fused)
        out16 = BiSeNetOutput(64, self.num_classes, name="conv_out16", **kw)(feat_cp8)
        out32 = BiSeNetOutput(64, self.num_classes, name="conv_out32", **kw)(feat_cp16)
        up = lambda t: resize_bilinear_align_corners(t.astype(jnp.float32), size)
        if return_aux:
            return up(out), up(out16), up(out32)
        return up(out)


# ----------------------------------------------------------------------------------- checkpoint

_LIST_MODULE = re.compile(r"^(layer[1-4]|downsample)_(\d+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}


def bisenet_key(path: Sequence[str], ndim: int) -> str:
    """Flax param path -> the checkpoint's key.

    `cp/resnet/layer2_0/downsample_1/var` -> `cp.resnet.layer2.0.downsample.1.running_var`.
    """
    *modules, leaf = path
    parts = []
    for m in modules:
        match = _LIST_MODULE.match(m)
        parts.append(f"{match.group(1)}.{match.group(2)}" if match else m)
    return ".".join(parts + [_LEAF[leaf]])


def abstract_params(model: BiSeNet | None = None, image_size: int = 64):
    """Param shapes (no compute) via eval_shape; they do not depend on the image size."""
    model = model or BiSeNet()
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def params_from_state_dict(state_dict: StateDict, model: BiSeNet | None = None) -> dict:
    """Maps a BiSeNet PyTorch state dict (numpy) onto Flax params, strictly.

    Only `*.num_batches_tracked` keys are dropped; anything else missing, unexpected or of the wrong
    shape raises `WeightsError` naming the keys.
    """
    model = model or BiSeNet()
    sd = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    # Checkpoints saved from nn.DataParallel prefix every key with 'module.'.
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return load_into(abstract_params(model), sd, what=f"BiSeNet(num_classes={model.num_classes})",
                     key_fn=bisenet_key, dtype=np.dtype(model.param_dtype))


def load_bisenet(path: os.PathLike, *, num_classes: int = NUM_CLASSES,
                 dtype=jnp.float32) -> tuple[BiSeNet, dict]:
    """Reads `79999_iter.pth` / `face_parsing.pth` (torch.load(weights_only=True)) or a
    `.safetensors` with the same keys; returns (model, params) for `model.apply({'params': params}, x)`.
    """
    model = BiSeNet(num_classes=num_classes, dtype=dtype)
    params = params_from_state_dict(read_state_dict(path), model)
    return model, jax.tree.map(jnp.asarray, params)
