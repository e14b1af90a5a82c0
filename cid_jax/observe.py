"""What a run shows: console progress, TensorBoard scalars/images, and the PNG summaries in workdir.

Only process 0 writes; the other hosts get no-op writers.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from PIL import Image

from cid_jax import paths


class _QuietOrbax:
    """Drops orbax's per-save INFO chatter (warnings and errors still pass)."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
    """Keeps library INFO chatter (orbax checkpointing, HTTP requests) out of our console output."""
    import logging as std_logging

    std_logging.getLogger("absl").addFilter(_QuietOrbax())
    for name in ("httpx", "httpcore"):  # one INFO line per HTTP request (gradio's client, hub checks)
        std_logging.getLogger(name).setLevel(std_logging.WARNING)


class _LogProgress:
    """tqdm's interface for a non-terminal stderr (a log file, a pipe, a job scheduler): one line
    every `every` steps instead of carriage-return redraws that fill the log."""

    def __init__(self, total: int, start: int, every: int, desc: str = "train"):
        import time

        self.total, self.n, self.every, self.desc = total, start, max(1, every), desc
        self._clock = time.perf_counter
        self._t0, self._n0 = self._clock(), start
        self._postfix = ""

    def set_postfix(self, **kwargs) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            rate = (self.n - self._n0) / max(1e-9, self._clock() - self._t0)
            left = (self.total - self.n) / rate if rate > 0 else float("nan")
            logging.info("%s %d/%d (%.0f%%), %.2f steps/s, %s left%s", self.desc, self.n, self.total,
                         100 * self.n / max(1, self.total), rate, _duration(left),
                         f", {self._postfix}" if self._postfix else "")

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress(total: int, start: int, log_every: int = 50, stream=None):
    """A tqdm bar on process 0 when stderr is a terminal; otherwise a log line every `log_every`
    steps; silent on the other processes."""
    import sys

    from tqdm.auto import tqdm

    stream = sys.stderr if stream is None else stream
    if jax.process_index() == 0 and not (hasattr(stream, "isatty") and stream.isatty()):
        return _LogProgress(total, start, log_every)
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=stream,
                disable=jax.process_index() != 0)


def ema(values: np.ndarray, halflife: float) -> np.ndarray:
    """Exponential moving average over a series (NaNs skipped), bias-corrected from the start."""
    decay = 0.5 ** (1.0 / max(halflife, 1e-9))
    out, acc, weight = np.full(len(values), np.nan), 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc, weight = decay * acc + (1 - decay) * v, decay * weight + (1 - decay)
        if weight > 0:
            out[i] = acc / weight
    return out


def plot_curves(history: Sequence[Mapping[str, float]], keys: Sequence[str], path: pathlib.Path) -> None:
    """One panel per key: the logged values and their EMA (half-life ~1/20 of the run), with step
    and value axes, drawn by matplotlib (no display needed)."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(np.isfinite(r.get(k, np.nan)) for r in history)]
    if not keys:
        return
    steps = np.array([r["step"] for r in history], np.float64)
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 2.6 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        ys = np.array([r.get(key, np.nan) for r in history], np.float64)
        ax.plot(steps, ys, color="tab:blue", alpha=0.35, linewidth=0.8, label="logged")
        ax.plot(steps, ema(ys, max(1.0, len(ys) / 20)), color="tab:red", linewidth=1.8, label="EMA")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        finite = ys[np.isfinite(ys)]
        if finite.size:
            ax.set_title(f"{key}: last {finite[-1]:.4g}, min {finite.min():.4g}", fontsize=9, loc="left")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    paths.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


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


class _Staged:
    """The log files of a remote run directory, written in a local folder and uploaded whole by
    `sync()` (an object store cannot append): metrics.jsonl, the TensorBoard event files, the
    attention images and the loss curves go through the same file layer as everything else
    (`cid_jax.paths`), not a logger's own client. A local run writes in place and `sync()` does
    nothing.

    Uploads are whole files, so `sync()` sends only files that changed, at most once every
    `$CID_JAX_UPLOAD_EVERY_S` seconds (default 60): a long run's log costs O(run time / interval)
    uploads, not one per log line. `close()` (the run's end, a preemption) always uploads."""

    def __init__(self, run):
        import tempfile

        self.run = run
        self.every_s = float(os.environ.get("CID_JAX_UPLOAD_EVERY_S", "60"))
        self._last = float("-inf")
        self._sent: dict[str, tuple[int, int]] = {}
        self._failing = False
        self.local = None if not run.remote else pathlib.Path(tempfile.mkdtemp(prefix="cid_jax-run-"))
        if self.local is not None and run.metrics_file.exists():  # a resumed run appends
            paths.copy_file(run.metrics_file, self.local / run.metrics_file.name)

    def where(self, target):
        return target if self.local is None else self.local / target.relative_to(self.run.root)

    def sync(self, force: bool = False) -> None:
        """Uploads what changed. A failed upload during the run (the store briefly unreachable) is
        logged once and retried at the next interval: the files are safe in the local folder, and
        losing a pod run to a log upload would cost far more. A forced upload raises."""
        import time

        if self.local is None or (not force and time.monotonic() - self._last < self.every_s):
            return
        self._last = time.monotonic()
        try:
            self._upload_changed()
        except Exception as e:  # noqa: BLE001 - each object-store client raises its own types
            if force:
                raise
            if not self._failing:
                logging.warning("could not upload the run's logs to %s (%s); trying again in %.0f s",
                                self.run.root, paths.describe_error(e), self.every_s)
            self._failing = True
            return
        if self._failing:
            logging.info("the run's logs are uploaded to %s again", self.run.root)
            self._failing = False

    def _upload_changed(self) -> None:
        for f in sorted(self.local.rglob("*")):
            if not f.is_file():
                continue
            stat = f.stat()
            rel = f.relative_to(self.local).as_posix()
            if self._sent.get(rel) != (stat.st_size, stat.st_mtime_ns):
                paths.copy_file(f, self.run.root / rel)
                self._sent[rel] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        self.sync(force=True)
        if self.local is not None:
            import shutil

            shutil.rmtree(self.local, ignore_errors=True)


class Writer:
    """TensorBoard (tensorboardX) + metrics.jsonl + PNGs in the run directory (`cid_jax.run.RunDir`,
    local or remote); no-op off process 0."""

    def __init__(self, run, mesh=None):
        self.run = run
        self.active = jax.process_index() == 0
        self._tb = None
        self._maps_fn = None
        self._mesh = mesh
        if self.active:
            from tensorboardX import SummaryWriter

            self._staged = _Staged(run)
            os.makedirs(self._staged.where(run.tensorboard), exist_ok=True)
            self._tb = SummaryWriter(os.fspath(self._staged.where(run.tensorboard)))
            metrics = self._staged.where(run.metrics_file)
            os.makedirs(os.path.dirname(metrics), exist_ok=True)
            self._jsonl = open(metrics, "a")

    def _flush(self) -> None:
        self._jsonl.flush()
        self._tb.flush()
        self._staged.sync()

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        for k, v in metrics.items():
            self._tb.add_scalar(f"train/{k}", v, step)
        self._jsonl.write(json.dumps(dict(step=step, **metrics)) + "\n")
        self._flush()
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def eval_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        """Training-time evaluation results (`cid_jax.train_eval`) and the image grid of that step."""
        if not self.active or not metrics:
            return
        for k, v in metrics.items():
            self._tb.add_scalar(f"eval/{k}", v, step)
        self._jsonl.write(json.dumps(dict(step=step, **{f"eval/{k}": v for k, v in metrics.items()})) + "\n")
        grid = self.run.images / f"eval_{step:07d}.png"
        if grid.exists():
            with grid.open("rb") as f:
                self._tb.add_image("eval/images", np.asarray(Image.open(f).convert("RGB")), step, dataformats="HWC")
        self._flush()

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
        paths.write_atomic(self._staged.where(self.run.images / f"attention_{step:07d}.png"),
                           lambda tmp: pic.save(tmp, format="PNG"))
        self._tb.add_image("attention/facial_tokens", np.asarray(pic), step, dataformats="HWC")

    def close(self, history: Sequence[Mapping[str, float]]) -> None:
        if not self.active:
            return
        self._tb.close()
        self._jsonl.close()
        plot_curves(history, ["loss", "noise_loss", "facial_loss", "grad_norm"], self._staged.where(self.run.curves))
        self._staged.close()
