"""Devices and layouts: the mesh from the config, parameter shardings from logical axis names, per-host batches.

    mesh = make_mesh(config.mesh)                       # axes (data, fsdp, tensor), -1 filled in
    shardings = param_shardings(logical_specs, shapes, mesh, config.sharding_rules)
    batch = shard_batch(local_numpy_batch, mesh)        # global jax.Arrays, rows over data x fsdp

Every parameter of unclip_jax's models carries logical axis names (unclip_jax.models.layers); the rules map
them to mesh axes. A dimension the mesh axis does not divide (a conv with 3 input channels, a 77-token
table over 4 devices) stays whole rather than failing: the rest of the array is still sharded.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")   # batch rows are split over both: FSDP is data parallelism with sharded state


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """{data: -1, fsdp: 2, tensor: 1} on 8 devices -> (4, 2, 1). At most one -1."""
    sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not a multiple "
                             f"of the fixed axes' product {known}")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices; this job has "
                         f"{num_devices} (use -1 on one axis to take what is left)")
    return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over all devices (or `devices`) with axes (data, fsdp, tensor), ordered for the interconnect."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide evenly."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if names and dim % size == 0 else None)
    return P(*out)


def param_shardings(logical_specs, shapes, mesh: Mesh, rules) -> Any:
    """Logical PartitionSpecs (as from unclip_jax.models.abstract_params) -> NamedShardings on `mesh`."""
    rules = tuple(tuple(r) for r in rules)

    def one(spec, shape):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec is not None else P()
        return NamedSharding(mesh, _fit(mesh_spec, tuple(shape.shape), mesh))
    return jax.tree.map(one, logical_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def like_params(tree, params, param_shardings_tree, mesh: Mesh):
    """Shardings for an optimiser state: a leaf whose path ends with a parameter's path and has its shape
    (Adam's mu and nu, however optax wraps them) takes that parameter's sharding; the rest (step counts,
    masked-out entries) is replicated."""
    by_path = {}
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, shape), sh in zip(flat_params, jax.tree.leaves(param_shardings_tree)):
        by_path[_dict_keys(path)] = (tuple(shape.shape), sh)

    def one(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return replicated(mesh)
    return jax.tree_util.tree_map_with_path(one, tree)


def _dict_keys(path) -> tuple:
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_rows_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's rows -> global arrays with rows split over data x fsdp (jax.make_array_from_process_local_data)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        if global_shape[0] % batch_rows_divisor(mesh):
            raise ValueError(f"the global batch has {global_shape[0]} rows; the mesh splits rows over data x fsdp = "
                             f"{batch_rows_divisor(mesh)} devices: make batch_size a multiple of it")
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, global_shape)
    return out


def shard_shapes(tree) -> Any:
    """Per-device shard shapes of a tree of jax.Arrays (what one device actually holds)."""
    return jax.tree.map(lambda x: x.sharding.shard_shape(x.shape), tree)
