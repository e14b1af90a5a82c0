"""The composite ConsistentID model: frozen SD family + trainable FacialEncoder, ProjPlus, adapters.

`ConsistentID` holds the module definitions (static, hashable-free Python objects); parameters live
in two trees kept apart:

    frozen    = {"unet": base UNet, "vae": ..., "text": [one or two encoders], "vision": CLIP-H}
    trainable = {"facial_encoder": ..., "image_proj": ...,
                 "adapter_modules": UNet-shaped adapter subtrees (…/attnN/processor/…)}

The trainable groups carry the reference checkpoint's names where the reference has one name
(`adapter_modules`); the export maps `facial_encoder` / `image_proj` to its `FacialEncoder` /
`image_proj[_model]`.

`conditioning` turns a batch into the UNet's context ([77 facial-fused text tokens ; 4 ID tokens]);
`predict_noise` runs the UNet with adapters and returns the noise prediction and the captured
facial attention maps (keyed by diffusers attention name). Both are pure functions of the params.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from cid_jax.models import adapters, trainable as trainable_lib
from cid_jax.models.clip import CLIPVisionModelWithProjection
from cid_jax.models.facial_encoder import FacialEncoder
from cid_jax.models.resampler import ProjPlus
from cid_jax.models.unet import UNet2DConditionModel
from cid_jax.models.vae import AutoencoderKL


TRAINABLE_GROUPS = ("facial_encoder", "image_proj", "adapter_modules")


@dataclasses.dataclass(frozen=True)
class ConsistentID:
    unet: UNet2DConditionModel           # built with adapters.consistentid_plan(...)
    vae: AutoencoderKL
    text_encoders: tuple                 # (CLIPTextModel,) for SD1.5; (+ CLIPTextModelWithProjection,) SDXL
    vision: CLIPVisionModelWithProjection
    facial_encoder: FacialEncoder
    image_proj: ProjPlus
    shortcut: bool = False               # ProjPlus shortcut (SDXL / FaceID-PlusV2 style)
    shortcut_scale: float = 1.0

    @property
    def variant(self) -> str:
        """'sdxl' (two text encoders) or 'sd15'."""
        return "sdxl" if len(self.text_encoders) == 2 else "sd15"

    @property
    def is_sdxl(self) -> bool:
        return self.variant == "sdxl"

    # ------------------------------------------------------------------------- frozen encoders

    def encode_latents(self, frozen, pixel_values, key) -> jax.Array:
        """Images [B,R,R,3] in [-1,1] -> scaled diffusion latents [B,R/8,R/8,4] (a posterior sample)."""
        posterior = self.vae.apply({"params": frozen["vae"]}, pixel_values, method=AutoencoderKL.encode)
        return self.vae.config.scale_latents(posterior.sample(key))

    def clip_hidden(self, frozen, images) -> jax.Array:
        """CLIP-H penultimate hidden states: [..., 224, 224, 3] -> [..., T, D]."""
        lead = images.shape[:-3]
        flat = images.reshape((-1,) + images.shape[-3:])
        out = self.vision.apply({"params": frozen["vision"]}, flat, output_hidden_states=True)
        h = out.hidden_states[-2]
        return h.reshape(lead + h.shape[1:])

    def encode_text(self, frozen, input_ids, input_ids_2=None) -> tuple[jax.Array, Optional[jax.Array]]:
        """input_ids [B,77] -> (prompt embeddings [B,77,E], pooled text embeds for SDXL or None).

        SD1.5: the last hidden state. SDXL: the penultimate hidden states of both encoders
        concatenated (768 + 1280 = 2048), and encoder 2's projected pooled output; encoder 2 reads
        `input_ids_2`, the text as SDXL's tokenizer_2 gives it ("!" padding: `text.second_encoder_ids`).
        """
        if not self.is_sdxl:
            out = self.text_encoders[0].apply({"params": frozen["text"][0]}, input_ids,
                                              output_hidden_states=False)
            return out.last_hidden_state, None
        if input_ids_2 is None:
            raise ValueError("SDXL's second text encoder needs input_ids_2 (tokenizer_2's ids: "
                             "cid_jax.text.second_encoder_ids)")
        out1 = self.text_encoders[0].apply({"params": frozen["text"][0]}, input_ids)
        out2 = self.text_encoders[1].apply({"params": frozen["text"][1]}, input_ids_2)
        embeds = jnp.concatenate([out1.hidden_states[-2], out2.hidden_states[-2]], axis=-1)
        return embeds, out2.text_embeds

    # ------------------------------------------------------------------------ conditioning

    def conditioning(self, frozen, trainable, batch: Mapping[str, jax.Array],
                     fuse: bool = True) -> tuple[jax.Array, Optional[dict]]:
        """A batch -> (context [B, 77 + num_tokens, E], SDXL added_cond or None).

        Frozen encoders run under stop_gradient; gradients flow into FacialEncoder and ProjPlus.
        `fuse=False` skips the facial fusion (the text-only embedding set of inference).
        """
        frozen = jax.lax.stop_gradient(frozen)
        prompt_embeds, pooled = self.encode_text(frozen, batch["input_ids"], batch.get("input_ids_2"))
        clip_embeds = self.clip_hidden(frozen, batch["clip_image"])
        id_tokens = self.image_proj.apply({"params": trainable["image_proj"]}, batch["id_embedding"],
                                          clip_embeds, shortcut=self.shortcut, scale=self.shortcut_scale)
        if fuse:
            parts = self.clip_hidden(frozen, batch["part_clip_images"])
            prompt_embeds = self.facial_encoder.apply(
                {"params": trainable["facial_encoder"]}, prompt_embeds.astype(jnp.float32), parts,
                batch["facial_token_mask"], batch["facial_token_idx_mask"])
        context = jnp.concatenate([prompt_embeds.astype(id_tokens.dtype), id_tokens], axis=1)
        added = None
        if self.is_sdxl:
            added = dict(text_embeds=pooled, time_ids=batch["time_ids"])
        return context, added

    def predict_noise(self, frozen, trainable, noisy, timesteps, context, added=None,
                      facial_token_idx=None, capture: bool = True, ip_scale=None, control=None, regions=None):
        """UNet with adapters -> (noise prediction, {attention name: [B, H, N, 5]} captured maps).
        `ip_scale` (a scalar, may be traced) overrides the ID attention branch's weight; `control`:
        ControlNet residuals (`UNet2DConditionModel`); `regions`: several people
        (`adapters.Regions`; `context` is then the base context outside their regions)."""
        params = trainable_lib.merge(frozen["unet"], trainable["adapter_modules"])
        kwargs = {} if facial_token_idx is None else {"facial_token_idx": facial_token_idx}
        if ip_scale is not None:
            kwargs["ip_scale"] = ip_scale
        if regions is not None:
            kwargs["regions"] = regions
        if not capture:
            return self.unet.apply({"params": params}, noisy, timesteps, context, added,
                                   attention_kwargs=kwargs, control=control), {}
        pred, state = self.unet.apply({"params": params}, noisy, timesteps, context, added,
                                      attention_kwargs=kwargs, mutable=["intermediates"])
        return pred, adapters.collect_facial_attn(state.get("intermediates", {}))


def split_unet_params(unet_params) -> tuple[dict, dict]:
    """A UNet tree with adapters -> (base weights, adapter subtrees)."""
    return trainable_lib.split_trainable(unet_params, (trainable_lib.ADAPTER_PATTERN,))
