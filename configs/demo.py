"""The embedded default: tiny random models, a synthetic FGID dataset built on the fly, CPU.

A few hundred steps in minutes on a laptop CPU; ends with the PyTorch export and loss curves (and
attention-map images) in the workdir:

    python -m cid_jax.train --config=configs/demo.py --workdir=/tmp/cid_demo
"""
import ml_collections

from cid_jax.config_base import base_config


def tiny_models() -> ml_collections.ConfigDict:
    """Small architectures of the real model families (diffusers/transformers config fields)."""
    t = ml_collections.ConfigDict()
    t.unet = dict(                                # 3 levels so the localization groups exist
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64],
        layers_per_block=1, attention_head_dim=2, cross_attention_dim=64, norm_num_groups=8,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    t.vae = dict(                                 # 4 levels: 8x downsampling as SD's VAE
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32, 32, 32],
        layers_per_block=1, norm_num_groups=8, sample_size=128, scaling_factor=0.18215,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    t.text = [dict(                               # real CLIP vocabulary size: the real tokenizer feeds it
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        eos_token_id=49407, projection_dim=64)]
    t.vision = dict(                              # 224 px input as CLIP-H, 50 tokens
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=224, patch_size=32, hidden_act="gelu", projection_dim=32)
    return t


def get_config():
    c = base_config()
    c.model.tiny = tiny_models()
    c.model.dtype = "float32"                     # CPU: bf16 is emulated and slower
    c.model.lora_rank = 8
    c.model.facial_encoder = ml_collections.ConfigDict(dict(dim=64, depth=2, heads=2))
    c.data.synthetic = 256                        # built into <workdir>/data on first run
    c.data.resolution = 128
    c.data.mask_resolution = 64
    c.train.global_batch = 8
    c.train.num_steps = 300
    c.train.log_every = 10
    c.train.image_every = 100
    c.train.export_dtype = "fp32"
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    return c
