"""Time to first image: process start to PNG on disk, `python -m cid_jax.generate` with a cold and
a warm persistent compilation cache, against `convert/run_pytorch.py` (first and later runs), the
same checkpoint, photo and settings, in one run.

    python benchmarks/first_image.py --runs=3 --out=benchmarks/results/first_image.md

The checkpoint is the demo's architecture (the tiny-sd15 preset; random weights written by
benchmarks/generate.py's `write_weights`: diffusers base folders + an exported ConsistentID
safetensors), 64 px, 10 Euler steps, CFG, fp32, CPU. Each measurement is a fresh process:
ours cold = an empty cache folder; ours warm = the folder the previous run filled; PyTorch has no
compilation to cache, its "warm" runs only have the files in the OS page cache (as ours do).
Medians of --runs; each run alternates the four cases.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _wall(cmd, env) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--weights_dir", default="/tmp/cid_bench_weights", help="random weights (kept, reused)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import skimage.data
    from PIL import Image

    from benchmarks.generate import PRESETS, write_weights

    preset = PRESETS["tiny"]()
    root = pathlib.Path(args.weights_dir) / "tiny"
    workdir = write_weights(preset, root)
    work = pathlib.Path(tempfile.mkdtemp())
    photo = work / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    env = {k: v for k, v in os.environ.items() if k not in ("CID_JAX_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    common = [f"--image={photo}", "--prompt=a portrait", f"--steps={args.steps}", "--merge_step=6",
              "--height=64", "--width=64"]
    ours = [sys.executable, "-m", "cid_jax.generate", f"--checkpoint={workdir}", *common]
    theirs = [sys.executable, "convert/run_pytorch.py", f"--checkpoint={workdir / 'consistentid.safetensors'}",
              f"--base={root / 'base'}", f"--image_encoder={root / 'clip'}", "--device=cpu",
              f"--facial_encoder_heads={preset['facial_encoder']['heads']}", *common]
    times = {"ours_cold": [], "ours_warm": [], "torch_first": [], "torch_again": []}
    for r in range(args.runs):
        cache = work / f"xla_{r}"
        times["ours_cold"].append(_wall(ours + [f"--compilation_cache_dir={cache}", f"--out={work / 'a.png'}"], env))
        times["ours_warm"].append(_wall(ours + [f"--compilation_cache_dir={cache}", f"--out={work / 'b.png'}"], env))
        (times["torch_first"] if r == 0 else times["torch_again"]).append(_wall(theirs + [f"--out={work / 'c.png'}"], env))
        times["torch_again"].append(_wall(theirs + [f"--out={work / 'd.png'}"], env))
        print({k: [round(x, 1) for x in v] for k, v in times.items()}, flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = ["# Time to first image (process start to PNG), CPU", "",
             f"`python benchmarks/first_image.py --runs={args.runs}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} "
             f"CPU cores). tiny-sd15 (the demo's architecture), 64 px, {args.steps} Euler steps, CFG, fp32; medians.",
             "", "| | cid_jax | PyTorch (convert/run_pytorch.py) |", "|---|---|---|",
             f"| first run (ours: empty compilation cache) | {med['ours_cold']:.1f} s | {med['torch_first']:.1f} s |",
             f"| later runs (ours: warm cache) | {med['ours_warm']:.1f} s | {med['torch_again']:.1f} s |",
             f"| warm / cold | **{med['ours_warm'] / med['ours_cold']:.0%}** (goal <= 25%) | "
             f"{med['torch_again'] / med['torch_first']:.0%} |", "",
             "Runs (s): " + "; ".join(f"{k} {', '.join(f'{x:.1f}' for x in v)}" for k, v in times.items()),
             "", "PyTorch's first run is the first of this benchmark only (its files were already in the OS page "
             "cache from writing them); it has nothing to compile.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
