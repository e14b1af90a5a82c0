"""From a training run to PyTorch: the trained groups in the reference ConsistentID layout.

`export_run` writes `<workdir>/export/consistentid.safetensors` (flat, prefixed keys; no torch
needed) and the reference nested `.bin` (what the reference SD1.5 loader reads), each re-read and
checked after writing. `restore_trainable` reads the newest orbax checkpoint of a workdir, so
`convert/to_pytorch.py --checkpoint=WORKDIR` works on a finished or interrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

import jax

from cid_jax.weights import consistentid as cid_weights


def layout_for_config(config, model) -> "cid_weights.CheckpointLayout":
    """The export key layout of this run's architecture (reference tables for sd15/sdxl)."""
    layout = cid_weights.layout_for(model.unet.config, base=config.model.variant,
                                    rank=config.model.lora_rank, num_tokens=config.model.num_id_tokens)
    fe = model.facial_encoder
    return dataclasses.replace(layout, clip_dim=model.vision.config.hidden_size,
                               fe_dim=fe.dim, fe_depth=fe.depth, fe_heads=fe.heads)


def to_export_groups(trainable: Mapping[str, Any]) -> dict:
    """Our trainable tree -> the three groups the exporter takes."""
    return {"facial_encoder": trainable["facial_encoder"], "image_proj": trainable["image_proj"],
            "adapters": trainable["unet"]}


def from_export_groups(groups: Mapping[str, Any]) -> dict:
    """Inverse of `to_export_groups`."""
    return {"facial_encoder": groups["facial_encoder"], "image_proj": groups["image_proj"],
            "unet": groups["adapters"]}


def export_run(config, trainable, workdir: pathlib.Path, step: int, out: pathlib.Path | None = None,
               dtype: str | None = None) -> list[pathlib.Path]:
    """Writes the safetensors and reference .bin exports (or only `out`); returns the paths."""
    from cid_jax.models.build import build_modules

    model = build_modules(config)
    layout = layout_for_config(config, model)
    dtype = dtype or config.train.export_dtype
    params = jax.device_get(to_export_groups(trainable))
    meta = cid_weights.make_metadata(
        layout, base_model=config.model.base or "tiny-random", pairing=config.data.pairing, step=step,
        dtype=dtype, extra=dict(facial_encoder_dim=layout.fe_dim, facial_encoder_depth=layout.fe_depth,
                                facial_encoder_heads=layout.fe_heads))
    targets = [out] if out else [workdir / "export" / "consistentid.safetensors",
                                 workdir / "export" / "consistentid.bin"]
    for path in targets:
        groups = cid_weights.save_checkpoint(params, layout, path, dtype=dtype, metadata=meta)
        cid_weights.verify_written(path, groups, layout)
    return targets


def restore_trainable(workdir: pathlib.Path, step: int | None = None):
    """(config, trainable params, step) from a run's newest (or given) orbax checkpoint, on the CPU."""
    import ml_collections
    import orbax.checkpoint as ocp

    workdir = pathlib.Path(workdir)
    config_file = workdir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: is {workdir} a cid_jax training workdir?")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    ckpt_dir = workdir / "checkpoints"
    manager = ocp.CheckpointManager(str(ckpt_dir.absolute()), item_names=("state", "meta"))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {ckpt_dir}")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                             meta=ocp.args.JsonRestore()))
    manager.close()
    state = restored.state
    params = state["params"] if isinstance(state, Mapping) else state.params
    return config, jax.device_get(params), step
