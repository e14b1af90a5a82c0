"""Loading a diffusers `vae/` folder into `cid_jax.models.vae.AutoencoderKL`.

The folder holds `config.json` and one of `diffusion_pytorch_model.safetensors` (read without
torch), `diffusion_pytorch_model.bin` (torch.load(weights_only=True)), sharded variants of these, or
diffusers-Flax's `diffusion_flax_model.msgpack` (in that order of preference, as diffusers).

Attention names: current diffusers checkpoints store the mid-block attention as
`attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`. Checkpoints from before diffusers 0.14 used
`query/key/value/proj_attn` (diffusers renames them at load time); we read only the current names in
PyTorch files, re-saving such a checkpoint with current diffusers fixes it. diffusers' Flax VAE kept
the old names, so for msgpack files they are mapped by `FLAX_ATTENTION_RENAMES`.
"""
from __future__ import annotations

import os
import pathlib

import jax.numpy as jnp

from cid_jax import errors, runtime
from cid_jax.models.vae import AutoencoderKL, VAEConfig, abstract_vae_params
from cid_jax.weights.flax_msgpack import load_msgpack_into
from cid_jax.weights.state_dict import load_into, read_sharded_folder

# diffusers-Flax FlaxAttentionBlock names -> ours (the torch module's current names).
FLAX_ATTENTION_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}

_TORCH_STEM = "diffusion_pytorch_model"
_FLAX_FILE = "diffusion_flax_model.msgpack"


def _vae_folder(folder: pathlib.Path) -> pathlib.Path:
    """Accepts the `vae/` folder itself or a pipeline folder that contains one."""
    if (folder / "config.json").exists():
        return folder
    if (folder / "vae" / "config.json").exists():
        return folder / "vae"
    raise errors.MissingError(f"{folder}/config.json not found: expected a diffusers vae/ folder "
                            "(or a pipeline folder with vae/)")


def _has_torch_weights(folder: pathlib.Path) -> bool:
    return any((folder / f"{_TORCH_STEM}{ext}").exists()
               for ext in (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))


def load_vae(folder: os.PathLike, dtype=jnp.float32, *, upcast_float16: bool = True):
    """Returns `(AutoencoderKL, params)` for a diffusers `vae/` folder.

    `dtype` is the compute dtype (params are always fp32 host numpy arrays). With
    `upcast_float16`, a float16 request on a config with `force_upcast` (SDXL's VAE, which
    overflows in fp16) builds the module in fp32, as diffusers' pipelines do.
    """
    folder = _vae_folder(pathlib.Path(folder))
    config = VAEConfig.from_json(folder / "config.json")
    if upcast_float16 and config.force_upcast and jnp.dtype(dtype) == jnp.float16:
        dtype = jnp.float32
    module = AutoencoderKL(config, dtype=dtype)
    plain = AutoencoderKL(config)
    abstract = runtime.cached_shapes("vae", runtime.describe(plain), lambda: abstract_vae_params(plain))
    what = f"VAE {folder}"
    if _has_torch_weights(folder) or not (folder / _FLAX_FILE).exists():
        params = load_into(abstract, read_sharded_folder(folder, _TORCH_STEM), what=what)
    else:
        params = load_msgpack_into(abstract, folder / _FLAX_FILE, what=what,
                                   rename=FLAX_ATTENTION_RENAMES)
    return module, params
