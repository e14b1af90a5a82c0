"""The training batch contract: what the input pipeline delivers and the train step consumes.

One global batch (B samples, R = `data.resolution`, M = `data.mask_resolution`, NHWC):

    pixel_values           float32 [B, R, R, 3]        in [-1, 1]
    clip_image             float32 [B, 224, 224, 3]    CLIP-normalised; zeros where the caption dropped
    part_clip_images       float32 [B, 5, 224, 224, 3] in facial-token order; zeros = padding
    facial_masks           float32 [B, 5, M, M]        region masks in [0, 1], same order
    foreground_mask        float32 [B, R, R]           "WithoutBackground"
    input_ids              int32   [B, 77]
    facial_token_mask      bool    [B, 77]
    facial_token_idx       int32   [B, 5]
    facial_token_idx_mask  bool    [B, 5]
    id_embedding           float32 [B, 512]
    use_foreground_loss    bool    [B]
    time_ids               float32 [B, 6]              SDXL only: (R, R, 0, 0, R, R), the reference's crop (0, 0)
    input_ids_2            int32   [B, 77]             SDXL only: the text as tokenizer_2 gives it ("!" padding)

`pipeline.py` produces these keys (plus a few for debugging, which `train_batches` drops); the
trainer and `cid_jax.aot` shape the jitted step from `batch_spec`.
"""
from __future__ import annotations

import numpy as np

CLIP_SIZE = 224
TEXT_LENGTH = 77
MAX_PARTS = 5
ID_DIM = 512


def batch_spec(batch: int, resolution: int, mask_resolution: int, variant: str = "sd15",
               clip_size: int = CLIP_SIZE) -> dict:
    """{key: jax.ShapeDtypeStruct} of one batch of `batch` samples."""
    import jax

    r, m, c = int(resolution), int(mask_resolution), int(clip_size)
    f32, i32 = np.float32, np.int32
    spec = dict(
        pixel_values=((batch, r, r, 3), f32), clip_image=((batch, c, c, 3), f32),
        part_clip_images=((batch, MAX_PARTS, c, c, 3), f32), facial_masks=((batch, MAX_PARTS, m, m), f32),
        foreground_mask=((batch, r, r), f32), input_ids=((batch, TEXT_LENGTH), i32),
        facial_token_mask=((batch, TEXT_LENGTH), bool), facial_token_idx=((batch, MAX_PARTS), i32),
        facial_token_idx_mask=((batch, MAX_PARTS), bool), id_embedding=((batch, ID_DIM), f32),
        use_foreground_loss=((batch,), bool))
    if variant == "sdxl":
        spec["time_ids"] = ((batch, 6), f32)
        spec["input_ids_2"] = ((batch, TEXT_LENGTH), i32)
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in spec.items()}


def spec_for_config(config, batch: int | None = None) -> dict:
    """`batch_spec` of a training config (`batch` samples; default the global batch)."""
    d = config.data
    return batch_spec(int(batch or config.train.global_batch), d.resolution, d.mask_resolution or d.resolution,
                      config.model.variant)


def sdxl_time_ids(batch: int, height: int, width: int) -> np.ndarray:
    """SDXL's added time ids [B, 6]: original size, crop top-left (0, 0), target size (= original)."""
    return np.tile(np.asarray([height, width, 0, 0, height, width], np.float32), (batch, 1))
