"""Optimizers for phase-dependent, mask-dependent training (METHOD.md section 3).

* Every parameter's label (`schedule.LABELS`) is its `group` metadata, set by the module that
  creates it (routers, routed experts, shared experts; none = backbone): no path is parsed, so
  every family's layout gets the same groups. A group never trained in the run is
  `optax.set_to_zero()` and holds no optimizer state at all.
* A group trained in some phases only is wrapped by `hold`: in a phase that freezes it, its
  update is zero and its state (moments, count) is carried unchanged, so all phases share one
  optimizer-state structure and a checkpoint restores into any phase.
* Routed experts are stacked `[L, E, ...]`; a per-leaf label cannot freeze expert 5 of layer 3,
  so `mask_experts` multiplies the group's update by a per-expert mask AFTER AdamW and keeps the
  masked experts' moments unchanged: momentum and weight decay cannot move a masked expert.
* The learning rate follows the GLOBAL step (passed as `step=`), not a group's own count, so a
  group that starts training in phase II follows the same decay as the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from desmoe_jax.schedule import LABELS


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Every field is a config knob (`optim.*`). Defaults: ESFT's AdamW settings."""
  learning_rate: float = 1e-4
  schedule: str = "linear"      # "linear" decay to 0 (HF Trainer's default) | "cosine" | "constant"
  warmup_steps: int = 0
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0        # global-norm clip over trainable gradients; 0 disables

  def __post_init__(self):
    if self.schedule not in ("linear", "cosine", "constant"):
      raise ValueError(f"optim.schedule={self.schedule!r}: expected linear, cosine or constant")


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def label_of(variable: nnx.Variable) -> str:
  """Parameter group of one parameter: its `group` metadata (nn/layers.py), else backbone."""
  label = variable.get_metadata().get("group") or "backbone"
  if label not in LABELS:
    raise ValueError(f"parameter group {label!r} is not one of {LABELS}")
  return label


def param_labels(params):
  """Tree of labels, a prefix of `params` (a callable for optax.multi_transform)."""
  return jax.tree.map(label_of, params, is_leaf=_is_variable)


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  decay_steps = max(1, total_steps - cfg.warmup_steps)
  if cfg.schedule == "linear":
    main = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
  else:
    main = optax.constant_schedule(cfg.learning_rate)
  if cfg.warmup_steps:
    warm = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warm, main], [cfg.warmup_steps])
  return main


def scale_by_global_lr(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
  """updates * -lr(step), with `step` the run's global step given to `update(..., step=)`."""

  def update(updates, state, params=None, *, step, **_):
    lr = schedule(step)
    return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def hold(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`inner`'s state structure, but zero updates and the state carried unchanged."""
  def update(updates, state, params=None, **_):
    return jax.tree.map(jnp.zeros_like, updates), state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def _expert_mask_for(variable, masks):
  """Per-expert mask broadcastable to a routed-expert Variable ([L, E, ...] experts, or
  [L, C, ...] duplicated copies: `expert_bank` metadata), None for any other Variable."""
  meta = variable.get_metadata()
  if meta.get("group") != "routed_experts":
    return None
  m = masks.get(meta.get("expert_bank", "experts"))
  leaf = variable.get_value()
  if m is None or leaf.ndim < 2 or leaf.shape[:2] != m.shape:
    return None
  return m.reshape(m.shape + (1,) * (leaf.ndim - 2)).astype(leaf.dtype)


def mask_experts(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Zeroes the update of masked experts and keeps their optimizer state unchanged.

  `update(..., expert_update_mask={"experts": [L, E], "expert_copies": [L, C]})`: 1 = train.
  """
  inner = optax.with_extra_args_support(inner)

  def update(updates, state, params=None, *, expert_update_mask=None, **extra):
    new_updates, new_state = inner.update(updates, state, params, **extra)
    if expert_update_mask is None:
      return new_updates, new_state

    def mask_update(u):
      m = _expert_mask_for(u, expert_update_mask) if _is_variable(u) else None
      return u if m is None else u.replace(u.get_value() * m)

    def keep_state(new, old):
      m = _expert_mask_for(new, expert_update_mask) if _is_variable(new) else None
      return new if m is None else new.replace(jnp.where(m > 0, new.get_value(), old.get_value()))

    new_updates = jax.tree.map(mask_update, new_updates, is_leaf=_is_variable)
    new_state = jax.tree.map(keep_state, new_state, state, is_leaf=_is_variable)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def adamw_core(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW direction (Adam moments + decoupled weight decay), before the learning rate."""
  return optax.chain(optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps),
                     optax.add_decayed_weights(cfg.weight_decay))


def build_optimizer(cfg: OptimConfig, total_steps: int, trainable_now: Iterable[str],
                    trainable_ever: Iterable[str]) -> optax.GradientTransformationExtraArgs:
  """The optimizer for one phase. All phases built with the same `trainable_ever` share
  one state structure (see module docstring)."""
  trainable_now, trainable_ever = frozenset(trainable_now), frozenset(trainable_ever)
  if not trainable_now <= trainable_ever:
    raise ValueError(f"groups {sorted(trainable_now - trainable_ever)} train now but not ever")
  transforms = {}
  for label in LABELS:
    if label not in trainable_ever:
      transforms[label] = optax.set_to_zero()
      continue
    core = adamw_core(cfg)
    if label == "routed_experts":
      core = mask_experts(core)
    transforms[label] = core if label in trainable_now else hold(core)
  chain = [optax.multi_transform(transforms, param_labels)]
  if cfg.grad_clip:
    chain.insert(0, optax.clip_by_global_norm(cfg.grad_clip))
  chain.append(scale_by_global_lr(learning_rate_schedule(cfg, total_steps)))
  return optax.chain(*chain)


def state_bytes(opt_state) -> int:
  """Bytes held by an optimizer state (frozen-for-the-run groups hold none)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)
             if hasattr(x, "dtype"))


def trainable_filter(labels: Iterable[str]):
  """nnx filter selecting the Params whose group is in `labels`."""
  labels = frozenset(labels)
  return nnx.All(nnx.Param, lambda path, variable: label_of(variable) in labels)
