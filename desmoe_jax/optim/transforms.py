"""The optax transforms of the optimizer, and `build_optimizer`, which chains them for one phase
(desmoe_jax/optim/__init__.py says what each serves; docs/METHOD.md section 3)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from desmoe_jax.optim.config import DECAY_EXCLUDE, OptimConfig
from desmoe_jax.optim.int8 import scale_by_adam_int8
from desmoe_jax.optim.labels import bare_label, decay_mask, is_variable, param_labels, path_key
from desmoe_jax.optim.rounding import master_weights
from desmoe_jax.schedule import BASE_LABELS, LABELS, LORA_LABELS


def decayed_weights(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW's decoupled weight decay, on every parameter but the kinds in `decay_exclude`."""
  if not DECAY_EXCLUDE[cfg.decay_exclude]:
    return optax.add_decayed_weights(cfg.weight_decay)
  return optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(cfg.decay_exclude))


def learning_rate_schedule(cfg: OptimConfig, total_steps: int, peak=None) -> optax.Schedule:
  """lr(step): warm-up to `peak`, then the decay `cfg.schedule` names. `peak` defaults to
  cfg.learning_rate; an array (traced) keeps the rate out of the compiled program, so that
  runs differing only in their rate share it (`scale_by_global_lr`)."""
  peak = cfg.learning_rate if peak is None else peak
  decay_steps = max(1, total_steps - cfg.warmup_steps)
  if cfg.schedule == "linear":
    main = optax.linear_schedule(peak, 0.0, decay_steps)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps)
  else:
    main = optax.constant_schedule(peak)
  if cfg.warmup_steps:
    warm = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warm, main], [cfg.warmup_steps])
  return main


def scale_by_global_lr(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformationExtraArgs:
  """updates * -lr(step), with `step` the run's global step given to `update(..., step=)`. The
  peak rate is `update(..., learning_rate=)` where given (a float32 scalar, an argument of the
  compiled step: a learning-rate sweep compiles each step once, train_step.jit_train_step), else
  cfg.learning_rate, a constant of the program."""

  def update(updates, state, params=None, *, step, learning_rate=None, **_):
    lr = learning_rate_schedule(cfg, total_steps, learning_rate)(step)
    return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def clip_by_given_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm (the same arithmetic) with the global norm given to
  `update(..., grad_norm=)` instead of computed from the updates: the update then holds no
  reduction over all gradients, and can run on a part of the tree at a time (the streamed
  update of `optim.host_offload`, one layer at a time; train_step computes the norm first)."""

  def update(updates, state, params=None, *, grad_norm, **_):
    trigger = jnp.squeeze(grad_norm < max_norm)
    return jax.tree.map(lambda t: jax.lax.select(
        trigger, t, (t / grad_norm.astype(t.dtype)) * max_norm), updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def apply_if_finite_given(inner: optax.GradientTransformation,
                          max_consecutive_errors: int) -> optax.GradientTransformationExtraArgs:
  """optax.apply_if_finite (the same state and decisions) with whether every gradient is
  finite given to `update(..., all_finite=)` instead of read from the updates it sees: the
  streamed update sees one layer at a time, and all of its parts must skip, or not, together.
  A skipped step's zero updates have the dtypes of a taken step's (optax's are the gradients':
  bfloat16 where `master_weights` makes float32 updates, which `lax.cond` refuses)."""
  inner = optax.with_extra_args_support(inner)
  reference = optax.apply_if_finite(inner, max_consecutive_errors)

  def update(updates, state, params=None, *, all_finite, **extra):
    notfinite_count = jnp.where(all_finite, jnp.zeros([], jnp.int32),
                                optax.safe_increment(state.notfinite_count))
    take = lambda: inner.update(updates, state.inner_state, params, **extra)
    shapes = jax.eval_shape(take)[0]
    new_updates, new_inner = jax.lax.cond(
        all_finite | (notfinite_count > max_consecutive_errors), take,
        lambda: (jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), state.inner_state))
    total = jnp.where(all_finite, state.total_notfinite,
                      optax.safe_increment(state.total_notfinite))
    return new_updates, optax.ApplyIfFiniteState(
        notfinite_count=notfinite_count, last_finite=jnp.asarray(all_finite),
        total_notfinite=total, inner_state=new_inner)

  return optax.GradientTransformationExtraArgs(reference.init, update)


def hold(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`inner`'s state structure, but zero updates and the state carried unchanged."""
  def update(updates, state, params=None, **_):
    return jax.tree.map(jnp.zeros_like, updates), state

  return optax.GradientTransformationExtraArgs(inner.init, update)


# Groups stacked [L, E, ...] by routed expert, which the per-expert masks apply to: the experts
# (and their copies), and their LoRA factors (lora.with_desmoe).
EXPERT_GROUPS = ("routed_experts", "lora_routed_experts")


def _expert_mask_for(leaf, masks, path=()):
  """Per-expert mask broadcastable to a routed-expert leaf ([L, E, ...] experts, or [L, C, ...]
  duplicated copies: `expert_bank` metadata, or the path of a bare array), else None."""
  if is_variable(leaf):
    meta = leaf.get_metadata()
    group, bank = meta.get("group"), meta.get("expert_bank", "experts")
    value = leaf.get_value()
  else:
    group = bare_label(path)
    bank = "expert_copies" if "expert_copies" in [str(path_key(p)) for p in path] else "experts"
    value = leaf
  if group not in EXPERT_GROUPS or not hasattr(value, "ndim"):
    return None
  m = masks.get(bank)
  if m is None or value.ndim < 2 or value.shape[:2] != m.shape:
    return None
  return m.reshape(m.shape + (1,) * (value.ndim - 2)).astype(value.dtype)


def mask_experts(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Zeroes the update of masked experts and keeps their optimizer state unchanged.

  `update(..., expert_update_mask={"experts": [L, E], "expert_copies": [L, C]})`: 1 = train.
  """
  inner = optax.with_extra_args_support(inner)

  def update(updates, state, params=None, *, expert_update_mask=None, **extra):
    new_updates, new_state = inner.update(updates, state, params, **extra)
    if expert_update_mask is None:
      return new_updates, new_state

    def mask_update(path, u):
      m = _expert_mask_for(u, expert_update_mask, path)
      if m is None:
        return u
      return u.replace(u.get_value() * m) if is_variable(u) else u * m

    def keep_state(path, new, old):
      m = _expert_mask_for(new, expert_update_mask, path)
      if m is None:
        return new
      if is_variable(new):
        return new.replace(jnp.where(m > 0, new.get_value(), old.get_value()))
      return jnp.where(m > 0, new, old)

    new_updates = jax.tree_util.tree_map_with_path(mask_update, new_updates, is_leaf=is_variable)
    new_state = jax.tree_util.tree_map_with_path(keep_state, new_state, state,
                                                 is_leaf=is_variable)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update)


class ScaleByAdamPerExpertState(NamedTuple):
  """Adam's moments, and a step count per routed expert: a tree like the parameters whose
  leaves are int32 [L, E] (or [L, C] for the copy bank)."""
  count: optax.Updates
  mu: optax.Updates
  nu: optax.Updates


def _expert_count_zeros(params):
  """int32 zeros [L, E] per stacked routed-expert leaf [L, E, ...], carrying the leading two
  logical axes (so the count is sharded like its experts)."""
  def zeros(x):
    if not hasattr(x.get_value() if is_variable(x) else x, "shape"):
      return x    # optax.masked's MaskedNode: a parameter of another group (multi_transform)
    if not is_variable(x):
      return jnp.zeros(x.shape[:2], jnp.int32)
    axes = x.get_metadata().get("logical_axes")
    value = jnp.zeros(x.shape[:2], jnp.int32)
    return x.replace(value) if axes is None else x.replace(value, logical_axes=tuple(axes[:2]))

  return jax.tree.map(zeros, params, is_leaf=is_variable)


def _bias_correction(moment, decay, count_le):
  """moment / (1 - decay^count), the count [L, E] broadcast over the expert's weights."""
  c = count_le.astype(jnp.float32).reshape(count_le.shape + (1,) * (moment.ndim - 2))
  return moment / (1.0 - decay ** c)


def scale_by_adam_per_expert(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """optax.scale_by_adam for stacked routed experts [L, E, ...], with one step count per expert.

  Every expert's count advances here; `mask_experts` then keeps a masked expert's count (with
  its moments), since the count's leading [L, E] axes are the experts'. So an expert's count is
  the number of updates it has had, and its bias correction is that of its own first, second,
  ... update, not the run's step (with one shared count, an expert first unmasked at step k would
  have its first moment divided by 1 - b1^k instead of 1 - b1: a step far smaller than Adam's)."""

  def init(params):
    return ScaleByAdamPerExpertState(_expert_count_zeros(params), optax.tree.zeros_like(params),
                                     optax.tree.zeros_like(params))

  def update(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = jax.tree.map(optax.safe_increment, state.count)

    def corrected(m, v, c):  # per leaf; the count's Variable carries 2 of the moment's 4 axes
      mv, vv, cv = (x.get_value() if is_variable(x) else x for x in (m, v, c))
      if not hasattr(mv, "shape"):
        return m   # optax.masked's MaskedNode: a parameter of another group
      out = _bias_correction(mv, b1, cv) / (jnp.sqrt(_bias_correction(vv, b2, cv)) + eps)
      return m.replace(out) if is_variable(m) else out

    new_updates = jax.tree.map(corrected, mu, nu, count, is_leaf=is_variable)
    return new_updates, ScaleByAdamPerExpertState(count, mu, nu)

  return optax.GradientTransformation(init, update)


class MixState(NamedTuple):
  """The router's two optimizer states under `alr.mix="update"`."""
  task: optax.OptState
  kd: optax.OptState


def mix_updates(direction: optax.GradientTransformation, kd_direction: optax.GradientTransformation,
                kd_lambda) -> optax.GradientTransformationExtraArgs:
  """The router's update lambda u_KD + (1 - lambda) u_task (`alr.mix="update"`).

  u_task = direction(task gradient) is the update of the gradient this transform is given, u_KD
  = kd_direction(KD gradient) that of `update(..., router_kd_grads=)` (a tree like the
  parameters, masked like them), each with its own state, so each is normalised by its own
  Adam moments. The mix is of normalised updates: with the KD gradient at 0 (the ALR equals its
  teacher), u_KD = 0 and the router moves by (1 - lambda) of a task-only step, where mixing the
  gradients would let Adam scale (1 - lambda) dL_task back up to a full step.
  `kd_lambda(step)`: lambda at the run's global step `step=`."""
  direction = optax.with_extra_args_support(direction)
  kd_direction = optax.with_extra_args_support(kd_direction)

  def init(params):
    return MixState(direction.init(params), kd_direction.init(params))

  def update(updates, state, params=None, *, step, router_kd_grads=None, **extra):
    if router_kd_grads is None:
      raise ValueError("alr.mix='update': the router's KD gradient (router_kd_grads=) is missing")
    u_task, task = direction.update(updates, state.task, params, **extra)
    u_kd, kd = kd_direction.update(router_kd_grads, state.kd, params, **extra)
    lam = jnp.asarray(kd_lambda(step), jnp.float32)
    mixed = jax.tree.map(lambda t, k: (lam * k + (1.0 - lam) * t).astype(t.dtype), u_task, u_kd)
    return mixed, MixState(task, kd)

  return optax.GradientTransformationExtraArgs(init, update)


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

def direction(cfg: OptimConfig, per_expert: bool = False) -> optax.GradientTransformation:
  """The optimizer's direction without weight decay (Adam, int8 Adam or Adafactor), its state
  stored as `moments_dtype` says; `per_expert`: Adam with a step count per routed expert."""
  if cfg.moments_dtype == "int8":
    return state_in(scale_by_adam_int8(cfg.b1, cfg.b2, cfg.eps), None)
  dtype = None if cfg.moments_dtype == "auto" else jnp.dtype(cfg.moments_dtype)
  if cfg.name == "adafactor":
    return state_in(optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0)),
                    dtype)
  adam = scale_by_adam_per_expert if per_expert else optax.scale_by_adam
  return state_in(adam(cfg.b1, cfg.b2, cfg.eps), dtype)


def build_optimizer(cfg: OptimConfig, total_steps: int, trainable_now: Iterable[str],
                    trainable_ever: Iterable[str], router_kd_lambda=None,
                    norm_given: bool = False) -> optax.GradientTransformationExtraArgs:
  """The optimizer for one phase. All phases built with the same `trainable_ever` (and
  `router_kd_lambda` or not) share one state structure (see module docstring).

  `router_kd_lambda`: None, or lambda(step) for `alr.mix="update"` (the router group then
  mixes two updates, `mix_updates`; `update` needs `router_kd_grads=`). `norm_given`: the
  gradient clip reads the global norm of the float32 gradients from `update(..., grad_norm=)`
  (`clip_by_given_norm`)."""
  trainable_now, trainable_ever = frozenset(trainable_now), frozenset(trainable_ever)
  if not trainable_now <= trainable_ever:
    raise ValueError(f"groups {sorted(trainable_now - trainable_ever)} train now but not ever")
  transforms = {}
  # LoRA's groups only where LoRA trains: every other method keeps the state structure (and
  # the checkpoints) it had before LoRA's groups existed.
  for label in (LABELS if trainable_ever & frozenset(LORA_LABELS) else BASE_LABELS):
    if label not in trainable_ever:
      transforms[label] = optax.set_to_zero()
      continue
    core = direction(cfg, per_expert=cfg.per_expert_bias_correction and label in EXPERT_GROUPS)
    if label == "router" and router_kd_lambda is not None:
      # The task gradient is clipped with every other gradient (below); the KD gradient, given
      # apart, is clipped by itself at the same norm.
      kd = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), direction(cfg)) \
          if cfg.grad_clip else direction(cfg)
      core = mix_updates(core, kd, router_kd_lambda)
    core = optax.chain(core, decayed_weights(cfg))
    if label in EXPERT_GROUPS:
      core = mask_experts(core)
    transforms[label] = core if label in trainable_now else hold(core)
  # mask_compatible_extra_args: `router_kd_grads` (a tree like the parameters) reaches each
  # group's transform masked like its updates.
  chain = [in_float32(), optax.multi_transform(transforms, param_labels,
                                               mask_compatible_extra_args=True)]
  if cfg.grad_clip:
    chain.insert(1, clip_by_given_norm(cfg.grad_clip) if norm_given
                 else optax.clip_by_global_norm(cfg.grad_clip))
  chain.append(scale_by_global_lr(cfg, total_steps))
  if cfg.master_weights:  # only for groups trained in some phase: the others never move
    chain.append(optax.masked(master_weights(trainable_now), lambda params: jax.tree.map(
        lambda label: label in trainable_ever, param_labels(params))))
  return optax.chain(*chain)


def state_bytes(opt_state) -> int:
  """Bytes held by an optimizer state (frozen-for-the-run groups hold none)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)
             if hasattr(x, "dtype"))
