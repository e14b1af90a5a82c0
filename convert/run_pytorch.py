#!/usr/bin/env python
"""Run a ConsistentID checkpoint (our exported .safetensors / reference .bin) with PyTorch + diffusers,
e.g. on CUDA, without running the networks in JAX:

    python convert/run_pytorch.py --checkpoint=ConsistentID-v1.bin --base=SD15_DIR \
        --image_encoder=CLIP_H_DIR --image=face.jpg --prompt="a portrait" --device=cuda --dtype=fp16

The steps are the reference pipelines' (spec §6, SD1.5 and SDXL) and those of `cid_jax.sampling`: the same
host preprocessing (imported from cid_jax: parsing or the offline template, masks, part images,
CLIP preprocessing, facial prompt and token masks), then in PyTorch the three embedding sets
(null / text-only / facial-fused, each with the 4 ID tokens), CFG with `i <= merge_step` using the
text-only set, diffusers' Euler or DDIM scheduler and the VAE decode. The ConsistentID modules are
rebuilt here from the checkpoint's shapes (FacialEncoder Perceiver, ProjPlus, LoRA + IP attention
processors) and loaded with strict `load_state_dict`.

SDXL (`--base` holds text_encoder_2/): both encoders' penultimate states form the 2048-wide
context, encoder 2's projected pooled output and the time ids (H, W, 0, 0, H, W) go to the UNet's
`added_cond_kwargs`, switched at the merge step with the context; ProjPlus uses its shortcut;
encoder 2 reads each text as SDXL's tokenizer_2 gives it (the host inputs' `*_ids_2`: "!" as padding
and as its own token).
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import cid_jax  # noqa: F401
except ImportError:  # run from a source checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


# ------------------------------------------------------------------------- ConsistentID modules


class LoRA(nn.Module):
    def __init__(self, din, dout, rank):
        super().__init__()
        self.down, self.up = nn.Linear(din, rank, bias=False), nn.Linear(rank, dout, bias=False)

    def forward(self, x):
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


class Perceiver(nn.Module):
    """One PerceiverAttention (keys .0.*) + FeedForward (keys .1.0/.1.1/.1.3) layer pair."""

    def __init__(self, dim, heads, inner):
        super().__init__()
        self.heads = heads
        self.attn = nn.ModuleDict(dict(norm1=nn.LayerNorm(dim), norm2=nn.LayerNorm(dim),
                                       to_q=nn.Linear(dim, inner, bias=False),
                                       to_kv=nn.Linear(dim, 2 * inner, bias=False),
                                       to_out=nn.Linear(inner, dim, bias=False)))
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim, bias=False), nn.GELU(),
                                nn.Linear(4 * dim, dim, bias=False))

    def forward(self, x, latents):
        a = self.attn
        x, lat = a["norm1"](x), a["norm2"](latents)
        q = a["to_q"](lat)
        k, v = a["to_kv"](torch.cat([x, lat], 1)).chunk(2, -1)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scale = q.shape[-1] ** -0.25
        w = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), -1).to(q.dtype)
        latents = a["to_out"]((w @ v).transpose(1, 2).flatten(2)) + latents
        return self.ff(latents) + latents


def _perceiver_state(sd, prefix):
    """Reference keys `layers.i.0.X` / `layers.i.1.j` -> this module's `layers.i.attn.X` / `layers.i.ff.j`."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "layers" and parts[2] in ("0", "1"):
            parts[2] = "attn" if parts[2] == "0" else "ff"
        out[prefix + ".".join(parts)] = v
    return out


class Resampler(nn.Module):
    """Perceiver stack with proj_in / proj_out / norm_out (AttentionMLP and FacePerceiverResampler)."""

    def __init__(self, din, dim, dout, depth, heads, inner, latents: int = 0):
        super().__init__()
        if latents:
            self.latents = nn.Parameter(torch.zeros(1, latents, dim))
        self.proj_in, self.proj_out, self.norm_out = nn.Linear(din, dim), nn.Linear(dim, dout), nn.LayerNorm(dout)
        self.layers = nn.ModuleList(Perceiver(dim, heads, inner) for _ in range(depth))

    def forward(self, x, latents=None):
        latents = self.latents.expand(x.shape[0], -1, -1) if latents is None else latents
        x = self.proj_in(x)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm_out(self.proj_out(latents))


def _depth(sd, prefix):
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(prefix + "layers."))


class MLP(nn.Module):
    def __init__(self, din, dout, residual):
        super().__init__()
        self.layernorm, self.fc1, self.fc2 = nn.LayerNorm(din), nn.Linear(din, dout), nn.Linear(dout, dout)
        self.residual = residual

    def forward(self, x):
        h = self.fc2(F.gelu(self.fc1(self.layernorm(x))))
        return h + x if self.residual else h


class FacialEncoder(nn.Module):
    """Perceiver over each part image's CLIP states -> one token; fused into the k-th facial word."""

    def __init__(self, sd, heads):
        super().__init__()
        dim = sd["visual_projection.latents"].shape[-1]
        clip_dim = sd["visual_projection.proj_in.weight"].shape[1]
        e = sd["fuse_module.layer_norm.weight"].shape[0]
        inner = sd["visual_projection.layers.0.0.to_q.weight"].shape[0]
        vp = {k[len("visual_projection."):]: v for k, v in sd.items() if k.startswith("visual_projection.")}
        self.visual_projection = Resampler(clip_dim, dim, e, _depth(vp, ""), heads or inner // 64, inner, latents=1)
        self.mlp1, self.mlp2, self.layer_norm = MLP(2 * e, e, False), MLP(e, e, True), nn.LayerNorm(e)
        state = _perceiver_state(vp, "visual_projection.")
        state.update({k[len("fuse_module."):]: v for k, v in sd.items() if k.startswith("fuse_module.")})
        self.load_state_dict(state, strict=True)

    def forward(self, prompt_embeds, parts, token_mask, valid_mask):
        b, p, t, c = parts.shape
        ids = self.visual_projection(parts.reshape(b * p, t, c)).reshape(b * p, -1)[valid_mask.reshape(-1)]
        flat = prompt_embeds.reshape(-1, prompt_embeds.shape[-1]).clone()
        mask = token_mask.reshape(-1)
        n = min(int(mask.sum()), ids.shape[0])
        rows = mask.nonzero()[:n, 0]
        h = self.mlp1(torch.cat([flat[rows], ids[:n]], -1)) + flat[rows]
        flat[rows] = self.layer_norm(self.mlp2(h)).to(flat.dtype)
        return flat.reshape(prompt_embeds.shape)


class ProjPlus(nn.Module):
    """ArcFace 512 -> num_tokens ID tokens, refined by a Perceiver over CLIP-H states (FaceID-Plus)."""

    def __init__(self, sd):
        super().__init__()
        c = sd["norm.weight"].shape[0]
        self.num_tokens = sd["proj.2.weight"].shape[0] // c
        id_dim = sd["proj.0.weight"].shape[1]
        self.proj = nn.Sequential(nn.Linear(id_dim, 2 * id_dim), nn.GELU(), nn.Linear(2 * id_dim, c * self.num_tokens))
        self.norm = nn.LayerNorm(c)
        pr = {k[len("perceiver_resampler."):]: v for k, v in sd.items() if k.startswith("perceiver_resampler.")}
        inner = pr["layers.0.0.to_q.weight"].shape[0]
        self.perceiver_resampler = Resampler(pr["proj_in.weight"].shape[1], c, c, _depth(pr, ""), c // 64, inner)
        state = {k: v for k, v in sd.items() if not k.startswith("perceiver_resampler.")}
        state.update(_perceiver_state(pr, "perceiver_resampler."))
        self.load_state_dict(state, strict=True)

    def forward(self, id_embeds, clip_embeds, shortcut=False, scale=1.0):
        x = self.norm(self.proj(id_embeds).reshape(id_embeds.shape[0], self.num_tokens, -1))
        out = self.perceiver_resampler(clip_embeds, x)
        return x + scale * out if shortcut else out


class Processor(nn.Module):
    """LoRA on q/k/v/out of an attention; cross-attentions also attend to the last `num_tokens`
    context tokens (the ID tokens) with to_k_ip/to_v_ip, added (x scale) before to_out."""

    def __init__(self, hidden, kin, rank, cross, num_tokens=4, scale=1.0):
        super().__init__()
        self.to_q_lora, self.to_k_lora = LoRA(hidden, hidden, rank), LoRA(kin, hidden, rank)
        self.to_v_lora, self.to_out_lora = LoRA(kin, hidden, rank), LoRA(hidden, hidden, rank)
        self.cross, self.num_tokens, self.scale = cross, num_tokens, scale
        if cross:
            self.to_k_ip, self.to_v_ip = nn.Linear(kin, hidden, bias=False), nn.Linear(kin, hidden, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 regions=None, **kw):
        x = hidden_states
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        if self.cross:
            ctx, ip = ctx[:, :-self.num_tokens], ctx[:, -self.num_tokens:]
        split = lambda t: t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa: E731
        q = split(attn.to_q(x) + self.to_q_lora(x))
        kv = lambda c: (split(attn.to_k(c) + self.to_k_lora(c)), split(attn.to_v(c) + self.to_v_lora(c)))  # noqa: E731
        if self.cross and regions is not None:
            h = self._regional(q, ctx, regions, kv, split)
        else:
            h = F.scaled_dot_product_attention(q, *kv(ctx)).transpose(1, 2).flatten(2)
            if self.cross:
                h_ip = F.scaled_dot_product_attention(q, split(self.to_k_ip(ip)), split(self.to_v_ip(ip)))
                h = h + self.scale * h_ip.transpose(1, 2).flatten(2)
        h = attn.to_out[1](attn.to_out[0](h) + self.to_out_lora(h))
        if attn.residual_connection:
            h = h + x
        return h / attn.rescale_output_factor

    def _regional(self, q, base, regions, kv, split):
        """Several people (cid_jax.people): per pixel, sum_p w_p (attention to person p's text context
        + scale x to p's ID tokens) + (1 - sum_p w_p) attention to the base text alone."""
        contexts, masks = regions                          # [B, P, T + n, E], [B, P, h, w]
        w = region_weights(masks, q.shape[2]).to(q.dtype)[:, :, None, :, None]  # [B, P, 1, L, 1]
        end = base.shape[1]
        h = (1 - w.sum(1)) * F.scaled_dot_product_attention(q, *kv(base))
        for p in range(contexts.shape[1]):
            text, ip = contexts[:, p, :end], contexts[:, p, end:]
            h_p = F.scaled_dot_product_attention(q, *kv(text))
            h_p = h_p + self.scale * F.scaled_dot_product_attention(q, split(self.to_k_ip(ip)), split(self.to_v_ip(ip)))
            h = h + w[:, p] * h_p
        return h.transpose(1, 2).flatten(2)


def region_weights(masks, pixels: int):
    """[B, P, h, w] region weights at the latents' resolution -> [B, P, pixels] at the UNet level
    of that many pixels: 2 x 2 means, an odd side padded with its edge (cid_jax.sampling.region_weights)."""
    m = masks.float()
    while m.shape[2] * m.shape[3] > pixels:
        m = F.pad(m, (0, m.shape[3] % 2, 0, m.shape[2] % 2), mode="replicate")
        m = F.avg_pool2d(m, 2)
    if m.shape[2] * m.shape[3] != pixels:
        raise ValueError(f"no UNet level of {pixels} pixels below the {masks.shape[2]}x{masks.shape[3]} latents")
    return m.flatten(2)


def install_processors(unet, adapter_sd) -> None:
    """One Processor per attention, in diffusers' attn_processors order (the checkpoint's indices)."""
    cfg = unet.config
    rank = adapter_sd["0.to_q_lora.down.weight"].shape[0]
    procs = {}
    for name in unet.attn_processors:
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name.split(".")[1])]
        else:
            hidden = cfg.block_out_channels[int(name.split(".")[1])]
        cross = not name.endswith("attn1.processor")
        procs[name] = Processor(hidden, cfg.cross_attention_dim if cross else hidden, rank, cross)
    unet.set_attn_processor(procs)
    nn.ModuleList(unet.attn_processors.values()).load_state_dict(adapter_sd, strict=True)


# ------------------------------------------------------------------------------------ pipeline


def read_checkpoint(path) -> tuple[dict, dict]:
    """(groups {FacialEncoder, image_proj, adapter_modules} of torch tensors, metadata)."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        groups = {}
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                g, _, rest = k.partition(".")
                groups.setdefault(g, {})[rest] = f.get_tensor(k)
    else:
        groups = {g: dict(sd) for g, sd in torch.load(path, map_location="cpu", weights_only=True).items()}
        side = path.with_name(path.name + ".json")
        meta = json.loads(side.read_text()) if side.exists() else {}
    if "image_proj_model" in groups:
        groups["image_proj"] = groups.pop("image_proj_model")
    return groups, meta


class ConsistentIDTorch:
    def __init__(self, checkpoint, base, image_encoder, device="cpu", dtype=torch.float32, sampler="euler",
                 facial_encoder_heads=None):
        import diffusers
        import transformers

        base = pathlib.Path(base)
        groups, self.metadata = read_checkpoint(checkpoint)
        load = dict(torch_dtype=dtype)
        from cid_jax.models.presets import is_sdxl_folder

        self.sdxl = is_sdxl_folder(base)
        self.unet = diffusers.UNet2DConditionModel.from_pretrained(base / "unet", **load)
        install_processors(self.unet, groups["adapter_modules"])
        self.vae = diffusers.AutoencoderKL.from_pretrained(base / "vae", **load)
        self.text = transformers.CLIPTextModel.from_pretrained(base / "text_encoder", **load)
        self.text2 = (transformers.CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2", **load)
                      if self.sdxl else None)
        self.vision = transformers.CLIPVisionModelWithProjection.from_pretrained(image_encoder, **load)
        self.fe = FacialEncoder(groups["FacialEncoder"], facial_encoder_heads)
        self.proj = ProjPlus(groups["image_proj"])
        cls = {"euler": diffusers.EulerDiscreteScheduler, "ddim": diffusers.DDIMScheduler}[sampler]
        sched_dir = base / "scheduler"
        if sched_dir.is_dir():
            self.scheduler = cls.from_pretrained(sched_dir)
        else:
            from cid_jax.schedulers import standard_config

            self.scheduler = cls.from_config(standard_config("sdxl" if self.sdxl else "sd15"))
        self.device, self.dtype = device, dtype
        for m in (self.unet, self.vae, self.text, self.text2, self.vision, self.fe, self.proj):
            if m is not None:
                m.to(device=device, dtype=dtype).eval()

    def _t(self, x, dtype=None):
        return torch.as_tensor(np.asarray(x)).to(self.device, dtype or self.dtype)

    def _clip(self, images_nhwc):
        lead = images_nhwc.shape[:-3]
        x = self._t(np.moveaxis(np.reshape(images_nhwc, (-1,) + images_nhwc.shape[-3:]), -1, 1))
        h = self.vision(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        return h.reshape(*lead, *h.shape[1:])

    def _encode(self, ids, ids_2=None):
        """Token ids (SDXL: also tokenizer_2's) -> (prompt embeddings, pooled embedding or None): SD1.5
        the last hidden state; SDXL both encoders' penultimate states concatenated, and encoder 2's
        projected pooled output."""
        if not self.sdxl:
            return self.text(ids)[0], None
        h1 = self.text(ids, output_hidden_states=True).hidden_states[-2]
        out2 = self.text2(ids_2, output_hidden_states=True)
        return torch.cat([h1, out2.hidden_states[-2]], -1), out2.text_embeds

    def _sets(self, inputs: dict) -> dict:
        """The reference's three contexts (null / text-only / facial, each with its 4 ID tokens), the
        plain negative encoding and the unconditional ID tokens; SDXL also the pooled embeddings."""
        ids = lambda k: self._t(inputs[k], torch.long)  # noqa: E731
        # SDXL's encoder 2 reads each text as tokenizer_2 gives it (inputs "<key>_2").
        texts = lambda k: (ids(k), ids(k + "_2") if self.sdxl else None)  # noqa: E731
        tok_mask, valid = ids("facial_token_mask").bool(), ids("facial_token_idx_mask").bool()
        emb = self._t(inputs["id_embedding"])
        proj = lambda e, clip: self.proj(e, clip, shortcut=self.sdxl)  # noqa: E731  (SDXL: shortcut, scale 1)
        id_tokens = proj(emb, self._clip(inputs["clip_image"]))
        null_tokens = proj(torch.zeros_like(emb), self._clip(np.zeros_like(inputs["clip_image"])))
        facial_text, facial_pooled = self._encode(*texts("input_ids"))
        facial = self.fe(facial_text, self._clip(inputs["part_clip_images"]), tok_mask, valid)
        negative, null_pooled = self._encode(*texts("negative_ids"))
        null_facial = self.fe(negative, self._clip(np.zeros_like(inputs["part_clip_images"])), tok_mask, valid)
        text_only, text_pooled = self._encode(*texts("text_only_ids"))
        return dict(null=torch.cat([null_facial, null_tokens], 1), augmented=torch.cat([facial, id_tokens], 1),
                    text=torch.cat([text_only, id_tokens], 1), negative=negative, null_tokens=null_tokens,
                    null_pooled=null_pooled, text_pooled=text_pooled, facial_pooled=facial_pooled)

    def _controls(self, controls, x_in, t, cond, added, i: int) -> dict:
        """The summed residuals of the ControlNets at step i (the conditional half only: the latents,
        the conditional context and, SDXL, its added embeddings), for both halves of the batch."""
        down = mid = None
        for net, image, scale, keep in controls:
            d, m = net(x_in.to(self.dtype), t, encoder_hidden_states=cond, controlnet_cond=image,
                       conditioning_scale=float(scale * keep[i]), added_cond_kwargs=added, return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is None:
            return {}
        return dict(down_block_additional_residuals=[torch.cat([r, r]) for r in down],
                    mid_block_additional_residual=torch.cat([mid, mid]))

    @torch.no_grad()
    def __call__(self, inputs: dict, noise_nhwc, steps=50, merge_step=30, guidance=5.0, inpaint=None,
                 strength=1.0, controls=()) -> np.ndarray:
        """Host inputs (cid_jax.sampling.model_inputs; SDXL also `time_ids`) + initial noise ->
        images [B,H,W,3] in [0,1]. Inputs with `region_masks` and `person_k`
        (`cid_jax.people.group_inputs`) put several people in one image.

        `inpaint`: (image [B,H,W,3] in [0,1], mask [B,H,W,1] in {0,1}) from
        `cid_jax.sampling.inpainting_arrays`: the reference's inpainting loop (a 9-channel UNet sees
        [latents, mask, masked-image latents]; a 4-channel one keeps the unmasked part, blended from the
        init latents noised to the next step), `strength` < 1 starting part-way. `controls`: (diffusers
        ControlNetModel, control image [B,H,W,3], scale, keep [steps run]) each, as the reference's
        ControlNet pipeline runs them. Init latents are the VAE posterior's mean, as in cid_jax."""
        from cid_jax import sampling as pl

        people = None
        if "region_masks" in inputs:  # several people (cid_jax.people.group_inputs)
            if self.sdxl:
                raise ValueError("several people in one image: SD1.5 models only so far")
            each = [self._sets(inputs[f"person_{k}"]) for k in range(inputs["region_masks"].shape[1])]
            first = each[0]
            null, text, augmented = torch.cat([first["negative"], first["null_tokens"]], 1), first["text"], first["text"]
            stack = lambda key: torch.stack([e[key] for e in each], 1)  # noqa: E731
            people = (stack("null"), stack("text"), stack("augmented"), self._t(inputs["region_masks"], torch.float32))
        else:
            sets = self._sets(inputs)
            null, text, augmented = sets["null"], sets["text"], sets["augmented"]
            null_pooled, text_pooled, facial_pooled = sets["null_pooled"], sets["text_pooled"], sets["facial_pooled"]
        if self.sdxl:
            if "time_ids" not in inputs:
                raise ValueError("SDXL needs inputs['time_ids'] (cid_jax.data.batch.sdxl_time_ids)")
            time_ids = self._t(inputs["time_ids"])

        nchw = lambda a: self._t(np.moveaxis(np.asarray(a), -1, 1), torch.float32)  # noqa: E731
        self.scheduler.set_timesteps(steps, device=self.device)
        start = pl.first_step(steps, strength) if inpaint is not None else 0
        timesteps = self.scheduler.timesteps[start * self.scheduler.order:]
        if inpaint is not None and hasattr(self.scheduler, "set_begin_index"):  # as diffusers' get_timesteps
            self.scheduler.set_begin_index(start * self.scheduler.order)
        noise = nchw(noise_nhwc)
        x = noise * self.scheduler.init_noise_sigma
        nine = self.unet.config.in_channels == 9
        if inpaint is not None:
            pixels, mask = nchw(inpaint[0]) * 2 - 1, nchw(inpaint[1])
            encode = lambda p: (self.vae.encode(p.to(self.dtype)).latent_dist.mean.float()  # noqa: E731
                                * self.vae.config.scaling_factor)
            image_latents = encode(pixels)
            small = F.interpolate(mask, size=noise.shape[-2:])
            masked = torch.cat([encode(pixels * (mask < 0.5))] * 2).to(self.dtype)
            if start:
                x = self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(noise.shape[0]))
        controls = [(net, nchw(image).to(self.dtype), scale, keep) for net, image, scale, keep in controls]
        for i, t in enumerate(timesteps):
            cond = text if i <= merge_step else augmented
            added = cond_added = None
            if self.sdxl:
                pooled = text_pooled if i <= merge_step else facial_pooled
                added = dict(text_embeds=torch.cat([null_pooled, pooled]), time_ids=time_ids.repeat(2, 1))
                cond_added = dict(text_embeds=pooled, time_ids=time_ids)
            x_in = self.scheduler.scale_model_input(x, t)
            residuals = self._controls(controls, x_in, t, cond, cond_added, i)
            if people is not None:
                people_null, people_text, people_facial, masks = people
                people_cond = people_text if i <= merge_step else people_facial
                residuals["cross_attention_kwargs"] = {"regions": (torch.cat([people_null, people_cond]),
                                                                   torch.cat([masks, masks]))}
            x_in = torch.cat([x_in, x_in]).to(self.dtype)
            if nine:
                x_in = torch.cat([x_in, torch.cat([small] * 2).to(self.dtype), masked], dim=1)
            eps = self.unet(x_in, t, encoder_hidden_states=torch.cat([null, cond]), added_cond_kwargs=added,
                            **residuals).sample.float()
            eu, ec = eps.chunk(2)
            x = self.scheduler.step(eu + guidance * (ec - eu), t, x).prev_sample
            if inpaint is not None and not nine:
                proper = image_latents
                if i < len(timesteps) - 1:
                    proper = self.scheduler.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
                x = (1 - small) * proper + small * x
            print(f"\rstep {i + 1}/{len(timesteps)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        vae = self.vae
        if self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae = vae.float()  # SDXL's VAE overflows in fp16
        z = (x / vae.config.scaling_factor).to(next(vae.parameters()).dtype)
        image = vae.decode(z).sample.float()
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def parse_args(argv=None):
    from cid_jax import cli

    p = cli.ArgumentParser(prog="convert/run_pytorch.py", description=__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--base", required=True, help="diffusers SD1.5 or SDXL folder")
    p.add_argument("--image_encoder", help="CLIP-ViT-H-14 folder (default <base>/image_encoder)")
    p.add_argument("--image", action="append", required=True,
                   help="the face photo; repeat for several people, with --region or --layout (as generate)")
    p.add_argument("--region", action="append", default=[], help="several people: x0,y0,x1,y1 per --image")
    p.add_argument("--layout", help="several people: one grey level per person (as generate)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default="monochrome, lowres, bad anatomy, worst quality, low quality, blurry")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None, help="default 5; SDXL 7.5 (the references')")
    p.add_argument("--merge_step", type=int, default=30)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--sampler", choices=("euler", "ddim"), default="euler")
    p.add_argument("--height", type=int, default=None, help="default 512; SDXL 1024")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--facial_encoder_heads", type=int, default=None, help="default: width // 64 (the reference)")
    p.add_argument("--parser_weights")
    p.add_argument("--parsing", help="a 19-class parsing map (PNG) of the photo, used instead of a parser")
    p.add_argument("--insightface_models")
    p.add_argument("--out", default="consistentid_torch.png")
    from cid_jax import generate as gen

    gen.add_edit_flags(p)  # --mask/--init_image/--strength/--controlnet ... as `python -m cid_jax.generate`
    return p.parse_args(argv)


def load_controlnets(folders, unet_config_file, device, dtype) -> list:
    """diffusers' ControlNetModel from each folder (local or remote), checked to fit the base's UNet
    as cid_jax.generate checks it."""
    import diffusers

    from cid_jax import paths
    from cid_jax.models.controlnet import ControlNetConfig
    from cid_jax.models.unet import UNetConfig
    from cid_jax.weights.controlnet import check_fits

    nets = []
    for folder in folders:
        local = paths.local_copy(folder)
        check_fits(ControlNetConfig.from_json(local / "config.json"), UNetConfig.from_json(unet_config_file),
                   f"--controlnet={folder}")
        nets.append(diffusers.ControlNetModel.from_pretrained(local, torch_dtype=dtype).to(device).eval())
    return nets


def main(argv=None) -> int:
    from cid_jax import cli

    return cli.entry_point("run_pytorch")(_main)(argv)


def _main(argv) -> int:
    from cid_jax import build as build_lib
    from cid_jax import cli
    from cid_jax import generate as gen
    from cid_jax import inference
    from cid_jax import sampling as pl
    from cid_jax.data.batch import sdxl_time_ids
    from cid_jax.models.presets import is_sdxl_folder

    cli.setup_logging()
    args = parse_args(argv)
    args.images, args.image = args.image, args.image[0]
    problems = gen.edit_problems(args) + gen.group_problems(args)
    if problems:
        raise cli.InputError("; ".join(problems))
    from cid_jax import paths

    paths.check_writable(paths.path(args.out).parent, "--out")  # before the work, not after it
    base = paths.local_copy(args.base)  # a gs:// folder is copied once into the local cache
    if args.image_encoder:
        args.image_encoder = str(paths.local_copy(args.image_encoder))
    if paths.is_remote(args.checkpoint):
        args.checkpoint = str(paths.local_copy(args.checkpoint))
    for sub in ("unet", "vae", "text_encoder"):
        if not (base / sub / "config.json").exists():
            raise cli.MissingError(f"{base / sub}/config.json not found (--base must be a diffusers SD1.5 "
                                   "or SDXL folder)")
    enc = pathlib.Path(args.image_encoder or base / "image_encoder")
    if not (enc / "config.json").exists():
        raise cli.MissingError(f"CLIP image encoder {enc}/config.json not found")
    variant = "sdxl" if is_sdxl_folder(base) else "sd15"
    defaults = pl.VARIANT_DEFAULTS[variant]
    analysed = [gen.analyse_photo(args, variant, path) for path in args.images]
    image = analysed[0][0]
    faces = [pl.face_batch(*a) for a in analysed]
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = ConsistentIDTorch(args.checkpoint, base, enc, args.device, dtype, args.sampler, args.facial_encoder_heads)
    tok, tok_2 = build_lib.tokenizers_for(inference.base_config(str(base), str(enc)))  # the base's tokenizer folders
    pairing = model.metadata.get("pairing", "reference")
    height, width = args.height or defaults.size, args.width or defaults.size
    f = 2 ** (len(model.vae.config.block_out_channels) - 1)
    if gen.is_group(args):
        from cid_jax import people

        texts = people.group_texts(args.prompt, args.negative_prompt, tok, [x.part_names for x in faces], None,
                                   pairing)
        inputs = people.group_inputs(faces, texts, people.latent_masks(gen.region_masks(args, height, width), f), 1)
    else:
        texts = [pl.text_batch(args.prompt, args.negative_prompt, tok, faces[0].part_names, None, pairing, variant,
                               tok_2)]
        inputs = pl.model_inputs(faces, texts)
    print(f"facial prompt: {texts[0].prompt_face}", file=sys.stderr)
    if model.sdxl:
        inputs["time_ids"] = sdxl_time_ids(1, height, width)
    guidance = args.guidance if args.guidance is not None else defaults.guidance
    noise = pl.initial_noise([args.seed], (height // f, width // f, model.vae.config.latent_channels))
    inpaint, control_images = gen.edit_arrays(args, image, height, width)
    if inpaint is None and model.unet.config.in_channels == 9:
        raise cli.InputError("this UNet is an inpainting one (9 input channels): give --mask (and --init_image)")
    nets = load_controlnets(args.controlnet, base / "unet" / "config.json", args.device, dtype)
    start = pl.first_step(args.steps, args.strength)
    scales = args.controlnet_scale or [0.5] * len(nets)
    keep = pl.control_keep(args.steps - start, args.control_guidance_start, args.control_guidance_end)
    controls = [(net, image_[None], scale, keep) for net, image_, scale in zip(nets, control_images, scales)]
    images = model(inputs, noise, args.steps, args.merge_step, guidance,
                   inpaint=None if inpaint is None else tuple(a[None] for a in inpaint), strength=args.strength,
                   controls=controls)
    from PIL import Image

    # Local or remote (gs://...), whole or not at all, as generate writes.
    paths.write_atomic(args.out, lambda tmp: Image.fromarray(pl.to_uint8(images)[0]).save(tmp, format="PNG"))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
