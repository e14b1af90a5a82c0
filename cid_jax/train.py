"""python -m cid_jax.train --config=configs/sd15.py --workdir=DIR [--config.x.y=v ...]

Runs on one host or on every host of a pod (the same command on each; see launch/). Resumes from
the latest checkpoint in DIR; exports the trained weights to the PyTorch layout at the end.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cid_jax import cli, runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and exports go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-host: host:port of process 0 (else JAX_COORDINATOR_ADDRESS; TPU pods need nothing).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_DEBUG = flags.DEFINE_bool("debug", cli.debug_requested([]), "Show the traceback of an error (or CID_DEBUG=1).")
_CACHE_DIR, _CACHE_ON = runtime.define_absl_cache_flags()
flags.mark_flags_as_required(["config", "workdir"])


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() when this is one process of several (flags, env or TPU pod)."""
    import jax

    explicit = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if explicit or _NUM_PROCESSES.value:
        jax.distributed.initialize(coordinator_address=explicit, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()  # auto-detected cluster (TPU pod slice, SLURM)


def run(config, workdir: str) -> int:
    from cid_jax import observe

    observe.quiet_library_logs()
    runtime.enable_compilation_cache(_CACHE_DIR.value if _CACHE_ON.value else None)
    maybe_initialize_distributed()
    import jax

    from cid_jax import export, trainer
    from cid_jax.run import RunDir

    logging.info("JAX %s: process %d/%d, %d local / %d global devices (%s)", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)
    result = trainer.train(config, workdir)
    if result.preempted:
        logging.info("preempted at step %d; rerun the same command to resume", result.step)
        return 0
    if config.train.export_at_end and jax.process_index() == 0:
        out = export.export_run(config, result.trainable, RunDir(workdir), result.step)
        logging.info("exported PyTorch weights: %s", out)
    return 0


def main(argv):
    del argv
    # SIGTERM stays the trainer's: a preemption notice saves a checkpoint and exits cleanly.
    sys.exit(cli.guarded("train", lambda: run(_CONFIG.value, _WORKDIR.value), debug=_DEBUG.value, sigterm=False))


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli.absl_flags_parser("train")(runtime.absl_argv(argv)))
