"""What a run shows: console progress, TensorBoard scalars/images, and the PNG summaries in workdir.

Only process 0 writes; the other hosts get no-op writers.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from PIL import Image, ImageDraw


class _QuietOrbax:
    """Drops orbax's per-save INFO chatter (warnings and errors still pass)."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
    """Keeps library INFO chatter (orbax checkpointing) out of our console output."""
    import logging as std_logging

    std_logging.getLogger("absl").addFilter(_QuietOrbax())


def progress(total: int, start: int):
    """A tqdm bar on process 0 (a silent one elsewhere)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0)


def plot_curves(history: Sequence[Mapping[str, float]], keys: Sequence[str], path: pathlib.Path,
                size=(900, 300)) -> None:
    """Small line plots (one panel per key) drawn with PIL, so no plotting library is needed."""
    if not history:
        return
    w, h = size
    img = Image.new("RGB", (w, h * len(keys)), "white")
    draw = ImageDraw.Draw(img)
    steps = np.array([r["step"] for r in history], np.float64)
    for i, key in enumerate(keys):
        ys = np.array([r.get(key, np.nan) for r in history], np.float64)
        top, left, right, bottom = i * h + 25, 60, w - 15, (i + 1) * h - 25
        draw.rectangle([left, top, right, bottom], outline="black")
        finite = ys[np.isfinite(ys)]
        if finite.size == 0:
            continue
        lo, hi = float(finite.min()), float(finite.max())
        hi = hi if hi > lo else lo + 1e-12
        x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)
        pts = [(left + (s - x0) / (x1 - x0) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))
               for s, y in zip(steps, ys) if np.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=(200, 40, 40), width=2)
        draw.text((left, top - 18), f"{key}  (min {lo:.4g}, max {hi:.4g}, last {finite[-1]:.4g})", fill="black")
        draw.text((left, bottom + 5), f"step {int(x0)}", fill="black")
        draw.text((right - 80, bottom + 5), f"step {int(x1)}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def attention_overlay(image: np.ndarray, maps: np.ndarray, valid: np.ndarray) -> Image.Image:
    """Input image next to each facial word's attention (averaged over heads and layers).

    image [H, W, 3] in [-1, 1]; maps [K, side, side]; valid [K]."""
    base = Image.fromarray(((np.asarray(image) + 1) * 127.5).clip(0, 255).astype(np.uint8))
    tiles = [base]
    for m, ok in zip(maps, valid):
        if not ok:
            continue
        heat = (m - m.min()) / (m.max() - m.min() + 1e-8)
        heat = Image.fromarray((heat * 255).astype(np.uint8)).resize(base.size, Image.BILINEAR)
        red = Image.merge("RGB", (heat, Image.new("L", base.size, 0), Image.new("L", base.size, 0)))
        tiles.append(Image.blend(base, red, 0.6))
    out = Image.new("RGB", (base.width * len(tiles), base.height))
    for i, t in enumerate(tiles):
        out.paste(t, (i * base.width, 0))
    return out


def facial_attention_maps(model, frozen, trainable, one, t: int = 400):
    """[K, side, side] attention of each facial word of a 1-sample batch, mean over heads and
    layers (None when nothing is captured). Jit it: `functools.partial(..., model)`.

    The clean latents are noised with a fixed key so images are comparable over time."""
    import jax.numpy as jnp

    latents = model.encode_latents(frozen, one["pixel_values"], jax.random.key(0))
    noisy = latents + 0.5 * jax.random.normal(jax.random.key(1), latents.shape)
    context, added = model.conditioning(frozen, trainable, one)
    _, maps = model.predict_noise(frozen, trainable, noisy, jnp.array([t]), context, added,
                                  facial_token_idx=one["facial_token_idx"], capture=True)
    if not maps:
        return None
    side = max(int(math.isqrt(m.shape[2])) for m in maps.values())
    resized = [jax.image.resize(jnp.mean(m[0], axis=0).T.reshape(-1, int(math.isqrt(m.shape[2])),
                                                                  int(math.isqrt(m.shape[2]))),
                                (m.shape[-1], side, side), "bilinear") for m in maps.values()]
    return jnp.mean(jnp.stack(resized), axis=0)


class Writer:
    """TensorBoard (tensorboardX) + metrics.jsonl + PNGs in the run directory (`cid_jax.run.RunDir`);
    no-op off process 0."""

    def __init__(self, run, mesh=None):
        self.run = run
        self.active = jax.process_index() == 0
        self._tb = None
        self._maps_fn = None
        self._mesh = mesh
        if self.active:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run.tensorboard))
            self._jsonl = open(run.metrics_file, "a")

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        for k, v in metrics.items():
            self._tb.add_scalar(f"train/{k}", v, step)
        self._jsonl.write(json.dumps(dict(step=step, **metrics)) + "\n")
        self._jsonl.flush()
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def eval_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        """Training-time evaluation results (`cid_jax.train_eval`) and the image grid of that step."""
        if not self.active or not metrics:
            return
        for k, v in metrics.items():
            self._tb.add_scalar(f"eval/{k}", v, step)
        self._jsonl.write(json.dumps(dict(step=step, **{f"eval/{k}": v for k, v in metrics.items()})) + "\n")
        self._jsonl.flush()
        grid = self.run.images / f"eval_{step:07d}.png"
        if grid.exists():
            self._tb.add_image("eval/images", np.asarray(Image.open(grid).convert("RGB")), step, dataformats="HWC")

    def attention_images(self, step: int, model, frozen, trainable, batch) -> None:
        """Facial-token attention maps of the first sample over its input image.

        Every process runs the (jitted, replicated-output) computation, as multi-host jit requires;
        only process 0 writes."""
        if self._maps_fn is None:
            from jax.sharding import NamedSharding, PartitionSpec

            out = NamedSharding(self._mesh, PartitionSpec()) if self._mesh is not None else None

            def first_sample(frozen, trainable, batch):
                one = {k: v[:1] for k, v in batch.items()}
                maps = facial_attention_maps(model, frozen, trainable, one)
                return maps, one["pixel_values"][0], one["facial_token_idx_mask"][0]

            self._maps_fn = jax.jit(first_sample, out_shardings=out)
        maps, image, valid = self._maps_fn(frozen, trainable, batch)
        if maps is None or not self.active:
            return
        maps, image, valid = (np.asarray(jax.device_get(x)) for x in (maps, image, valid))
        pic = attention_overlay(image, maps, valid)
        path = self.run.images / f"attention_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pic.save(path)
        self._tb.add_image("attention/facial_tokens", np.asarray(pic), step, dataformats="HWC")

    def close(self, history: Sequence[Mapping[str, float]]) -> None:
        if not self.active:
            return
        plot_curves(history, ["loss", "noise_loss", "facial_loss", "grad_norm"], self.run.curves)
        self._tb.close()
        self._jsonl.close()
