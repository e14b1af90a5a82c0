"""Seconds per image: our compiled JAX ConsistentID pipeline vs the PyTorch/diffusers path, same run.

    python benchmarks/generate.py --presets=tiny,mid --batches=1,4 --runs=3 --out=benchmarks/results/generate.md
    python benchmarks/generate.py --presets=sd15 --device=gpu --dtype=bf16 --steps=50   # see device_generate.sh

Both sides compute the same thing from the same files (random weights; no real weights are
downloadable here): diffusers/transformers models are created with their default random init and
written with `save_pretrained` (UNet, VAE, CLIP text encoder, CLIP vision encoder, an SD1.5
scheduler config), the ConsistentID trainable modules get random values and are exported with
`cid_jax.export.export_run` (our safetensors layout). Then

* ours:    `cid_jax.inference.load` (the CLI's loader) + `cid_jax.sampling.Generator`: the three
           embedding sets, the whole denoising loop (`lax.scan`) with CFG and the merge switch, and
           the VAE decode in one jitted function;
* PyTorch: `convert/run_pytorch.py`'s `ConsistentIDTorch` (diffusers UNet2DConditionModel /
           AutoencoderKL / Euler scheduler, transformers CLIP, PyTorch ConsistentID modules): the
           reference pipeline's loop, i.e. diffusers' StableDiffusionPipeline structure (Python
           loop, one UNet call per step on the CFG-doubled batch), eager mode.

Timed: host inputs (token ids, CLIP-preprocessed photo and part images, initial noise: built once
by the shared numpy code and given to both) -> decoded images on the host. Face parsing and
preprocessing are the same numpy code for both and are not timed. Each side gets one warm-up
call (ours: includes XLA compilation, reported separately), then `--runs` timed calls,
alternating ours / PyTorch so background load hits both alike; the median is reported. With
bf16/fp16 both sides hold their weights in that dtype (PyTorch: `.to(dtype)`; ours: the param
trees cast once, `--keep-fp32-params` to skip). The max abs difference between the two final
images is printed as a check that the computation is the same (fp32: ~1e-3 or less).

Cases (`--cases`): `text` text-to-image; `inpaint` the reference's inpainting pipeline (the astronaut
repainted under a box, a 4-channel UNet blended each step, strength 1, as its demo); `controlnet`
inpainting steered by one random ControlNet on canny edges at scale 0.5 (the reference's ControlNet +
inpainting demo). PyTorch runs diffusers' ControlNetModel in `run_pytorch.py`'s loop.

Presets (architectures from cid_jax.models.presets, as diffusers/transformers config fields):
  tiny  tiny-sd15, the demo's tiny models (configs/demo.py), 64 px, 10 steps
  mid   mid-sd15: SD1.5's layout at 1/5 width (UNet 64-128-256-256, 2 layers/block, 8 heads of
        8..32), CLIP text 4x256, CLIP vision 4x256 patch 14 (257 tokens like ViT-H), VAE
        32-64-128-128, 256 px, 20 steps
  sd15  sd15: the real SD1.5 UNet/VAE/CLIP-L text + CLIP ViT-H/14 vision + ConsistentID's default
        FacialEncoder/ProjPlus/LoRA-128 adapters, 512 px, 50 steps (for a GPU)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Benchmark preset -> (the architecture preset of cid_jax.models.presets both sides build, image
# side, sampling steps).
BENCH_PRESETS = {"tiny": ("tiny-sd15", 64, 10), "mid": ("mid-sd15", 256, 20), "sd15": ("sd15", 512, 50)}


def _preset(name: str) -> dict:
    """The architecture (diffusers / transformers config fields, one text encoder), size and steps."""
    from cid_jax.models import presets

    arch, size, steps = BENCH_PRESETS[name]
    p = presets.get(arch)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731  (bookkeeping keys)
    return dict(arch=arch, unet=strip(p["unet"]), vae=strip(p["vae"]), text=strip(p["text"][0]),
                vision=strip(p["vision"]), facial_encoder=p["facial_encoder"], lora_rank=p["lora_rank"],
                size=size, steps=steps)


PRESETS = {name: (lambda n=name: _preset(n)) for name in BENCH_PRESETS}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ weights


def random_params(abstract, seed: int):
    """Random host values of init-like scale for an abstract param tree (numpy: no compilation)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        z = rng.standard_normal(leaf.shape, dtype=np.float32)
        if name == "scale":
            return 1 + 0.05 * z
        if name == "bias":
            return 0.05 * z
        fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else leaf.shape[-1]
        return z * np.float32(1 / np.sqrt(fan_in))

    return jax.tree.unflatten(treedef, [draw(p, x) for p, x in flat])


def _torch_models(preset: dict):
    """The base models as diffusers/transformers build them (random init; on the current torch device)."""
    import diffusers
    import transformers

    return {"base/unet": diffusers.UNet2DConditionModel(**preset["unet"]),
            "base/vae": diffusers.AutoencoderKL(**preset["vae"]),
            "base/text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**preset["text"])),
            "clip": transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**preset["vision"]))}


def _our_config(preset: dict, root: pathlib.Path, seed: int):
    from cid_jax.config_base import base_config

    config = base_config()
    config.seed = seed
    config.model.base, config.model.image_encoder = str(root / "base"), str(root / "clip")
    config.model.lora_rank = preset["lora_rank"]
    config.model.facial_encoder.update(preset["facial_encoder"])
    config.model.facial_loss_mode = "none"
    config.data.pairing = "reference"
    return config


def _abstract(model):
    from cid_jax import build as build_lib

    return build_lib.abstract_frozen(model, boxed=False), build_lib.abstract_trainable(model, boxed=False)


def write_weights(preset: dict, root: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """diffusers/transformers folders + a training-style workdir (config.json + exported
    ConsistentID safetensors) under `root`; returns the workdir. Reused if already complete."""
    workdir = root / "workdir"
    marker = root / "complete.json"
    if marker.exists() and json.loads(marker.read_text()) == preset:
        log(f"reusing the weights in {root}")
        return workdir
    import diffusers
    import torch

    from cid_jax import build as build_lib
    from cid_jax import export
    from cid_jax.run import RunDir
    from cid_jax.schedulers import SD15_SCHEDULER_CONFIG

    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(seed)
    log("creating the PyTorch base models (random init) and saving them")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is much faster on a GPU
        models = _torch_models(preset)
    for sub, m in models.items():
        m.save_pretrained(root / sub)
    del models
    diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG).save_pretrained(root / "base" / "scheduler")

    config = _our_config(preset, root, seed)
    model = build_lib.build_modules(config)
    log("random ConsistentID trainable params -> cid_jax.export.export_run")
    trainable = random_params(_abstract(model)[1], seed)
    workdir.mkdir(parents=True)
    export.export_run(config, trainable, RunDir(workdir), step=0, out=workdir / "consistentid.safetensors",
                      dtype="fp32")
    (workdir / "config.json").write_text(config.to_json())
    marker.write_text(json.dumps(preset))
    return workdir


def dry_run(name: str) -> str:
    """No weights, no compute: the preset's PyTorch models on the meta device write their configs;
    our modules are built from them; parameter counts of each base model must agree, and the
    ConsistentID export layout is derived (and, for sd15, must be the reference key table's)."""
    import jax
    import numpy as np
    import torch

    from cid_jax import build as build_lib
    from cid_jax import export
    from cid_jax.weights import consistentid as cw

    preset = PRESETS[name]()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        with torch.device("meta"):
            models = _torch_models(preset)
        for sub, m in models.items():
            (m.save_config if hasattr(m, "save_config") else m.config.save_pretrained)(root / sub)
        config = _our_config(preset, root, 0)
        model = build_lib.build_modules(config)
        frozen, trainable = _abstract(model)
        count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
        ours = {"base/unet": count(frozen["unet"]), "base/vae": count(frozen["vae"]),
                "base/text_encoder": count(frozen["text"]), "clip": count(frozen["vision"])}
        lines = [f"{name}: {preset['size']} px, {preset['steps']} steps"]
        for sub, m in models.items():
            theirs = sum(p.numel() for p in m.parameters())
            lines.append(f"  {sub}: PyTorch {theirs / 1e6:.2f} M params, ours {ours[sub] / 1e6:.2f} M")
            if theirs != ours[sub]:
                raise SystemExit(f"{name}: {sub} parameter counts differ: PyTorch {theirs} vs ours {ours[sub]}")
        layout = export.layout_for_config(config)
        if name == "sd15":
            want = {g: sorted((k, tuple(s)) for k, s in v) for g, v in cw.reference_keys(cw.SD15).items()}
            got = {g: sorted((k, tuple(s)) for k, s in v) for g, v in cw.reference_keys(layout).items()}
            if want != got:
                raise SystemExit("sd15: the export layout differs from the reference SD1.5 key table")
        lines.append(f"  ConsistentID trainable: {count(trainable) / 1e6:.2f} M params, "
                     f"{len(layout.sites)} attention processors")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- runs


def host_inputs(loaded, batch: int, size: int, steps: int, sampler: str, case: str = "text"):
    """The shared host-side inputs: astronaut photo, template parse, random unit ID embedding; for
    the edit cases also the astronaut as the init image with a box over her face to repaint, and
    (controlnet) its canny edges."""
    import numpy as np
    import skimage.data

    from cid_jax import sampling as pl
    from cid_jax.face import template_parse
    from cid_jax.text import DEFAULT_CAPTION_SD15

    photo = skimage.data.astronaut()
    emb = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    face = pl.face_batch(photo, template_parse(photo), emb / np.linalg.norm(emb))
    text = pl.text_batch("a woman reading in a sunlit garden, film photo", "lowres, blurry",
                         loaded.tokenizer, face.part_names, DEFAULT_CAPTION_SD15, "reference")
    inputs = pl.model_inputs([face] * batch, [text] * batch)
    noise = pl.initial_noise(range(batch), pl.latent_shape(loaded.model, size, size))
    edit = {}
    if case != "text":
        mask = np.zeros(photo.shape[:2], np.uint8)
        mask[30:230, 140:330] = 255
        image, small_mask = pl.inpainting_arrays(photo, mask, size, size)
        edit = dict(init_image=np.repeat(image[None], batch, 0), inpaint_mask=np.repeat(small_mask[None], batch, 0))
    if case == "controlnet":
        edit.update(control_image_0=np.repeat(pl.control_arrays(pl.canny_control(photo), size, size)[None], batch, 0),
                    control_scale_0=np.float32(0.5), control_keep_0=pl.control_keep(steps))
    return inputs, edit, noise, pl.scheduler_state(sampler, steps, loaded.noise_config)


def write_controlnet(preset: dict, root: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A random ControlNet for the preset's UNet (diffusers' from_unet), saved as diffusers saves one."""
    where = root / "controlnet"
    if (where / "config.json").exists():
        return where
    import diffusers
    import torch

    torch.manual_seed(seed + 1)
    diffusers.ControlNetModel.from_unet(diffusers.UNet2DConditionModel(**preset["unet"])).save_pretrained(where)
    return where


def run_preset(name: str, args) -> list[dict]:
    """One result per case and batch size: ours with the LoRA folded in at load (the CLI's default)
    and unfolded, and PyTorch, alternating."""
    import jax
    import jax.numpy as jnp
    import torch

    from cid_jax import inference
    from cid_jax import sampling as pl

    preset = PRESETS[name]()
    steps = args.steps or preset["steps"]
    size = preset["size"]
    root = pathlib.Path(args.weights_dir) / name if args.weights_dir else pathlib.Path(tempfile.mkdtemp()) / name
    workdir = write_weights(preset, root)
    controlnet_dir = write_controlnet(preset, root) if "controlnet" in args.cases else None

    jax_dtype = TORCH_DTYPES[args.dtype]
    cast = (lambda x: x) if args.dtype == "fp32" or args.keep_fp32_params else (
        lambda x: x.astype(jax_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x)
    variants = {}
    for label, fold in (("folded", True), ("unfolded", False)):
        log(f"[{name}] loading ours (cid_jax.inference.load, LoRA {label})")
        loaded = inference.load(str(workdir), dtype=jax_dtype, fold_lora=fold)
        params = jax.device_put(jax.tree.map(lambda x: cast(jnp.asarray(x)), (loaded.frozen, loaded.trainable)))
        variants[label] = (loaded, params, pl.Generator(loaded.model))

    log(f"[{name}] loading PyTorch (convert/run_pytorch.py ConsistentIDTorch)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_pytorch", ROOT / "convert" / "run_pytorch.py")
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    device = "cuda" if args.device == "gpu" else "cpu"
    runner = rp.ConsistentIDTorch(workdir / "consistentid.safetensors", root / "base", root / "clip", device=device,
                                  dtype=getattr(torch, TORCH_DTYPES[args.dtype]), sampler=args.sampler,
                                  facial_encoder_heads=variants["folded"][0].model.facial_encoder.heads)

    controlnet = None
    if controlnet_dir is not None:
        import dataclasses

        import diffusers

        from cid_jax.weights.controlnet import load_controlnet

        module, cn_params = load_controlnet(controlnet_dir, dtype=jax_dtype)
        controlnet = (module, jax.device_put(jax.tree.map(lambda x: cast(jnp.asarray(x)), cn_params)),
                      diffusers.ControlNetModel.from_pretrained(controlnet_dir, torch_dtype=getattr(
                          torch, TORCH_DTYPES[args.dtype])).to(device).eval())
        for label, (loaded, params, g) in variants.items():
            variants[label] = (loaded, params, g, dataclasses.replace(g, controlnets=(module,)))

    results = []
    for case in args.cases:
        for batch in args.batches:
            results.append(run_case(name, case, batch, args, variants, runner, controlnet, size, steps, device))
    if not args.weights_dir:
        shutil.rmtree(root.parent, ignore_errors=True)
    return results


def timed(fn):
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_case(name, case, batch, args, variants, runner, controlnet, size, steps, device) -> dict:
    """One case at one batch size: ours folded / unfolded and PyTorch, alternating."""
    import jax
    import numpy as np
    import torch

    inputs, edit, noise, state = host_inputs(variants["folded"][0], batch, size, steps, args.sampler, case)

    def ours(label):
        _, (frozen, trainable), *generators = variants[label]
        g = generators[-1] if case == "controlnet" else generators[0]
        if case == "controlnet":
            frozen = dict(frozen, controlnets=[controlnet[1]])
        return np.asarray(g(frozen, trainable, dict(inputs, **edit), noise, state, args.merge_step,
                            args.guidance)[0])

    def theirs():
        extra = {}
        if case != "text":
            extra["inpaint"] = (edit["init_image"], edit["inpaint_mask"])
        if case == "controlnet":
            extra["controls"] = [(controlnet[2], edit["control_image_0"], 0.5, edit["control_keep_0"])]
        with contextlib.redirect_stderr(io.StringIO()):  # its per-step progress line
            out = runner(inputs, noise, steps, args.merge_step, args.guidance, **extra)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    cases = {"folded": lambda: ours("folded"), "unfolded": lambda: ours("unfolded"), "torch": theirs}
    log(f"[{name}] {case}, batch {batch}: warm-up (ours: compilation)")
    first = {k: timed(fn)[0] for k, fn in cases.items()}
    per_image = {k: [] for k in cases}
    last = {}
    for r in range(args.runs):
        for k, fn in cases.items():
            dt, last[k] = timed(fn)
            per_image[k].append(dt / batch)
        log(f"[{name}] {case}, batch {batch} run {r + 1}/{args.runs}: " +
            ", ".join(f"{k} {v[-1]:.3f} s/img" for k, v in per_image.items()))
    diff = lambda a, b: float(np.abs(last[a].astype(np.float32) - last[b].astype(np.float32)).max())  # noqa: E731
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variants["unfolded"][1]))
    return dict(preset=name, case=case, size=size, steps=steps, merge=args.merge_step, batch=batch,
                params=n_params, t=per_image, first=first, diff_torch=diff("folded", "torch"),
                diff_fold=diff("folded", "unfolded"), jax_device=str(jax.devices()[0]), torch_device=device,
                attention=attention_note())


def attention_note() -> str:
    """Which attention kernel ours ran: on a GPU, cuDNN flash attention where its probe passed."""
    from cid_jax.models import attention

    probes = attention.CUDNN_PROBES
    return "auto" + (f", cuDNN on {sum(probes.values())}/{len(probes)} shapes" if probes else "")


def report(results: list[dict], args) -> str:
    import diffusers
    import jax
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    lines = ["# ConsistentID generation: seconds per image, cid_jax (JAX) vs PyTorch/diffusers", "",
             f"Command: `python {' '.join([str(pathlib.Path(sys.argv[0]).as_posix())] + sys.argv[1:])}`",
             f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} used); "
             f"load average at the end "
             f"{'/'.join(f'{x:.1f}' if isinstance(x, float) else x for x in load)}; jax {jax.__version__} "
             f"({results[0]['jax_device']}), torch {torch.__version__} ({results[0]['torch_device']}"
             f"{', ' + str(torch.get_num_threads()) + ' threads' if results[0]['torch_device'] == 'cpu' else ''}), "
             f"diffusers {diffusers.__version__}.",
             f"Setting: {args.dtype}, {args.sampler}, CFG {args.guidance}; median of {args.runs} alternating runs "
             f"after one warm-up each; ours' attention kernel: {results[0]['attention']}. Ours 'folded': each LoRA "
             "folded into its base projection at load (the CLI's default); 'unfolded': --no_fold_lora.", "",
             "| preset | case | px | steps (merge) | batch | cid_jax folded s/img (img/s) | cid_jax unfolded s/img | "
             "PyTorch s/img (img/s) | folded / PyTorch | 1st call s: folded / unfolded / PyTorch | "
             "max abs diff vs PyTorch / folded vs unfolded |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = {k: statistics.median(v) for k, v in r["t"].items()}
        lines.append(f"| {r['preset']} | {r['case']} | {r['size']} | {r['steps']} ({r['merge']}) | {r['batch']} | "
                     f"{m['folded']:.3f} ({1 / m['folded']:.2f}) | {m['unfolded']:.3f} | "
                     f"{m['torch']:.3f} ({1 / m['torch']:.2f}) | **{m['folded'] / m['torch']:.2f}x** | "
                     f"{r['first']['folded']:.1f} / {r['first']['unfolded']:.1f} / {r['first']['torch']:.2f} | "
                     f"{r['diff_torch']:.1e} / {r['diff_fold']:.1e} |")
    lines += ["", "Runs (s/img): " + "; ".join(
        f"{r['preset']} {r['case']} batch {r['batch']}: " + ", ".join(f"{k} {'/'.join(f'{t:.3f}' for t in v)}"
                                                          for k, v in r["t"].items()) for r in results), ""]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,mid", help=f"comma-separated, of {sorted(PRESETS)}")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="fp32")
    p.add_argument("--keep-fp32-params", action="store_true", help="ours: keep fp32 params with a low-precision dtype")
    p.add_argument("--steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batches", default="1", help="comma-separated images per call (one prompt, several seeds)")
    p.add_argument("--sampler", choices=("euler", "ddim"), default="euler")
    p.add_argument("--cases", default="text", help="comma-separated, of text,inpaint,controlnet (see above)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--merge-step", type=int, default=None, help="default: 30/50 of the steps (the reference's)")
    p.add_argument("--cpus", type=int, default=None,
                   help="CPU runs: pin the process to this many cores and give PyTorch as many threads "
                        "(XLA sizes its pool from the same affinity); default: all cores")
    p.add_argument("--weights-dir", default=None, help="keep/reuse the random weights here (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--dry-run", action="store_true",
                   help="only check the presets: configs, parameter counts PyTorch vs ours, export layout")
    args = p.parse_args(argv)
    unknown = [n for n in args.presets.split(",") if n not in PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    if args.runs < 1:
        p.error("--runs must be >= 1")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.cases = args.cases.split(",")
    if set(args.cases) - {"text", "inpaint", "controlnet"}:
        p.error(f"--cases: of text, inpaint, controlnet; got {args.cases}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if args.cpus:  # before jax/torch start their thread pools
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])
    else:  # one process holds both frameworks: leave PyTorch room on the GPU
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    os.environ.setdefault("USE_TF", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.dry_run:
        for name in args.presets.split(","):
            print(dry_run(name))
        return 0
    import torch

    if args.device == "cpu" and args.cpus:
        torch.set_num_threads(args.cpus)
    results = []
    for name in args.presets.split(","):
        steps = args.steps or PRESETS[name]()["steps"]
        run_args = argparse.Namespace(**vars(args))
        run_args.merge_step = args.merge_step if args.merge_step is not None else round(steps * 30 / 50)
        results.extend(run_preset(name, run_args))
    text = report(results, args)
    print(text)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
