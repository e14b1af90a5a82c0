"""The embedded default: tiny random models, a synthetic FGID dataset built on the fly, CPU.

A few hundred steps in minutes on a laptop CPU; ends with the PyTorch export and loss curves (and
attention-map images, and the evaluation grids of held-out faces) in the workdir:

    python -m cid_jax.train --config=configs/demo.py --workdir=/tmp/cid_demo
"""
import ml_collections

from cid_jax.config_base import base_config
from cid_jax.models import presets

PRESET = "tiny-sd15"                              # cid_jax.models.presets: 3 UNet levels, real CLIP vocabulary


def get_config():
    c = base_config()
    tiny = presets.get(PRESET)
    c.model.preset = PRESET
    c.model.dtype = "float32"                     # CPU: bf16 is emulated and slower
    c.model.lora_rank = tiny["lora_rank"]
    c.model.facial_encoder = ml_collections.ConfigDict(tiny["facial_encoder"])
    c.data.synthetic = 256                        # built into <workdir>/data on first run
    c.data.resolution = 128
    c.data.mask_resolution = 64
    c.train.global_batch = 8
    c.train.num_steps = 300
    c.train.log_every = 10
    c.train.image_every = 100
    c.train.export_dtype = "fp32"
    c.eval.every_steps = 100                      # identity metrics on held-out synthetic faces ...
    c.eval.random_metric_models = True            # ... scored by tiny random nets: machinery, not fidelity
    c.eval.num_references = 2
    c.eval.steps = 10
    c.eval.merge_step = 3
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    return c
