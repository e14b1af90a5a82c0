"""The FGID training input pipeline: tf.data from TFRecord shards to numpy batches.

    from cid_jax.data import pipeline
    cfg = pipeline.PipelineConfig(global_batch_size=16, resolution=512, seed=0)
    for batch in pipeline.batches(dataset_dir, cfg, start_step=step,
                                  process_index=jax.process_index(), process_count=jax.process_count()):
        ...  # dict of numpy arrays, this host's G/P rows of global step `step`, `step + 1`, ...

Order and sharding (see sample.py): the record stream is a per-epoch permutation of the records,
a pure function of (seed, epoch). Step s is stream positions [s*G, (s+1)*G); host h of P reads
rows [h*G/P, (h+1)*G/P) of it. Records are read by index (an offset table of the TFRecord shards,
built once per dataset), so a host reads only its own samples and restarting at step k costs
nothing. Every random choice (caption drop, foreground-loss flag) is a stateless function of
(seed, stream position) (or (seed, step) for a per-batch flag). Hence batches depend only on
(dataset, config, step, process_index, process_count): resume and multi-host are exact.

Per sample (parallel map, deterministic order):
  read record -> parse/decode (tf) -> `masks.face_inputs` (numpy: hole-filled region masks,
  foreground, part images, CLIP preprocessing with PIL bicubic; the same function inference
  uses) -> `sample.text_inputs` (Python: caption composition, drop, tokenisation, part order) ->
  tf: training image resized (bilinear, antialiased; shortest side R) and centre-cropped, in
  [-1, 1]; masks resized the same way; parts reordered/packed; CLIP image zeroed on drop.

Batch (numpy; B = G / process_count, R = resolution, M = mask_resolution or R):
  pixel_values           float32 [B, R, R, 3]   in [-1, 1], NHWC
  clip_image             float32 [B, 224, 224, 3] CLIP-normalised; zeros where `drop`
  part_clip_images       float32 [B, 5, 224, 224, 3] in facial-token order; zeros = padding
  facial_masks           float32 [B, 5, M, M]   region masks in [0, 1], same order as the parts
  foreground_mask        float32 [B, R, R]      "WithoutBackground" in [0, 1]
  input_ids              int32   [B, 77]
  facial_token_mask      bool    [B, 77]
  facial_token_idx       int32   [B, 5]
  facial_token_idx_mask  bool    [B, 5]
  id_embedding           float32 [B, 512]
  has_id_embedding       bool    [B]
  drop                   bool    [B]   caption + CLIP-image drop applied (p = drop_prob)
  use_foreground_loss    bool    [B]   apply the background-masked loss (p = foreground_loss_prob)
  index                  int64   [B]   record index in the split (for debugging and tests)
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import struct
import threading
from typing import Iterator

import numpy as np
import tensorflow as tf
from etils import epath
import tensorflow_datasets as tfds

from cid_jax import errors, paths
from cid_jax.data import batch as batch_lib
from cid_jax.data import clip_preprocess as clip_lib
from cid_jax.data import masks as masks_lib
from cid_jax.data import sample as sample_lib
from cid_jax.text import facial_prompts

MAX_PARTS = masks_lib.MAX_PARTS
# The image is decoded by `decode_image` (accurate JPEG IDCT), not by tfds.
_DECODERS = {"image": tfds.decode.SkipDecoding()}
CLIP = clip_lib.CLIP_SIZE


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    global_batch_size: int
    resolution: int = 512                  # training image side R
    mask_resolution: int | None = None     # facial_masks side (None: R)
    seed: int = 0
    pairing: str = "by_name"               # "reference" (positional, the released weights) | "by_name"
    drop_prob: float = 0.1                 # caption + CLIP-image drop (reference: 0.1)
    foreground_loss_prob: float = 0.5      # background-masked loss (reference: 0.5, per batch)
    foreground_loss_per: str = "batch"     # "batch" (one draw per global step, as the reference) | "sample"
    max_text_length: int = 340             # facial-text length fallback (chars)
    max_length: int = 77                   # tokens
    split: str = "train"
    num_parallel_calls: int = tf.data.AUTOTUNE
    prefetch: int = 2                      # batches
    sdxl: bool = False                     # add SDXL's `time_ids` (R, R, 0, 0, R, R) and encoder 2's `input_ids_2`

    @classmethod
    def from_config(cls, config) -> "PipelineConfig":
        """The pipeline of a training config (`config.data`, `config.train.global_batch`, `config.seed`)."""
        d = config.data
        return cls(global_batch_size=int(config.train.global_batch), resolution=int(d.resolution),
                   mask_resolution=int(d.mask_resolution or d.resolution), seed=int(config.seed),
                   pairing=d.pairing, drop_prob=float(d.drop_prob),
                   foreground_loss_prob=float(d.foreground_loss_prob), max_text_length=int(d.max_text_length),
                   num_parallel_calls=int(d.num_parallel_calls), prefetch=int(d.prefetch),
                   sdxl=config.model.variant == "sdxl")


# ------------------------------------------------------------------------------- record access


def _open_for_scan(path: str):
    """A file opened for one sequential pass: local, or remote through fsspec with large read-ahead
    blocks (the project's file layer, `cid_jax.paths`; TF's own GCS client ignores emulators)."""
    if not paths.is_remote(path):
        return open(path, "rb")
    import fsspec

    fs, name = fsspec.core.url_to_fs(path)
    return fs.open(name, "rb", block_size=8 << 20, cache_type="readahead")


def _read_range(path: str, start: int, length: int) -> bytes:
    """`length` bytes of a remote file from `start`: one ranged GET, no handle or read-ahead kept."""
    import fsspec

    fs, name = fsspec.core.url_to_fs(path)
    return fs.cat_file(name, start=start, end=start + length)


def _scan_tfrecord(path: str) -> np.ndarray:
    """[(data_offset, length)] of each record of a TFRecord file, from the record headers."""
    out = []
    with _open_for_scan(path) as f:
        pos = 0
        while True:
            header = f.read(12)  # uint64 length, uint32 masked CRC of the length
            if not header:
                break
            if len(header) < 12:
                raise ValueError(f"{path}: truncated record header at byte {pos}")
            (length,) = struct.unpack("<Q", header[:8])
            out.append((pos + 12, length))
            pos += 12 + length + 4  # data, uint32 masked CRC of the data
            f.seek(pos)
    return np.asarray(out, np.int64).reshape(-1, 2)


class RecordSource:
    """Random access to the serialized examples of one split of a built FGID dataset."""

    INDEX_NAME = "record_index-{split}.npz"

    def __init__(self, dataset_dir: os.PathLike | str, split: str = "train"):
        self.dataset_dir = epath.Path(dataset_dir)  # local or remote (gs://...)
        if not (self.dataset_dir / "dataset_info.json").exists():
            hint = ""
            found = ([folder for folder, _, files in self.dataset_dir.walk() if "dataset_info.json" in files]
                     if self.dataset_dir.is_dir() else [])  # epath refuses glob("**")
            if found:
                hint = f"; did you mean {sorted(found)[0]}?"
            raise errors.MissingError(f"{self.dataset_dir} is not a built FGID dataset (no dataset_info.json){hint}")
        self.builder = tfds.builder_from_directory(os.fspath(self.dataset_dir))
        if split not in self.builder.info.splits:
            raise KeyError(f"split {split!r} not in {list(self.builder.info.splits)} of {self.dataset_dir}")
        info = self.builder.info.splits[split]
        self.features = self.builder.info.features
        self.files = [os.fspath(p) for p in info.filepaths]
        self.shard_lengths = list(info.shard_lengths)
        table = self._index_table(split)
        self.file_ids, self.offsets, self.lengths = table[:, 0], table[:, 1], table[:, 2]
        self._local = threading.local()

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def _index_table(self, split: str) -> np.ndarray:
        """[(file_id, offset, length)] per record, cached next to the shards when writable."""
        path = self.dataset_dir / self.INDEX_NAME.format(split=split)
        names = [os.path.basename(f) for f in self.files]
        sizes = [epath.Path(f).stat().length for f in self.files]  # a rebuilt dataset invalidates the cache
        if path.exists():
            with path.open("rb") as f, np.load(f) as z:
                if ("sizes" in z.files and list(z["files"]) == names and list(z["sizes"]) == sizes
                        and z["table"].shape[0] == sum(self.shard_lengths)):
                    return z["table"]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:  # I/O bound (remote shards)
            scans = list(pool.map(_scan_tfrecord, self.files))
        rows = []
        for fid, (f, n, t) in enumerate(zip(self.files, self.shard_lengths, scans)):
            if t.shape[0] != n:
                raise ValueError(f"{f}: {t.shape[0]} records, dataset_info says {n}")
            rows.append(np.concatenate([np.full((t.shape[0], 1), fid, np.int64), t], 1))
        table = np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)
        try:  # write then rename, so a concurrent reader never sees half a file
            tmp = path.parent / (path.name + f".tmp{os.getpid()}")
            with tmp.open("wb") as f:
                np.savez(f, table=table, files=np.asarray(names), sizes=np.asarray(sizes, np.int64))
            tmp.replace(path)
        except Exception:  # noqa: BLE001 - a read-only folder or bucket: keep the table in memory only
            pass
        return table

    def read(self, index) -> bytes:
        """The serialized tf.train.Example of record `index` (thread-safe: one handle per thread)."""
        i = int(index)
        fid = int(self.file_ids[i])
        if paths.is_remote(self.files[fid]):
            return _read_range(self.files[fid], int(self.offsets[i]), int(self.lengths[i]))
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        f = handles.get(fid)
        if f is None:
            f = handles[fid] = open(self.files[fid], "rb")
        f.seek(int(self.offsets[i]))
        return f.read(int(self.lengths[i]))


# ----------------------------------------------------------------------------- tf transforms


def _shortest_side_size(h, w, size: int):
    """int32 (new_h, new_w): shortest side = size, the other truncated (torchvision/transformers)."""
    h, w = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    s = tf.constant(size, tf.float64)
    new_h = tf.where(w <= h, tf.floor(s * h / w), s)
    new_w = tf.where(w <= h, s, tf.floor(s * w / h))
    return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def resize_center_crop(x: tf.Tensor, size: int) -> tf.Tensor:
    """[..., H, W, C] (rank 3 or 4) -> float32 [..., size, size, C]: torchvision's Resize(size) + CenterCrop(size).

    Bilinear with antialiasing (as PIL's bilinear, which torchvision uses on PIL images); the crop
    offset rounds half to even, like torchvision's `int(round((h - size) / 2))`. Skips the resize
    when the shortest side already is `size`.
    """
    x = tf.cast(x, tf.float32)
    h, w = tf.shape(x)[-3], tf.shape(x)[-2]
    new_h, new_w = _shortest_side_size(h, w, size)
    same = tf.logical_and(tf.equal(new_h, h), tf.equal(new_w, w))
    x = tf.cond(same, lambda: x,
                lambda: tf.image.resize(x, tf.stack([new_h, new_w]), method="bilinear", antialias=True))
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
    return x[..., top:top + size, left:left + size, :]


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG bytes -> uint8 [H, W, 3], decoding JPEG exactly as PIL (and OpenCV) do.

    TensorFlow's default JPEG IDCT ("INTEGER_FAST", what tfds' Image feature uses) differs from
    libjpeg's accurate one by up to ~18/255 on real photos; "INTEGER_ACCURATE" matches PIL bit for
    bit (tested), so training sees the pixels the reference's PIL loader and our inference see.
    """
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False))


def _gather_parts(values: tf.Tensor, order: tf.Tensor) -> tf.Tensor:
    """values[order] along axis 0 with zeros where order == -1 (cf. masks.arrange_parts)."""
    picked = tf.gather(values, tf.maximum(order, 0))
    keep = tf.reshape(tf.cast(order >= 0, values.dtype), [-1] + [1] * (len(values.shape) - 1))
    return picked * keep


# ----------------------------------------------------------------------------------- pipeline


class _SampleFns:
    """The numpy functions the map calls (closures over the source and tokenizer)."""

    def __init__(self, source: RecordSource, cfg: PipelineConfig, tokenizer, tokenizer_2):
        self.source, self.cfg = source, cfg
        self.tokenizer = tokenizer if tokenizer is not None else sample_lib.default_tokenizer()
        if cfg.sdxl and tokenizer_2 is None:
            tokenizer_2 = sample_lib.default_tokenizer(pad_token="!")
        self.tokenizer_2 = tokenizer_2
        self.order = sample_lib.RecordOrder(cfg.seed, len(source))
        self._lock = threading.Lock()

    def step_records(self, step, process_index, process_count):
        pos = sample_lib.stream_positions(int(step), self.cfg.global_batch_size, int(process_index),
                                          int(process_count))
        with self._lock:
            idx = self.order(pos)
        return pos, idx

    def read(self, index):
        return self.source.read(index)

    @staticmethod
    def vision(image, parsing):
        fi = masks_lib.face_inputs(image, parsing[..., 0])
        return (fi.clip_image, fi.part_clip_images, fi.slot_labels, fi.part_masks.astype(np.uint8),
                fi.foreground.astype(np.uint8))

    def text(self, vqa, detail, slot_labels, drop):
        t = sample_lib.text_inputs(self.tokenizer, vqa.decode("utf-8"), detail.decode("utf-8"), slot_labels,
                                   bool(drop), self.cfg.pairing, self.cfg.max_text_length, self.cfg.max_length)
        # SDXL's encoder 2 reads the text as the reference's SDXL training tokenizes it for it.
        ids_2 = (facial_prompts.second_encoder_ids(self.tokenizer_2, t.text, self.cfg.max_length)
                 if self.cfg.sdxl else np.zeros(0, np.int32))
        return t.input_ids, t.facial_token_mask, t.facial_token_idx, t.facial_token_idx_mask, t.part_order, ids_2


def make_dataset(dataset_dir: os.PathLike | str, cfg: PipelineConfig, *, start_step: int = 0,
                 num_steps: int | None = None, process_index: int = 0, process_count: int = 1,
                 tokenizer=None, tokenizer_2=None) -> tf.data.Dataset:
    """tf.data.Dataset of this host's batches for steps start_step, start_step + 1, ... (see module doc).

    `dataset_dir` is a built dataset folder (`<data_dir>/<name>[/<config>]/<version>`, see builder.py;
    `BuildReport.dataset_dir`).
    `num_steps=None` repeats forever (epochs follow one another inside the stream).
    """
    if cfg.pairing not in sample_lib.PAIRINGS:
        raise ValueError(f"pairing must be one of {sample_lib.PAIRINGS}, got {cfg.pairing!r}")
    if cfg.foreground_loss_per not in ("batch", "sample"):
        raise ValueError(f"foreground_loss_per must be 'batch' or 'sample', got {cfg.foreground_loss_per!r}")
    sample_lib.stream_positions(start_step, cfg.global_batch_size, process_index, process_count)  # validates
    source = RecordSource(dataset_dir, cfg.split)
    fns = _SampleFns(source, cfg, tokenizer, tokenizer_2)
    local_batch = cfg.global_batch_size // process_count
    R = cfg.resolution
    M = cfg.mask_resolution or R
    G = cfg.global_batch_size
    seed = tf.constant(cfg.seed, tf.int64)

    def step_to_samples(step):
        pos, idx = tf.numpy_function(fns.step_records, [step, process_index, process_count],
                                     [tf.int64, tf.int64], stateful=False)
        pos.set_shape([local_batch])
        idx.set_shape([local_batch])
        return tf.data.Dataset.from_tensor_slices((pos, idx))

    def process(position, index):
        serialized = tf.numpy_function(fns.read, [index], tf.string, stateful=False)
        ex = source.features.deserialize_example(serialized, decoders=_DECODERS)
        image, parsing = decode_image(ex["image"]), ex["parsing"]

        u = tf.random.stateless_uniform([2], seed=tf.stack([seed, position]), alg="philox")
        drop = u[0] < cfg.drop_prob
        if cfg.foreground_loss_per == "sample":
            use_fg = u[1] < cfg.foreground_loss_prob
        else:  # one draw per global step, shared by every host
            step_key = tf.stack([seed + 0x5DEECE66D, position // G])
            use_fg = tf.random.stateless_uniform([], seed=step_key, alg="philox") < cfg.foreground_loss_prob

        clip_image, part_clip, slot_labels, part_masks, fg = tf.numpy_function(
            fns.vision, [image, parsing], [tf.float32, tf.float32, tf.int32, tf.uint8, tf.uint8],
            stateful=False)
        clip_image.set_shape([CLIP, CLIP, 3])
        part_clip.set_shape([MAX_PARTS, CLIP, CLIP, 3])
        slot_labels.set_shape([MAX_PARTS])
        part_masks.set_shape([MAX_PARTS, None, None])
        fg.set_shape([None, None])

        ids, ftm, fidx, fidx_mask, order, ids_2 = tf.numpy_function(
            fns.text, [ex["vqa_llva"], ex["vqa_llva_more_face_detail"], slot_labels, drop],
            [tf.int32, tf.bool, tf.int32, tf.bool, tf.int32, tf.int32], stateful=False)
        ids.set_shape([cfg.max_length])
        ftm.set_shape([cfg.max_length])
        fidx.set_shape([MAX_PARTS])
        fidx_mask.set_shape([MAX_PARTS])
        order.set_shape([MAX_PARTS])

        pixel_values = resize_center_crop(image, R) / 127.5 - 1.0
        # masks as a batch of 5 one-channel images: [5, H, W, 1] -> [5, R, R, 1] (-> [5, M, M, 1])
        facial_masks = resize_center_crop(_gather_parts(part_masks, order)[..., None], R)
        if M != R:
            facial_masks = tf.image.resize(facial_masks, [M, M], method="bilinear", antialias=True)
        foreground = resize_center_crop(fg[..., None], R)[..., 0]
        extra = {}
        if cfg.sdxl:
            extra["time_ids"] = tf.constant(batch_lib.sdxl_time_ids(1, R, R)[0])
            extra["input_ids_2"] = tf.ensure_shape(ids_2, [cfg.max_length])
        return {
            **extra,
            "pixel_values": tf.ensure_shape(pixel_values, [R, R, 3]),
            "clip_image": clip_image * (1.0 - tf.cast(drop, tf.float32)),
            "part_clip_images": _gather_parts(part_clip, order),
            "facial_masks": tf.ensure_shape(facial_masks[..., 0], [MAX_PARTS, M, M]),
            "foreground_mask": tf.ensure_shape(foreground, [R, R]),
            "input_ids": ids,
            "facial_token_mask": ftm,
            "facial_token_idx": fidx,
            "facial_token_idx_mask": fidx_mask,
            "id_embedding": ex["id_embedding"],
            "has_id_embedding": ex["has_id_embedding"],
            "drop": drop,
            "use_foreground_loss": use_fg,
            "index": index,
        }

    end = start_step + num_steps if num_steps is not None else np.iinfo(np.int64).max
    ds = tf.data.Dataset.range(start_step, end)
    ds = ds.flat_map(step_to_samples)
    ds = ds.map(process, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.prefetch(cfg.prefetch)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def batches(dataset_dir: os.PathLike | str, cfg: PipelineConfig, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches of `make_dataset` (same arguments)."""
    return make_dataset(dataset_dir, cfg, **kwargs).as_numpy_iterator()


def train_batches(config, dataset_dir: os.PathLike | str, *, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This host's numpy batches of a training config from step `start_step` on: exactly the keys
    of `cid_jax.data.batch.spec_for_config` (deterministic in (seed, step): a resumed run sees the
    batches the uninterrupted one would have seen)."""
    keys = set(batch_lib.spec_for_config(config))
    for b in batches(dataset_dir, PipelineConfig.from_config(config), start_step=start_step,
                     process_index=process_index, process_count=process_count):
        yield {k: v for k, v in b.items() if k in keys}
