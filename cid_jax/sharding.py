"""Logical axis names for parameters and activations, and the rules that map them onto the mesh.

Modules annotate kernels with logical names (`nn.with_logical_partitioning`); this file is the one
place that says which mesh axis each logical name lands on. The mesh has two axes:
`data` (pure data parallelism) and `fsdp` (data parallelism whose parameters are also sharded).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
MESH_AXES = (DATA, FSDP)

# Logical name -> mesh axis (None = replicated). Parameters shard their model dimension ('embed')
# over fsdp; batches shard their leading dimension over both axes. Every name here is used: by the
# modules' kernel annotations (`dense_init`, `conv_init`) or by `batch_sharding`.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", (DATA, FSDP)),  # the leading dimension of every input batch
    ("embed", FSDP),          # model width of Dense inputs/outputs, conv output channels
    ("mlp", None),            # FFN hidden width
    ("heads", None),          # attention inner width (heads * head_dim)
    ("vocab", None),
    ("conv_in", None),        # conv input channels
    ("conv_h", None),
    ("conv_w", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data','fsdp') mesh with Auto axis types. `data=-1` takes every device left over."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1:
        if n % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} != {n} devices")
    return jax.make_mesh((data, fsdp), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _divisible(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops a mesh axis from `spec` wherever the dimension does not divide evenly (tiny models)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else (axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if size and dim % size == 0 else None)
    return P(*out)


def param_shardings(boxed_abstract_params, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a (boxed, abstract) param tree; unannotated params are replicated."""
    specs = nn.get_partition_spec(boxed_abstract_params)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.meta.unbox(boxed_abstract_params)
    return jax.tree.map(lambda s, x: NamedSharding(mesh, _divisible(s, x.shape, mesh)),
                        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int, rules=LOGICAL_RULES) -> NamedSharding:
    """The leading ('batch') dimension over the mesh axes the rules give it, the rest replicated."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def dense_init(names: tuple[str, str], init=nn.initializers.lecun_normal()):
    """Kernel initializer for a Dense annotated with logical names (in, out)."""
    return nn.with_logical_partitioning(init, names)


def conv_init(init=nn.initializers.lecun_normal()):
    """HWIO conv kernel: output channels follow the model width."""
    return nn.with_logical_partitioning(init, ("conv_h", "conv_w", "conv_in", "embed"))
