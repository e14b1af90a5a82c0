"""FGID input pipeline throughput at 512 px: samples/s on all cores, on one core, and per stage.

Data: synthetic portraits stored as JPEG (q95) at 512 x 512 through the folder builder, like FGID's
`resize_IMG` files. The pipeline runs as training would (global batch, AUTOTUNE parallel map,
prefetch). Each measurement runs in its own subprocess so a one-core run can be pinned with
`sched_setaffinity` before TensorFlow starts its thread pools.

    python benchmarks/data_pipeline.py [--num 64 --batch 8 --batches 12] [--out benchmarks/results/data_pipeline.md]

Also measures the CLIP-preprocessing choice: PIL bicubic (used) vs tf.image.resize bicubic, both
against transformers' CLIPImageProcessor on skimage.data.astronaut().
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = pathlib.Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------- data


def prepare(data_root: pathlib.Path, num: int, size: int) -> pathlib.Path:
    """Folder layout with JPEG images -> built dataset dir (reused if present)."""
    import numpy as np
    from PIL import Image

    from cid_jax.data import builder, synthetic

    done = builder.dataset_dirs(data_root / "built")
    if done:
        return done[0]
    src = data_root / "src"
    for d in ("images", "masks", "embeddings"):
        (src / d).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num):
        f = synthetic.render_sample(0, i, size=size, num_identities=max(1, num // 4))
        Image.fromarray(f.image).save(src / "images" / f"{i:05d}.jpg", quality=95)
        Image.fromarray(f.parsing).save(src / "masks" / f"{i:05d}.png")
        np.save(src / "embeddings" / f"{i:05d}.npy", f.id_embedding)
        rows.append({"id": f"{i:05d}", "vqa_llva": f.vqa_llva,
                     "vqa_llva_more_face_detail": f.vqa_llva_more_face_detail})
    (src / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t0 = time.perf_counter()
    report = builder.build_from_folder(src, data_root / "built", progress=False)
    print(f"built {report.num_examples} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return report.dataset_dir


# ------------------------------------------------------------------------------ workers


def worker_throughput(args) -> dict:
    if args.cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    import numpy as np  # noqa: F401

    from cid_jax.data import pipeline

    cfg = pipeline.PipelineConfig(global_batch_size=args.batch, resolution=args.resolution,
                                  mask_resolution=args.mask_resolution or None)
    it = pipeline.batches(args.dataset_dir, cfg, num_steps=args.batches + 2)
    t0 = time.perf_counter()
    next(it)
    next(it)  # warm-up: tokenizer, tf.function tracing, file handles, the thread pools
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for b in it:
        n += len(b["index"])
    dt = time.perf_counter() - t0
    return {"samples_per_s": n / dt, "samples": n, "seconds": dt, "warmup_s": warm,
            "cores": len(os.sched_getaffinity(0)), "batch_mb": sum(v.nbytes for v in b.values()) / 2**20}


def worker_stages(args) -> dict:
    """Per-sample cost of each stage, single thread, median over the dataset's records."""
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:1]))
    import numpy as np
    import tensorflow as tf

    from cid_jax.data import masks, pipeline, sample
    from cid_jax.data import clip_preprocess as clip_lib

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    src = pipeline.RecordSource(args.dataset_dir)
    tok = sample.default_tokenizer()
    R = args.resolution

    @tf.function
    def parse(serialized):
        ex = src.features.deserialize_example(serialized, decoders=pipeline._DECODERS)
        return pipeline.decode_image(ex["image"]), ex["parsing"], ex["vqa_llva"], ex["vqa_llva_more_face_detail"]

    @tf.function
    def tf_tail(image, part_masks, fg):
        px = pipeline.resize_center_crop(image, R) / 127.5 - 1.0
        m = pipeline.resize_center_crop(part_masks[..., None], R)
        f = pipeline.resize_center_crop(tf.cast(fg, tf.float32)[..., None], R)
        return px, m, f

    stages = {k: [] for k in ("read", "parse+decode", "region masks+foreground", "part composites",
                              "CLIP preprocess x(1+parts)", "text (compose+tokenize)", "tf resize/crop",
                              "total")}
    n = len(src)
    for rep in range(2):  # first pass warms caches / traces
        for i in range(n):
            t = [time.perf_counter()]
            ser = src.read(i)
            t.append(time.perf_counter())
            image, parsing, vqa, detail = parse(tf.constant(ser))
            image, parsing = image.numpy(), parsing.numpy()[..., 0]
            t.append(time.perf_counter())
            pm, slots = masks.region_masks(parsing)
            fg = masks.foreground_mask(parsing)
            t.append(time.perf_counter())
            present = np.flatnonzero(slots)
            comps = masks.part_images(image, pm[present])
            t.append(time.perf_counter())
            clip_lib.clip_preprocess(image)
            clip_lib.clip_preprocess_batch(list(comps))
            t.append(time.perf_counter())
            sample.text_inputs(tok, vqa.numpy().decode(), detail.numpy().decode(), slots, False)
            t.append(time.perf_counter())
            out = tf_tail(tf.constant(image), tf.constant(pm.astype(np.uint8)), tf.constant(fg.astype(np.uint8)))
            out[0].numpy()
            t.append(time.perf_counter())
            if rep:
                for k, a, b in zip(list(stages)[:-1], t[:-1], t[1:]):
                    stages[k].append(b - a)
                stages["total"].append(t[-1] - t[0])
    return {k: statistics.median(v) * 1e3 for k, v in stages.items()}


def worker_clip_choice(args) -> dict:
    import warnings

    import numpy as np
    import skimage.data
    import tensorflow as tf

    from cid_jax.data import clip_preprocess as C

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers

        proc = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)()
    photo = skimage.data.astronaut()
    out = {}
    for name, im in (("512x512", photo), ("400x300", photo[:400, :300])):
        ref = proc(images=im, return_tensors="np").pixel_values[0].transpose(1, 2, 0)
        h, w = im.shape[:2]
        nh, nw = C.shortest_side_size(h, w, 224)
        top, left = C.center_crop_box(nh, nw, 224)

        def tf_path(rounded, antialias=True):
            x = tf.image.resize(tf.cast(im, tf.float32), (nh, nw), "bicubic", antialias=antialias)
            if rounded:
                x = tf.clip_by_value(tf.round(x), 0, 255)
            x = x[top:top + 224, left:left + 224]
            return ((x / 255.0 - C.OPENAI_CLIP_MEAN) / C.OPENAI_CLIP_STD).numpy()

        for label, got in (("PIL bicubic (used)", C.clip_preprocess(im)),
                           ("tf bicubic antialias, rounded to uint8", tf_path(True)),
                           ("tf bicubic antialias, float", tf_path(False)),
                           ("tf bicubic, no antialias", tf_path(False, False))):
            d = np.abs(got - ref)
            out[f"{name}: {label}"] = {"max": float(d.max()), "mean": float(d.mean()),
                                       "max_pixel_levels": float((d * C.OPENAI_CLIP_STD).max() * 255)}
    # speed per 512 -> 224 image, one thread
    f = tf.function(lambda x: tf.image.resize(tf.cast(x, tf.float32), (224, 224), "bicubic", antialias=True))
    f(photo)
    for label, fn in (("PIL bicubic (used)", lambda: C.clip_resize_crop(photo)),
                      ("tf bicubic", lambda: f(photo).numpy())):
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[f"time ms/image: {label}"] = statistics.median(ts) * 1e3
    return out


def worker_hole_fill(args) -> dict:
    """Hole filling: ours (scipy labelling in the bounding box) vs OpenCV contours vs scipy fill."""
    import numpy as np
    from scipy import ndimage

    from cid_jax.data import masks, synthetic

    face = synthetic.render_sample(0, 0, size=512)
    out = {}
    cands = {"ours (scipy label, bbox)": masks.fill_holes, "scipy binary_fill_holes": ndimage.binary_fill_holes}
    try:
        import cv2

        def cv_fill(m):
            c, _ = cv2.findContours(m.astype(np.uint8) * 255, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            o = np.zeros(m.shape, np.uint8)
            cv2.drawContours(o, c, -1, 255, thickness=cv2.FILLED)
            return o > 0
        cands["opencv contours (reference)"] = cv_fill
    except ImportError:
        pass
    for what, lab in (("face (skin)", 1), ("eye", 4), ("background", 0)):
        m = face.parsing == lab
        for name, fn in cands.items():
            ts = []
            for _ in range(20):
                t0 = time.perf_counter()
                fn(m)
                ts.append(time.perf_counter() - t0)
            out[f"{what}: {name}"] = statistics.median(ts) * 1e3
    return out


def worker_threads(args) -> dict:
    """How the Python stages (masks, part images, CLIP, text) scale with threads (GIL check)."""
    from concurrent.futures import ThreadPoolExecutor

    from cid_jax.data import masks, sample, synthetic

    tok = sample.default_tokenizer()
    faces = [synthetic.render_sample(0, i, size=args.size) for i in range(8)]

    def one(f):
        fi = masks.face_inputs(f.image, f.parsing)
        sample.text_inputs(tok, f.vqa_llva, f.vqa_llva_more_face_detail, fi.slot_labels, False)

    for f in faces[:2]:
        one(f)
    out = {}
    ncpu = len(os.sched_getaffinity(0))
    for threads in sorted({1, ncpu}):
        work = faces * 3
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(one, work))
        out[threads] = len(work) / (time.perf_counter() - t0)
    return out


NOTES = """
## Notes

* On this shared 2-core machine (load average ~5 from other jobs) the 2-core runs are not faster than
  the 1-core runs, and two Python threads are not faster than one; so scaling beyond one core could
  not be measured here. Of the ~52 ms per sample, the GIL is held by the text stage (~0.7 ms), scipy
  labelling (~1 ms) and Python glue; tf ops and large numpy ops release it, and so should PIL's
  resampling (its C core drops the GIL around resampling loops; not verified here).
  Re-run this script on a training host (it reports all-core and one-core rates side by side) before
  sizing a pod; if the map turns out GIL-bound there, run the input pipeline in several processes
  (e.g. tf.data service workers) rather than threads.
* The 1-core rate is the budget figure: it includes everything a training step consumes per sample.
  `mask_resolution=64` cuts the batch from ~100 MiB to ~60 MiB (8 samples) with little CPU saved.
"""

WORKERS = {"threads": worker_threads, "throughput": worker_throughput, "stages": worker_stages,
           "clip": worker_clip_choice, "holes": worker_hole_fill}


def spawn(kind: str, args, **over) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind]
    for k, v in {**vars(args), **over}.items():
        if k in ("worker", "out") or v is None:
            continue
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", default=None)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--mask_resolution", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--cores", type=int, default=0)
    p.add_argument("--dataset_dir", default=None)
    p.add_argument("--data_root", default=None, help="where to build the benchmark data (default: a temp dir)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    data_root = pathlib.Path(args.data_root or tempfile.mkdtemp(prefix="cid_data_bench_"))
    args.dataset_dir = str(prepare(data_root, args.num, args.size))
    ncpu = len(os.sched_getaffinity(0))
    load = os.getloadavg()
    results = {
        "all cores, masks 512": spawn("throughput", args),
        "all cores, masks 64": spawn("throughput", args, mask_resolution=64),
        "one core, masks 512": spawn("throughput", args, cores=1),
        "one core, masks 64": spawn("throughput", args, cores=1, mask_resolution=64),
    }
    stages = spawn("stages", args)
    clip = spawn("clip", args)
    holes = spawn("holes", args)
    threads = spawn("threads", args)

    lines = [
        "# FGID input pipeline throughput (benchmarks/data_pipeline.py)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {ncpu} cores visible, load average at start "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared with other jobs: figures are lower bounds).",
        f"Data: {args.num} synthetic {args.size}x{args.size} JPEG (q95) portraits + PNG label maps, built with the "
        f"folder builder. Pipeline: resolution {args.resolution}, global batch {args.batch} (one host), "
        "AUTOTUNE parallel map, by-name pairing, drop 0.1. Output per sample: pixel_values, clip_image, 5 part CLIP "
        "images, 5 facial masks, foreground, tokens.",
        "",
        "## Samples/s",
        "",
        "| run | samples/s | batch size (MiB) | warm-up (s) |",
        "|---|---|---|---|",
    ]
    for k, r in results.items():
        lines.append(f"| {k} ({r['cores']} core{'s' if r['cores'] > 1 else ''}) | {r['samples_per_s']:.1f} | "
                     f"{r['batch_mb']:.0f} | {r['warmup_s']:.1f} |")
    one = results["one core, masks 512"]["samples_per_s"]
    lines += [
        "",
        f"**One core sustains about {one:.1f} samples/s at 512 px** (full per-sample work, masks at 512). "
        "A host needs `cores >= samples_per_step_per_host / step_time_s / per_core_rate` (plus headroom for "
        "the training process itself); e.g. a host feeding 4 chips x 8 samples per 1.0 s step needs "
        f"32 / {one:.1f} = {32 / max(one, 1e-9):.1f} cores at this rate (TPU v4/v5p hosts have 200+ vCPUs).",
        "",
        "## Per-stage cost (one thread, median ms per sample)",
        "",
        "| stage | ms |",
        "|---|---|",
    ]
    for k, v in stages.items():
        lines.append(f"| {k} | {v:.2f} |")
    t1 = threads.get("1")
    tn = max(threads, key=int)
    lines += [
        "",
        f"Python stages alone (face_inputs + text_inputs, no tf.data), thread pool: "
        + ", ".join(f"{k} thread(s): {v:.1f} samples/s" for k, v in threads.items())
        + (f" (x{threads[tn] / t1:.2f} with {tn} threads)" if tn != "1" else "") + ".",
    ]
    lines += [
        "",
        "Stages run in Python through `tf.numpy_function`: record read, region masks + foreground (hole filling),",
        "part composites, CLIP preprocessing (PIL) and text. The rest (parse, JPEG/PNG decode, resizes) are tf ops.",
        "",
        "## CLIP preprocessing: PIL vs tf.image.resize, against transformers' CLIPImageProcessor (astronaut)",
        "",
        "| variant | max abs diff (normalised) | mean abs diff | max diff in 0-255 levels |",
        "|---|---|---|---|",
    ]
    for k, v in clip.items():
        if isinstance(v, dict):
            lines.append(f"| {k} | {v['max']:.2e} | {v['mean']:.2e} | {v['max_pixel_levels']:.2f} |")
    lines += ["", "| resize 512 -> 224, one thread | ms |", "|---|---|"]
    for k, v in clip.items():
        if not isinstance(v, dict):
            lines.append(f"| {k.replace('time ms/image: ', '')} | {v:.2f} |")
    lines += ["", "PIL matches CLIPImageProcessor to float rounding and is not slower, so it is the one "
              "implementation (numpy, shared with inference).", "",
              "## Hole filling (ms per 512 x 512 mask, one thread)", "", "| mask: method | ms |", "|---|---|"]
    for k, v in holes.items():
        lines.append(f"| {k} | {v:.2f} |")
    lines += ["", "Ours equals OpenCV's filled external contours exactly (tests/test_data_masks.py), without "
              "needing OpenCV in the data extra.", NOTES]
    text = "\n".join(lines)
    print(text)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
