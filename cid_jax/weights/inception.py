"""Loading pytorch-fid's FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`) into
cid_jax.models.inception.

The file is a plain state dict written by torch.save and read here with `torch.load(weights_only=True)`
(`read_state_dict`), so no code in it runs. pytorch-fid loads it strictly into torchvision's
`Inception3(num_classes=1008, aux_logits=False)` with the FID blocks swapped in, so its keys are that
module's: for each of the 94 BasicConv2d layers (`Conv2d_1a_3x3`, ..., `Mixed_7c.branch_pool`)

    <layer>.conv.weight                    [out, in, kh, kw]   -> <layer>/conv/kernel [kh, kw, in, out]
    <layer>.bn.weight / .bn.bias           [out]               -> <layer>/bn/scale, <layer>/bn/bias
    <layer>.bn.running_mean / running_var  [out]               -> <layer>/bn/mean, <layer>/bn/var
    <layer>.bn.num_batches_tracked         []  (int64, if the file has it: dropped, unused at inference)

plus the classifier `fc.weight` [1008, 2048] / `fc.bias` [1008] -> `fc/kernel` (transposed) / `fc/bias`,
and no `AuxLogits.*`. Loading is strict (`load_into`): every model parameter must be found with the
right shape and every key other than `*.num_batches_tracked` must be used; errors name the keys.
Checkpoints saved from `nn.DataParallel` (every key prefixed `module.`) are accepted too.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cid_jax.models.inception import FIDInceptionV3, abstract_params
from cid_jax.weights.state_dict import StateDict, load_into, read_state_dict

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}
BUFFER_SUFFIX = ".num_batches_tracked"


def fid_inception_key(path: Sequence[str], ndim: int) -> str:
    """Flax param path -> the checkpoint key, module names unchanged (none of them is a list):

    `Mixed_6b/branch7x7_2/bn/var` -> `Mixed_6b.branch7x7_2.bn.running_var`, `fc/kernel` -> `fc.weight`.
    """
    *modules, leaf = path
    if leaf not in _LEAF:
        raise KeyError(f"no checkpoint key for the parameter {'/'.join(path)}")
    return ".".join(list(modules) + [_LEAF[leaf]])


def drop_buffers(state_dict: Mapping[str, np.ndarray]) -> StateDict:
    """Without the `num_batches_tracked` counters and without a DataParallel `module.` prefix."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith(BUFFER_SUFFIX)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                           model: FIDInceptionV3 | None = None) -> dict:
    """A pytorch-fid Inception state dict (numpy) -> the plain Flax param tree of host arrays.

    Raises `WeightsError` naming every missing, unexpected or mis-shaped key.
    """
    model = model or FIDInceptionV3()
    return load_into(abstract_params(model, boxed=False), drop_buffers(state_dict),
                     what=f"FIDInceptionV3(num_classes={model.num_classes})",
                     key_fn=fid_inception_key, dtype=np.dtype(model.param_dtype))


def load_fid_inception(path: os.PathLike, *, dtype: Any = jnp.float32,
                       param_dtype: Any = jnp.float32) -> tuple[FIDInceptionV3, dict]:
    """Reads `pt_inception-2015-12-05-6726825d.pth` (or a `.safetensors` with the same keys).

    Returns (model, params) for `model.apply({'params': params}, fid_preprocess(images))` or
    `cid_jax.models.inception.pool_features(params, images, model)`. `dtype` is the compute dtype of
    the convs, `param_dtype` the dtype of the returned arrays.
    """
    model = FIDInceptionV3(dtype=dtype, param_dtype=param_dtype)
    params = params_from_state_dict(read_state_dict(path), model)
    return model, jax.tree.map(jnp.asarray, params)
