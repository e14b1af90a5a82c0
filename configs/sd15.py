"""ConsistentID on Stable Diffusion 1.5: the paper's recipe (512 px, batch 16, AdamW 1e-4, lambda 0.01).

    python -m cid_jax.train --config=configs/sd15.py --workdir=DIR \
        --config.model.base=/models/stable-diffusion-v1-5 \
        --config.model.image_encoder=/models/CLIP-ViT-H-14-laion2B-s32B-b79K \
        --config.data.path=/data/fgid_records
"""
from cid_jax.config_base import base_config


def get_config():
    c = base_config()
    c.model.variant = "sd15"
    c.data.resolution = 512
    c.train.global_batch = 16
    c.mesh.fsdp = 1                              # 860M frozen UNet fits one chip; raise on small-HBM chips
    return c
