"""Sharded, resumable ConsistentID training: state, step, checkpoints and the loop.

Read top to bottom: the mesh and the models come from the config; the frozen weights are placed on
the mesh by the logical sharding rules (FSDP over `fsdp`); the trainable weights and their AdamW
state likewise; one jitted step (explicit in/out shardings, donated state) computes

    loss = noise MSE (foreground-masked for the flagged samples) + lambda * facial localization loss

orbax saves the state with the config and the data position (= the step: the input pipeline is
deterministic in (seed, step)); a restart resumes from the latest checkpoint, SIGTERM saves and exits.
"""
from __future__ import annotations

import dataclasses
import pathlib
import signal
import time
from typing import Any, Callable, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from cid_jax import losses, schedulers, sharding
from cid_jax.models import build as build_lib
from cid_jax.models.consistentid import ConsistentID


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any          # trainable tree: {"unet": adapters, "facial_encoder": ..., "image_proj": ...}
    opt_state: Any


# ------------------------------------------------------------------------------------- config


def step_batch(config, n_devices: int) -> int:
    """Samples per jitted step (global_batch / grad_accum), checked to give each of `n_devices` a
    whole share and the mesh to fit them; ValueError with the fix otherwise."""
    accum = max(1, int(config.optim.grad_accum))
    gb, fsdp, data = int(config.train.global_batch), int(config.mesh.fsdp), int(config.mesh.data)
    if n_devices % fsdp or (data != -1 and data * fsdp != n_devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not fit the {n_devices} devices: keep "
                         f"--config.mesh.data=-1 and pick an --config.mesh.fsdp that divides {n_devices}")
    if gb % accum or (gb // accum) % n_devices:
        per = n_devices * accum
        raise ValueError(f"--config.train.global_batch={gb} with grad_accum={accum} does not give every one "
                         f"of the {n_devices} devices a whole sample per step: use a multiple of {per}, e.g. "
                         f"--config.train.global_batch={per} (1 sample per device per step)")
    return gb // accum


def validate(config) -> None:
    """Fails before any compile, with the fix in the message, when the config cannot run."""
    step_batch(config, jax.device_count())
    build_lib.frozen_dtype(config)  # raises on an unknown dtype name
    problems = build_lib.missing_weight_folders(config)
    if problems:
        raise FileNotFoundError("base model weights not found:\n  " + "\n  ".join(problems)
                                + "\nPoint the config at local copies (see README 'Weights').")
    if config.model.facial_loss_mode not in ("cross", "self", "none"):
        raise ValueError("--config.model.facial_loss_mode must be 'cross' (paper), 'self' (reference "
                         "training code) or 'none'")


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW as the reference (lr 1e-4 constant, betas (0.9, 0.999), wd 1e-2, eps 1e-8)."""
    o = config.optim
    lr = optax.warmup_constant_schedule(0.0, o.lr, o.warmup_steps) if o.warmup_steps else o.lr
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if o.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
    return tx  # gradient accumulation happens inside the step (`make_train_step`)


# --------------------------------------------------------------------------------------- step


def make_train_step(model: ConsistentID, tx, config) -> Callable:
    """(state, frozen, batch, rng) -> (state, metrics); pure, to be jitted with shardings."""
    sched = schedulers.NoiseSchedule.create(
        schedulers.SchedulerConfig.from_config(dict(config.noise), "DDPMScheduler"))
    lam = float(config.train.facial_loss_weight)
    capture = config.model.facial_loss_mode != "none" and lam > 0
    n_micro = max(1, int(config.optim.grad_accum))

    def accumulate(loss_fn, params, *batch_args):
        """Mean loss/grads over `grad_accum` micro-batches (one when 1), scanned to bound memory.

        A batch sharded over devices is split as (micro, accum) then transposed, so every
        micro-batch stays spread over all devices instead of living on a few."""
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if n_micro == 1:
            return grad_fn(params, *batch_args)
        split = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((-1, n_micro) + x.shape[1:]), 0, 1),
                             batch_args)

        def body(carry, micro):
            (loss, aux), grads = grad_fn(params, *micro)
            return jax.tree.map(jnp.add, carry, ((loss, aux), grads)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, *jax.tree.map(
            lambda x: x[0], split)))
        total, _ = jax.lax.scan(body, zeros, split)
        return jax.tree.map(lambda x: x / n_micro, total)

    def train_step(state: TrainState, frozen, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        k_latent, k_noise, k_t = jax.random.split(rng, 3)
        latents = model.encode_latents(jax.lax.stop_gradient(frozen), batch["pixel_values"], k_latent)
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        t = schedulers.sample_timesteps(k_t, latents.shape[0], sched)
        noisy = schedulers.add_noise(sched, latents, noise, t)
        target = schedulers.training_target(sched, latents, noise, t)

        def loss_fn(params, batch, noisy, target, t):
            context, added = model.conditioning(frozen, params, batch)
            pred, maps = model.predict_noise(frozen, params, noisy, t, context, added,
                                             facial_token_idx=batch["facial_token_idx"], capture=capture)
            noise_loss = losses.noise_mse(pred, target, batch.get("foreground_mask"),
                                          batch.get("use_foreground_loss"))
            facial = (losses.facial_localization_loss(maps, batch["facial_masks"],
                                                      batch["facial_token_idx_mask"])
                      if capture else jnp.zeros((), jnp.float32))
            return noise_loss + lam * facial, dict(noise_loss=noise_loss, facial_loss=facial)

        (loss, aux), grads = accumulate(loss_fn, state.params, batch, noisy, target, t)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(loss=loss, grad_norm=optax.global_norm(grads), **aux)
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def jit_train_step(model: ConsistentID, tx, config, placement: "Placement", batch_ndims: Mapping[str, int]):
    """The one jitted train step (explicit shardings, donated state) that `train` runs and
    `cid_jax.aot` compiles for TPU topologies."""
    batch_sh = {k: placement.batch(n) for k, n in batch_ndims.items()}
    return jax.jit(make_train_step(model, tx, config),
                   in_shardings=(placement.state, placement.frozen, batch_sh, None),
                   out_shardings=(placement.state, None), donate_argnums=(0,))


# ------------------------------------------------------------------------------- placement


@dataclasses.dataclass
class Placement:
    """Shardings of everything the step touches, derived once from the config."""
    mesh: Mesh
    frozen: Any
    state: Any

    def batch(self, ndim: int) -> NamedSharding:
        return sharding.batch_sharding(self.mesh, ndim)


def abstract_trees(model: ConsistentID, tx, key):
    """Boxed (logically annotated) abstract frozen/trainable trees and the abstract opt state."""
    frozen = jax.eval_shape(lambda k: build_lib.init_frozen_random(model, k, unbox=False), key)
    trainable = jax.eval_shape(
        lambda k: build_lib.init_trainable(model, flax.linen.meta.unbox(
            build_lib.init_frozen_random(model, k)), k, unbox=False), key)
    return frozen, trainable


def new_state(params, tx) -> TrainState:
    """Step 0 with fresh optimizer state (pure: jit it with shardings, or eval_shape it)."""
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def place(trainable, frozen, tx, placement: Placement) -> tuple[TrainState, Any]:
    """The initial train state, created sharded on device, and the frozen weights placed."""
    state = jax.jit(lambda p: new_state(p, tx), out_shardings=placement.state)(trainable)
    return state, jax.device_put(frozen, placement.frozen)


def make_placement(model: ConsistentID, tx, mesh: Mesh, key) -> Placement:
    frozen_abs, train_abs = abstract_trees(model, tx, key)
    frozen_sh = sharding.param_shardings(frozen_abs, mesh)
    train_sh = sharding.param_shardings(train_abs, mesh)
    opt_abs = jax.eval_shape(tx.init, flax.linen.meta.unbox(train_abs))
    # Optimizer moments mirror the params they belong to; counters are replicated.
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, train_sh,
                                   transform_non_params=lambda _: sharding.replicated(mesh))
    state_sh = TrainState(step=sharding.replicated(mesh), params=train_sh, opt_state=opt_sh)
    return Placement(mesh, frozen_sh, state_sh)


def batch_spec(config, model: ConsistentID, batch: int | None = None) -> dict:
    """Shapes and dtypes of one global training batch (the input pipeline's contract)."""
    b = batch or config.train.global_batch
    r, m = config.data.resolution, config.data.mask_resolution
    clip = model.vision.config.image_size
    f32, i32 = np.float32, np.int32
    spec = dict(
        pixel_values=((b, r, r, 3), f32), clip_image=((b, clip, clip, 3), f32),
        part_clip_images=((b, 5, clip, clip, 3), f32), facial_masks=((b, 5, m, m), f32),
        foreground_mask=((b, r, r), f32), input_ids=((b, 77), i32), facial_token_mask=((b, 77), bool),
        facial_token_idx=((b, 5), i32), facial_token_idx_mask=((b, 5), bool), id_embedding=((b, 512), f32),
        use_foreground_loss=((b,), bool))
    if model.is_sdxl:
        spec["time_ids"] = ((b, 6), f32)
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in spec.items()}


def global_batch(local: Mapping[str, np.ndarray], placement: Placement) -> dict:
    """Host-local numpy batch -> global jax.Arrays sharded over the batch axis (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(placement.batch(np.ndim(v)), np.asarray(v))
            for k, v in local.items()}


def dataset_dir(config, workdir: pathlib.Path) -> pathlib.Path:
    """The built FGID dataset: `data.path`, or synthetic faces built once into <workdir>/data."""
    from cid_jax.data import builder

    if config.data.path:
        built = list(builder.dataset_dirs(config.data.path))
        if (pathlib.Path(config.data.path) / "dataset_info.json").exists():
            return pathlib.Path(config.data.path)
        if len(built) == 1:
            return built[0]
        raise FileNotFoundError(
            f"--config.data.path={config.data.path} holds {len(built)} built datasets "
            f"({[str(b) for b in built]}); point it at one (a folder with dataset_info.json)")
    if not config.data.synthetic:
        raise ValueError("no training data: set --config.data.path to a built FGID dataset "
                         "(python -m cid_jax.data.synthetic, or the builders in cid_jax.data.builder) "
                         "or --config.data.synthetic=N for N synthetic faces")
    data_dir = workdir / "data"
    if jax.process_index() == 0:
        logging.info("building %d synthetic faces into %s (once)", config.data.synthetic, data_dir)
        builder.build_synthetic(data_dir, num=config.data.synthetic, seed=config.seed,
                                size=max(config.data.resolution, 128), progress=False)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("synthetic dataset built")
    return builder.report_of(next(iter(builder.dataset_dirs(data_dir)))).dataset_dir


def fgid_batches(config, workdir: pathlib.Path) -> Callable[[int], Iterator]:
    """start_step -> this host's numpy batches from the tf.data pipeline (deterministic in
    (seed, step), so a resumed run sees exactly the batches it would have seen)."""
    from cid_jax.data import pipeline

    folder = dataset_dir(config, workdir)
    cfg = pipeline.PipelineConfig(
        global_batch_size=config.train.global_batch,
        resolution=config.data.resolution, mask_resolution=config.data.mask_resolution,
        seed=config.seed, pairing=config.data.pairing, drop_prob=config.data.drop_prob,
        foreground_loss_prob=config.data.foreground_loss_prob,
        max_text_length=config.data.max_text_length, prefetch=config.data.prefetch,
        num_parallel_calls=config.data.num_parallel_calls)
    keys = set(batch_spec(config, build_lib.build_modules(config)))

    def batches(start_step: int):
        for b in pipeline.batches(folder, cfg, start_step=start_step, process_index=jax.process_index(),
                                  process_count=jax.process_count()):
            yield {k: v for k, v in b.items() if k in keys}

    return batches


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: pathlib.Path, config):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.checkpoint.every_steps, max_to_keep=config.checkpoint.keep,
        enable_async_checkpointing=config.checkpoint.get("async_save", True), create=True)
    return ocp.CheckpointManager(str((workdir / "checkpoints").absolute()), options=options,
                                 item_names=("state", "meta"))


def save(manager, state: TrainState, config, *, force: bool = False) -> bool:
    import orbax.checkpoint as ocp

    step = int(jax.device_get(state.step))
    meta = dict(step=step, data_position=step, seed=config.seed, config=config.to_json())
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=force)


def restore_latest(manager, abstract_state: TrainState):
    """(state, meta) of the newest checkpoint, or (None, None) when there is none."""
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None, None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta


def _abstract_like(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ------------------------------------------------------------------------------------ loop


class _Preemption:
    """SIGTERM -> finish the current step, save, exit cleanly."""

    def __init__(self):
        self.requested = False
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. under some test runners)
            self._previous = None

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class RunResult:
    step: int
    history: list            # per logged step: dict of floats
    workdir: pathlib.Path
    preempted: bool = False
    trainable: Any = None


def train(config, workdir: str | pathlib.Path, batches: Callable[[int], Iterator] | None = None) -> RunResult:
    """Runs (or resumes) training. `batches(start_step)` yields host-local numpy batches; by
    default the FGID tf.data pipeline from `config.data`."""
    from cid_jax import observe

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    validate(config)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    key = jax.random.key(config.seed)
    k_model, k_step = jax.random.split(key)
    tx = make_optimizer(config)

    logging.info("building models (%s)", "tiny random" if config.model.get("tiny") else config.model.base)
    model, frozen, trainable = build_lib.build(config, k_model)
    placement = make_placement(model, tx, mesh, k_model)
    state, frozen = place(trainable, frozen, tx, placement)
    del trainable

    manager = checkpoint_manager(workdir, config)
    restored, meta = restore_latest(manager, _abstract_like(state))
    if restored is not None:
        state = restored
        logging.info("resumed from step %d (data position %d)", int(state.step), meta["data_position"])
    start = int(jax.device_get(state.step))

    if batches is None:
        batches = fgid_batches(config, workdir)
    it = batches(start)
    first = next(it, None)
    if first is None:
        raise RuntimeError("the input pipeline produced no batch")
    first = global_batch(first, placement)
    jitted = jit_train_step(model, tx, config, placement, {k: v.ndim for k, v in first.items()})
    t0 = time.perf_counter()
    compiled = jitted.lower(state, frozen, first, k_step).compile()
    flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
    logging.info("train step compiled in %.1f s (%.3g GFLOP per device per step)",
                 time.perf_counter() - t0, flops / 1e9)

    writer = observe.Writer(workdir, config, mesh)
    preempt = _Preemption()
    history, step, preempted = [], start, False
    total = config.train.num_steps
    progress = observe.progress(total, start)
    pending_batch = first
    t_log, step_at_log = time.perf_counter(), start
    try:
        while step < total:
            batch = pending_batch if pending_batch is not None else global_batch(next(it), placement)
            pending_batch = None
            state, metrics = compiled(state, frozen, batch, k_step)
            step += 1
            if step % config.train.log_every == 0 or step == total or step == start + 1:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
                now = time.perf_counter()
                dt = (now - t_log) / (step - step_at_log)  # steps are async: average since last log
                t_log, step_at_log = now, step
                metrics.update(step_time_s=dt, samples_per_s=config.train.global_batch / dt,
                               tflops_per_device=flops / dt / 1e12,  # XLA counts one device's program
                               lr=float(config.optim.lr))
                history.append(dict(step=step, **metrics))
                writer.scalars(step, metrics)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", facial=f"{metrics['facial_loss']:.4f}")
            if config.train.image_every and step % config.train.image_every == 0:
                writer.attention_images(step, model, frozen, state.params, batch)
            progress.update(1)
            save(manager, state, config)
            if preempt.requested:
                preempted = True
                break
    finally:
        progress.close()
        preempt.restore()
        # The last step is always on disk: at the end, on SIGTERM, and on an exception.
        if manager.latest_step() != step:
            try:
                save(manager, state, config, force=True)
            except Exception as e:  # e.g. the state was donated to a step that failed
                logging.error("could not save the final checkpoint at step %d: %s", step, e)
        manager.wait_until_finished()
        manager.close()
        writer.close(history)
    return RunResult(step, history, workdir, preempted, jax.device_get(state.params))
