"""From a folder of photos to the prepared-folder layout that `builder.build_from_folder` reads.

    python -m cid_jax.data.prepare --images=photos/ --out=my_faces/ \
        --parser_weights=79999_iter.pth --insightface_models=~/.insightface/models/buffalo_l \
        [--captions=captions.csv] [--batch_size=8]
    python -c "from cid_jax.data import builder; print(builder.build_from_folder('my_faces', '/data/tfds').summary())"

For every photo directly inside `--images` (.jpg .jpeg .png .webp .bmp .tif .tiff) it runs the
code generation uses (`cid_jax.face.FaceAnalyzer`): BiSeNet parsing from `--parser_weights`
(a face must first be found by the offline detector, as in `generate`), or without it the offline
LBP face cascade + geometric part template; and the insightface ArcFace embedding from
`--insightface_models`, or without it no embedding (the record then gets zeros and
`has_id_embedding=False`, as the reference does for a face insightface cannot see). Each fallback
is announced once. It writes (README.md, "Folder layout (b)"):

    OUT/images/<id>.{jpg,jpeg,png}   the photo: its own bytes when already JPEG/PNG, else PNG
                                     (re-encoded upright when the EXIF orientation says rotated)
    OUT/masks/<id>.png               uint8 19-class label map at the photo's size (the parser runs at
                                     --parse_size square like the reference; resized back nearest)
    OUT/embeddings/<id>.npy          float32 (512,) normed ArcFace embedding (only with insightface)
    OUT/captions.jsonl               {"id", "vqa_llva", "vqa_llva_more_face_detail", "identity"}
    OUT/prepare_report.json          this run: counts, the failed files with reasons, fallbacks used

`<id>` is the photo's file name without extension. Captions come from `--captions` (a CSV with a
file/image/id/name column plus vqa_llva, vqa_llva_more_face_detail[, identity]; a JSON object
{file name: {"vqa_llva": .., "vqa_llva_more_face_detail": ..} or [llva, detail]}; or a JSON list /
JSONL of rows as in the CSV), matched by file name, then by stem. Photos without a caption get the
default captions `DEFAULT_VQA_LLVA` / `DEFAULT_FACE_DETAIL` (the latter is the reference's default
facial caption, naming all five parts so every present part gets a facial token) and are listed
in the report.

Robust and resumable: a photo that cannot be decoded or has no face is counted, listed with its
reason in the report, and skipped; a photo whose captions.jsonl line exists (and whose files are
there) is not redone, so an interrupted run is simply restarted. Each photo's files are written
atomically before its caption line, which marks it done. Parsing runs in fixed-size batches (one
compilation), decoding in a thread pool.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import logging
import os
import pathlib
import sys
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from cid_jax import cli

log = logging.getLogger("cid_jax.data.prepare")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
KEPT_EXTS = (".jpg", ".jpeg", ".png")  # what the folder builder reads; other formats become PNG
DEFAULT_VQA_LLVA = "The image shows a person."
DEFAULT_FACE_DETAIL = "The person has one face, one nose, two eyes, two ears, and one mouth."
REPORT_NAME = "prepare_report.json"
EXIF_ORIENTATION = 0x0112
CAPTIONS_NAME = "captions.jsonl"


# ------------------------------------------------------------------------------------ captions


def _caption_row(name: str, value: Any) -> dict:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"vqa_llva": value[0], "vqa_llva_more_face_detail": value[1]}
    if isinstance(value, Mapping) and "vqa_llva" in value and "vqa_llva_more_face_detail" in value:
        return dict(value)
    raise cli.InputError(f"captions for {name!r}: expected [vqa_llva, vqa_llva_more_face_detail] or an object "
                     f"with those keys, got {value!r}")


def _row_name(row: Mapping, path: pathlib.Path) -> str:
    for key in ("file", "image", "file_name", "filename", "name", "id"):
        if row.get(key):
            return str(row[key])
    raise cli.InputError(f"{path}: a row has none of the columns file/image/file_name/filename/name/id: {dict(row)}")


def read_captions(path: os.PathLike | str) -> dict[str, dict]:
    """--captions file -> {file name or stem: {"vqa_llva", "vqa_llva_more_face_detail"[, "identity"]}}."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise cli.MissingError(f"captions file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, Mapping):
            return {str(k): _caption_row(str(k), v) for k, v in data.items()}
        if not isinstance(data, list):
            raise cli.InputError(f"{path}: expected a JSON object or list, got {type(data).__name__}")
        rows = data
    else:
        raise cli.InputError(f"{path}: captions must be .csv, .json or .jsonl")
    out = {}
    for row in rows:
        name = _row_name(row, path)
        out[name] = _caption_row(name, row)
    return out


def captions_for(file_name: str, table: Optional[Mapping[str, dict]]) -> Optional[dict]:
    """The row of `file_name` (exact name first, then its stem), or None."""
    if not table:
        return None
    return table.get(file_name) or table.get(pathlib.Path(file_name).stem)


# --------------------------------------------------------------------------------------- files


def list_images(images_dir: pathlib.Path) -> list[pathlib.Path]:
    """Photos directly inside `images_dir`, by name (hidden files and other extensions ignored)."""
    if not images_dir.is_dir():
        raise cli.MissingError(f"images folder {images_dir} does not exist")
    return sorted(p for p in images_dir.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS)


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclasses.dataclass
class Photo:
    """A decoded photo: RGB pixels exactly as the builder will decode the written image file."""
    id: str
    path: pathlib.Path
    rgb: np.ndarray      # uint8 [H, W, 3]
    encoded: bytes       # the bytes to write as images/<id><ext>
    ext: str             # ".jpg" / ".jpeg" / ".png"


def load_photo(path: pathlib.Path) -> Photo:
    """Decodes a photo and decides what to write; raises OSError/ValueError if it is not an image.

    JPEG/PNG files are kept byte for byte (no re-encoding loss). A photo stored rotated (EXIF
    orientation) is transposed upright and re-encoded, so that the mask, the detector and the
    builder (which ignores EXIF) all see the same upright pixels; other formats become PNG.
    """
    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        im.load()  # decode now: a truncated/corrupt file fails here, not later
        fmt = im.format
        rotated = im.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1)
        rgb = np.asarray((ImageOps.exif_transpose(im) if rotated else im).convert("RGB"))
    if rgb.ndim != 3 or min(rgb.shape[:2]) < 16:
        raise ValueError(f"image too small ({rgb.shape[1]}x{rgb.shape[0]})")
    ext = path.suffix.lower()
    if ext in KEPT_EXTS and fmt in ("JPEG", "PNG") and not rotated:
        return Photo(path.stem, path, rgb, raw, ext)
    if fmt == "JPEG":  # keep JPEG photos JPEG when they must be re-encoded (rotation)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
        return Photo(path.stem, path, rgb, buf.getvalue(), ".jpg")
    return Photo(path.stem, path, rgb, _png(rgb), ".png")


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Label map -> [height, width] uint8, nearest neighbour (labels are categories)."""
    labels = np.asarray(labels, np.uint8)
    if labels.shape == (height, width):
        return labels
    return np.asarray(Image.fromarray(labels, "L").resize((width, height), Image.Resampling.NEAREST))


class Output:
    """The prepared folder: its files, the captions index (which says what is done) and writing."""

    def __init__(self, out_dir: pathlib.Path):
        self.dir = out_dir
        for sub in ("images", "masks", "embeddings"):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
        self.captions = out_dir / CAPTIONS_NAME
        self.done = self._read_done()

    def image_path(self, rid: str) -> Optional[pathlib.Path]:
        return next((p for p in (self.dir / "images" / f"{rid}{e}" for e in KEPT_EXTS) if p.is_file()), None)

    def _read_done(self) -> dict[str, dict]:
        """Rows of captions.jsonl whose files exist; drops (and rewrites without) the others, e.g. a
        half-written last line after a crash or a row whose files were deleted."""
        if not self.captions.is_file():
            return {}
        lines = self.captions.read_text(encoding="utf-8").splitlines()
        done, kept = {}, []
        for line in lines:
            try:
                row = json.loads(line)
                rid = str(row["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if self.image_path(rid) and (self.dir / "masks" / f"{rid}.png").is_file():
                done[rid] = row
                kept.append(line)
        if len(kept) != len(lines):
            log.info("%s: dropping %d incomplete row(s); those photos are redone", self.captions,
                     len(lines) - len(kept))
            _atomic_write(self.captions, "".join(k + "\n" for k in kept).encode("utf-8"))
        return done

    def write(self, photo: Photo, labels: np.ndarray, embedding: Optional[np.ndarray], row: dict) -> None:
        """Files first (atomically), the caption line last: a photo counts as done only when complete."""
        for e in KEPT_EXTS:  # a leftover of an earlier run under another extension
            stale = self.dir / "images" / f"{photo.id}{e}"
            if e != photo.ext and stale.exists():
                stale.unlink()
        _atomic_write(self.dir / "images" / f"{photo.id}{photo.ext}", photo.encoded)
        _atomic_write(self.dir / "masks" / f"{photo.id}.png", _png(labels))
        emb_path = self.dir / "embeddings" / f"{photo.id}.npy"
        if embedding is not None:
            buf = io.BytesIO()
            np.save(buf, np.asarray(embedding, np.float32).reshape(512))
            _atomic_write(emb_path, buf.getvalue())
        elif emb_path.exists():
            emb_path.unlink()
        with open(self.captions, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[photo.id] = row


# ------------------------------------------------------------------------------------------ run


@dataclasses.dataclass
class PrepareReport:
    out_dir: pathlib.Path
    parser: str                       # "bisenet" | "template"
    embedding: str                    # "arcface" | "none"
    prepared: list[str] = dataclasses.field(default_factory=list)   # ids written by this run
    skipped: list[str] = dataclasses.field(default_factory=list)    # ids already prepared
    failed: list[dict] = dataclasses.field(default_factory=list)    # [{"file", "reason"}]
    default_captions: list[str] = dataclasses.field(default_factory=list)  # ids given the defaults

    def to_json(self) -> dict:
        return {"out_dir": str(self.out_dir), "parser": self.parser, "embedding": self.embedding,
                "num_prepared": len(self.prepared), "num_skipped": len(self.skipped),
                "num_failed": len(self.failed), "prepared": self.prepared, "skipped": self.skipped,
                "failed": self.failed, "default_captions": self.default_captions}

    def summary(self) -> str:
        lines = [f"{self.out_dir}: {len(self.prepared)} prepared, {len(self.skipped)} already there, "
                 f"{len(self.failed)} failed (parsing: {self.parser}, embedding: {self.embedding})"]
        lines += [f"  failed: {f['file']}: {f['reason']}" for f in self.failed[:20]]
        if len(self.failed) > 20:
            lines.append(f"  ... {len(self.failed) - 20} more in {self.out_dir / REPORT_NAME}")
        if self.default_captions:
            lines.append(f"  {len(self.default_captions)} photo(s) got the default captions")
        return "\n".join(lines)


def _caption_fields(photo: Photo, table, report: PrepareReport) -> dict:
    row = captions_for(photo.path.name, table)
    if row is None:
        report.default_captions.append(photo.id)
        row = {"vqa_llva": DEFAULT_VQA_LLVA, "vqa_llva_more_face_detail": DEFAULT_FACE_DETAIL}
    return {"id": photo.id, "vqa_llva": str(row["vqa_llva"]),
            "vqa_llva_more_face_detail": str(row["vqa_llva_more_face_detail"]),
            "identity": str(row.get("identity") or "")}


def _chunks(items: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def prepare_folder(images_dir: os.PathLike | str, out_dir: os.PathLike | str, *, analyzer=None,
                   parser_weights: Optional[str] = None, insightface_models: Optional[str] = None,
                   captions: Optional[str] = None, batch_size: int = 8, parse_size: int = 512,
                   workers: int = 4, progress: bool = True) -> PrepareReport:
    """Prepares every photo of `images_dir` into `out_dir` (module docstring); returns the report,
    also written to `out_dir/prepare_report.json`.

    `analyzer`: a `cid_jax.face.FaceAnalyzer` (default: built from `parser_weights` and
    `insightface_models`, announcing each fallback once); its `parser` (BiSeNet model, params) and
    `embedder` (`ArcFaceEmbedder`) are used, or None for the offline fallbacks.
    """
    from tqdm.auto import tqdm

    from cid_jax.face import FaceAnalyzer, NoFaceFoundError, detect_largest_face, parse_batch, template_parse

    images_dir, out_dir = pathlib.Path(images_dir).expanduser(), pathlib.Path(out_dir).expanduser()
    if batch_size < 1:
        raise cli.InputError(f"batch_size must be >= 1, got {batch_size}")
    paths = list_images(images_dir)
    table = read_captions(captions) if captions else None
    analyzer = analyzer or FaceAnalyzer(parser_weights, insightface_models)
    out = Output(out_dir)
    report = PrepareReport(out_dir, "bisenet" if analyzer.parser is not None else "template",
                           "arcface" if analyzer.embedder is not None else "none")

    todo, seen = [], {}
    for path in paths:
        if path.stem in seen:
            report.failed.append({"file": path.name, "reason": f"duplicate id {path.stem!r} (also {seen[path.stem]})"})
            continue
        seen[path.stem] = path.name
        if path.stem in out.done:
            report.skipped.append(path.stem)
        else:
            todo.append(path)
    if report.skipped:
        log.info("%d photo(s) already prepared in %s: skipped", len(report.skipped), out_dir)

    def fail(path: pathlib.Path, reason: str) -> None:
        report.failed.append({"file": path.name, "reason": reason})

    bar = tqdm(total=len(todo), desc="prepare", unit="img", disable=not progress, dynamic_ncols=True)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for chunk in _chunks(todo, batch_size):
            # 1. Decode (threads: PIL releases the GIL while decoding).
            photos = []
            for path, result in zip(chunk, pool.map(_try(load_photo), chunk)):
                if isinstance(result, Exception):
                    fail(path, f"undecodable image ({type(result).__name__}: {result})")
                else:
                    photos.append(result)
            # 2. Find the face; the template fallback paints its label map from the detection.
            labels, with_face = {}, []
            for photo in photos:
                try:
                    if analyzer.parser is None:
                        labels[photo.id] = template_parse(photo.rgb, size=parse_size)
                    else:
                        detect_largest_face(photo.rgb)  # refuse face-free photos, as generate does
                    with_face.append(photo)
                except NoFaceFoundError as e:
                    fail(photo.path, f"no face: {e}")
            # 3. BiSeNet on the whole batch.
            if analyzer.parser is not None and with_face:
                maps = parse_batch(analyzer.parser, [p.rgb for p in with_face], parse_size, batch_size)
                labels.update({p.id: m for p, m in zip(with_face, maps)})
            # 4. Embedding, then write.
            for photo in with_face:
                try:
                    embedding = analyzer.id_embedding(photo.rgb)
                except NoFaceFoundError as e:
                    fail(photo.path, f"no face for ArcFace: {e}")
                    continue
                except Exception as e:  # noqa: BLE001 - one bad photo must not stop a long run
                    fail(photo.path, f"embedding failed ({type(e).__name__}: {e})")
                    continue
                h, w = photo.rgb.shape[:2]
                out.write(photo, resize_labels(labels[photo.id], h, w), embedding,
                          _caption_fields(photo, table, report))
                report.prepared.append(photo.id)
            bar.update(len(chunk))
    bar.close()
    _atomic_write(out_dir / REPORT_NAME, json.dumps(report.to_json(), indent=1).encode("utf-8"))
    return report


def _try(fn):
    def call(*args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - reported per photo
            return e
    return call


# -------------------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]] = None):
    p = cli.ArgumentParser(prog="python -m cid_jax.data.prepare", description=__doc__)
    p.add_argument("--images", required=True, help="folder of photos (not recursive)")
    p.add_argument("--out", required=True, help="prepared folder to write (or resume)")
    p.add_argument("--parser_weights", help="BiSeNet 79999_iter.pth / face_parsing.pth (default: offline template)")
    p.add_argument("--insightface_models", help="insightface buffalo_l folder (default: no ID embedding)")
    p.add_argument("--captions", help="CSV / JSON / JSONL: file name -> vqa_llva, vqa_llva_more_face_detail")
    p.add_argument("--batch_size", type=int, default=8, help="photos per parsing batch")
    p.add_argument("--parse_size", type=int, default=512, help="parser input size (the reference: 512)")
    p.add_argument("--workers", type=int, default=4, help="decoding threads")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


@cli.entry_point("prepare")
def main(argv: Optional[Sequence[str]] = None) -> int:
    cli.setup_logging()
    args = parse_args(argv)
    report = prepare_folder(args.images, args.out, parser_weights=args.parser_weights,
                            insightface_models=args.insightface_models, captions=args.captions,
                            batch_size=args.batch_size, parse_size=args.parse_size,
                            workers=args.workers, progress=not args.no_progress)
    print(report.summary())
    print(f"report: {pathlib.Path(args.out) / REPORT_NAME}\n"
          f"next: python -m cid_jax.data.builder folder --src={args.out} --out=DATA_DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
