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

OPTIMIZERS = ("adamw", "adafactor")
MOMENT_DTYPES = ("auto", "float32", "bfloat16")


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
  name: str = "adamw"           # "adamw" (the paper's) | "adafactor" (factored 2nd moment, no 1st)
  moments_dtype: str = "auto"   # "auto" (the parameter's dtype) | "float32" | "bfloat16"
  host_offload: bool = False    # optimizer state in host memory (memory kind pinned_host)
  # train.skip_nonfinite_updates: 0 off; N > 0 skips a step whose gradients hold NaN/inf (no
  # update, optimizer state kept; optax.apply_if_finite), up to N in a row (then it is applied,
  # and the trainer's finiteness checks stop the run).
  skip_nonfinite_updates: int = 0

  def __post_init__(self):
    if self.schedule not in ("linear", "cosine", "constant"):
      raise ValueError(f"optim.schedule={self.schedule!r}: expected linear, cosine or constant")
    if self.name not in OPTIMIZERS:
      raise ValueError(f"optim.name={self.name!r}: expected one of {OPTIMIZERS}")
    if self.moments_dtype not in MOMENT_DTYPES:
      raise ValueError(f"optim.moments_dtype={self.moments_dtype!r}: expected one of "
                       f"{MOMENT_DTYPES}")


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def label_of(variable) -> str:
  """Parameter group of one parameter: its `group` metadata (nn/layers.py), else backbone (also
  for a bare array, which carries no metadata)."""
  meta = variable.get_metadata() if _is_variable(variable) else {}
  label = meta.get("group") or "backbone"
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


def adafactor_core(cfg: OptimConfig) -> optax.GradientTransformation:
  """Adafactor's direction (Shazeer & Stern 2018) in AdamW's place: a factored second moment
  (a row and a column statistic per matrix instead of a full moment: ~0 bytes per parameter
  against AdamW's two moments), no first moment, updates clipped to block RMS 1, and the same
  decoupled weight decay, before the same learning rate. optax.adafactor's own relative step
  (`multiply_by_parameter_scale`) is off, so `optim.learning_rate` means what it means for
  AdamW. A flagged alternative, not the paper's optimizer."""
  return optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0),
                     optax.add_decayed_weights(cfg.weight_decay))


def state_in(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformationExtraArgs:
  """`inner` with its floating state stored in `dtype` (None: the parameters' own dtypes) and
  kept there: optax computes a moment in the promoted dtype of gradient and moment (float32
  here) and would otherwise change the state's dtype, and with it the donated buffers and the
  checkpoint layout, after the first step. The arithmetic stays float32; only storage rounds."""
  inner = optax.with_extra_args_support(inner)

  def init(params):
    if dtype is not None:
      params = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating)
                            else p, params)
    return inner.init(params)

  def update(updates, state, params=None, **extra):
    new_updates, new_state = inner.update(updates, state, params, **extra)
    new_state = jax.tree.map(lambda new, old: new.astype(old.dtype) if hasattr(old, "dtype")
                             else new, new_state, state)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init, update)


def in_float32() -> optax.GradientTransformation:
  """Casts gradients to float32 first, so that the optimizer's arithmetic (moments, the update,
  weight decay lr * wd * w) is float32 whatever the parameters' dtype: in bfloat16 a weight-decay
  term 1e-6 of its weight, or an update 1e-5 of it, is below resolution before any rounding of
  the parameter itself."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(
      lambda u: u.astype(jnp.float32) if jnp.issubdtype(u.dtype, jnp.floating) else u, updates))


def _stochastic_round_bf16(x_f32, key):
  """float32 -> bfloat16, rounding up with probability equal to the fraction of the bfloat16
  step that `x` lies above the value below it: unbiased, E[result] = x. Adds 16 random bits
  below bfloat16's mantissa and truncates. Non-finite values round to nearest (the random carry
  could otherwise turn a NaN into a finite number and hide a divergence)."""
  return round_bf16_with_noise(x_f32, jax.random.bits(key, x_f32.shape, jnp.uint16))


def round_bf16_with_noise(x_f32, noise_u16):
  """The rounding of `_stochastic_round_bf16` for given 16-bit noise (uniform noise makes it
  stochastic rounding; averaging over all 65536 values gives its exact expectation)."""
  bits = jax.lax.bitcast_convert_type(x_f32, jnp.uint32)
  noisy = bits + noise_u16.astype(jnp.uint32)
  rounded = jax.lax.bitcast_convert_type(noisy & jnp.uint32(0xFFFF0000), jnp.float32)
  return jnp.where(jnp.isfinite(x_f32), rounded, x_f32).astype(jnp.bfloat16)


def apply_updates(params, updates, key=None):
  """params + updates, added in float32. A bfloat16 parameter gets the sum rounded
  stochastically when `key` is given (`train.precision=bf16_sr`; each leaf its own bits from
  `key`), to nearest otherwise; float32 parameters are exact. An update of exactly 0 leaves a
  parameter bit for bit (a frozen or masked expert stays frozen whatever the rounding)."""
  p_leaves, treedef = jax.tree.flatten(params)
  u_leaves = treedef.flatten_up_to(updates)
  out = []
  for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
    x = p.astype(jnp.float32) + u.astype(jnp.float32)
    if p.dtype == jnp.bfloat16 and key is not None:
      out.append(_stochastic_round_bf16(x, jax.random.fold_in(key, i)))
    else:
      out.append(x.astype(p.dtype))
  return jax.tree.unflatten(treedef, out)


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
    core = state_in(adamw_core(cfg) if cfg.name == "adamw" else adafactor_core(cfg),
                    None if cfg.moments_dtype == "auto" else jnp.dtype(cfg.moments_dtype))
    if label == "routed_experts":
      core = mask_experts(core)
    transforms[label] = core if label in trainable_now else hold(core)
  chain = [in_float32(), optax.multi_transform(transforms, param_labels)]
  if cfg.grad_clip:
    chain.insert(1, optax.clip_by_global_norm(cfg.grad_clip))
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
