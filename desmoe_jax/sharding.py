"""Logical axis names -> a 4-axis device mesh (`data`, `fsdp`, `expert`, `tensor`).

Every parameter declares what its dimensions are (`logical_axes` metadata, e.g.
("experts", "embed", "expert_mlp")); the rules below say which mesh axis each name is split
over, MaxText style. Changing the parallelism layout is changing a rule, never a model edit.

The mesh uses `AxisType.Auto` on purpose: `jax.make_mesh` now defaults to Explicit axes, under
which `with_sharding_constraint` and GSPMD propagation inside `jit` behave differently
(sharding becomes part of the type); this code lets the compiler propagate from annotated
parameters and inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),  # activations: every non-tensor axis splits the batch
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("q_lora", None),
    ("kv_lora", None),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("norm", None),
    ("domains", None),
)

def make_mesh(shape: dict[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
  """A mesh over `devices` (default all) with axes data/fsdp/expert/tensor.

  `shape` maps axis -> size (missing axes are 1; one axis may be -1 = the rest). Default: all
  devices on `fsdp`.
  """
  devices = list(jax.devices() if devices is None else devices)
  if shape is None:
    shape = {"fsdp": -1}
  if not isinstance(shape, dict):
    shape = dict(zip(MESH_AXES, shape))
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
  sizes = [shape.get(a, 1) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"there are {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=None) -> P:
  """PartitionSpec for one array; a mesh axis is used at most once, and only where it divides."""
  rules = dict(rules if rules is not None else DEFAULT_RULES)
  used, spec = set(), []
  for name, dim in zip(axes, shape):
    target = rules.get(name) if name is not None else None
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(rules)}")
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    for axis in targets:
      size = mesh.shape[axis]
      if axis in used or size == 1:
        continue
      if dim % (math.prod(mesh.shape[a] for a in kept) * size) == 0:
        kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules=None) -> NamedSharding:
  axes = var.get_metadata().get("logical_axes")
  if axes is None:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules))


def param_shardings(model: nnx.Module, mesh: Mesh, rules=None) -> dict:
  """{state path: NamedSharding} for every Variable of a (possibly abstract) model."""
  return {path: variable_sharding(var, mesh, rules)
          for path, var in nnx.to_flat_state(nnx.state(model))}


def state_shardings(state, mesh: Mesh, rules=None):
  """NamedShardings in exactly the tree structure of `state` (each Variable now holding its
  sharding), for device_put, jit in/out_shardings and abstract restore targets.

  Also takes an optax state over an nnx parameter State: its moments are Variables that carry
  their parameter's logical axes, so they are laid out like the parameter; plain leaves (step
  counts) are replicated."""
  def one(x):
    if not isinstance(x, nnx.Variable):
      return NamedSharding(mesh, P())
    if not hasattr(x.get_value(), "shape"):  # optax.MaskedNode: a moment another group holds
      return x
    return x.replace(variable_sharding(x, mesh, rules))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules=None) -> nnx.Module:
  """Moves every Variable of `model` to its sharding on `mesh` (in place; returns the model)."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules)
  nnx.update(model, jax.device_put(state, shardings))
  return model


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=None) -> NamedSharding:
  """Sharding of a [batch, ...] input: batch over the data-parallel axes, rest replicated."""
  rules = dict(rules if rules is not None else DEFAULT_RULES)
  target = rules["batch"]
  axes = tuple(a for a in ((target,) if isinstance(target, str) else target or ())
               if mesh.shape[a] > 1)
  lead = None if not axes else axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def constrain(x, axes: Sequence[str | None]):
  """`x` laid out by logical axis names on the mesh in context (`with jax.set_mesh(mesh):`);
  unchanged without one. Activations need it: from the parameters alone (d_model split over
  fsdp) the partitioner may split d_model instead of the batch and replicate every activation
  on every device (scripts/memory_plan.py shows it: the whole batch's logits on each device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def describe(model: nnx.Module, mesh: Mesh, rules=None) -> str:
  """One line per parameter: path, shape, partition spec (for logs and docs)."""
  lines = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    spec = variable_sharding(var, mesh, rules).spec
    lines.append(f"{'.'.join(map(str, path)):60s} {str(tuple(var.shape)):28s} {spec}")
  return "\n".join(lines)

