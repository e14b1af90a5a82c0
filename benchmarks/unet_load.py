"""Peak host memory (and time) of loading an SD1.5-size UNet from a diffusers folder: ours
(`cid_jax.weights.unet.load_unet`, which converts tensor by tensor from a lazily read state dict)
vs reading the whole file first (what it did before: `read_state_dict` + `load_into`), vs diffusers'
`UNet2DConditionModel.from_pretrained`, each in a fresh process.

    python benchmarks/unet_load.py --folder /tmp/sd15_unet --out benchmarks/results/unet_load.md

The folder (config.json + diffusion_pytorch_model.safetensors, 3.4 GB of random fp32 weights) is
written once if it does not exist.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
MODES = ("ours", "eager", "diffusers")


def write_folder(folder: pathlib.Path) -> None:
    """An SD1.5-architecture diffusers unet/ folder with random weights."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    from safetensors.numpy import save_file

    import diffusers
    import torch

    from cid_jax.models import presets

    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**presets.SD15_UNET)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    rng = np.random.default_rng(0)
    tensors = {k: (rng.standard_normal(tuple(p.shape), dtype=np.float32) * 0.02)
               for k, p in model.state_dict().items()}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))


def load(mode: str, folder: str) -> dict:
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t0 = time.perf_counter()
    if mode == "diffusers":
        import diffusers

        model = diffusers.UNet2DConditionModel.from_pretrained(folder)
        n = sum(p.numel() for p in model.parameters())
    else:
        import jax

        from cid_jax.models.unet import UNet2DConditionModel, UNetConfig, abstract_unet_params
        from cid_jax.weights.state_dict import load_into, read_state_dict
        from cid_jax.weights.unet import load_unet

        if mode == "ours":
            _, params = load_unet(folder)
        else:  # the whole file in memory first, then converted (the loader before this change)
            config = UNetConfig.from_json(pathlib.Path(folder) / "config.json")
            state = read_state_dict(pathlib.Path(folder) / "diffusion_pytorch_model.safetensors")
            params = load_into(abstract_unet_params(UNet2DConditionModel(config)), state, what="UNet")
        n = sum(x.size for x in jax.tree.leaves(params))
    seconds = time.perf_counter() - t0
    return dict(mode=mode, seconds=seconds, params=int(n),
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default="/tmp/cid_bench_sd15_unet")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(load(args.mode, args.folder)))
        return
    folder = pathlib.Path(args.folder)
    if not (folder / "diffusion_pytorch_model.safetensors").exists():
        print(f"writing an SD1.5-size UNet with random weights to {folder}", file=sys.stderr)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                        f"from benchmarks.unet_load import write_folder; import pathlib; "
                        f"write_folder(pathlib.Path({str(folder)!r}))"], check=True)
    env = dict(os.environ, USE_TF="0", JAX_PLATFORMS="cpu")
    results = {m: [] for m in MODES}
    for r in range(args.runs):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--folder", str(folder)], env=env,
                                 capture_output=True, text=True, check=True)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"run {r + 1}: {results[mode][-1]}", file=sys.stderr)
    size = (folder / "diffusion_pytorch_model.safetensors").stat().st_size / 2**30
    lines = [f"Loading an SD1.5-size UNet ({results['ours'][0]['params'] / 1e6:.1f} M params, {size:.2f} GiB "
             f"safetensors, fp32) into host memory; fresh process each, median of {args.runs} "
             f"({os.cpu_count()} cores)", "",
             "| loader | peak RSS GiB | seconds |", "|---|---|---|"]
    names = {"ours": "cid_jax `load_unet` (tensor by tensor)",
             "eager": "whole file first, then converted (cid_jax before)",
             "diffusers": "diffusers `from_pretrained` (PyTorch)"}
    for mode in MODES:
        rss = statistics.median(r["peak_rss_gib"] for r in results[mode])
        sec = statistics.median(r["seconds"] for r in results[mode])
        lines.append(f"| {names[mode]} | {rss:.2f} | {sec:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(f"<!-- python {' '.join(sys.argv)} -->\n{text}\n")


if __name__ == "__main__":
    main()
