"""From trained weights to PyTorch: the reference ConsistentID checkpoint layout.

    save(trainable, layout, path, metadata=..., dtype=...)   an in-memory trainable tree -> `.bin` (the
                                                            reference nested pickle) or `.safetensors`
                                                            (flat, the reference's prefixes); re-read
                                                            and checked bit for bit after writing
    layout_for_config(config)                               the key layout of a run's architecture
    export_run(config, trainable, run, step)                <run>/export/consistentid.{safetensors,bin}
    to_pytorch(source, out, ...)                            what `convert/to_pytorch.py` does: a run
                                                            directory, our params file or a reference
                                                            file -> a reference-layout file

The trainable tree is the model's (`facial_encoder`, `image_proj`, `adapter_modules`); the files
use the reference's group names (`FacialEncoder`, `image_proj` / `image_proj_model`, `adapter_modules`).
"""
from __future__ import annotations

import pathlib
from typing import Any, Mapping, Optional

import jax
import numpy as np

from cid_jax import build as build_lib
from cid_jax import paths
from cid_jax import run as run_lib
from cid_jax.weights import consistentid as cw
from cid_jax.weights.state_dict import WeightsError

DEFAULT_BASE_MODEL = {"sd15": "runwayml/stable-diffusion-v1-5",
                      "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


def layout_for_config(config) -> cw.CheckpointLayout:
    """The export key layout of a config's architecture (`cid_jax.build.checkpoint_layout`)."""
    return build_lib.checkpoint_layout(config)


def run_metadata(config, layout: cw.CheckpointLayout, step, dtype: str) -> dict[str, str]:
    """The metadata of an export of a run: base model, pairing, step, dtype, FacialEncoder sizes."""
    return cw.make_metadata(
        layout, base_model=config.model.base or f"random {config.model.preset}", pairing=config.data.pairing,
        step=step, dtype=dtype, extra=dict(facial_encoder_dim=layout.fe_dim, facial_encoder_depth=layout.fe_depth,
                                           facial_encoder_heads=layout.fe_heads))


def save(trainable: Mapping[str, Any], layout: cw.CheckpointLayout, path: pathlib.Path, *,
         metadata: Optional[Mapping[str, str]] = None, dtype: str = "fp32", partial: bool = False) -> dict:
    """Writes `trainable` (host or device arrays) to `path` in the reference layout, atomically, and
    checks the file by reading it back; a file that fails the check is removed. Returns the groups.
    A remote `path` (gs://...) is written and checked locally, then uploaded with its sidecar."""
    if paths.is_remote(path):
        import tempfile

        target = paths.path(path)
        with tempfile.TemporaryDirectory(prefix="cid_jax-export-") as tmp:
            local = pathlib.Path(tmp, target.name)
            groups = save(trainable, layout, local, metadata=metadata, dtype=dtype, partial=partial)
            for f in (local, cw.sidecar_path(local)):
                if f.exists():
                    paths.copy_file(f, target.parent / f.name)
        return groups
    path = pathlib.Path(path)
    groups = cw.save_checkpoint(jax.device_get(dict(trainable)), layout, path, dtype=dtype, metadata=metadata,
                                partial=partial)
    try:
        cw.verify_written(path, groups, layout)
    except Exception:  # never leave a file behind that failed its self-check
        for p in (path, cw.sidecar_path(path)):
            p.unlink(missing_ok=True)
        raise
    return groups


def export_run(config, trainable, run: run_lib.RunDir, step: int, out: pathlib.Path | None = None,
               dtype: str | None = None) -> list[pathlib.Path]:
    """Writes the safetensors and reference .bin exports of a run (or only `out`); returns the paths."""
    layout = layout_for_config(config)
    dtype = dtype or config.train.export_dtype
    meta = run_metadata(config, layout, step, dtype)
    targets = [out] if out else [run.export_dir / "consistentid.safetensors", run.export_dir / "consistentid.bin"]
    for path in targets:
        save(trainable, layout, path, metadata=meta, dtype=dtype)
    return targets


def read_source(source: pathlib.Path, layout: Optional[cw.CheckpointLayout] = None,
                step: Optional[int] = None) -> tuple[dict, dict[str, str], cw.CheckpointLayout]:
    """(trainable, metadata, layout) of a training run directory (its newest or given step), our
    params file or a reference-layout file."""
    if run_lib.RunDir.looks_like_run(source):
        run = run_lib.RunDir.of(source)
        config, trainable, step = run_lib.restore_trainable(run, step)
        run_layout = layout_for_config(config)
        if layout is not None and layout.base != run_layout.base:
            raise WeightsError(f"{run.root} was trained with layout {run_layout.base!r}, not {layout.base!r}")
        return trainable, run_metadata(config, run_layout, step, "fp32"), run_layout
    params, meta, layout = cw.load_params(paths.local_copy(source), layout)
    if step is not None:  # a weights file has no steps to choose from: record the one given
        meta = dict(meta, step=str(step))
    return params, meta, layout


def to_pytorch(source, out, *, layout: Optional[str] = None, dtype: str = "fp32", pairing: Optional[str] = None,
               step: Optional[int] = None, base_model: Optional[str] = None, allow_partial: bool = False):
    """`convert/to_pytorch.py`: (groups written, metadata, layout)."""
    params, meta, lay = read_source(source, cw.LAYOUTS[layout] if layout else None, step)
    pairing = pairing or meta.get("pairing")
    if pairing is None:
        raise WeightsError(f"{source} records no pairing mode: pass --pairing=reference|by_name")
    metadata = cw.make_metadata(
        lay, base_model=base_model or meta.get("base_model") or DEFAULT_BASE_MODEL.get(lay.base, lay.base),
        pairing=pairing, step=meta.get("step", "unknown"), dtype=dtype,
        extra={k: v for k, v in meta.items() if k.startswith("facial_encoder_")} | {"source": str(source)})
    groups = save(params, lay, out, metadata=metadata, dtype=dtype, partial=allow_partial)
    return groups, metadata, lay


def summary(groups: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    n_tensors = sum(len(g) for g in groups.values())
    n_params = sum(int(v.size) for g in groups.values() for v in g.values())
    return (", ".join(f"{g} {len(sd)} tensors" for g, sd in groups.items())
            + f"; {n_tensors} tensors, {n_params:,} params")
