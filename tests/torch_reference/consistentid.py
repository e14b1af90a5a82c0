"""A PyTorch rendering of the reference ConsistentID modules and processors, written from
../shared/reference/consistentid_spec.md (§2-§4, §7.5) for parity tests and benchmarks only.

Module and parameter names follow the spec's state-dict keys exactly, so `load_state_dict(...,
strict=True)` of an exported group checks the layout as the reference loaders do.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- Perceiver blocks


class LoRALinearLayer(nn.Module):
    """diffusers LoRALinearLayer with network_alpha=None: up(down(x)), computed in down's dtype."""

    def __init__(self, in_features, out_features, rank):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        dtype = x.dtype
        return self.up(self.down(x.to(self.down.weight.dtype))).to(dtype)


def feed_forward(dim, mult=4):
    """Keys .0 (LayerNorm), .1, .3 (bias-free Linears), exact GELU in between."""
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    def __init__(self, dim, dim_head=64, heads=8):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x, latents):
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, lq, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        s = 1 / (self.dim_head ** 0.25)
        w = (q * s) @ (k * s).transpose(-2, -1)
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        out = (w @ v).permute(0, 2, 1, 3).reshape(b, lq, -1)
        return self.to_out(out)


class AttentionMLP(nn.Module):
    """FacialEncoder.visual_projection: 1 learned latent, 8 layers of width 1024."""

    def __init__(self, embedding_dim=1280, output_dim=768, dim=1024, depth=8, dim_head=64, heads=16,
                 single_num_tokens=1, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, single_num_tokens, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth))

    def forward(self, x):
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FacePerceiverResampler(nn.Module):
    def __init__(self, dim=768, depth=4, dim_head=64, heads=16, embedding_dim=1280, output_dim=768,
                 ff_mult=4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth))

    def forward(self, latents, x):
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ProjPlusModel(nn.Module):
    def __init__(self, cross_attention_dim=768, id_embeddings_dim=512, clip_embeddings_dim=1280,
                 num_tokens=4):
        super().__init__()
        self.cross_attention_dim, self.num_tokens = cross_attention_dim, num_tokens
        self.proj = nn.Sequential(nn.Linear(id_embeddings_dim, id_embeddings_dim * 2), nn.GELU(),
                                  nn.Linear(id_embeddings_dim * 2, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=cross_attention_dim, depth=4, dim_head=64, heads=cross_attention_dim // 64,
            embedding_dim=clip_embeddings_dim, output_dim=cross_attention_dim, ff_mult=4)

    def forward(self, id_embeds, clip_embeds, shortcut=False, scale=1.0):
        x = self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        x = self.norm(x)
        out = self.perceiver_resampler(x, clip_embeds)
        return x + scale * out if shortcut else out


# ------------------------------------------------------------------------------ FacialEncoder


class MLP(nn.Module):
    def __init__(self, in_dim, out_dim, hidden_dim, use_residual=True):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.use_residual = use_residual
        self.act_fn = nn.GELU()

    def forward(self, x):
        h = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return h + x if self.use_residual else h


class FuseModule(nn.Module):
    def __init__(self, embed_dim):
        super().__init__()
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse_fn(self, p, ids):
        h = self.mlp1(torch.cat([p, ids], dim=-1)) + p
        return self.layer_norm(self.mlp2(h))

    def forward(self, prompt_embeds, id_embeds, class_tokens_mask, valid_id_mask):
        """masked_scatter semantics: the k-th True token (flattened batch order) gets the k-th valid part."""
        b, l, e = prompt_embeds.shape
        valid = id_embeds.reshape(-1, id_embeds.shape[-1])[valid_id_mask.flatten()]
        flat = prompt_embeds.reshape(-1, e).clone()
        mask = class_tokens_mask.reshape(-1)
        fused = self.fuse_fn(flat[mask], valid)
        assert int(mask.sum()) == fused.shape[0]
        flat.masked_scatter_(mask[:, None], fused.to(flat.dtype))
        return flat.view(b, l, e)


class FacialEncoder(nn.Module):
    def __init__(self, embedding_dim=1280, output_dim=768, embed_dim=768):
        super().__init__()
        self.visual_projection = AttentionMLP(embedding_dim=embedding_dim, output_dim=output_dim)
        self.fuse_module = FuseModule(embed_dim)

    def forward(self, prompt_embeds, multi_image_embeds, class_tokens_mask, valid_id_mask):
        b, p, t, c = multi_image_embeds.shape
        ids = self.visual_projection(multi_image_embeds.view(b * p, t, c)).view(b, p, 1, -1)
        return self.fuse_module(prompt_embeds, ids, class_tokens_mask, valid_id_mask)


# --------------------------------------------------------------------------------- processors


class ConsistentAttProcessor(nn.Module):
    """Reference Consistent_AttProcessor, non-xformers branch (get_attention_scores + bmm)."""

    def __init__(self, hidden_size, cross_attention_dim=None, rank=128, lora_scale=1.0):
        super().__init__()
        self.lora_scale = lora_scale
        kin = cross_attention_dim or hidden_size
        self.to_q_lora = LoRALinearLayer(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRALinearLayer(kin, hidden_size, rank)
        self.to_v_lora = LoRALinearLayer(kin, hidden_size, rank)
        self.to_out_lora = LoRALinearLayer(hidden_size, hidden_size, rank)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        assert hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
        b, n, _ = hidden_states.shape
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, ctx.shape[1], b)
        s = self.lora_scale
        q = attn.to_q(hidden_states) + s * self.to_q_lora(hidden_states)
        k = attn.to_k(ctx) + s * self.to_k_lora(ctx)
        v = attn.to_v(ctx) + s * self.to_v_lora(ctx)
        q, k, v = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), attn.head_to_batch_dim(v)
        probs = attn.get_attention_scores(q, k, attention_mask)
        h = attn.batch_to_head_dim(torch.bmm(probs, v))
        h = attn.to_out[0](h) + s * self.to_out_lora(h)
        h = attn.to_out[1](h)
        if attn.residual_connection:
            h = h + hidden_states
        return h / attn.rescale_output_factor


class ConsistentIPAttProcessor(nn.Module):
    """Reference Consistent_IPAttProcessor: LoRA text attention + decoupled ID-token attention.

    `store` (a list) receives the text-part probabilities [B, heads, N, T] when set (the paper's
    "cross" capture; the reference code has no such hook).
    """

    def __init__(self, hidden_size, cross_attention_dim=None, rank=128, lora_scale=1.0, scale=1.0,
                 num_tokens=4):
        super().__init__()
        self.lora_scale, self.scale, self.num_tokens = lora_scale, scale, num_tokens
        kin = cross_attention_dim or hidden_size
        self.to_q_lora = LoRALinearLayer(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRALinearLayer(kin, hidden_size, rank)
        self.to_v_lora = LoRALinearLayer(kin, hidden_size, rank)
        self.to_out_lora = LoRALinearLayer(hidden_size, hidden_size, rank)
        self.to_k_ip = nn.Linear(kin, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(kin, hidden_size, bias=False)
        self.store: Optional[list] = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        assert hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
        b = hidden_states.shape[0]
        end = encoder_hidden_states.shape[1] - self.num_tokens
        text, ip = encoder_hidden_states[:, :end], encoder_hidden_states[:, end:]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        attention_mask = attn.prepare_attention_mask(attention_mask, text.shape[1], b)
        s = self.lora_scale
        q = attn.to_q(hidden_states) + s * self.to_q_lora(hidden_states)
        k = attn.to_k(text) + s * self.to_k_lora(text)
        v = attn.to_v(text) + s * self.to_v_lora(text)
        d = k.shape[-1] // attn.heads

        def heads(t):
            return t.view(b, -1, attn.heads, d).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        if attention_mask is not None:
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        if self.store is not None:
            logits = (q @ k.transpose(-2, -1)) / d ** 0.5
            self.store.append(torch.softmax(logits.float(), dim=-1))
        h = h.transpose(1, 2).reshape(b, -1, attn.heads * d)
        ip_k, ip_v = heads(self.to_k_ip(ip)), heads(self.to_v_ip(ip))
        h_ip = F.scaled_dot_product_attention(q, ip_k, ip_v).transpose(1, 2).reshape(b, -1, attn.heads * d)
        h = h + self.scale * h_ip
        h = attn.to_out[0](h) + s * self.to_out_lora(h)
        h = attn.to_out[1](h)
        if attn.residual_connection:
            h = h + hidden_states
        return h / attn.rescale_output_factor


# ------------------------------------------------------------------------------- UNet wiring


def set_consistentid_processors(unet, rank=128, num_tokens=4, scale=1.0) -> nn.ModuleList:
    """The reference `set_ip_adapter` loop (spec §4): returns `adapter_modules` in attn_processors order."""
    cfg = unet.config
    procs = {}
    for name in unet.attn_processors.keys():
        cross_dim = None if name.endswith("attn1.processor") else cfg.cross_attention_dim
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = cfg.block_out_channels[int(name[len("down_blocks.")])]
        if cross_dim is None:
            procs[name] = ConsistentAttProcessor(hidden, None, rank=rank)
        else:
            procs[name] = ConsistentIPAttProcessor(hidden, cross_dim, rank=rank, scale=scale,
                                                   num_tokens=num_tokens)
    unet.set_attn_processor(procs)
    return nn.ModuleList(unet.attn_processors.values())


def hook_self_attention_scores(unet, store: dict, groups) -> None:
    """Reference `unet_store_cross_attention_scores` (§7.5): wraps `get_attention_scores` of every
    attn1 in `groups`, recording its probabilities [B*heads, N, N] under the module name."""
    for name, module in unet.named_modules():
        if not name.endswith("attn1") or not any(name.startswith(g + ".") for g in groups):
            continue
        original = module.get_attention_scores

        def wrapped(query, key, attention_mask=None, _name=name, _orig=original):
            probs = _orig(query, key, attention_mask)
            store[_name] = probs
            return probs

        module.get_attention_scores = wrapped
