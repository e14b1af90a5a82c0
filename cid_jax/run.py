"""The run directory: the one owner of everything a training run keeps on disk.

    <workdir>/config.json            the run's config (process 0, written atomically)
    <workdir>/checkpoints/<step>/    orbax: `state` (step, trainable params, optimizer state) and
                                     `meta` (step, data position, seed, config)
    <workdir>/frozen.safetensors     a preset run's random frozen weights (what generation reads)
    <workdir>/metrics.jsonl, tensorboard/, images/, loss_curves.png   written by `cid_jax.observe`
    <workdir>/export/                the PyTorch export (`cid_jax.export`)
    <workdir>/data/                  synthetic faces built on the first start (`cid_jax.data.builder`)
    <workdir>/.lock                  held by the one training process writing the run (`RunLock`;
                                     on an object store a lease object, `ObjectLease`)
    <workdir>/corrupt/<step>-<time>  unreadable checkpoints, moved aside on resume (never deleted)

Training (`cid_jax.trainer`), generation, export and the converters read and write these only
through this module. The workdir may be local or on an object store (`gs://bucket/run`): every path
here is an etils `epath.Path` (`cid_jax.paths`), and process 0 alone writes the run-level files
(each host writes its own checkpoint shards through orbax).
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import logging

from cid_jax import errors, paths
from cid_jax import build as build_lib


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (local, or `gs://...` / `s3://...`)."""
    root: Any  # epath.Path

    def __post_init__(self):
        object.__setattr__(self, "root", paths.path(self.root))

    @property
    def remote(self) -> bool:
        return paths.is_remote(self.root)

    config_file = property(lambda self: self.root / "config.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    frozen_file = property(lambda self: self.root / "frozen.safetensors")
    metrics_file = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tensorboard")
    images = property(lambda self: self.root / "images")
    curves = property(lambda self: self.root / "loss_curves.png")
    export_dir = property(lambda self: self.root / "export")
    data = property(lambda self: self.root / "data")
    lock_file = property(lambda self: self.root / ".lock")
    corrupt = property(lambda self: self.root / "corrupt")

    @staticmethod
    def looks_like_run(path) -> bool:
        """A folder a training run wrote (its config.json or checkpoints/), or its checkpoints/."""
        path = paths.path(path)
        return path.is_dir() and ((path / "config.json").exists() or (path / "checkpoints").is_dir()
                                  or path.name == "checkpoints")

    @classmethod
    def of(cls, path) -> "RunDir":
        """The run directory of `path` (the run folder itself or its checkpoints/ folder)."""
        path = paths.path(path)
        return cls(path.parent if path.name == "checkpoints" else path)


# ------------------------------------------------------------------------------------ config


def write_config(run: RunDir, config) -> None:
    """config.json (process 0 only; atomic, so a crash never leaves half a file)."""
    if jax.process_index() == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        paths.write_text_atomic(run.config_file, config.to_json_best_effort(indent=2))


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
    raise errors.MissingError(f"{run.root} has no config.json (nor a checkpoint with a saved config): "
                            "is it a cid_jax training run directory?")


# ------------------------------------------------------------------------------- checkpoints


def _orbax_dir(run: RunDir) -> str:
    """The checkpoints folder as orbax takes it: a URL as is, a local path absolute."""
    return str(run.checkpoints) if run.remote else os.path.abspath(run.checkpoints)


def _handlers(ocdbt: bool = True):
    """The run's two checkpoint items: `state` (arrays, orbax's OCDBT format unless `ocdbt` is
    False) and `meta` (JSON). Named handlers also let a reader ask a checkpoint for its tree."""
    import orbax.checkpoint as ocp

    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state, meta = ocp.StandardCheckpointHandler(use_ocdbt=ocdbt), ocp.JsonCheckpointHandler()
    for item, handler, args in (("state", state, ocp.args.StandardSave), ("state", state, ocp.args.StandardRestore),
                                ("meta", meta, ocp.args.JsonSave), ("meta", meta, ocp.args.JsonRestore)):
        registry.add(item, args, handler)
    return registry


def store_retries() -> dict:
    """tensorstore's context resources that bound its retries of a failing object store, from
    `$CID_JAX_STORE_RETRIES` (the number of retries; unset: tensorstore's own 32, backing off up
    to 32 s apart, which rides out an outage of about a quarter of an hour before a save fails)."""
    n = os.environ.get("CID_JAX_STORE_RETRIES")
    if not n:
        return {}
    retries = {"max_retries": int(n), "initial_delay": "0.5s", "max_delay": "4s"}
    return {"gcs_request_retries": retries, "s3_request_retries": retries}


def _bound_orbax_store_retries() -> None:
    """orbax opens every checkpoint array with a context built from its module defaults and takes
    no context from its caller, so the retry bound is added to those defaults."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    for defaults in (tensorstore_utils._BASE_TS_CONTEXT, tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):
        defaults.update(store_retries())


# orbax's replica-parallel save splits every replicated array into one slice per replica (each
# written from its own device), which pays for large arrays; for a small one each slice costs a copy
# and a compiled slice program and gains nothing. Arrays whose per-replica slice would be under this
# size are written whole from one device: the demo's saves (several hundred small arrays, 8 CPU
# devices) take a third of the time; SD1.5-size arrays keep the parallel save.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _small_arrays_from_one_replica() -> None:
    """Registers orbax's jax.Array handler (as its default, metadata store included) with the slice floor."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.metadata import array_metadata_store

    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                                  min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES),
        override=True)


def checkpoint_manager(run: RunDir, config=None, *, read_only: bool = False):
    """The orbax CheckpointManager of the run (`config` sets interval, keep and async saving). A
    writing manager also sets orbax's jax.Array handler to `REPLICA_PARALLEL_MIN_BYTES` (process-wide:
    orbax's handler registry is global)."""
    import orbax.checkpoint as ocp

    _bound_orbax_store_retries()
    if read_only:  # orbax warns that a read-only manager saves nothing, which is the point
        import logging as std_logging

        absl_logger = std_logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(std_logging.ERROR)
        try:
            return ocp.CheckpointManager(_orbax_dir(run),
                                         options=ocp.CheckpointManagerOptions(create=False, read_only=True),
                                         handler_registry=_handlers())
        finally:
            absl_logger.setLevel(level)
    _small_arrays_from_one_replica()
    c = config.checkpoint
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=c.every_steps, max_to_keep=c.keep,
        enable_async_checkpointing=c.get("async_save", True), create=True)
    return ocp.CheckpointManager(_orbax_dir(run), options=options, handler_registry=_handlers(c.get("ocdbt", True)))


def save(manager, state, config, *, force: bool = False) -> bool:
    """Saves `state` (a TrainState: step, params, opt_state) with its meta, if due (or `force`)."""
    import orbax.checkpoint as ocp

    step = int(jax.device_get(state.step))
    meta = dict(step=step, data_position=step, seed=config.seed, config=config.to_json())
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=force)


class CheckpointError(errors.InputError):
    """A checkpoint cannot be read (names the step and the cause)."""


def _first_cause(error: BaseException) -> str:
    """The innermost cause's first line: orbax wraps tensorstore's actual complaint."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


# Event loops of failed restores, kept open (see `_loops_stay_open_on_failure`).
_FAILED_RESTORE_LOOPS: list = []


def _loops_stay_open_on_failure():
    """orbax runs a restore on a fresh asyncio loop and closes it when the restore raises; the reads
    of a damaged checkpoint that are still in flight then complete onto the closed loop, and each
    prints 'RuntimeError: Event loop is closed' with a traceback from a tensorstore thread (over a
    thousand for one truncated file). A loop left open takes those callbacks silently. Returns the
    function to undo it, or None when orbax has no such helper (another version)."""
    import asyncio

    try:
        from orbax.checkpoint._src import asyncio_utils
    except ImportError:
        return None
    original = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
    if original is None:
        return None

    def run(coro):
        loop = asyncio.new_event_loop()
        try:
            asyncio.set_event_loop(loop)
            result = loop.run_until_complete(coro)
        except BaseException:
            _FAILED_RESTORE_LOOPS.append(loop)
            raise
        finally:
            asyncio.set_event_loop(None)
        loop.close()
        return result

    asyncio_utils._run_sync_via_new_loop = run
    return lambda: setattr(asyncio_utils, "_run_sync_via_new_loop", original)


def _on_this_host(manager, step: int):
    """The saved state's tree as abstract arrays on this process's first device: a checkpoint of a
    multi-host run (its shards on other processes' devices) read by one process (export, generate)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    saved = manager.item_metadata(step).state
    tree = saved.tree if hasattr(saved, "tree") else saved
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)
                        if hasattr(m, "shape") else m, tree)


def restore(manager, step: int, abstract_state=None):
    """(state, meta) of checkpoint `step`; `abstract_state` gives the target tree and shardings
    (None: the saved tree on this host's first device). A checkpoint that cannot be read raises
    `CheckpointError`."""
    import logging as std_logging

    import orbax.checkpoint as ocp

    # A damaged file fails many array reads at once; each would log its own traceback.
    quiet = [std_logging.getLogger(n) for n in ("absl", "orbax", "asyncio", "tensorstore")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(std_logging.CRITICAL)
    undo = _loops_stay_open_on_failure()
    try:
        if abstract_state is None:
            abstract_state = _on_this_host(manager, step)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for a bad file
        raise CheckpointError(f"checkpoint {step} cannot be read: {_first_cause(e)}") from e
    finally:
        if undo is not None:
            undo()
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    return restored.state, restored.meta


def set_aside(run: RunDir, step: int):
    """Moves checkpoint `step` out of checkpoints/ into corrupt/ (kept, never deleted)."""
    run.corrupt.mkdir(parents=True, exist_ok=True)
    target = run.corrupt / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths.move_tree(run.checkpoints / str(step), target)
    return target


def restore_latest(manager, abstract_state, run: Optional[RunDir] = None):
    """(state, meta) of the newest readable checkpoint, or (None, None) when there is none.

    A checkpoint that cannot be read is logged with its cause and, given `run` (training, on
    process 0), moved aside to `run.corrupt`; the next older one is tried. If checkpoints exist
    but none can be read, `CheckpointError` says so (a rerun then starts from scratch)."""
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            return restore(manager, step, abstract_state)
        except CheckpointError as e:
            where = ""
            if run is not None and jax.process_index() == 0:
                where = f"; moved to {set_aside(run, step)}"
                manager.reload()
            logging.warning("%s%s; trying the previous checkpoint", e, where)
    if steps:
        raise CheckpointError(f"none of the {len(steps)} checkpoints under {manager.directory} can be read"
                              + (f" (moved to {run.corrupt}; rerun to start from step 0)" if run else ""))
    return None, None


def _trainable_of(params: Mapping) -> dict:
    """The trainable tree of a restored state; runs before `adapter_modules` named the adapters "unet"."""
    params = dict(params)
    if "unet" in params and "adapter_modules" not in params:
        params["adapter_modules"] = params.pop("unet")
    return params


def restore_trainable(run: RunDir, step: Optional[int] = None):
    """(config, trainable params as host numpy, step) from the run's newest readable (or the given)
    checkpoint; an unreadable one is logged and the next older one used."""
    config = read_config(run)
    if not run.checkpoints.is_dir():
        raise errors.MissingError(f"no checkpoints/ under {run.root}")
    manager = checkpoint_manager(run, read_only=True)
    try:
        available = sorted(manager.all_steps(), reverse=True)
        if not available:
            raise errors.MissingError(f"no checkpoint under {run.checkpoints}")
        if step is not None and step not in available:
            raise errors.MissingError(f"no checkpoint {step} under {run.checkpoints} (steps: {sorted(available)})")
        steps = [step] if step is not None else available
        for k, s in enumerate(steps):
            try:
                state, _ = restore(manager, s)
                break
            except CheckpointError as e:
                if k + 1 == len(steps):
                    if len(steps) > 1:
                        raise CheckpointError(f"none of the {len(steps)} checkpoints under {run.checkpoints} can "
                                              f"be read (the newest: {e})") from e
                    raise
                logging.warning("%s; using checkpoint %d instead", e, steps[k + 1])
    finally:
        manager.close()
    params = state["params"] if isinstance(state, Mapping) else state.params
    return config, _trainable_of(jax.device_get(params)), int(s)


def clean_temporary_saves(run: RunDir) -> list:
    """Removes the temporary folders of saves that never finished (a crash, a full disk, the store
    gone mid-save): orbax names them `<step>.orbax-checkpoint-tmp-*`; on an object store, where it
    cannot rename, a step folder without its `commit_success.txt`. Only the lock holder may call this."""
    if not run.checkpoints.is_dir():
        return []
    removed = sorted(run.checkpoints.glob("*.orbax-checkpoint-tmp*"))
    if run.remote:
        removed += [p for p in run.checkpoints.iterdir()
                    if p.name.isdigit() and not (p / "commit_success.txt").exists()]
    for path in removed:
        try:
            path.rmtree()
        except OSError as e:
            logging.warning("could not remove the unfinished save %s: %s", path, e)
    return removed


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


# Random frozen weights up to this size are stored in the run directory (the demo's are ~10 MB).
STORE_RANDOM_FROZEN_MAX_BYTES = 1 << 30


def frozen_weights(model, config, run: Optional[RunDir] = None) -> dict:
    """The frozen weights of a run, in fp32 on the host: the base folders' (`model.base`), or for a
    preset run the random ones stored in the run directory (created from the run's "frozen"
    stream and stored on first use, by process 0, when under STORE_RANDOM_FROZEN_MAX_BYTES; larger
    ones are drawn again), so training and generation see the same ones."""
    if config.model.base or run is None:
        return jax.device_get(build_lib.base_weights(model, config))
    if run.frozen_file.exists():
        from safetensors.numpy import load

        stored = _unflat(load(run.frozen_file.read_bytes()))
        expected = jax.tree.map(lambda x: tuple(x.shape), build_lib.abstract_frozen(model, boxed=False))
        if jax.tree.map(np.shape, stored) != expected:
            raise ValueError(f"{run.frozen_file} does not fit the config's {config.model.preset} architecture")
        return stored
    frozen = jax.device_get(build_lib.base_weights(model, config))
    nbytes = sum(np.asarray(x).size * 4 for x in jax.tree.leaves(frozen))
    if nbytes > STORE_RANDOM_FROZEN_MAX_BYTES:
        # A full-size random architecture (benchmarks, AOT-sized tests): writing gigabytes would cost
        # more than drawing them again, and the draw depends only on (seed, tree), so generation
        # re-creates the same weights from the run's "frozen" stream.
        logging.info("not storing the %s preset's random frozen weights (%.1f GiB): they are re-drawn from "
                     "the run's seed when needed", config.model.preset, nbytes / 2**30)
    elif jax.process_index() == 0:
        from cid_jax.weights.state_dict import write_safetensors_atomic

        write_safetensors_atomic({k: np.asarray(v, np.float32) for k, v in _flat(frozen).items()},
                                 run.frozen_file, metadata={"preset": config.model.preset})
        logging.info("stored the %s preset's random frozen weights in %s", config.model.preset, run.frozen_file)
    return frozen


# --------------------------------------------------------------------------- trainable init


def read_init_from(config) -> dict:
    """The trainable groups of `model.init_from`, read strictly against the config's layout before
    anything is built or compiled: {group: params or None for a group the file lacks}.

    Accepted: a reference ConsistentID `.bin` (SD1.5 nested, or SDXL), our `.safetensors` / `.bin`
    exports, our params `.msgpack`, and IP-Adapter FaceID-Plus / PlusV2 `.bin` / `.safetensors`
    (image_proj and the adapters' LoRA + ID K/V; the FacialEncoder keeps its fresh init). A key or
    shape that does not fit names the key and both shapes. The file's part-image pairing (its
    metadata; the released weights, which have none: "reference") must be the config's."""
    from cid_jax.weights import consistentid as cw

    if not paths.path(config.model.init_from).exists():
        raise errors.MissingError(f"--config.model.init_from={config.model.init_from} does not exist")
    path = paths.local_copy(config.model.init_from)  # torch.load / safetensors read a local file
    layout = build_lib.checkpoint_layout(config)
    if path.suffix == ".msgpack":
        params, meta = cw.load_params_msgpack(path)
        cw.check_params(params, layout)
        kind = "our params file"
    else:
        groups = cw.read_groups(path)
        ip_adapter = cw.IP_ADAPTER in groups
        params = cw.import_reference(groups, layout,
                                     required=("image_proj", cw.ADAPTERS) if ip_adapter else cw.OUR_GROUPS)
        meta = cw.read_metadata(path)
        kind = "an IP-Adapter FaceID-Plus checkpoint" if ip_adapter else "a ConsistentID checkpoint"
    if params.get("facial_encoder") is not None:
        pairing = meta.get("pairing", "reference")  # the released weights carry no metadata
        if pairing != config.data.pairing:
            raise errors.InputError(
                f"--config.model.init_from={path} pairs part images with facial words '{pairing}', this config "
                f"'{config.data.pairing}': add --config.data.pairing={pairing} (its FacialEncoder learned that "
                "pairing)")
    loaded = [g for g in cw.OUR_GROUPS if params.get(g) is not None]
    fresh = [g for g in cw.OUR_GROUPS if params.get(g) is None]
    logging.info("init_from %s (%s): %s from the file%s", path, kind, ", ".join(loaded),
                 f"; {', '.join(fresh)} initialised" if fresh else "")
    return params


def initial_trainable(model, config, frozen_unet, init_params: Optional[Mapping] = None) -> dict:
    """The trainable params a fresh run starts from: the reference initialisation, with the groups
    `init_params` (`read_init_from`) holds taking their place."""
    fresh = build_lib.init_trainable(model, frozen_unet, build_lib.stream_seed(config, "trainable"))
    for group, value in (init_params or {}).items():
        if value is None:
            continue
        expected = jax.tree.structure(fresh[group])
        if jax.tree.structure(value) != expected:  # read_init_from checked keys and shapes already
            raise errors.InputError(f"--config.model.init_from: the {group} group does not fit this model's tree")
        fresh[group] = jax.tree.map(lambda x: np.asarray(x, np.float32), value)
    return fresh


# ----------------------------------------------------------------------------- one writer


def run_lock(run: RunDir):
    """The run directory's one-writer lock: `RunLock` (flock) for a local or NFS folder,
    `ObjectLease` on an object store, where there is no flock."""
    return ObjectLease(run) if run.remote else RunLock(run)


class RunLock:
    """The run directory's exclusive lock, held by the one training process that writes it (process
    0 of a multi-host run), from its start until it exits; the kernel drops it if the process dies.
    A lock file left by a dead process is taken over, with a log line."""

    lost: Optional[str] = None  # a kernel lock cannot be lost while the process lives

    def __init__(self, run: RunDir):
        self.run = run
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.run.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        holder = os.read(fd, 4096).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise errors.BusyError(f"{self.run.root} is being trained by another process ({holder or 'unknown'}): "
                                   "wait for it to finish, or give this run another --workdir") from None
        if holder:
            logging.warning("took over the lock of %s, which is no longer running", holder)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        os.ftruncate(self._fd, 0)  # an empty lock file: nobody to report as a dead holder
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class ObjectLease(RunLock):
    """The one-writer lock of a run on an object store: a lease object `<workdir>/.lock` (JSON:
    holder, token, time of the last renewal, time to live). Every change is a conditional write on
    the generation last read (tensorstore's kvstore, the client orbax writes the checkpoints with):
    created only if absent, so of two hosts racing one wins; renewed by a background thread every
    ttl/4 while the run lives; deleted when it ends. A lease not renewed for its time to live
    belonged to a run that died: it is taken over (under the same condition), with a log line. If a
    renewal finds the lease changed by another process, `lost` says so and training stops.

    The time to live is `$CID_JAX_LEASE_TTL_S` (default 300 s): a killed run's successor waits at
    most that long; a preempted run releases its lease on the way out."""

    DEFAULT_TTL_S = 300.0

    def __init__(self, run: RunDir):
        import threading
        import uuid

        self.run = run
        self.ttl_s = float(os.environ.get("CID_JAX_LEASE_TTL_S", self.DEFAULT_TTL_S))
        self.token = uuid.uuid4().hex
        self.holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        self.lost = None
        self._generation = None
        self._stop = threading.Event()
        self._thread = None
        self._kv, self._key = _kvstore_of(run.lock_file)

    def _read(self):
        """(lease dict or None, generation)."""
        got = self._kv.read(self._key).result()
        lease = json.loads(bytes(got.value) or b"{}") if got.state == "value" else None
        return lease, got.stamp.generation

    def _write(self, if_generation) -> bool:
        """Writes the lease if the object is still at `if_generation`; False if it is not."""
        data = json.dumps(dict(holder=self.holder, token=self.token, renewed=time.time(), ttl_s=self.ttl_s))
        written = self._kv.write(self._key, data.encode(), if_equal=if_generation).result()
        if not written.generation:  # the condition did not hold
            return False
        self._generation = written.generation
        return True

    def acquire(self) -> "ObjectLease":
        import threading

        current, generation = self._read()
        if current is not None:
            age = time.time() - float(current.get("renewed", 0))
            if age < float(current.get("ttl_s", self.ttl_s)):
                raise errors.BusyError(f"{self.run.root} is being trained by another process ({current.get('holder')}; "
                                       f"its lease was renewed {age:.0f} s ago): wait for it to finish, or give this "
                                       "run another --workdir")
            logging.warning("took over the lease of %s on %s: not renewed for %.0f s", current.get("holder"),
                            self.run.root, age)
        if not self._write(generation):
            raise errors.BusyError(f"{self.run.root}: another process took the run's lease at the same moment; "
                                   "give this run another --workdir")
        self._thread = threading.Thread(target=self._renew, name="cid_jax-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        failing_since = None
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self._write(self._generation):
                    self.lost = f"the lease on {self.run.root} was taken by another process"
                    logging.error("%s; this run stops at the next step", self.lost)
                    return
            except Exception as e:  # noqa: BLE001 - the store briefly unreachable: try again next time
                if failing_since is None:  # once per outage, not at every try
                    failing_since = time.monotonic()
                    logging.warning("could not renew the lease on %s (%s); retrying every %.0f s", self.run.root,
                                    _first_cause(e), self.ttl_s / 4)
                continue
            if failing_since is not None:
                logging.info("the lease on %s is renewed again, after %.0f s", self.run.root,
                             time.monotonic() - failing_since)
                failing_since = None

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self.lost:
            return
        try:
            self._kv.write(self._key, None, if_equal=self._generation).result()
        except Exception as e:  # noqa: BLE001 - it then goes stale, and is taken over after its ttl
            logging.warning("could not remove the lease %s (%s); it expires in %.0f s", self.run.lock_file, e,
                            self.ttl_s)


def _kvstore_of(url):
    """(tensorstore KvStore of the bucket, key) for a gs:// or s3:// object."""
    import tensorstore as ts

    scheme, _, rest = str(url).partition("://")
    bucket, _, key = rest.partition("/")
    driver = {"gs": "gcs", "s3": "s3"}[scheme]
    return ts.KvStore.open({"driver": driver, "bucket": bucket}, context=ts.Context(store_retries())).result(), key


# ----------------------------------------------------------------------- resuming with a config

# Fields a resumed run may change freely: how long it runs, how it logs, saves and executes.
FREE_FIELDS = ("train.num_steps", "train.log_every", "train.image_every", "train.export_at_end",
               "train.export_dtype", "train.allow_config_change", "checkpoint.", "data.num_parallel_calls",
               "data.prefetch", "model.attention", "model.remat", "model.init_from", "mesh.", "eval.")
# Fields that change what the checkpoint holds (parameter shapes, the optimizer's state tree): a run
# cannot resume with other values.
STRUCTURE_FIELDS = ("model.variant", "model.preset", "model.lora_rank", "model.num_id_tokens",
                    "model.facial_encoder.", "model.projplus_shortcut", "optim.clip_norm", "optim.warmup_steps",
                    "optim.grad_accum")


def _flat_fields(config) -> dict[str, Any]:
    data = json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = value
    walk("", data)
    return out


def _matches(field: str, patterns) -> bool:
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in patterns)


def config_changes(stored, new) -> list[tuple[str, Any, Any]]:
    """(field, stored value, new value) for every field both configs have and that differs (a field
    one of them lacks is a config from another cid_jax version: its default applies)."""
    a, b = _flat_fields(stored), _flat_fields(new)
    return [(k, a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def check_resume_config(stored, new) -> None:
    """A resumed run's config against the one it was started with: changes to what the checkpoint
    holds stop it; other changes (seed, data, learning rate, ...) stop it unless
    `train.allow_config_change`; changes to run length, logging and saving pass (logged)."""
    changes = [c for c in config_changes(stored, new) if not _matches(c[0], FREE_FIELDS)]
    if not changes:
        return
    show = lambda cs: "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in cs)  # noqa: E731
    structure = [c for c in changes if _matches(c[0], STRUCTURE_FIELDS)]
    if structure:
        raise errors.InputError(
            f"this run's checkpoints were made with another model or optimizer: {show(structure)}. Resume with "
            "the run's values, or start a new --workdir (to start from this run's weights, export them and "
            "pass --config.model.init_from=FILE)")
    if not bool(new.train.get("allow_config_change", False)):
        raise errors.InputError(
            f"the config differs from the one this run was started with: {show(changes)}. Resume with the "
            "run's values, or add --config.train.allow_config_change=True to continue with the new ones")
    logging.warning("resuming with a changed config (allowed): %s", show(changes))
