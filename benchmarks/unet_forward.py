"""SD1.5 UNet forward, full architecture with random weights: ours (JAX) vs diffusers (PyTorch).

Each implementation runs in its own subprocess (so peak RSS is its own), fp32, on the same number
of CPU threads, batch 2, 64x64 latents (512 px), 77 text tokens. Reports the median of N timed runs
after one warm-up (which includes XLA compilation for ours; compile time is reported separately).

    python benchmarks/unet_forward.py --runs 5 --threads 2 [--out benchmarks/results/unet_forward.md]
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


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_jax(args) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cid_jax.models.unet import SD15_UNET, UNet2DConditionModel, abstract_unet_params

    model = UNet2DConditionModel(SD15_UNET)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.02),
                          abstract_unet_params(model))
    x = jnp.asarray(rng.standard_normal((args.batch, 64, 64, 4), np.float32))
    ctx = jnp.asarray(rng.standard_normal((args.batch, 77, 768), np.float32))
    t = jnp.full((args.batch,), 500, jnp.int32)
    fwd = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, x, t, ctx).compile()
    compile_s = time.perf_counter() - t0
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    compiled(params, x, t, ctx).block_until_ready()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        compiled(params, x, t, ctx).block_until_ready()
        times.append(time.perf_counter() - t0)
    return dict(impl="cid_jax (JAX/XLA)", times=times, compile_s=compile_s, flops=flops,
                peak_rss_gib=_peak_rss_gib(), version=f"jax {jax.__version__}")


def run_torch(args) -> dict:
    import diffusers
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2).eval()
    x = torch.randn(args.batch, 4, 64, 64)
    ctx = torch.randn(args.batch, 77, 768)
    t = torch.full((args.batch,), 500)
    times = []
    with torch.inference_mode():
        model(x, t, ctx)
        for _ in range(args.runs):
            t0 = time.perf_counter()
            model(x, t, ctx)
            times.append(time.perf_counter() - t0)
    return dict(impl="diffusers (PyTorch)", times=times, peak_rss_gib=_peak_rss_gib(),
                version=f"torch {torch.__version__}, diffusers {diffusers.__version__}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impl", choices=["both", "jax", "torch"], default="both")
    ap.add_argument("--out", default=None, help="write a markdown result table here")
    args = ap.parse_args()
    if args.impl != "both":
        print(json.dumps((run_jax if args.impl == "jax" else run_torch)(args)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), USE_TF="0",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen=true")
    results = []
    for impl in ("torch", "jax"):
        cmd = [sys.executable, __file__, "--impl", impl, "--runs", str(args.runs),
               "--batch", str(args.batch), "--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    torch_r, jax_r = results
    med = {r["impl"]: statistics.median(r["times"]) for r in results}
    ratio = med[jax_r["impl"]] / med[torch_r["impl"]]
    lines = [
        f"SD1.5 UNet forward, batch {args.batch}, 64x64 latents, 77 tokens, fp32, {args.threads} threads, "
        f"median of {args.runs} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "",
        "| implementation | median s | runs (s) | peak RSS GiB | notes |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        note = r["version"]
        if "compile_s" in r:
            note += f"; compile {r['compile_s']:.1f} s; XLA flops {r['flops'] / 1e12:.3f} T"
        lines.append(f"| {r['impl']} | {statistics.median(r['times']):.2f} | "
                     f"{', '.join(f'{t:.2f}' for t in r['times'])} | {r['peak_rss_gib']:.2f} | {note} |")
    lines += ["", f"**ours / PyTorch time ratio: {ratio:.2f}x** (goal <= 1.0x)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"<!-- {' '.join(sys.argv)} -->\n" + text + "\n")


if __name__ == "__main__":
    main()
