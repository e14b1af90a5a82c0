"""Architecture presets: one registry that configs, tools, benchmarks and tests all use.

Each preset is what the `config.json` files of a base model say (diffusers / transformers field
names) for the four frozen parts, plus the ConsistentID sizes that go with it:

    unet       diffusers UNet2DConditionModel config
    vae        diffusers AutoencoderKL config
    text       [CLIPTextModel config] (SD1.5) or [CLIPTextModel, CLIPTextModelWithProjection] (SDXL)
    vision     transformers CLIPVisionModelWithProjection config (the CLIP-H image encoder)
    facial_encoder, lora_rank   the trainable parts' widths (the reference's for sd15/sdxl)

"sd15" and "sdxl" are the public checkpoints' architectures (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-xl-base-1.0, laion/CLIP-ViT-H-14-laion2B-s32B-b79K): AOT compiles and
benchmarks time them without weights. "tiny-sd15" / "tiny-sdxl" are the demo's and the tests' (three
UNet levels so the localization groups exist, the real CLIP vocabulary so the real tokenizer feeds
them); "mid-sd15" is a CPU benchmark size (256 px, 69 M parameters).

Plain Python (no Flax), so config files can import it.
"""
from __future__ import annotations

import copy
import pathlib

VARIANTS = ("sd15", "sdxl")

_DOWN_SD = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP_SD = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_VAE_BLOCKS = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)

# --------------------------------------------------------------------- the public checkpoints

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
    down_block_types=_DOWN_SD, up_block_types=_UP_SD)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[5, 10, 20], cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10],
    norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
# SD1.5 relies on diffusers' defaults for scaling_factor and force_upcast; SDXL's base ships the
# fp16-overflowing VAE with force_upcast.
SD15_VAE = dict(
    _class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512], in_channels=3,
    out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512, **_VAE_BLOCKS)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# SD1.5 `text_encoder` and SDXL `text_encoder` (openai/clip-vit-large-patch14 text tower).
CLIP_L_TEXT = dict(
    architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=49408, hidden_size=768,
    intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
    hidden_act="quick_gelu", layer_norm_eps=1e-05, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    projection_dim=768)
# SDXL `text_encoder_2` (laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower, with projection).
OPENCLIP_BIGG_TEXT = dict(
    architectures=["CLIPTextModelWithProjection"], model_type="clip_text_model", vocab_size=49408,
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-05, bos_token_id=0, eos_token_id=2,
    pad_token_id=1, projection_dim=1280)
# The ConsistentID / IP-Adapter image encoder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K vision tower).
CLIP_VIT_H_14_VISION = dict(
    architectures=["CLIPVisionModelWithProjection"], model_type="clip_vision_model", hidden_size=1280,
    intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, num_channels=3, image_size=224,
    patch_size=14, hidden_act="gelu", layer_norm_eps=1e-05, projection_dim=1024)
# The reference FacialEncoder's Perceiver (AttentionMLP defaults) and LoRA rank.
REFERENCE_FACIAL_ENCODER = dict(dim=1024, depth=8, heads=16)

# ------------------------------------------------------------------------------ small sizes

# The real configs' ids, quirks included: `eos_token_id` 2 is a stale placeholder in CLIP-L's and
# OpenCLIP-bigG's published configs (the end-of-text token is 49407); a tiny model must carry it so
# that a test can see code that trusts it.
_TINY_TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
_TINY_VAE = dict(  # 4 levels: 8x downsampling as SD's VAE
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32, 32, 32],
    layers_per_block=1, norm_num_groups=8, sample_size=128, scaling_factor=0.18215, **_VAE_BLOCKS)
_TINY_VISION = dict(  # 224 px input as CLIP-H, 50 tokens
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
    patch_size=32, hidden_act="gelu", projection_dim=32)
_TINY_FACIAL_ENCODER = dict(dim=64, depth=2, heads=2)

_PRESETS = {
    "sd15": dict(unet=SD15_UNET, vae=SD15_VAE, text=[CLIP_L_TEXT], vision=CLIP_VIT_H_14_VISION,
                 facial_encoder=REFERENCE_FACIAL_ENCODER, lora_rank=128),
    "sdxl": dict(unet=SDXL_UNET, vae=SDXL_VAE, text=[CLIP_L_TEXT, OPENCLIP_BIGG_TEXT],
                 vision=CLIP_VIT_H_14_VISION, facial_encoder=REFERENCE_FACIAL_ENCODER, lora_rank=128),
    "tiny-sd15": dict(
        unet=dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64],
                  layers_per_block=1, attention_head_dim=2, cross_attention_dim=64, norm_num_groups=8,
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
        vae=_TINY_VAE,
        text=[dict(_TINY_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, hidden_act="quick_gelu", projection_dim=64)],
        vision=_TINY_VISION, facial_encoder=_TINY_FACIAL_ENCODER, lora_rank=8),
    "tiny-sdxl": dict(  # context 32 + 32 (two text encoders); added embedding: 32-wide pooled + 6 x 8 time ids
        unet=dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64],
                  layers_per_block=1, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 2, 2], cross_attention_dim=64,
                  norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
        vae=dict(_TINY_VAE, scaling_factor=0.13025),
        text=[dict(_TINY_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   hidden_act="quick_gelu"),
              dict(_TINY_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   hidden_act="gelu", projection_dim=32)],
        vision=_TINY_VISION, facial_encoder=_TINY_FACIAL_ENCODER, lora_rank=8),
    "mid-sd15": dict(
        unet=dict(SD15_UNET, sample_size=32, block_out_channels=[64, 128, 256, 256], cross_attention_dim=256),
        vae=dict(SD15_VAE, block_out_channels=[32, 64, 128, 128], sample_size=256, scaling_factor=0.18215),
        text=[dict(_TINY_TEXT, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                   hidden_act="quick_gelu", bos_token_id=49406, projection_dim=256)],
        vision=dict(_TINY_VISION, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=4, patch_size=14, projection_dim=256),
        facial_encoder=dict(dim=256, depth=2, heads=4), lora_rank=32),
}
NAMES = tuple(_PRESETS)


def get(name: str) -> dict:
    """A fresh copy of preset `name` (the caller may change it)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown architecture preset {name!r}; known: {', '.join(NAMES)}")
    return copy.deepcopy(_PRESETS[name])


def variant_of(preset: dict) -> str:
    """'sdxl' for a two-text-encoder architecture, else 'sd15'."""
    return "sdxl" if len(preset["text"]) == 2 else "sd15"


def is_sdxl_folder(base) -> bool:
    """A diffusers Stable Diffusion folder is SDXL when it has a second text encoder."""
    return (pathlib.Path(base).expanduser() / "text_encoder_2").is_dir()
