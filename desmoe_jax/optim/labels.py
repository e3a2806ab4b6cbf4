"""Which group and which kind every parameter is: read from the `group` / `kind` metadata its
module sets (nn/layers.py), or, for a bare array, from the module names on its path."""

from __future__ import annotations

from collections.abc import Iterable

import jax
from flax import nnx

from desmoe_jax.optim.config import DECAY_EXCLUDE
from desmoe_jax.schedule import LABELS


def is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def label_of(variable) -> str:
  """Parameter group of one parameter: its `group` metadata (nn/layers.py), else backbone (also
  for a bare array, which carries no metadata). Given a path (a tuple of names) instead, the
  group its module names say (`bare_label`)."""
  if isinstance(variable, tuple):
    return bare_label(variable)
  meta = variable.get_metadata() if is_variable(variable) else {}
  label = meta.get("group") or "backbone"
  if label not in LABELS:
    raise ValueError(f"parameter group {label!r} is not one of {LABELS}")
  return label


def bare_label(path) -> str:
  """The group of a bare array (a plain pytree of arrays has no metadata to read), from the
  module names on its path as nn/ and moe/ name them."""
  names = [str(path_key(p)) for p in path]
  if "lora" in names:   # a LoRA factor: "lora_" + the group of the weight it adapts
    return "lora_" + bare_label(tuple(path[:names.index("lora")]))
  if "experts" in names or "expert_copies" in names:
    return "routed_experts"
  if "shared_experts" in names or "shared_expert" in names or "shared_expert_gate" in names:
    return "shared_experts"
  if "gate" in names and "mlp" in names and names.index("gate") == names.index("mlp") + 1:
    return "router"
  return "backbone"


def path_key(entry):
  """The name in one jax tree-path entry (DictKey.key, GetAttrKey.name, SequenceKey.idx)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def param_labels(params):
  """Tree of labels with the structure of `params` (a callable for optax.multi_transform)."""
  # Same structure as `params` (a Variable node holds its label), as the tree code over the
  # labels and the parameters together expects.
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (jax.tree.map(lambda _: label_of(x), x) if is_variable(x)
                       else bare_label(path)), params, is_leaf=is_variable)


def kind_of(variable, path=()) -> str:
  """"norm" (a norm's gain), "bias", or "weight": the `kind` metadata of a parameter, else (a
  bare array) what its path says: a leaf named bias/b1/b2, or one inside a module named *norm*."""
  if is_variable(variable):
    return variable.get_metadata().get("kind") or "weight"
  names = [str(path_key(p)) for p in path]
  if names and names[-1] in ("bias", "b1", "b2"):
    return "bias"
  if any("norm" in n for n in names[:-1]):
    return "norm"
  return "weight"


def decay_mask(exclude: str):
  """optax mask function: True for the parameters weight decay applies to (`decay_exclude`)."""
  kinds = DECAY_EXCLUDE[exclude]

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (jax.tree.map(lambda _: kind_of(x) not in kinds, x) if is_variable(x)
                         else kind_of(x, path) not in kinds), params, is_leaf=is_variable)

  return mask


def trainable_filter(labels: Iterable[str]):
  """nnx filter selecting the Params whose group is in `labels`."""
  labels = frozenset(labels)
  return nnx.All(nnx.Param, lambda path, variable: label_of(variable) in labels)
