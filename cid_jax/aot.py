"""Will it fit my pod? Compile the real training step for a TPU topology, on a machine without TPUs.

    python -m cid_jax.aot --config=configs/sd15.py --topology=v5p:4x4x4 [--mfu=0.4] [--config.x.y=v ...]

XLA compiles for a TPU topology on any host once `libtpu` is installed (`pip install 'cid_jax[tpu]'`):
`jax.experimental.topologies` describes the pod's devices, the mesh is built over them from the
config, and the very jitted step that `cid_jax.trainer.train` runs (`trainer.jit_train_step`) is lowered
with abstract, sharded arguments (`jax.eval_shape`: nothing is allocated, no weights are read) and
compiled. The compiled executable's memory and cost analyses give the per-chip HBM use and FLOPs.

Architectures: the config.json files of `config.model.base` / `config.model.image_encoder` when
those folders exist; else `config.model.preset` (the demo's tiny one); otherwise the public
checkpoints' architectures of the preset registry (`cid_jax.models.presets`: sd15 / sdxl), so no
download is needed.

Exit status: 0 when the step fits the chip's HBM, 1 when it does not (the message names the knob to
turn), 2 when the setup is wrong (libtpu missing, batch not divisible, unknown topology).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import sys
import time
from typing import Any, Sequence

from cid_jax import cli
from cid_jax.models.unet import remat_mode

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int          # per chip
    peak_bf16_flops: float  # per chip, dense bf16


# Public per-chip figures (Cloud TPU system architecture pages). Keyed by the topology prefix.
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12),
}
# `device_kind` as libtpu reports it -> CHIPS key (for topologies named another way).
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}

INSTALL_HINT = ("libtpu is not installed: AOT compilation for TPU topologies needs it (it runs on CPU "
                "hosts too). Install the extra: pip install 'cid_jax[tpu]'  (or: pip install libtpu)")


class SetupError(cli.InputError):
    """The command cannot run as asked (exit status 2)."""


# ------------------------------------------------------------------------------ environment


def _quiet_libtpu(topology: str) -> None:
    """libtpu looks for the TPU VM it runs on (metadata server, worker hostnames) and logs warnings
    when there is none; AOT needs no TPU, so tell it up front. Only defaults: a real pod's env wins."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    # libtpu takes a host-wide lock (/tmp/libtpu_lockfile) meant for processes that drive the chips;
    # compile-only processes touch no chip, so several (a test beside a run) may coexist.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    gen, _, dims = topology.partition(":")
    chips = 1
    for d in dims.split("x"):
        chips *= int(d) if d.isdigit() else 1
    cores = {"v5e": ("v5litepod", 1), "v6e": ("v6e", 1), "v5p": ("v5p", 2), "v4": ("v4", 2)}
    if gen in cores:
        prefix, per_chip = cores[gen]
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{prefix}-{chips * per_chip}")


def topology_devices(topology: str) -> list:
    """The devices of a TPU topology such as 'v5e:4x4' or 'v5p:4x4x4' (no TPU needed)."""
    if importlib.util.find_spec("libtpu") is None:
        raise SetupError(INSTALL_HINT)
    gen = topology.partition(":")[0]
    if gen not in CHIPS or ":" not in topology:
        raise SetupError(f"--topology={topology!r}: expected <generation>:<chips per axis>, generation one "
                         f"of {sorted(CHIPS)}, e.g. v5e:4x4 (16 chips) or v5p:4x4x4 (64 chips)")
    _quiet_libtpu(topology)
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # libtpu's own message says which shapes exist
        raise SetupError(f"libtpu does not know topology {topology!r}: {e}") from e
    return list(desc.devices)


def chip_of(topology: str, devices: Sequence) -> Chip:
    key = _DEVICE_KINDS.get(getattr(devices[0], "device_kind", ""), topology.partition(":")[0])
    return CHIPS[key]


# ---------------------------------------------------------------------------- architectures


def architecture_config(config):
    """(config whose architectures are the ones to compile, where they came from). XLA's fused
    attention is traced: this host is a CPU, the target a TPU."""
    from cid_jax import build as build_lib
    from cid_jax.models import presets

    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.attention = "fused"
        if config.model.base and not build_lib.missing_weight_folders(config):
            return config, f"config.json files under {config.model.base}"
        if config.model.get("preset"):
            return config, f"the {config.model.preset} preset"
        if config.model.variant not in presets.VARIANTS:
            raise SetupError(f"--config.model.variant={config.model.variant!r}: expected 'sd15' or 'sdxl'")
        config.model.base = ""
        config.model.preset = config.model.variant
    return config, f"the {config.model.variant} preset (the public checkpoints' config.json)"


# ------------------------------------------------------------------------------------ plan


@dataclasses.dataclass
class Plan:
    """Everything needed to lower the step: model, optimizer, mesh, shardings, abstract arguments."""
    config: Any
    topology: str
    chip: Chip
    mesh: Any
    model: Any
    tx: Any
    placement: Any
    state: Any           # abstract TrainState (ShapeDtypeStructs with shardings)
    frozen: Any
    batch: dict
    key: Any
    micro_batch: int
    arch_source: str


def check_batch(config, n_devices: int) -> int:
    """The global batch of one jitted step (global_batch / grad_accum), checked against the pod
    (`trainer.step_batch`, the check training runs)."""
    from cid_jax import trainer

    try:
        return trainer.step_batch(config, n_devices)
    except ValueError as e:
        raise SetupError(str(e)) from None


def make_plan(config, topology: str, devices: Sequence | None = None) -> Plan:
    """Abstract, sharded arguments of the training step on `topology` (no allocation)."""
    import flax
    import jax

    from cid_jax import build as build_lib
    from cid_jax import sharding, trainer
    from cid_jax.data.batch import spec_for_config

    devices = list(devices) if devices is not None else topology_devices(topology)
    config, source = architecture_config(config)
    n = len(devices)
    micro = check_batch(config, n)  # the mesh too
    mesh = sharding.make_mesh(config.mesh.data, int(config.mesh.fsdp), devices=devices)

    model = build_lib.build_modules(config)
    tx = trainer.make_optimizer(config)
    key = build_lib.stream_key(config, "step")
    placement = trainer.make_placement(model, tx, mesh)
    frozen_boxed, train_boxed = build_lib.abstract_frozen(model), build_lib.abstract_trainable(model)
    unbox = flax.linen.meta.unbox
    state = jax.eval_shape(lambda p: trainer.new_state(p, tx), unbox(train_boxed))
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    state = jax.tree.map(with_sharding, state, placement.state)
    # The frozen weights in their storage dtype (model.frozen_dtype), as trainer.run places them.
    frozen_abs = jax.eval_shape(lambda t: build_lib.cast_floating(t, build_lib.frozen_dtype(config)),
                                unbox(frozen_boxed))
    frozen = jax.tree.map(with_sharding, frozen_abs, placement.frozen)
    batch = {k: with_sharding(v, placement.batch(v.ndim)) for k, v in spec_for_config(config, micro).items()}
    key_abs = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
    return Plan(config, topology, chip_of(topology, devices), mesh, model, tx, placement, state, frozen,
                batch, key_abs, micro, source)


# ---------------------------------------------------------------------------------- report


@dataclasses.dataclass
class ArrayInfo:
    path: str
    shape: tuple
    dtype: str
    spec: str
    global_bytes: int
    device_bytes: int


@dataclasses.dataclass
class Report:
    topology: str
    chip: str
    n_devices: int
    mesh: dict
    arch_source: str
    variant: str
    resolution: int
    dtype: str
    frozen_dtype: str           # storage dtype of the frozen base weights
    remat: bool
    global_batch: int
    micro_batch: int            # samples per jitted step over the pod (global_batch / grad_accum)
    per_chip_batch: int
    # Per-device bytes of the inputs, from the shardings (exact, before TPU tiling/padding).
    frozen_param_bytes: int
    trainable_param_bytes: int
    opt_state_bytes: int
    batch_bytes: int
    # Per-device bytes from XLA's buffer assignment of the compiled step.
    argument_bytes: int
    output_bytes: int
    alias_bytes: int            # outputs written in place of donated inputs (the train state)
    temp_bytes: int             # activations, gradients, workspace
    generated_code_bytes: int
    total_bytes: int            # argument + output - alias + temp + generated code
    hbm_bytes: int
    fits: bool
    flops_per_device: float     # XLA cost analysis of the per-device (SPMD-partitioned) program
    flops_per_step: float       # the pod: per device x devices
    peak_flops_per_chip: float
    mfu: float
    step_time_s: float          # predicted at `mfu`
    samples_per_s: float        # the pod, predicted
    compile_s: float
    largest: list               # ArrayInfo of the largest arrays (global size)
    advice: list

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def _shard_bytes(x) -> int:
    import numpy as np

    return int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * x.dtype.itemsize


def _global_bytes(x) -> int:
    import numpy as np

    return int(np.prod(x.shape, dtype=np.int64)) * x.dtype.itemsize


def _tree_bytes(tree) -> int:
    import jax

    return sum(_shard_bytes(x) for x in jax.tree.leaves(tree))


def _path(path) -> str:
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(name))
    return "/".join(parts)


def largest_arrays(trees: dict, k: int) -> list[ArrayInfo]:
    import jax

    rows = []
    for root, tree in trees.items():
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            spec = getattr(x.sharding, "spec", None)
            rows.append(ArrayInfo(f"{root}/{_path(path)}", tuple(x.shape), str(x.dtype), str(spec),
                                  _global_bytes(x), _shard_bytes(x)))
    rows.sort(key=lambda r: -r.global_bytes)
    return rows[:k]


def advise(*, remat: bool, temp_bytes: int, sharded_bytes: int, fsdp: int, n_devices: int,
           hbm_bytes: int, per_chip_batch: int, dtype: str) -> list[str]:
    """The knobs that would bring the step under the chip's HBM, largest effect first.

    `sharded_bytes`: per-chip parameters + optimizer state; `temp_bytes`: activations/workspace."""
    out = []
    if not remat and temp_bytes > 0.25 * hbm_bytes:
        out.append(f"--config.model.remat=full (or attention): recompute each block in the backward pass instead of keeping "
                   f"its activations (temps are {temp_bytes / GiB:.1f} GiB per chip)")
    if fsdp < n_devices and sharded_bytes > 0.15 * hbm_bytes:
        wider = min(n_devices, 2 * fsdp)
        out.append(f"--config.mesh.fsdp={wider}: shard parameters and optimizer state over more chips "
                   f"({sharded_bytes / GiB:.1f} GiB per chip now, about "
                   f"{sharded_bytes * fsdp / wider / GiB:.1f} GiB at fsdp={wider})")
    if per_chip_batch > 1:
        out.append(f"--config.optim.grad_accum=2 (or halve --config.train.global_batch): {per_chip_batch} "
                   f"samples per chip per step now; activations scale with it")
    if dtype == "float32":
        out.append("--config.model.dtype=bfloat16: half-size activations, and the MXU's native precision")
    if not out:
        out.append("a larger chip (more HBM) or a lower --config.data.resolution")
    return out


def _advise_report(r: "Report") -> list[str]:
    return advise(remat=r.remat, temp_bytes=r.temp_bytes,
                  sharded_bytes=r.frozen_param_bytes + r.trainable_param_bytes + r.opt_state_bytes,
                  fsdp=r.mesh.get("fsdp", 1), n_devices=r.n_devices, hbm_bytes=r.hbm_bytes,
                  per_chip_batch=r.per_chip_batch, dtype=r.dtype)


def compile_plan(plan: Plan, mfu: float = 0.4, top_k: int = 8) -> Report:
    """Lowers and compiles the trainer's jitted step for the plan; raises `DoesNotFit` on HBM OOM."""
    import jax
    import jax.numpy as jnp

    from cid_jax import build as build_lib
    from cid_jax import trainer

    batch_ndims = {k: v.ndim for k, v in plan.batch.items()}
    step = trainer.jit_train_step(plan.model, plan.tx, plan.config, plan.placement, batch_ndims)
    t0 = time.perf_counter()
    # A topology-only (compile-only) client cannot load executables back from JAX's persistent
    # compilation cache, so writing them there would only waste disk and warn on the next run.
    # (The cache's on/off switch is read once per process; the write threshold is read per compile.)
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        compiled = step.lower(plan.state, plan.frozen, plan.batch, plan.key).compile()
    except Exception as e:  # XlaRuntimeError: TPU compiler's "Ran out of memory in memory space hbm"
        msg = str(e)
        if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
            raise DoesNotFit(plan, msg) from e
        raise
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    compile_s = time.perf_counter() - t0

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))
    n = len(plan.mesh.devices.flat)
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    step_time = flops / (plan.chip.peak_bf16_flops * mfu) if flops else float("nan")
    c = plan.config
    report = Report(
        topology=plan.topology, chip=plan.chip.name, n_devices=n, mesh=dict(plan.mesh.shape),
        arch_source=plan.arch_source, variant=c.model.variant, resolution=int(c.data.resolution),
        dtype=str(c.model.dtype), frozen_dtype=jnp.dtype(build_lib.frozen_dtype(c)).name,
        remat=remat_mode(c.model.remat) != "none", global_batch=int(c.train.global_batch),
        micro_batch=plan.micro_batch, per_chip_batch=plan.micro_batch // n,
        frozen_param_bytes=_tree_bytes(plan.frozen), trainable_param_bytes=_tree_bytes(plan.state.params),
        opt_state_bytes=_tree_bytes(plan.state.opt_state), batch_bytes=_tree_bytes(plan.batch),
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        generated_code_bytes=int(mem.generated_code_size_in_bytes), total_bytes=int(total),
        hbm_bytes=plan.chip.hbm_bytes, fits=total <= plan.chip.hbm_bytes,
        flops_per_device=flops, flops_per_step=flops * n, peak_flops_per_chip=plan.chip.peak_bf16_flops,
        mfu=mfu, step_time_s=step_time, samples_per_s=plan.micro_batch / step_time if flops else 0.0,
        compile_s=compile_s,
        largest=largest_arrays({"frozen": plan.frozen, "params": plan.state.params,
                                "opt_state": plan.state.opt_state}, top_k),
        advice=[])
    if not report.fits:
        report.advice = _advise_report(report)
    return report


class DoesNotFit(Exception):
    """The TPU compiler refused the step: it needs more HBM than the chip has."""

    def __init__(self, plan: Plan, compiler_message: str):
        self.plan, self.compiler_message = plan, compiler_message
        super().__init__(compiler_message)

    def advice(self) -> list[str]:
        p = self.plan
        n = len(p.mesh.devices.flat)
        # No buffer assignment came back: treat everything beyond the parameters as activations.
        return advise(remat=remat_mode(p.config.model.remat) != "none", temp_bytes=p.chip.hbm_bytes,
                      sharded_bytes=_tree_bytes(p.frozen) + _tree_bytes(p.state),
                      fsdp=int(p.mesh.shape["fsdp"]), n_devices=n, hbm_bytes=p.chip.hbm_bytes,
                      per_chip_batch=p.micro_batch // n, dtype=str(p.config.model.dtype))


# ---------------------------------------------------------------------------------- output


def _gib(b: float) -> str:
    return f"{b / GiB:8.2f} GiB"


def _flop(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"


def format_report(r: Report, command: str = "") -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = []
    if command:
        lines.append(f"$ {command}")
    lines += [
        f"ConsistentID {r.variant} training step, {r.resolution} px, compute {r.dtype}, remat={r.remat}",
        f"topology {r.topology}: {r.n_devices} x {r.chip} (HBM {r.hbm_bytes / GiB:.0f} GiB, "
        f"peak bf16 {r.peak_flops_per_chip / 1e12:.0f} TFLOP/s per chip); mesh {mesh}",
        f"batch: {r.micro_batch} samples per step ({r.per_chip_batch} per chip); global batch {r.global_batch}",
        f"architectures: {r.arch_source}; compiled in {r.compile_s:.0f} s",
        "",
        "per-chip HBM                               bytes",
        f"  frozen params ({r.frozen_dtype + ', sharded)':<19}{_gib(r.frozen_param_bytes)}",
        f"  trainable params                   {_gib(r.trainable_param_bytes)}",
        f"  optimizer state (AdamW mu, nu)     {_gib(r.opt_state_bytes)}",
        f"  batch                              {_gib(r.batch_bytes)}",
        f"  = arguments (XLA)                  {_gib(r.argument_bytes)}",
        f"  outputs, not aliased to donated    {_gib(r.output_bytes - r.alias_bytes)}",
        f"  activations / temps                {_gib(r.temp_bytes)}",
        f"  generated code                     {_gib(r.generated_code_bytes)}",
        f"  total                              {_gib(r.total_bytes)}  of {r.hbm_bytes / GiB:.0f} GiB "
        f"({100 * r.total_bytes / r.hbm_bytes:.0f}%)  -> {'FITS' if r.fits else 'DOES NOT FIT'}",
        "",
        f"FLOPs per step: {_flop(r.flops_per_step)} for the pod ({_flop(r.flops_per_device)} per chip, "
        f"XLA cost analysis of the partitioned program)",
        f"predicted at {100 * r.mfu:.0f}% MFU: {r.step_time_s * 1e3:.4g} ms per step, "
        f"{r.samples_per_s:.4g} samples/s for the pod",
        "",
        "largest arrays (global shape -> sharding, bytes per chip)",
    ]
    for a in r.largest:
        lines.append(f"  {a.path:70s} {str(a.shape):22s} {a.dtype:8s} {a.spec:28s} {a.device_bytes / 2**20:8.1f} MiB")
    if r.advice:
        lines += ["", "to make it fit, turn one of these knobs:"] + [f"  {a}" for a in r.advice]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main


def _main(argv):
    from absl import flags

    from cid_jax import runtime

    del argv
    f = flags.FLAGS
    runtime.enable_compilation_cache(f.compilation_cache_dir if f.compilation_cache else None)
    command = "python -m cid_jax.aot " + " ".join(sys.argv[1:])
    from cid_jax.config_base import config_problems

    problems = config_problems(f.config)
    if problems:
        raise SetupError(f"{len(problems)} config value(s) cannot work:\n  " + "\n  ".join(problems))
    try:
        plan = make_plan(f.config, f.topology)
        report = compile_plan(plan, mfu=f.mfu, top_k=f.top_k)
    except DoesNotFit as e:
        print(f"DOES NOT FIT on {f.topology}: the TPU compiler ran out of HBM:\n{e.compiler_message[-1500:]}\n"
              "\nto make it fit, turn one of these knobs:\n  " + "\n  ".join(e.advice()), file=sys.stderr)
        return 1
    text = format_report(report, command)
    print(text)
    if f.output:
        with open(f.output, "w") as fh:
            fh.write(text + "\n")
    if f.json:
        with open(f.json, "w") as fh:
            fh.write(report.to_json() + "\n")
    if not report.fits:
        print(f"\nDOES NOT FIT: {report.total_bytes / GiB:.1f} GiB per chip > {report.hbm_bytes / GiB:.0f} GiB",
              file=sys.stderr)
        return 1
    return 0


def main():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only traces; the target is the topology
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4 (16 chips), v5p:4x4x4 (64 chips).")
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the predicted step time.")
    flags.DEFINE_integer("top_k", 8, "How many of the largest arrays to list with their sharding.")
    flags.DEFINE_string("output", None, "Also write the table to this file.")
    flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
    flags.DEFINE_bool("debug", cli.debug_requested([]), "Show the traceback of an error (or CID_DEBUG=1).")
    from cid_jax import runtime

    runtime.define_absl_cache_flags()
    flags.mark_flags_as_required(["config", "topology"])
    app.run(lambda argv: sys.exit(cli.guarded("aot", lambda: _main(argv), debug=flags.FLAGS.debug)),
            flags_parser=lambda argv: cli.absl_flags_parser("aot")(runtime.absl_argv(argv)))


if __name__ == "__main__":
    main()
