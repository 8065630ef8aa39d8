"""Device mesh, logical-axis rules and shardings: the one place where placement is declared.

Parameters carry ``logical_axes`` metadata (``embed``, ``mlp``, ``heads``, ``vocab``, ...).
Rules map each logical name to mesh axes (``data``, ``fsdp``, ``tensor``); a dimension that
a rule's mesh axes do not divide, or whose mesh axis is already used by another dimension of
the same array, stays replicated.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)
_warned_replicated: set[str] = set()  # parameter names already reported (once per name)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# logical name -> mesh axis (or tuple of axes, or None)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("fused", "tensor"),
    ("ids", "fsdp"),
    # The hybrid model's user- and item-indexed tables: rows split over every data-parallel
    # device (the catalog's item matrix and the ID tables are the model's big arrays).
    ("users", ("data", "fsdp")),
    ("items", ("data", "fsdp")),
    ("positions", None),
    ("types", None),
    ("domain", None),
    ("expert", None),
)


def create_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """``axes`` maps data/fsdp/tensor to sizes; one may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
  sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh axes {dict(axes)}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{len(devices)} are available; set one axis to -1")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_axes_tree(state: nnx.State) -> dict:
  """Nested dict (same structure as ``nnx.to_pure_dict(state)``) of each parameter's axes."""
  tree: dict = {}
  for path, variable in nnx.to_flat_state(state):
    axes = variable.get_metadata().get("logical_axes")
    if axes is None or len(axes) != variable.get_value().ndim:
      raise ValueError(f"parameter {'/'.join(map(str, path))} has no logical_axes matching its "
                       f"shape {variable.get_value().shape}")
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = tuple(axes)
  return tree


def spec_for(shape: Sequence[int], logical: Sequence[str | None], rules, mesh: Mesh,
             name: str = "") -> P:
  """A dimension its rule's mesh axes do not divide stays replicated; that silently loses
  FSDP / tensor parallelism (e.g. hidden 384 on a 256-way fsdp axis), so it is logged once per
  parameter ``name``."""
  table = dict(rules)
  used, spec = set(), []
  for dim, axis_name in zip(shape, logical):
    target = table.get(axis_name) if axis_name is not None else None
    axes = tuple(a for a in ((target,) if isinstance(target, str) else (target or ()))
                 if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % size == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
      key = name or str(tuple(shape))
      if axes and key not in _warned_replicated:
        _warned_replicated.add(key)
        log.warning("sharding: %s dimension %r of size %d is replicated: mesh axes %s (size %d) "
                    "do not divide it; change config.mesh or config.sharding_rules to shard it",
                    name or "a parameter", axis_name, dim, "x".join(axes), size)
  return P(*spec)


def tree_shardings(abstract_tree, logical_tree, rules, mesh: Mesh):
  """NamedSharding for every array of ``abstract_tree`` from its logical axes."""
  names = jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(str(key_name(e)) for e in path), abstract_tree)
  return jax.tree.map(
      lambda x, axes, n: NamedSharding(mesh, spec_for(x.shape, axes, rules, mesh, name=n)),
      abstract_tree, logical_tree, names, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global arrays sharded over the batch axes (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def global_from_full_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """A batch every process holds in full -> global arrays (each process fills its devices)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_callback(np.shape(v), sharding, lambda idx, v=v: np.asarray(v)[idx])
          for k, v in batch.items()}


def to_host(x) -> np.ndarray:
  """A (replicated or fully addressable) array as numpy, on every process of a multi-host run."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def key_name(entry) -> str | int:
  """The plain key of a pytree path entry (dict key, attribute name or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)
