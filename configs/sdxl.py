"""ConsistentID on SDXL: 1024 px, E=2048 (two text encoders), ProjPlus shortcut, 3 localization groups.

    python -m cid_jax.train --config=configs/sdxl.py --workdir=DIR \
        --config.model.base=/models/stable-diffusion-xl-base-1.0 \
        --config.model.image_encoder=/models/CLIP-ViT-H-14-laion2B-s32B-b79K --config.data.path=...
"""
from cid_jax.config_base import base_config
from cid_jax.models.sites import SDXL_CAPTURE_GROUPS


def get_config():
    c = base_config()
    c.model.variant = "sdxl"
    c.model.projplus_shortcut = True
    c.model.capture_groups = SDXL_CAPTURE_GROUPS
    c.model.remat = "full"                       # 2.6B frozen UNet at 1024 px: trade compute for memory
    c.data.resolution = 1024
    c.data.mask_resolution = 64
    c.train.global_batch = 16
    c.mesh.fsdp = 4                              # shard the frozen UNet/encoders over 4 chips
    return c
