"""tfds builders that write FGID records (features.py) as TFRecord shards.

Three sources, one record format:
* `FgidReference`: the layout the reference training reads (spec §7.1): a JSON list of records
  with `resize_IMG`, `parsing_mask_IMG`, `vqa_llva`, `vqa_llva_more_face_detail` and optionally
  `id_embed_file_origin` / `id_embed_file_resize` (torch-saved (1, 512) tensors, read with
  `torch.load(weights_only=True)`; `.npy` files are accepted too). Paths are relative to
  `image_root`, `parsing_root` and `faceid_root` (the reference's three roots; by default the
  JSON file's folder).
* `FgidFolder`: our simple layout for bringing your own data (see README.md):
      SRC/captions.{jsonl,json,csv}   rows: id, vqa_llva, vqa_llva_more_face_detail[, identity]
      SRC/images/<id>.{jpg,jpeg,png}  SRC/masks/<id>.png  SRC/embeddings/<id>.npy (optional)
* `FgidSynthetic`: `synthetic.render_sample` (seeded procedural portraits).

After writing, `build` also stores `record_index-<split>.npz` (the byte offset of every record) for
the pipeline's random access.

Robustness: a record that cannot be read (missing file, undecodable image, mask of another size,
bad embedding, ...) is skipped, counted and listed with its reason in `bad_records-<split>.json`
inside the dataset folder; it never stops the build. `build()` returns a `BuildReport`.
Shards are written by tfds into a temporary folder that is renamed when complete (an interrupted
build leaves no half dataset); tfds shows tqdm progress bars.

At scale, pass `use_beam=True` (and `beam_runner=` / `beam_options=` to `build`): the same record
loading then runs as an Apache Beam pipeline (DirectRunner locally, Dataflow/Flink/Spark for a
cluster) and bad records are written by Beam as `bad_records-<split>-*.jsonl`. This needs the
`beam` extra (`pip install -c requirements/constraints.txt -e '.[data,beam]'`).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import inspect
import json
import os
import pathlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from cid_jax import cli
from cid_jax.data import features as features_lib

_DESCRIPTION = "FGID-style portraits with parsing maps, captions and ArcFace embeddings (cid_jax)."
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass
class BuildReport:
    """What a build wrote and what it skipped."""

    dataset_dir: pathlib.Path
    num_examples: dict[str, int]
    bad_records: dict[str, list[dict]]  # split -> [{"key", "source_id", "reason"}]

    @property
    def num_bad(self) -> int:
        return sum(len(v) for v in self.bad_records.values())

    def summary(self) -> str:
        lines = [f"dataset: {self.dataset_dir}"]
        for split, n in self.num_examples.items():
            bad = self.bad_records.get(split, [])
            lines.append(f"  {split}: {n} examples written, {len(bad)} bad records skipped"
                         + (f" (listed in {self.dataset_dir / f'bad_records-{split}'}*)" if bad else ""))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ builders


class _FgidBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared machinery: `_sources()` lists records cheaply; `_loader()` returns a small picklable
    callable that reads one (and may raise). The loader is separate from the builder because Beam
    pickles it to its workers, and a tfds builder does not pickle."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First FGID record format (see cid_jax/data/README.md)."}

    def __init__(self, *, max_side: int | None = None, use_beam: bool = False, **kwargs):
        self._max_side = max_side
        self._use_beam = use_beam
        self.bad_rows: dict[str, list[dict]] = {}  # split -> the records skipped so far (plain builds)
        super().__init__(**kwargs)

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds 4.9.10 finds a builder's source through the `importlib_resources` backport, which it
        # does not install on Python >= 3.9 (ModuleNotFoundError); the plain file path is what it
        # falls back to anyway (there are no checksum/metadata files next to our builders).
        return epath.Path(inspect.getfile(cls))

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=_DESCRIPTION,
                                     features=features_lib.features_dict())

    # Subclasses: {split: [(source_id, source), ...]} and a `source -> record dict` callable.
    def _sources(self) -> dict[str, list[tuple[str, Any]]]:
        raise NotImplementedError

    def _loader(self) -> Callable[[Any], dict]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        return {split: self._generate_examples(split, srcs) for split, srcs in self._sources().items()}

    def _generate_examples(self, split: str, sources: Sequence[tuple[str, Any]]):
        keyed = [(f"{i:09d}", sid, src) for i, (sid, src) in enumerate(sources)]
        if self._use_beam:
            return _beam_examples(self, split, keyed)
        return self._iter_examples(split, keyed)

    def _iter_examples(self, split, keyed) -> Iterator[tuple[str, dict]]:
        bad = self.bad_rows.setdefault(split, [])
        bad.clear()
        load = self._loader()
        for key, sid, src in keyed:
            key, example, bad_row = example_or_reason(load, self._max_side, key, sid, src)
            if example is None:
                bad.append(bad_row)
                continue
            yield key, example
        # Runs when tfds has consumed the generator; self.data_dir is then the (temporary) dataset
        # folder, so the report ends up next to the shards.
        _write_json(pathlib.Path(self.data_dir) / f"bad_records-{split}.json", bad)


def example_or_reason(load: Callable[[Any], dict], max_side: int | None, key: str, source_id: str,
                      source: Any):
    """(key, example, None), or (key, None, its bad-record report row); never raises for a bad record."""
    try:
        rec = load(source)
        rec.setdefault("source_id", source_id)
        return key, features_lib.validate_record(rec, max_side), None
    except (features_lib.BadRecord, OSError, ValueError, KeyError, TypeError) as e:
        return key, None, {"key": key, "source_id": source_id, "reason": f"{type(e).__name__}: {e}"}


def _beam_examples(builder: _FgidBuilder, split: str, keyed):
    """The Beam form of `_iter_examples` (a PTransform tfds applies to its pipeline)."""
    from tensorflow_datasets.core.utils.lazy_imports_utils import apache_beam as beam

    report_prefix = os.fspath(pathlib.Path(builder.data_dir) / f"bad_records-{split}")
    # Only the loader and max_side travel to the workers, never the builder.
    load_one = functools.partial(example_or_reason, builder._loader(), builder._max_side)

    def expand(root):
        results = (root | f"Sources_{split}" >> beam.Create(keyed)
                   | f"Load_{split}" >> beam.MapTuple(load_one))
        good, bad = results | f"Split_{split}" >> beam.Partition(lambda r, n: int(r[1] is None), 2)
        _ = (bad | f"Reason_{split}" >> beam.Map(lambda r: json.dumps(r[2]))
             | f"Report_{split}" >> beam.io.WriteToText(report_prefix, file_name_suffix=".jsonl"))
        return good | f"Examples_{split}" >> beam.Map(lambda r: (r[0], r[1]))

    return beam.ptransform_fn(expand)()


def _write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _load_embedding(path: pathlib.Path) -> np.ndarray:
    """A (1, 512) or (512,) embedding from a torch-saved tensor (.pt/.pth/.bin, weights_only) or .npy."""
    if not path.is_file():
        raise features_lib.BadRecord(f"id_embedding: missing file {path}")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(f"reading the torch-saved embedding {path} needs PyTorch "
                          "(pip install 'cid_jax[torch]')") from e
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt pickle, unsupported content
        raise features_lib.BadRecord(f"id_embedding: cannot read {path} ({type(e).__name__}: {e})") from e
    if not isinstance(t, torch.Tensor):
        raise features_lib.BadRecord(f"id_embedding: {path} holds a {type(t).__name__}, not a tensor")
    return t.detach().float().cpu().numpy()


class FgidReference(_FgidBuilder, skip_registration=True):
    """FGID from the reference JSON layout (see the module docstring)."""

    def __init__(self, *, json_files: os.PathLike | str | dict[str, os.PathLike | str],
                 image_root=None, parsing_root=None, faceid_root=None, **kwargs):
        if not isinstance(json_files, dict):
            json_files = {"train": json_files}
        self._json_files = {k: pathlib.Path(v) for k, v in json_files.items()}
        first = next(iter(self._json_files.values()))
        self._image_root = pathlib.Path(image_root) if image_root else first.parent
        self._parsing_root = pathlib.Path(parsing_root) if parsing_root else self._image_root
        self._faceid_root = pathlib.Path(faceid_root) if faceid_root else self._image_root
        super().__init__(**kwargs)

    def _sources(self):
        out = {}
        for split, path in self._json_files.items():
            try:
                items = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise cli.InputError(f"cannot read the record list {path}: {e}") from e
            if not isinstance(items, list):
                raise cli.InputError(f"{path}: expected a JSON list of records, got {type(items).__name__}")
            out[split] = [(str(it.get("resize_IMG", f"#{i}")) if isinstance(it, dict) else f"#{i}", it)
                          for i, it in enumerate(items)]
        return out

    def _loader(self):
        return ReferenceRecordLoader(self._image_root, self._parsing_root, self._faceid_root)


@dataclasses.dataclass(frozen=True)
class ReferenceRecordLoader:
    """One record of the reference JSON layout -> record dict (paths resolved under the three roots)."""

    image_root: pathlib.Path
    parsing_root: pathlib.Path
    faceid_root: pathlib.Path

    def __call__(self, item) -> dict:
        if not isinstance(item, dict):
            raise features_lib.BadRecord(f"record is a {type(item).__name__}, not an object")
        missing = [k for k in ("resize_IMG", "parsing_mask_IMG", "vqa_llva", "vqa_llva_more_face_detail")
                   if k not in item]
        if missing:
            raise features_lib.BadRecord(f"record lacks {missing}")
        emb = None
        # The reference's precedence: origin, then resize, else zeros. An empty value counts as absent.
        for key in ("id_embed_file_origin", "id_embed_file_resize"):
            if item.get(key):
                emb = _load_embedding(self.faceid_root / item[key])
                break
        return {
            "image": self.image_root / item["resize_IMG"],
            "parsing": self.parsing_root / item["parsing_mask_IMG"],
            "vqa_llva": item["vqa_llva"],
            "vqa_llva_more_face_detail": item["vqa_llva_more_face_detail"],
            "id_embedding": emb,
            "identity": item.get("identity", ""),
        }


def read_caption_table(path: pathlib.Path) -> list[dict]:
    """Rows of captions.{jsonl,json,csv} as dicts (the folder layout's index)."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise cli.InputError(f"{path}: expected a JSON list of rows")
        return rows
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class FgidFolder(_FgidBuilder, skip_registration=True):
    """FGID from our prepared-folder layout (see the module docstring and README.md)."""

    def __init__(self, *, source_dir: os.PathLike | str, **kwargs):
        self._source_dir = pathlib.Path(source_dir)
        super().__init__(**kwargs)

    def _sources(self):
        for name in ("captions.jsonl", "captions.json", "captions.csv"):
            table = self._source_dir / name
            if table.is_file():
                break
        else:
            raise cli.MissingError(f"{self._source_dir} has no captions.jsonl / captions.json / captions.csv")
        rows = read_caption_table(table)
        return {"train": [(str(r.get("id", f"#{i}")), r) for i, r in enumerate(rows)]}

    def _loader(self):
        return FolderRecordLoader(self._source_dir)


@dataclasses.dataclass(frozen=True)
class FolderRecordLoader:
    """One row of the prepared-folder layout -> record dict."""

    source_dir: pathlib.Path

    def __call__(self, row) -> dict:
        rid = str(row.get("id") or "")
        if not rid:
            raise features_lib.BadRecord("row has no id")
        image = next((self.source_dir / "images" / f"{rid}{e}" for e in _IMAGE_EXTS
                      if (self.source_dir / "images" / f"{rid}{e}").is_file()), None)
        if image is None:
            raise features_lib.BadRecord(f"image: missing file images/{rid}.{{jpg,jpeg,png}}")
        emb_path = self.source_dir / "embeddings" / f"{rid}.npy"
        return {
            "image": image,
            "parsing": self.source_dir / "masks" / f"{rid}.png",
            "vqa_llva": row.get("vqa_llva"),
            "vqa_llva_more_face_detail": row.get("vqa_llva_more_face_detail"),
            "id_embedding": _load_embedding(emb_path) if emb_path.exists() else None,
            "identity": row.get("identity", ""),
        }


class FgidSynthetic(_FgidBuilder, skip_registration=True):
    """Synthetic FGID (`synthetic.render_sample`), deterministic in its arguments."""

    def __init__(self, *, num: int, seed: int = 0, size: int = 512, num_identities: int = 16,
                 missing_embedding_prob: float = 0.0, **kwargs):
        self._num, self._seed, self._size = int(num), int(seed), int(size)
        self._num_identities, self._missing = int(num_identities), float(missing_embedding_prob)
        # The arguments name the config (a sub-folder), so a dataset with other arguments is never
        # silently reused in place of the one asked for.
        name = (f"n{self._num}_seed{self._seed}_px{self._size}_ids{self._num_identities}"
                f"_miss{round(self._missing * 1000)}")
        kwargs.setdefault("config", tfds.core.BuilderConfig(name=name, description="synthetic portraits"))
        super().__init__(**kwargs)

    def _sources(self):
        return {"train": [(f"synthetic-{self._seed}-{i:07d}", i) for i in range(self._num)]}

    def _loader(self):
        return SyntheticRecordLoader(self._seed, self._size, self._num_identities, self._missing)


@dataclasses.dataclass(frozen=True)
class SyntheticRecordLoader:
    """Sample index -> synthetic record dict (`synthetic.render_sample`)."""

    seed: int
    size: int
    num_identities: int
    missing_embedding_prob: float

    def __call__(self, index) -> dict:
        from cid_jax.data import synthetic

        face = synthetic.render_sample(self.seed, index, self.size, self.num_identities,
                                       self.missing_embedding_prob)
        rec = synthetic.record_of(face)
        if not face.has_id_embedding:
            rec["id_embedding"] = None
        return rec


# --------------------------------------------------------------------------------------- build


def build(builder: _FgidBuilder, *, num_shards: int | None = None, progress: bool = True,
          beam_runner=None, beam_options=None, overwrite: bool = False) -> BuildReport:
    """Writes the dataset (unless already there) and returns what was written and skipped."""
    if not progress:
        tfds.disable_progress_bar()
    mode = (tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS if not overwrite
            else tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS)
    config = tfds.download.DownloadConfig(download_mode=mode, num_shards=num_shards,
                                          beam_runner=beam_runner, beam_options=beam_options)
    try:
        builder.download_and_prepare(download_config=config)
    except AssertionError as e:  # tfds: "No examples were yielded" for a split
        if "No examples" not in str(e):
            raise
        reasons = [f"{r['source_id']}: {r['reason']}" for rows in builder.bad_rows.values() for r in rows]
        shown = "\n  ".join(reasons[:20]) + (f"\n  ... and {len(reasons) - 20} more" if len(reasons) > 20 else "")
        raise cli.InputError(f"no record could be read, so nothing was written ({len(reasons)} bad):\n  "
                             + (shown or "(the source lists no records)")) from None
    report = report_of(builder.data_dir)
    # The pipeline reads records by byte offset; index them now, while the shards are at hand,
    # rather than on every training host's first start.
    from cid_jax.data.pipeline import RecordSource

    for split in report.num_examples:
        RecordSource(report.dataset_dir, split)
    return report


def report_of(dataset_dir: os.PathLike | str) -> BuildReport:
    """The BuildReport of a built dataset folder (split sizes and the bad-record lists)."""
    dataset_dir = pathlib.Path(dataset_dir)
    info = json.loads((dataset_dir / "dataset_info.json").read_text())
    num = {s["name"]: int(sum(int(n) for n in s.get("shardLengths", []))) for s in info.get("splits", [])}
    bad = {}
    for split in num:
        path = dataset_dir / f"bad_records-{split}.json"
        rows = json.loads(path.read_text()) if path.is_file() else []
        for part in sorted(dataset_dir.glob(f"bad_records-{split}-*.jsonl")):  # Beam's report
            rows += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
        bad[split] = rows
    return BuildReport(dataset_dir, num, bad)


def build_from_reference_json(json_files, data_dir, *, image_root=None, parsing_root=None,
                              faceid_root=None, max_side=None, use_beam=False, **build_kwargs) -> BuildReport:
    b = FgidReference(json_files=json_files, image_root=image_root, parsing_root=parsing_root,
                      faceid_root=faceid_root, max_side=max_side, use_beam=use_beam, data_dir=os.fspath(data_dir))
    return build(b, **build_kwargs)


def build_from_folder(source_dir, data_dir, *, max_side=None, use_beam=False, **build_kwargs) -> BuildReport:
    b = FgidFolder(source_dir=source_dir, max_side=max_side, use_beam=use_beam, data_dir=os.fspath(data_dir))
    return build(b, **build_kwargs)


def build_synthetic(data_dir, *, num: int, seed: int = 0, size: int = 512, num_identities: int = 16,
                    missing_embedding_prob: float = 0.0, max_side=None, use_beam=False,
                    **build_kwargs) -> BuildReport:
    b = FgidSynthetic(num=num, seed=seed, size=size, num_identities=num_identities,
                      missing_embedding_prob=missing_embedding_prob, max_side=max_side, use_beam=use_beam,
                      data_dir=os.fspath(data_dir))
    return build(b, **build_kwargs)


class NoDataError(cli.MissingError):
    """The config names no usable dataset (the message says which flag to set)."""


def dataset_for(config, workdir: os.PathLike | str, *, create: bool = True):
    """The built FGID dataset a training config reads (an `epath.Path`, local or remote): `data.path`
    (a built dataset, or a tfds data_dir holding exactly one), or with `data.synthetic=N` N synthetic
    faces built once into <workdir>/data (`create=False`: only find them, e.g. on the hosts that did
    not build them). On an object store they are built locally, then uploaded."""
    from cid_jax import paths

    d = config.data
    if d.path:
        path = paths.path(d.path)
        if (path / "dataset_info.json").exists():
            return path
        if not path.exists():
            raise NoDataError(f"--config.data.path={d.path} does not exist; build a dataset with "
                              "python -m cid_jax.data.builder {reference,folder,synthetic} --out=DIR")
        built = list(dataset_dirs(path))
        if len(built) == 1:
            return built[0]
        raise NoDataError(f"--config.data.path={d.path} holds {len(built)} built datasets "
                          f"({[str(b) for b in built]}); point it at one (a folder with dataset_info.json)")
    if not d.synthetic:
        raise NoDataError("no training data: set --config.data.path to a built FGID dataset "
                          "(python -m cid_jax.data.builder ...) or --config.data.synthetic=N for N "
                          "synthetic faces")
    import tempfile

    data_dir = paths.path(workdir) / "data"
    remote = paths.is_remote(data_dir)

    def synthetic(root):
        return FgidSynthetic(num=int(d.synthetic), seed=int(config.seed), size=max(int(d.resolution), 128),
                             data_dir=os.fspath(root))

    with tempfile.TemporaryDirectory(prefix="cid_jax-data-") as probe:  # where tfds puts it, under any root
        found = data_dir / os.path.relpath(synthetic(probe).data_dir, probe)
    if (found / "dataset_info.json").exists():
        return found
    if not create:
        raise NoDataError(f"no synthetic dataset in {found} (process 0 builds it)")
    if not remote:
        return paths.path(build(synthetic(data_dir), progress=False).dataset_dir)
    with tempfile.TemporaryDirectory(prefix="cid_jax-data-") as tmp:  # tfds writes TFRecords with TF's GCS client
        local = build(synthetic(tmp), progress=False).dataset_dir
        paths.copy_tree(local, found)
    return found


def dataset_dirs(data_dir: os.PathLike | str) -> list:
    """Built dataset folders (those with a dataset_info.json) under a tfds data_dir:
    `<name>/<version>`, or `<name>/<config>/<version>` for the synthetic builder."""
    from cid_jax import paths

    root = paths.path(data_dir)  # walk, not glob("**"): epath refuses recursive globs (an RPC per folder on GCS)
    return sorted(folder for folder, _, files in root.walk() if "dataset_info.json" in files) if root.is_dir() else []


# ----------------------------------------------------------------------------------------- CLI


def _beam_pipeline_options(flags: str | None):
    if not flags:
        return None
    import shlex

    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(shlex.split(flags))


@cli.entry_point("builder")
def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m cid_jax.data.builder",
        description="Write an FGID dataset (TFRecord shards, tfds layout) from the reference JSON layout, "
                    "from a prepared folder, or of synthetic portraits.",
        epilog="At scale: --beam_runner=DirectRunner (local processes) or DataflowRunner/FlinkRunner/"
               "SparkRunner with --beam_options='--project=... --temp_location=...' (needs the `beam` extra).")
    sub = p.add_subparsers(dest="source", required=True)
    ref = sub.add_parser("reference", help="the reference training's JSON list of records")
    ref.add_argument("--json", required=True, nargs="+", help="record list(s); SPLIT=PATH names a split "
                     "(default: one file = train)")
    ref.add_argument("--image_root", help="root of resize_IMG paths (default: the JSON file's folder)")
    ref.add_argument("--parsing_root", help="root of parsing_mask_IMG paths (default: image_root)")
    ref.add_argument("--faceid_root", help="root of id_embed_file_* paths (default: image_root)")
    folder = sub.add_parser("folder", help="our prepared-folder layout (see cid_jax/data/README.md)")
    folder.add_argument("--src", required=True, help="the prepared folder (captions + images/ masks/ embeddings/)")
    synth = sub.add_parser("synthetic", help="procedurally drawn portraits with exact parsing maps (smoke tests)")
    synth.add_argument("--num", type=int, required=True, help="number of examples")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=512, help="image side in pixels")
    synth.add_argument("--identities", type=int, default=None, help="number of identities (default num // 8, >= 1)")
    synth.add_argument("--missing_embedding_prob", type=float, default=0.0)
    for s in (ref, folder, synth):
        s.add_argument("--out", required=True, help="tfds data_dir to write the dataset into")
        s.add_argument("--max_side", type=int, help="downscale images (and masks) whose longer side is larger")
        s.add_argument("--num_shards", type=int, help="TFRecord shards per split (default: tfds picks)")
        s.add_argument("--overwrite", action="store_true", help="rebuild even if the dataset exists")
        s.add_argument("--beam_runner", help="run the build as an Apache Beam pipeline on this runner")
        s.add_argument("--beam_options", help="Beam pipeline flags, one string (e.g. '--direct_num_workers=2')")
        s.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)

    use_beam = bool(args.beam_runner or args.beam_options)
    common = dict(max_side=args.max_side, use_beam=use_beam, num_shards=args.num_shards,
                  progress=not args.no_progress, overwrite=args.overwrite,
                  beam_runner=args.beam_runner, beam_options=_beam_pipeline_options(args.beam_options))
    if args.source == "reference":
        named = [j.split("=", 1) if "=" in j else ("train", j) for j in args.json]
        if len({s for s, _ in named}) != len(named):
            p.error(f"--json: each split once, as SPLIT=PATH (got {args.json})")
        report = build_from_reference_json(dict(named), args.out, image_root=args.image_root,
                                           parsing_root=args.parsing_root, faceid_root=args.faceid_root,
                                           **common)
    elif args.source == "folder":
        report = build_from_folder(args.src, args.out, **common)
    else:
        if args.num < 1:
            p.error(f"--num must be at least 1, got {args.num}")
        report = build_synthetic(args.out, num=args.num, seed=args.seed, size=args.size,
                                 num_identities=args.identities or max(1, args.num // 8),
                                 missing_embedding_prob=args.missing_embedding_prob, **common)
    print(report.summary())
    return 0


if __name__ == "__main__":
    # Through the package module, so Beam pickles the loaders by reference, not as `__main__` code.
    from cid_jax.data import builder as _builder

    raise SystemExit(_builder.main())
