"""A PyTorch rendering of the reference ConsistentID SD1.5 sampling loop (spec §6 steps 6-12), with
diffusers' UNet / VAE / schedulers, transformers' CLIP encoders and the PyTorch ConsistentID
modules of `consistentid.py`. Written from the spec for parity tests and benchmarks only.

Inputs are the host-side arrays our pipeline builds (token ids, masks, CLIP-normalised images,
NHWC numpy); the loop is the reference's Python loop with `if i <= start_merge_step`.
"""
from __future__ import annotations

import numpy as np
import torch


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x, np.float32), -1, -3)))


@torch.no_grad()
def embedding_sets(text_encoder, vision, facial_encoder, image_proj, inputs: dict):
    """(null, text, augmented), each [B, 77 + 4, E], as the reference pipeline builds them."""
    ids = lambda k: torch.from_numpy(np.asarray(inputs[k], np.int64))  # noqa: E731

    def clip_hidden(images):  # [..., H, W, 3] -> [..., T, D]
        lead = images.shape[:-3]
        flat = _nchw(np.reshape(images, (-1,) + images.shape[-3:]))
        h = vision(pixel_values=flat, output_hidden_states=True).hidden_states[-2]
        return h.reshape(*lead, *h.shape[1:])

    token_mask = torch.from_numpy(np.asarray(inputs["facial_token_mask"], bool))
    valid = torch.from_numpy(np.asarray(inputs["facial_token_idx_mask"], bool))
    facial_text = text_encoder(ids("input_ids"))[0]
    text_only = text_encoder(ids("text_only_ids"))[0]
    negative = text_encoder(ids("negative_ids"))[0]

    clip = clip_hidden(inputs["clip_image"])
    uncond_clip = clip_hidden(np.zeros_like(inputs["clip_image"]))
    id_emb = torch.from_numpy(np.asarray(inputs["id_embedding"], np.float32))
    id_tokens = image_proj(id_emb, clip, shortcut=False)
    uncond_tokens = image_proj(torch.zeros_like(id_emb), uncond_clip, shortcut=False)

    parts = clip_hidden(inputs["part_clip_images"])
    uncond_parts = clip_hidden(np.zeros_like(inputs["part_clip_images"]))
    facial = facial_encoder(facial_text, parts, token_mask, valid)
    uncond_facial = facial_encoder(negative, uncond_parts, token_mask, valid)  # positive masks (§9.6)

    null = torch.cat([uncond_facial, uncond_tokens], dim=1)
    augmented = torch.cat([facial, id_tokens], dim=1)
    text = torch.cat([text_only, id_tokens], dim=1)
    return null, text, augmented


@torch.no_grad()
def sample(unet, vae, scheduler, sets, noise_nhwc, steps: int, start_merge_step: int, guidance: float):
    """The denoising loop + decode. Returns (images [B,H,W,3] in [0,1], per-step guided eps NHWC)."""
    null, text, augmented = sets
    scheduler.set_timesteps(steps)
    latents = _nchw(noise_nhwc) * scheduler.init_noise_sigma
    per_step = []
    for i, t in enumerate(scheduler.timesteps):
        cond = text if i <= start_merge_step else augmented
        latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps = unet(latent_in, t, encoder_hidden_states=torch.cat([null, cond])).sample
        eps_uncond, eps_cond = eps.chunk(2)
        guided = eps_uncond + guidance * (eps_cond - eps_uncond)
        per_step.append(guided.permute(0, 2, 3, 1).numpy())
        latents = scheduler.step(guided, t, latents).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    return image.permute(0, 2, 3, 1).numpy(), np.stack(per_step)


@torch.no_grad()
def inpaint(unet, vae, scheduler, sets, noise_nhwc, image01_nhwc, mask01_nhwc, steps: int, strength: float,
            start_merge_step: int, guidance: float, controlnets=()):
    """The reference's inpainting loop (pipelines/StableDIffusionInpaint_ConsistentID.py) + decode:
    the init image's latents (the posterior's mean, where the reference draws a sample with its
    generator), a partial start for strength < 1, a 9-channel UNet fed [latents, mask, masked-image
    latents], a 4-channel one blended with the init latents noised to the next timestep. Returns
    (images [B,H,W,3] in [0,1], per-step guided eps NHWC)."""
    import torch.nn.functional as F

    null, text, augmented = sets
    init_image = _nchw(image01_nhwc) * 2 - 1
    mask = _nchw(mask01_nhwc)
    masked_image = init_image * (mask < 0.5)
    scheduler.set_timesteps(steps)
    init_timestep = min(int(steps * strength), steps)  # StableDiffusionInpaintPipeline.get_timesteps
    t_start = max(steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    encode = lambda x: vae.encode(x).latent_dist.mean * vae.config.scaling_factor  # noqa: E731
    image_latents = encode(init_image)
    noise = _nchw(noise_nhwc)
    if strength == 1.0:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(noise.shape[0]))
    small = F.interpolate(mask, size=latents.shape[-2:])
    mask_in, masked_in = torch.cat([small] * 2), torch.cat([encode(masked_image)] * 2)
    nine = unet.config.in_channels == 9
    per_step = []
    for i, t in enumerate(timesteps):
        cond = text if i <= start_merge_step else augmented
        latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        residuals = {}
        if controlnets:
            control_in = scheduler.scale_model_input(latents, t)
            down, mid = None, None
            for net, control_image, scale, start, end in controlnets:
                keep = 1.0 - float(i / len(timesteps) < start or (i + 1) / len(timesteps) > end)
                d, m = net(control_in, t, encoder_hidden_states=cond, controlnet_cond=_nchw(control_image),
                           conditioning_scale=scale * keep, return_dict=False)
                down = list(d) if down is None else [a + b for a, b in zip(down, d)]
                mid = m if mid is None else mid + m
            residuals = dict(down_block_additional_residuals=[torch.cat([r, r]) for r in down],
                             mid_block_additional_residual=torch.cat([mid, mid]))
        if nine:
            latent_in = torch.cat([latent_in, mask_in, masked_in], dim=1)
        eps = unet(latent_in, t, encoder_hidden_states=torch.cat([null, cond]), **residuals).sample
        eps_uncond, eps_cond = eps.chunk(2)
        guided = eps_uncond + guidance * (eps_cond - eps_uncond)
        per_step.append(guided.permute(0, 2, 3, 1).numpy())
        latents = scheduler.step(guided, t, latents).prev_sample
        if not nine:
            proper = image_latents
            if i < len(timesteps) - 1:
                proper = scheduler.add_noise(image_latents, noise, torch.tensor([timesteps[i + 1]]))
            latents = (1 - small) * proper + small * latents
    image = vae.decode(latents / vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    return image.permute(0, 2, 3, 1).numpy(), np.stack(per_step)
