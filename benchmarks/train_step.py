"""One ConsistentID train step, ours (JAX/XLA) vs the same computation in PyTorch, side by side.

The step: frozen VAE encode -> noisy latents; frozen CLIP text encoder; frozen CLIP vision
(penultimate hidden states of the face crop and of the 5 facial-part crops); trainable ProjPlus
(ID tokens) and FacialEncoder (fuses the part features into the facial words); the frozen UNet
with the trainable ConsistentID attention processors (LoRA on every attention, decoupled ID
attention on every cross-attention); loss = noise MSE + 0.01 * facial localization loss (the
cross-attention probabilities of the facial words in the reference's 5 middle block groups);
backward into the trainable parts only; AdamW.

Ours is `cid_jax.trainer.jit_train_step` on a 1-device mesh. PyTorch is diffusers
UNet2DConditionModel + AutoencoderKL, transformers CLIPTextModel / CLIPVisionModelWithProjection,
and the PyTorch renderings of the adapter processors, FacialEncoder and ProjPlus in
tests/torch_reference/consistentid.py (the attention processors store the text probabilities,
which are gathered at the facial-token indices as ours does). Both sides get the same
architecture sizes and the same random batch; each runs in its own subprocess (own peak RSS).
Reported: median of `--runs` timed steps after `--warmup` untimed steps (ours: after compilation,
whose time is reported separately; PyTorch on CPU needs ~2 steps before its step time settles).

Weights are random (a `model.preset` of cid_jax.models.presets, drawn by cid_jax.build without
compiling anything): the step's cost does not depend on the weight values, and this keeps the
benchmark free of downloads.

CPU, mid-size config (results in benchmarks/results/train_step.md):

    python benchmarks/train_step.py --preset mid --runs 3 --threads 2 --out benchmarks/results/train_step.md

GPU, SD1.5 architecture at 512 px, bf16 compute (see benchmarks/device_train.sh):

    python benchmarks/train_step.py --preset sd15 --batch 8 --dtype bfloat16 --device gpu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_BF16_DENSE_TFLOPS = 989.0


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -------------------------------------------------------------------------- architecture sizes


# Benchmark preset -> the architecture preset of cid_jax.models.presets (both sides build from it),
# and the training image / mask resolution of each.
PRESETS = {"tiny": "tiny-sd15", "mid": "mid-sd15", "sd15": "sd15"}
DATA_SIZES = {"tiny": (64, 32), "mid": (256, 64), "sd15": (512, 64)}


def preset_sizes(preset: str) -> dict:
    """Architectures (diffusers / transformers config fields) shared by both implementations."""
    sys.path.insert(0, REPO)
    from cid_jax.models import presets  # plain Python: no JAX on the PyTorch side

    p = presets.get(PRESETS[preset])
    resolution, mask_resolution = DATA_SIZES[preset]
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731  (bookkeeping keys)
    return dict(preset=PRESETS[preset], resolution=resolution, mask_resolution=mask_resolution,
                lora_rank=p["lora_rank"], unet=strip(p["unet"]), vae=strip(p["vae"]), text=strip(p["text"][0]),
                vision=strip(p["vision"]), facial_encoder=p["facial_encoder"])


def random_batch(sizes: dict, batch: int, seed: int = 0) -> dict:
    """One NHWC numpy batch of the trainer's contract. Each sample has exactly 5 facial words, all
    valid (so the reference's masked_scatter pairs words and parts one to one)."""
    import numpy as np

    r = np.random.default_rng(seed)
    res, m, clip = sizes["resolution"], sizes["mask_resolution"], sizes["vision"]["image_size"]
    idx = np.sort(np.stack([r.choice(np.arange(1, 70), 5, replace=False) for _ in range(batch)]), axis=1)
    token_mask = np.zeros((batch, 77), bool)
    np.put_along_axis(token_mask, idx, True, axis=1)
    f32 = np.float32
    return dict(
        pixel_values=r.uniform(-1, 1, (batch, res, res, 3)).astype(f32),
        clip_image=r.uniform(-1, 1, (batch, clip, clip, 3)).astype(f32),
        part_clip_images=r.uniform(-1, 1, (batch, 5, clip, clip, 3)).astype(f32),
        facial_masks=(r.uniform(size=(batch, 5, m, m)) > 0.7).astype(f32),
        foreground_mask=(r.uniform(size=(batch, res, res)) > 0.3).astype(f32),
        input_ids=r.integers(1, 49000, (batch, 77)).astype(np.int32),
        facial_token_mask=token_mask, facial_token_idx=idx.astype(np.int32),
        facial_token_idx_mask=np.ones((batch, 5), bool),
        id_embedding=r.standard_normal((batch, 512)).astype(f32),
        use_foreground_loss=r.uniform(size=batch) < 0.5)


# ------------------------------------------------------------------------------------- ours


def run_jax(args) -> dict:
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, REPO)
    import jax
    import ml_collections

    from cid_jax import build as build_lib
    from cid_jax import sharding, trainer
    from cid_jax.config_base import base_config
    from cid_jax.data.batch import spec_for_config
    from cid_jax.models import attention

    sizes = preset_sizes(args.preset)
    c = base_config()
    c.model.preset = sizes["preset"]
    c.model.facial_encoder = ml_collections.ConfigDict(sizes["facial_encoder"])
    c.model.lora_rank = sizes["lora_rank"]
    c.model.dtype = args.dtype
    c.model.remat = args.remat
    c.model.attention = args.attention
    c.model.facial_loss_mode = "cross" if args.facial else "none"
    c.data.resolution, c.data.mask_resolution = sizes["resolution"], sizes["mask_resolution"]
    c.train.global_batch = args.batch

    t0 = time.perf_counter()
    model, frozen, trainable = build_lib.build(c)
    build_s = time.perf_counter() - t0
    print(f"ours: built the models in {build_s:.0f} s", file=sys.stderr, flush=True)
    batch = random_batch(sizes, args.batch)
    for k, s in spec_for_config(c).items():  # the benchmark batch honours the trainer's input contract
        assert batch[k].shape == s.shape and batch[k].dtype == s.dtype, (k, batch[k].shape, s)

    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    tx = trainer.make_optimizer(c)
    placement = trainer.make_placement(model, tx, mesh)
    state, frozen = trainer.place(trainable, frozen, tx, placement)
    del trainable
    gb = trainer.global_batch(batch, placement)
    step = trainer.jit_train_step(model, tx, c, placement, {k: v.ndim for k, v in gb.items()})
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, gb, jax.random.key(7)).compile()
    compile_s = time.perf_counter() - t0
    print(f"ours: compiled the step in {compile_s:.0f} s", file=sys.stderr, flush=True)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", float("nan")))  # one device's program

    def one(state):
        state, metrics = compiled(state, frozen, gb, jax.random.key(7))
        jax.block_until_ready(metrics)
        return state, metrics

    for _ in range(args.warmup):
        state, metrics = one(state)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        state, metrics = one(state)
        times.append(time.perf_counter() - t0)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    n_train = sum(x.size for x in jax.tree.leaves(state.params))
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    mem = {}
    if args.device == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        mem["peak_device_gib"] = stats.get("peak_bytes_in_use", float("nan")) / 2**30
    # Which attention kernel ran: "auto" on a GPU uses cuDNN flash attention per shape where it passed
    # its probe (cid_jax.models.attention), XLA's elsewhere.
    probes = attention.CUDNN_PROBES
    kernel = (f"attention {args.attention}" + (f", cuDNN on {sum(probes.values())}/{len(probes)} shapes"
                                              if probes else ""))
    return dict(impl="cid_jax (JAX/XLA)", times=times, compile_s=compile_s, build_s=build_s, flops=flops,
                attention=kernel,
                loss=metrics["loss"], facial_loss=metrics["facial_loss"], n_trainable=int(n_train),
                n_frozen=int(n_frozen), peak_rss_gib=_peak_rss_gib(), device=str(jax.devices()[0]),
                version=f"jax {jax.__version__}", **mem)


# ------------------------------------------------------------------------------------ PyTorch


def balanced_l1_torch(attn, masks, valid, eps=1e-5):
    """The reference BalancedL1Loss for one layer. attn [B, H, N, K]; masks [B, K, N]; valid [B, K]."""
    attn = attn.float()
    attn = attn / (attn.amax(dim=2, keepdim=True) + eps)
    m = masks.transpose(1, 2)[:, None]
    background = (attn * (1 - m)).sum(2) / ((1 - m).sum(2) + eps)
    foreground = (attn * m).sum(2) / (m.sum(2) + eps)
    valid = valid.float()[:, None, :]
    return (((background - foreground) * valid).sum(-1) / (valid.sum(-1) + eps)).mean()


def run_torch(args) -> dict:
    import diffusers
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers

    sys.path.insert(0, REPO)
    from tests.torch_reference import consistentid as ref

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device("cuda" if args.device == "gpu" else "cpu")
    sizes = preset_sizes(args.preset)
    t0 = time.perf_counter()
    torch.set_default_device(dev)  # initialise on the device directly (SD1.5 + CLIP-H on CPU takes a minute)
    unet = diffusers.UNet2DConditionModel(**sizes["unet"])
    vae = diffusers.AutoencoderKL(**sizes["vae"])
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**sizes["text"]))
    vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**sizes["vision"]))
    ctx_dim, v_dim = sizes["unet"]["cross_attention_dim"], sizes["vision"]["hidden_size"]
    fe_cfg = sizes["facial_encoder"]
    facial = ref.FacialEncoder(embedding_dim=v_dim, output_dim=ctx_dim, embed_dim=ctx_dim)
    facial.visual_projection = ref.AttentionMLP(  # the reference's Perceiver at this config's width
        embedding_dim=v_dim, output_dim=ctx_dim, dim=fe_cfg["dim"], depth=fe_cfg["depth"],
        dim_head=fe_cfg["dim"] // fe_cfg["heads"], heads=fe_cfg["heads"])
    proj = ref.ProjPlusModel(cross_attention_dim=ctx_dim, id_embeddings_dim=512, clip_embeddings_dim=v_dim,
                             num_tokens=4)
    for m in (unet, vae, text, vision):
        m.requires_grad_(False)
        if args.dtype == "bfloat16":  # frozen weights stored in the compute dtype, as the reference's
            m.to(torch.bfloat16)      # train.py (weight_dtype) and cid_jax (model.frozen_dtype) do
    adapters = ref.set_consistentid_processors(unet, rank=sizes["lora_rank"], num_tokens=4)  # fp32
    for m in (unet, vae, text, vision, facial, proj):
        m.to(dev)
    trainable = [p for m in (adapters, facial, proj) for p in m.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    torch.set_default_device("cpu")
    build_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                            foreach=True)  # multi-tensor update (the CPU default is a per-parameter loop)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear")
    alphas = sched.alphas_cumprod.to(dev)

    # Capture: the text probabilities of every cross-attention in the reference's 5 middle groups.
    # = cid_jax.models.adapters.SD15_CAPTURE_GROUPS, the reference's localization_layers=5 (written out:
    # importing JAX here would inflate this side's RSS).
    groups = ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2")
    capture = []
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, ref.ConsistentIPAttProcessor):
            proc.store = capture if (args.facial and any(name.startswith(g + ".") for g in groups)) else None

    nb = random_batch(sizes, args.batch)
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3))).to(dev)  # noqa: E731
    b = dict(pixel_values=nchw(nb["pixel_values"]), clip_image=nchw(nb["clip_image"]),
             part_clip_images=nchw(nb["part_clip_images"]))
    for k in ("facial_masks", "foreground_mask", "input_ids", "facial_token_mask", "facial_token_idx",
              "facial_token_idx_mask", "id_embedding", "use_foreground_loss"):
        b[k] = torch.from_numpy(nb[k]).to(dev)
    b["input_ids"] = b["input_ids"].long()
    b["facial_token_idx"] = b["facial_token_idx"].long()
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
           else torch.autocast(dev.type, enabled=False))
    gen = torch.Generator(dev).manual_seed(7)
    lam = 0.01

    def step():
        bs = args.batch
        with torch.no_grad(), amp:
            lat = vae.encode(b["pixel_values"]).latent_dist.sample(gen) * sizes["vae"]["scaling_factor"]
            prompt = text(b["input_ids"]).last_hidden_state
            clip = vision(b["clip_image"], output_hidden_states=True).hidden_states[-2]
            parts = vision(b["part_clip_images"].flatten(0, 1), output_hidden_states=True).hidden_states[-2]
            parts = parts.view(bs, 5, *parts.shape[1:])
        lat = lat.float()
        noise = torch.randn(lat.shape, generator=gen, device=dev)
        t = torch.randint(0, 1000, (bs,), generator=gen, device=dev)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        capture.clear()
        with amp:
            id_tokens = proj(b["id_embedding"], clip)
            fused = facial(prompt.float(), parts, b["facial_token_mask"], b["facial_token_idx_mask"])
            context = torch.cat([fused.to(id_tokens.dtype), id_tokens], dim=1)
            pred = unet(noisy, t, context).sample
        pred = pred.float()
        fg = F.interpolate(b["foreground_mask"][:, None], size=pred.shape[-2:], mode="bilinear")
        w = torch.where(b["use_foreground_loss"].view(-1, 1, 1, 1), fg, torch.ones_like(fg))
        loss = F.mse_loss(pred * w, noise * w)
        facial_loss = torch.zeros((), device=dev)
        if capture:
            total = 0.0
            for probs in capture:  # [B, H, N, T] -> the facial words' columns [B, H, N, 5]
                idx = b["facial_token_idx"][:, None, None, :].expand(*probs.shape[:3], 5)
                maps = torch.gather(probs, 3, idx)
                side = int(round(maps.shape[2] ** 0.5))
                masks = F.interpolate(b["facial_masks"], size=(side, side), mode="bilinear",
                                      antialias=True).flatten(2)
                total = total + balanced_l1_torch(maps, masks, b["facial_token_idx_mask"])
            facial_loss = total / len(capture)
        loss = loss + lam * facial_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return loss.item(), float(facial_loss.detach()), len(capture)

    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        loss, facial_loss, n_maps = step()
        times.append(time.perf_counter() - t0)
    mem = {}
    if dev.type == "cuda":
        mem["peak_device_gib"] = torch.cuda.max_memory_allocated() / 2**30
    n_frozen = sum(p.numel() for m in (unet, vae, text, vision) for p in m.parameters()) \
        - sum(p.numel() for p in adapters.parameters())
    return dict(impl="PyTorch reference", times=times, build_s=build_s, loss=loss, facial_loss=facial_loss,
                n_maps=n_maps, n_trainable=sum(p.numel() for p in trainable), n_frozen=int(n_frozen),
                peak_rss_gib=_peak_rss_gib(), device=str(dev),
                version=f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
                        f"transformers {transformers.__version__}", **mem)


# --------------------------------------------------------------------------------------- main


def report(args, results) -> str:
    torch_r, jax_r = results
    med_t, med_j = statistics.median(torch_r["times"]), statistics.median(jax_r["times"])
    s = preset_sizes(args.preset)
    u = s["unet"]
    flops = jax_r.get("flops", float("nan"))
    lines = [
        f"ConsistentID train step, preset `{args.preset}`: {args.batch} x {s['resolution']} px, UNet "
        f"{u['block_out_channels']} x {u['layers_per_block']} layers, context {u['cross_attention_dim']}, "
        f"CLIP text {s['text']['hidden_size']}x{s['text']['num_hidden_layers']}, CLIP vision "
        f"{s['vision']['hidden_size']}x{s['vision']['num_hidden_layers']} at {s['vision']['image_size']} px, "
        f"LoRA rank {s['lora_rank']}, FacialEncoder {s['facial_encoder']}; compute {args.dtype}; "
        f"loss = MSE{' + 0.01 * facial (cross capture)' if args.facial else ' only (no facial term)'}; "
        f"{args.threads} threads; median of {args.runs} after {args.warmup} warm-up steps "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "",
        f"trainable params: ours {jax_r['n_trainable'] / 1e6:.2f} M, PyTorch {torch_r['n_trainable'] / 1e6:.2f} M; "
        f"frozen: ours {jax_r['n_frozen'] / 1e6:.1f} M, PyTorch {torch_r['n_frozen'] / 1e6:.1f} M",
        "",
        "| implementation | median s | runs (s) | samples/s | peak RSS GiB | peak device GiB | loss (facial) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        med = statistics.median(r["times"])
        note = f"{r['version']}; {r['device']}"
        if "compile_s" in r:
            note += (f"; compile {r['compile_s']:.1f} s; XLA flops/step {r['flops'] / 1e12:.3f} T; "
                     f"{r.get('attention', '')}")
        if "n_maps" in r:
            note += f"; {r['n_maps']} captured maps"
        lines.append(f"| {r['impl']} | {med:.3f} | {', '.join(f'{t:.3f}' for t in r['times'])} | "
                     f"{args.batch / med:.2f} | {r['peak_rss_gib']:.2f} | "
                     f"{r.get('peak_device_gib', float('nan')):.2f} | "
                     f"{r['loss']:.4f} ({r['facial_loss']:.4f}) | {note} |")
    lines += ["", f"**ours / PyTorch step time ratio: {med_j / med_t:.2f}x** (goal <= 0.8x); "
                  f"peak RSS ratio {jax_r['peak_rss_gib'] / torch_r['peak_rss_gib']:.2f}x"]
    if args.device == "gpu":
        tf_j, tf_t = flops / med_j / 1e12, flops / med_t / 1e12
        lines += ["", f"TFLOP/s (XLA cost analysis of the compiled step, per device; the same count used for "
                      f"both): ours {tf_j:.1f}, PyTorch {tf_t:.1f}; MFU vs H100 bf16 dense "
                      f"{H100_BF16_DENSE_TFLOPS:.0f} TFLOP/s: ours {100 * tf_j / H100_BF16_DENSE_TFLOPS:.1f}%, "
                      f"PyTorch {100 * tf_t / H100_BF16_DENSE_TFLOPS:.1f}%"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "mid", "sd15"], default="mid")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps first (PyTorch's CPU kernels need ~2 to reach steady state)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="compute dtype (trainable params fp32, frozen ones stored in this dtype, on both sides; PyTorch uses autocast)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--remat", choices=["none", "attention", "full"], default="none",
                    help="ours: recompute in the backward pass (model.remat): nothing, the transformer blocks, every block")
    ap.add_argument("--no-facial", dest="facial", action="store_false",
                    help="loss = MSE only on both sides (no attention capture)")
    ap.add_argument("--impl", choices=["both", "jax", "torch"], default="both")
    ap.add_argument("--attention", choices=["auto", "fused", "chunked", "cudnn"], default="auto",
                    help="ours: attention kernel (auto: chunked on CPU, cuDNN on GPU where it works)")
    ap.add_argument("--out", default=None, help="write the markdown result here")
    args = ap.parse_args()
    if args.impl != "both":
        print(json.dumps((run_jax if args.impl == "jax" else run_torch)(args)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), USE_TF="0", HF_HUB_OFFLINE="1",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true")
    if args.device == "gpu":
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    results = []
    for impl in ("torch", "jax"):
        cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--preset", args.preset,
               "--batch", str(args.batch), "--runs", str(args.runs), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--dtype", args.dtype, "--device", args.device,
               "--attention", args.attention]
        cmd += ["--remat", args.remat] + ([] if args.facial else ["--no-facial"])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-6000:])
            raise SystemExit(f"{impl} side failed (rc {proc.returncode}): {' '.join(cmd)}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        # Each side's raw result as soon as it is there: a later failure keeps it.
        print(f"{impl}: done in {time.perf_counter() - t0:.0f} s: {json.dumps(results[-1])}", file=sys.stderr)
    text = report(args, results)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"<!-- python {' '.join(sys.argv)} -->\n" + text + "\n")


if __name__ == "__main__":
    main()
