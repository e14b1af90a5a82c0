"""Sharded, resumable ConsistentID training: state, step, checkpoints and the loop.

Read top to bottom: the mesh and the models come from the config; the frozen weights are placed on
the mesh by the logical sharding rules (FSDP over `fsdp`); the trainable weights and their AdamW
state likewise; one jitted step (explicit in/out shardings, donated state) computes

    loss = noise MSE (foreground-masked for the flagged samples) + lambda * facial localization loss

orbax saves the state with the config and the data position (= the step: the input pipeline is
deterministic in (seed, step)); a restart resumes from the latest checkpoint, SIGTERM saves and exits.
The run directory is `cid_jax.run`'s, the batches come from `cid_jax.data`, the model and its
weights from `cid_jax.build`.
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

from cid_jax import build as build_lib
from cid_jax import config_base, errors, losses, paths, run as run_lib, runtime, schedulers, sharding, train_eval
from cid_jax.models.consistentid import ConsistentID


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any          # trainable tree: {"unet": adapters, "facial_encoder": ..., "image_proj": ...}
    opt_state: Any


# ------------------------------------------------------------------------------------- config


def step_batch(config, n_devices: int) -> int:
    """Samples per jitted step (global_batch / grad_accum), checked to give each of `n_devices` a
    whole share and the mesh to fit them; `errors.InputError` (a ValueError) with the fix otherwise."""
    accum = max(1, int(config.optim.grad_accum))
    gb, fsdp, data = int(config.train.global_batch), int(config.mesh.fsdp), int(config.mesh.data)
    if n_devices % fsdp or (data != -1 and data * fsdp != n_devices):
        raise errors.InputError(f"mesh data={data} x fsdp={fsdp} does not fit the {n_devices} devices: keep "
                                f"--config.mesh.data=-1 and pick an --config.mesh.fsdp that divides {n_devices}")
    if gb % accum or (gb // accum) % n_devices:
        per = n_devices * accum
        raise errors.InputError(f"--config.train.global_batch={gb} with grad_accum={accum} does not give every "
                                f"one of the {n_devices} devices a whole sample per step: use a multiple of {per}, "
                                f"e.g. --config.train.global_batch={per} (1 sample per device per step)")
    return gb // accum


def validate(config, workdir=None) -> None:
    """Fails before any work (nothing built, compiled or created), with the fix in the message,
    when the config cannot run: field values, the batch over the devices, the weights and data
    folders, `init_from`, and whether the run directory can be written."""
    problems = config_base.config_problems(config)
    if problems:
        raise errors.InputError(f"{len(problems)} config value(s) cannot work:\n  " + "\n  ".join(problems))
    step_batch(config, jax.device_count())
    with paths.reading("--config.model.base", config.model.base):
        build_lib.check_weight_folders(config)
    init_from = config.model.get("init_from")
    with paths.reading("--config.model.init_from", init_from):
        if init_from and not paths.path(init_from).exists():
            raise errors.MissingError(f"--config.model.init_from={init_from} does not exist")
    if config.data.path:
        from cid_jax.data import builder

        with paths.reading("--config.data.path", config.data.path):
            builder.dataset_for(config, workdir or ".", create=False)
    elif not config.data.synthetic:
        builder_hint = "python -m cid_jax.data.builder {reference,folder,synthetic} --out=DIR"
        raise errors.InputError(f"no training data: set --config.data.path to a built FGID dataset ({builder_hint}) "
                                "or --config.data.synthetic=N for N synthetic faces")
    if workdir is not None:
        paths.check_writable(workdir, "--workdir")


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


def new_state(params, tx) -> TrainState:
    """Step 0 with fresh optimizer state (pure: jit it with shardings, or eval_shape it)."""
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def place(trainable, frozen, tx, placement: Placement) -> tuple[TrainState, Any]:
    """The initial train state, created sharded on device, and the frozen weights placed."""
    state = jax.jit(lambda p: new_state(p, tx), out_shardings=placement.state)(trainable)
    return state, jax.device_put(frozen, placement.frozen)


def make_placement(model: ConsistentID, tx, mesh: Mesh) -> Placement:
    frozen_abs, train_abs = build_lib.abstract_frozen(model), build_lib.abstract_trainable(model)
    frozen_sh = sharding.param_shardings(frozen_abs, mesh)
    train_sh = sharding.param_shardings(train_abs, mesh)
    opt_abs = jax.eval_shape(tx.init, flax.linen.meta.unbox(train_abs))
    # Optimizer moments mirror the params they belong to; counters are replicated.
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, train_sh,
                                   transform_non_params=lambda _: sharding.replicated(mesh))
    state_sh = TrainState(step=sharding.replicated(mesh), params=train_sh, opt_state=opt_sh)
    return Placement(mesh, frozen_sh, state_sh)


def global_batch(local: Mapping[str, np.ndarray], placement: Placement) -> dict:
    """Host-local numpy batch -> global jax.Arrays sharded over the batch axis (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(placement.batch(np.ndim(v)), np.asarray(v))
            for k, v in local.items()}


def input_batches(config, run: run_lib.RunDir) -> Callable[[int], Iterator]:
    """start_step -> this host's numpy batches from the data layer (the dataset built first by
    process 0 when the config asks for synthetic faces)."""
    from cid_jax.data import builder, pipeline

    if jax.process_index() == 0:
        data_dir = builder.dataset_for(config, run.root)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dataset ready")
    if jax.process_index() != 0:
        data_dir = builder.dataset_for(config, run.root, create=False)
    return lambda start: pipeline.train_batches(config, data_dir, start_step=start,
                                                process_index=jax.process_index(),
                                                process_count=jax.process_count())


# ------------------------------------------------------------------------------------ loop


def _wait_for_all_hosts(name: str, timeout_s: int = 3600) -> None:
    """A barrier of all processes through JAX's coordination service (no device collective). Hosts
    finish compiling at different times (one reads the persistent cache, another compiles for
    minutes), and the first step's collectives give their setup only 30 s on CPU (gloo)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination client; no public barrier without devices

    client = distributed.global_state.client
    if client is not None:
        client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


class _Preemption:
    """SIGTERM -> finish the current step, save, exit cleanly (one process; a multi-host run
    agrees on the step through JAX's preemption sync point instead, see `_train`)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() > 1:  # JAX's preemption notifier owns SIGTERM there
            return
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


def _state_bytes(state) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))


def _warn_if_disk_low(run: run_lib.RunDir, state_bytes: int) -> None:
    """A checkpoint needs about the state's size on disk; say so before a save that may not fit."""
    import shutil

    if run.remote:  # an object store has no disk to fill
        return
    free = shutil.disk_usage(run.checkpoints if run.checkpoints.exists() else run.root).free
    if free < 2 * state_bytes:
        logging.warning("only %.2f GiB free under %s for checkpoints of %.2f GiB each: free some space or "
                        "lower --config.checkpoint.keep", free / 2**30, run.checkpoints, state_bytes / 2**30)


class SaveFailed(errors.UserError):
    """A checkpoint or the run's logs could not be written (the cause is in the message; the run
    stopped cleanly)."""
    code = errors.EXIT_FAILED


def _surface_save_errors(manager, run: run_lib.RunDir, step: int) -> None:
    """An asynchronous save that failed raises here, at the next step, not at the next save."""
    try:
        manager.check_for_errors()
    except Exception as e:  # noqa: BLE001 - whatever the filesystem raised
        removed = run_lib.clean_temporary_saves(run)
        latest = [s for s in manager.all_steps() if s < step]
        raise SaveFailed(f"saving a checkpoint failed at step {step} ({run_lib._first_cause(e)}); stopped. "
                         f"The last good checkpoint is step {max(latest) if latest else 'none'}"
                         f"{f'; removed {len(removed)} unfinished save folder(s)' if removed else ''}") from e


def train(config, workdir: str | pathlib.Path, batches: Callable[[int], Iterator] | None = None) -> RunResult:
    """Runs (or resumes) training. `batches(start_step)` yields host-local numpy batches; by
    default the FGID tf.data pipeline from `config.data`.

    Before anything is built: the config is checked, the run directory locked (one writer), and a
    resumed run's config compared with the one it started with. A checkpoint that cannot be read
    is set aside and the previous one used."""
    from cid_jax import observe

    run = run_lib.RunDir(workdir)
    with paths.reading("--workdir", workdir):
        new_folder = not run.root.exists()
    validate(config, run.root)
    lock = run_lib.run_lock(run).acquire() if jax.process_index() == 0 else None
    try:
        return _train(config, run, batches, observe, lock)
    except BaseException:
        if lock is not None and new_folder:
            lock.release()
            _remove_if_only_the_lock(run)
        raise
    finally:
        if lock is not None:
            lock.release()


def _remove_if_only_the_lock(run: run_lib.RunDir) -> None:
    """A run that failed before writing anything (a bad init_from, a shape mismatch) leaves no
    folder it created holding only its lock: the next try starts from nothing, as this one did."""
    try:
        if run.root.exists() and {p.name for p in run.root.iterdir()} <= {".lock"}:
            run.root.rmtree()
    except OSError:  # the folder is a courtesy; the error being raised is what matters
        pass


def _train(config, run: run_lib.RunDir, batches, observe, lock=None) -> RunResult:
    if run.config_file.exists():
        run_lib.check_resume_config(run_lib.read_config(run), config)
    has_checkpoints = run.checkpoints.is_dir() and any(p.name.isdigit() for p in run.checkpoints.iterdir())
    init_params = None
    if config.model.get("init_from") and not has_checkpoints:  # strict, before anything is built
        init_params = run_lib.read_init_from(config)
    if jax.process_index() == 0 and run_lib.clean_temporary_saves(run):
        logging.warning("removed the unfinished save folders a previous run left under %s", run.checkpoints)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    tx = make_optimizer(config)
    step_key = build_lib.stream_key(config, "step")

    t0 = time.perf_counter()
    logging.info("building models (%s)", config.model.base or f"random {config.model.preset} preset")
    model = build_lib.build_modules(config)
    placement = make_placement(model, tx, mesh)
    manager = run_lib.checkpoint_manager(run, config)
    abstract_state = jax.eval_shape(lambda p: new_state(p, tx), build_lib.abstract_trainable(model, boxed=False))
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  abstract_state, placement.state)
    frozen32 = run_lib.frozen_weights(model, config, run)
    restored, meta = run_lib.restore_latest(manager, abstract_state, run)
    if restored is not None:
        state = restored
        logging.info("resumed from step %d (data position %d)%s", int(state.step), meta["data_position"],
                     "; model.init_from is ignored: the checkpoint wins" if config.model.get("init_from") else "")
        frozen = jax.device_put(build_lib.cast_floating(frozen32, build_lib.frozen_dtype(config)), placement.frozen)
    else:
        trainable = run_lib.initial_trainable(model, config, frozen32["unet"], init_params)
        state, frozen = place(trainable, build_lib.cast_floating(frozen32, build_lib.frozen_dtype(config)), tx,
                              placement)
        del trainable
    del frozen32
    run_lib.write_config(run, config)
    start = int(jax.device_get(state.step))
    state_bytes = _state_bytes(state)
    build_s = time.perf_counter() - t0
    logging.info("models built and placed in %.1f s", build_s)

    if batches is None:
        batches = input_batches(config, run)
    it = batches(start)
    first = next(it, None)
    if first is None:
        raise RuntimeError("the input pipeline produced no batch")
    first = global_batch(first, placement)
    jitted = jit_train_step(model, tx, config, placement, {k: v.ndim for k, v in first.items()})
    t0 = time.perf_counter()
    with runtime.CompileStats() as stats:
        compiled = jitted.lower(state, frozen, first, step_key).compile()
    compile_s = time.perf_counter() - t0
    _wait_for_all_hosts("cid_jax: train step compiled")
    flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
    logging.info("train step compiled in %.1f s (%.3g GFLOP per device per step%s)",
                 compile_s, flops / 1e9, "; read from the persistent cache" if stats.cache_hits else "")

    writer = observe.Writer(run, mesh)
    evaluator = train_eval.make_evaluator(config, model, run, mesh)
    preempt = _Preemption()
    history, step, preempted = [], start, False
    total = config.train.num_steps
    progress = observe.progress(total, start, max(config.train.log_every, total // 20))
    pending_batch = first
    t_log, step_at_log = time.perf_counter(), start
    save_failed = failing = False
    try:
        while step < total:
            batch = pending_batch if pending_batch is not None else global_batch(next(it), placement)
            pending_batch = None
            state, metrics = compiled(state, frozen, batch, step_key)
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
                if step == start + 1:
                    logging.info("first step done %.1f s after the process started (building %.1f s, compiling "
                                 "%.1f s, the step %.1f s)", runtime.seconds_since_process_start(), build_s,
                                 compile_s, dt)
                writer.scalars(step, metrics)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", facial=f"{metrics['facial_loss']:.4f}")
            if config.train.image_every and step % config.train.image_every == 0:
                writer.attention_images(step, model, frozen, state.params, batch)
            if evaluator is not None and (step % config.eval.every_steps == 0 or step == total):
                t_eval = time.perf_counter()
                writer.eval_scalars(step, evaluator(step, frozen, state.params))
                t_log += time.perf_counter() - t_eval  # step_time_s measures training steps only
            progress.update(1)
            _surface_save_errors(manager, run, step)
            if manager.should_save(step):
                _warn_if_disk_low(run, state_bytes)
            try:
                run_lib.save(manager, state, config)
            except OSError as e:  # a synchronous part of the save (e.g. creating its folder) failed
                removed = run_lib.clean_temporary_saves(run)
                raise SaveFailed(f"saving the checkpoint of step {step} failed ({e.strerror or e}); stopped. The "
                                 f"last good checkpoint is step {manager.latest_step()}"
                                 f"{f'; removed {len(removed)} unfinished save folder(s)' if removed else ''}") from e
            # One host: our SIGTERM handler. Several: every host reaches JAX's preemption sync point
            # at the same step (orbax saved it just now), so all of them stop there together.
            if preempt.requested or (jax.process_count() > 1 and manager.reached_preemption(step)):
                preempted = True
                logging.warning("preemption: checkpoint of step %d saved; exiting", step)
                break
            if lock is not None and lock.lost:
                raise errors.BusyError(f"{lock.lost}; stopped at step {step}")
    except SaveFailed:
        save_failed = failing = True
        raise
    except BaseException:
        failing = True
        raise
    finally:
        progress.close()
        preempt.restore()
        # The last step is always on disk: at the end, on SIGTERM, and on an exception (not after a
        # failed save: the disk that refused it would refuse this one too).
        if not save_failed:
            try:
                if manager.latest_step() != step:
                    run_lib.save(manager, state, config, force=True)
                manager.wait_until_finished()
                manager.check_for_errors()
            except Exception as e:  # e.g. the state was donated to a step that failed, or a full disk
                logging.error("could not save the final checkpoint at step %d: %s", step, run_lib._first_cause(e))
                run_lib.clean_temporary_saves(run)
        try:
            manager.close()
        except Exception as e:  # noqa: BLE001 - an async save's error, already reported above
            logging.error("closing the checkpoint manager: %s", run_lib._first_cause(e))
        try:
            writer.close(history)
        except Exception as e:  # noqa: BLE001 - the store's own error types
            if failing:  # the error already on its way says what went wrong first
                logging.error("the run's logs could not be written to %s: %s", run.root, paths.describe_error(e))
            else:
                raise SaveFailed(f"the run's logs could not be written to {run.root} ({paths.describe_error(e)}); "
                                 f"the checkpoint of step {step} is saved") from e
    return RunResult(step, history, run.root, preempted, jax.device_get(state.params))
