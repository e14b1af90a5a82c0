"""The run directory: the one owner of everything a training run keeps on disk.

    <workdir>/config.json            the run's config (process 0, written atomically)
    <workdir>/checkpoints/<step>/    orbax: `state` (step, trainable params, optimizer state) and
                                     `meta` (step, data position, seed, config)
    <workdir>/frozen.safetensors     a preset run's random frozen weights (what generation reads)
    <workdir>/metrics.jsonl, tensorboard/, images/, loss_curves.png   written by `cid_jax.observe`
    <workdir>/export/                the PyTorch export (`cid_jax.export`)
    <workdir>/data/                  synthetic faces built on the first start (`cid_jax.data.builder`)

Training (`cid_jax.trainer`), generation, export and the converters read and write these only
through this module.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import logging

from cid_jax import cli
from cid_jax import build as build_lib


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""
    root: pathlib.Path

    def __post_init__(self):
        object.__setattr__(self, "root", pathlib.Path(self.root).expanduser())

    config_file = property(lambda self: self.root / "config.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    frozen_file = property(lambda self: self.root / "frozen.safetensors")
    metrics_file = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tensorboard")
    images = property(lambda self: self.root / "images")
    curves = property(lambda self: self.root / "loss_curves.png")
    export_dir = property(lambda self: self.root / "export")
    data = property(lambda self: self.root / "data")

    @staticmethod
    def looks_like_run(path) -> bool:
        """A folder a training run wrote (its config.json or checkpoints/), or its checkpoints/."""
        path = pathlib.Path(path)
        return path.is_dir() and ((path / "config.json").exists() or (path / "checkpoints").is_dir()
                                  or path.name == "checkpoints")

    @classmethod
    def of(cls, path) -> "RunDir":
        """The run directory of `path` (the run folder itself or its checkpoints/ folder)."""
        path = pathlib.Path(path).expanduser()
        return cls(path.parent if path.name == "checkpoints" else path)


# ------------------------------------------------------------------------------------ config


def _atomic_text(path: pathlib.Path, text: str) -> None:
    from cid_jax.weights.state_dict import atomic_write

    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def write_config(run: RunDir, config) -> None:
    """config.json (process 0 only; atomic, so a crash never leaves half a file)."""
    if jax.process_index() == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        _atomic_text(run.config_file, config.to_json_best_effort(indent=2))


def config_from_json(text: str):
    """A stored config as an ml_collections ConfigDict, older runs' fields carried over."""
    import ml_collections

    from cid_jax.models import presets

    data = json.loads(text)
    model = data.setdefault("model", {})
    tiny = model.pop("tiny", None)
    if tiny and not model.get("preset"):  # runs before the preset registry stored the tiny dicts
        matches = [n for n in presets.NAMES if {k: presets.get(n)[k] for k in ("unet", "vae", "text", "vision")}
                   == json.loads(json.dumps(dict(tiny)))]
        if not matches:
            raise ValueError("this run's config stores a custom tiny architecture from an older cid_jax; "
                             "it matches no preset of cid_jax.models.presets")
        model["preset"] = matches[0]
    model.setdefault("preset", "")
    model.setdefault("attention", "auto")
    return ml_collections.ConfigDict(data)


def read_config(run: RunDir):
    """The run's config: config.json, else the newest checkpoint's saved one."""
    if run.config_file.exists():
        return config_from_json(run.config_file.read_text())
    metas = sorted(run.checkpoints.glob("*/meta/metadata")) if run.checkpoints.is_dir() else []
    for meta in reversed(metas):
        data = json.loads(meta.read_text())
        if "config" in data:
            return config_from_json(data["config"])
    raise cli.MissingError(f"{run.root} has no config.json (nor a checkpoint with a saved config): "
                            "is it a cid_jax training run directory?")


# ------------------------------------------------------------------------------- checkpoints


def checkpoint_manager(run: RunDir, config=None, *, read_only: bool = False):
    """The orbax CheckpointManager of the run (`config` sets interval, keep and async saving)."""
    import orbax.checkpoint as ocp

    if read_only:
        options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    else:
        c = config.checkpoint
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=c.every_steps, max_to_keep=c.keep,
            enable_async_checkpointing=c.get("async_save", True), create=True)
    return ocp.CheckpointManager(str(run.checkpoints.absolute()), options=options,
                                 item_names=("state", "meta"))


def save(manager, state, config, *, force: bool = False) -> bool:
    """Saves `state` (a TrainState: step, params, opt_state) with its meta, if due (or `force`)."""
    import orbax.checkpoint as ocp

    step = int(jax.device_get(state.step))
    meta = dict(step=step, data_position=step, seed=config.seed, config=config.to_json())
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=force)


def restore(manager, step: int, abstract_state=None):
    """(state, meta) of checkpoint `step`; `abstract_state` gives the target tree and shardings
    (None: as saved, on the host)."""
    import orbax.checkpoint as ocp

    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta


def restore_latest(manager, abstract_state):
    """(state, meta) of the newest checkpoint, or (None, None) when there is none."""
    step = manager.latest_step()
    if step is None:
        return None, None
    return restore(manager, step, abstract_state)


def _trainable_of(params: Mapping) -> dict:
    """The trainable tree of a restored state; runs before `adapter_modules` named the adapters "unet"."""
    params = dict(params)
    if "unet" in params and "adapter_modules" not in params:
        params["adapter_modules"] = params.pop("unet")
    return params


def restore_trainable(run: RunDir, step: Optional[int] = None):
    """(config, trainable params as host numpy, step) from the run's newest (or given) checkpoint."""
    config = read_config(run)
    if not run.checkpoints.is_dir():
        raise cli.MissingError(f"no checkpoints/ under {run.root}")
    manager = checkpoint_manager(run, read_only=True)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise cli.MissingError(f"no checkpoint under {run.checkpoints}")
        state, _ = restore(manager, step)
    finally:
        manager.close()
    params = state["params"] if isinstance(state, Mapping) else state.params
    return config, _trainable_of(jax.device_get(params)), int(step)


# ---------------------------------------------------------------------------- frozen weights


def _flat(tree) -> dict:
    from flax import traverse_util

    tree = dict(tree, text={str(i): t for i, t in enumerate(tree["text"])})
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _unflat(flat: Mapping) -> dict:
    from flax import traverse_util

    tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    tree["text"] = [tree["text"][k] for k in sorted(tree["text"], key=int)]
    return tree


def frozen_weights(model, config, run: Optional[RunDir] = None) -> dict:
    """The frozen weights of a run, in fp32 on the host: the base folders' (`model.base`), or for a
    preset run the random ones stored in the run directory (created from the run's "frozen"
    stream and stored on first use, by process 0), so training and generation see the same ones."""
    if config.model.base or run is None:
        return jax.device_get(build_lib.base_weights(model, config))
    if run.frozen_file.exists():
        from safetensors.numpy import load_file

        stored = _unflat(load_file(str(run.frozen_file)))
        expected = jax.tree.map(lambda x: tuple(x.shape), build_lib.abstract_frozen(model, boxed=False))
        if jax.tree.map(np.shape, stored) != expected:
            raise ValueError(f"{run.frozen_file} does not fit the config's {config.model.preset} architecture")
        return stored
    frozen = jax.device_get(build_lib.base_weights(model, config))
    if jax.process_index() == 0:
        from cid_jax.weights.state_dict import write_safetensors_atomic

        write_safetensors_atomic({k: np.asarray(v, np.float32) for k, v in _flat(frozen).items()},
                                 run.frozen_file, metadata={"preset": config.model.preset})
        logging.info("stored the %s preset's random frozen weights in %s", config.model.preset, run.frozen_file)
    return frozen


# --------------------------------------------------------------------------- trainable init


def initial_trainable(model, config, frozen_unet) -> dict:
    """The trainable params a fresh run starts from: the reference initialisation.

    `config.model.init_from` (a ConsistentID / IP-Adapter checkpoint to start from) is read here.
    """
    if config.model.get("init_from"):
        raise NotImplementedError("--config.model.init_from is not implemented yet")
    return build_lib.init_trainable(model, frozen_unet, build_lib.stream_seed(config, "trainable"))
