"""Process start to the first finished training step, SD1.5 architecture (random weights: the real
UNet, VAE, CLIP-L text and CLIP-H vision sizes, the reference's adapters), 128 px, batch 2, fp32,
CPU: this checkout against an older one (before the host-side init), each in a fresh process.

    python benchmarks/first_step.py --old_repo=/path/to/old/checkout --out=benchmarks/results/first_step.md

The clock runs from launching `python -m cid_jax.train` to its "step 1:" log line (the first step's
metrics, after building, compiling and running it); the process is then stopped. The log's own
split (building / compiling / the step) is reported where the checkout prints it. An old checkout
names random architectures with `model.tiny` (given the same SD1.5 sizes); this one with
`model.preset=sd15`. The persistent compilation cache is off for both.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMON = ["--config.data.synthetic=8", "--config.data.resolution=128", "--config.data.mask_resolution=64",
          "--config.train.global_batch=2", "--config.train.num_steps=2", "--config.train.log_every=1",
          "--config.model.dtype=float32", "--config.train.export_at_end=False", "--config.checkpoint.every_steps=1000",
          "--config.train.image_every=0"]


def old_config_file(folder: pathlib.Path) -> pathlib.Path:
    """configs/sd15.py of the old checkout with `model.tiny` = this checkout's SD1.5 presets."""
    from cid_jax.models import presets

    p = presets.get("sd15")
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    arch = dict(unet=strip(p["unet"]), vae=strip(p["vae"]), text=[strip(t) for t in p["text"]],
                vision=strip(p["vision"]))
    path = folder / "old_sd15_random.py"
    path.write_text("import ml_collections\nfrom configs.sd15 import get_config as _sd15\n\n\ndef get_config():\n"
                    f"    c = _sd15()\n    c.model.tiny = ml_collections.ConfigDict({arch!r})\n    return c\n")
    return path


def time_to_first_step(repo: pathlib.Path, config_args: list[str], workdir: pathlib.Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu", CID_JAX_COMPILATION_CACHE="off")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "-m", "cid_jax.train", f"--workdir={workdir}", *config_args, *COMMON]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"\] step 1: ", line):
                elapsed = time.perf_counter() - t0
                break
        else:
            raise SystemExit(f"{repo}: no first step:\n{''.join(lines[-40:])}")
    finally:
        proc.kill()
        proc.wait()
    text = "".join(lines)
    found = lambda pattern: (m := re.search(pattern, text)) and float(m.group(1))  # noqa: E731
    return {"s": elapsed, "build": found(r"models built and placed in ([\d.]+) s"),
            "compile": found(r"train step compiled in ([\d.]+) s")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old_repo", required=True, help="a checkout from before the host-side init (e.g. 23e09e8)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    old = pathlib.Path(args.old_repo).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        new = time_to_first_step(ROOT, ["--config=configs/sd15.py", "--config.model.preset=sd15"], tmp / "new")
        print("this checkout:", new, flush=True)
        before = time_to_first_step(old, [f"--config={old_config_file(tmp)}"], tmp / "old")
        print("old checkout:", before, flush=True)
    rev = lambda repo: subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],  # noqa: E731
                                      capture_output=True, text=True).stdout.strip() or "?"
    cell = lambda v: f"{v:.0f} s" if v else "n/a"  # noqa: E731
    lines = ["# Process start to the first SD1.5-architecture train step, CPU", "",
             f"`python benchmarks/first_step.py --old_repo=...` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU "
             "cores): random SD1.5 + CLIP-H weights, 128 px, batch 2, fp32, no compilation cache.", "",
             "| checkout | process start -> step 1 | building models | compiling the step |", "|---|---|---|---|",
             f"| before ({rev(old)}, jitted flax inits) | {before['s']:.0f} s | {cell(before['build'])} | "
             f"{cell(before['compile'])} |",
             f"| after ({rev(ROOT)}, host-side init) | {new['s']:.0f} s | {cell(new['build'])} | {cell(new['compile'])} |",
             "", f"Speed-up of the whole start: {before['s'] / new['s']:.1f}x.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
