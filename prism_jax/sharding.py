"""The one place where logical axis names become mesh axes.

Parameters carry logical names (`out_sharding=("embed", "mlp")`); activations are
constrained with `constrain(x, ("batch", "length", "embed"))`. Both go through the rules
table of `MeshConfig`, set once per process with `use_rules`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from prism_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "model")

LogicalAxes = Sequence[str | None]
_RULES: contextvars.ContextVar[dict] = contextvars.ContextVar("prism_logical_rules", default={})


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, model) mesh; one -1 entry absorbs the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = [cfg.data, cfg.fsdp, cfg.model]
  if shape.count(-1) > 1:
    raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.model may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ConfigError(f"{len(devices)} devices cannot be split into mesh {shape}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                      f"found {len(devices)}")
  # Auto axes: XLA's partitioner propagates shardings between the constraints we write.
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
  if len(slices) > 1:
    return jax.sharding.Mesh(_hybrid_grid(shape, devices, len(slices)), MESH_AXES,
                             axis_types=axis_types)
  try:
    # Device order that follows the chips' interconnect (ICI) on TPU and GPU.
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=axis_types, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # A shape the physical topology cannot tile (e.g. on a partial slice): plain order.
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                             axis_types=axis_types)


def _hybrid_grid(shape: list[int], devices, num_slices: int) -> np.ndarray:
  """Multi-slice pods: the data axis spans slices (DCN), everything else stays in a slice."""
  from jax.experimental import mesh_utils

  if shape[0] % num_slices:
    raise ConfigError(f"{num_slices} slices need mesh.data divisible by {num_slices} (data "
                      f"parallelism crosses slices over DCN); got mesh {shape}")
  ici = (shape[0] // num_slices, shape[1], shape[2])
  return mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices)


@contextlib.contextmanager
def use_rules(rules):
  """Makes `rules` (logical name -> mesh axes) the active table for `constrain`/`spec`."""
  token = _RULES.set(dict(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def logical_to_spec(axes: LogicalAxes | None, rules: dict | None = None) -> P:
  """Maps logical axis names to a PartitionSpec, never using one mesh axis twice."""
  rules = _RULES.get() if rules is None else rules
  if axes is None:
    return P()
  used, out = set(), []
  for name in axes:
    target = rules.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used)
    used.update(targets)
    out.append(targets[0] if len(targets) == 1 else (targets or None))
  return P(*out)


def _active_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op without a mesh.

  A dimension its mesh axes do not divide (one prompt on a data-parallel mesh, say) is left
  unconstrained rather than refused: tools run small batches on the training mesh."""
  mesh = _active_mesh()
  if mesh is None or mesh.size == 1:
    return x
  spec = [entry if x.shape[i] % _mesh_axes_size(mesh, entry) == 0 else None
          for i, entry in enumerate(logical_to_spec(axes))]
  return jax.lax.with_sharding_constraint(x, P(*spec))


def _mesh_axes_size(mesh, entry) -> int:
  """How many ways a PartitionSpec entry (None, an axis, or a tuple of axes) splits a dim."""
  if entry is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry))


def axis_size(name: str) -> int:
  """Size of the mesh axis that logical axis `name` maps to (1 without a mesh)."""
  mesh = _active_mesh()
  target = _RULES.get().get(name)
  if mesh is None or target is None:
    return 1
  targets = (target,) if isinstance(target, str) else target
  return math.prod(mesh.shape[t] for t in targets)


def param_specs(abstract_state, rules) -> object:
  """PartitionSpecs for a (pure dict) parameter tree from its `out_sharding` metadata."""
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
  return jax.tree.map(lambda spec: logical_to_spec(tuple(spec), dict(rules)), logical,
                      is_leaf=lambda x: isinstance(x, P))


def named(mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
