"""Optimizers for phase-dependent, mask-dependent training (docs/METHOD.md section 3).

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
* Weight decay skips the parameter kinds in `decay_exclude` (norm gains and biases by default,
  the HF/ESFT convention), read from the `kind` metadata their modules set.
* `per_expert_bias_correction`: the routed experts' Adam step count is one per expert ([L, E]),
  and `mask_experts` keeps a masked expert's count with its moments, so an expert first updated
  at step k gets Adam's first-step bias correction then, not step k's.
* `alr.mix="update"` (`mix_updates`): the router keeps two Adam states, one for its task
  gradient and one for its KD gradient (given as `update(..., router_kd_grads=)`), and moves by
  lambda u_KD + (1 - lambda) u_task of the two normalised updates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from desmoe_jax.schedule import LABELS

OPTIMIZERS = ("adamw", "adafactor")
MOMENT_DTYPES = ("auto", "float32", "bfloat16", "int8")
# optim.decay_exclude: which parameter kinds (`kind` metadata, nn/layers.py) get no weight decay
DECAY_EXCLUDE = {"norms,biases": frozenset({"norm", "bias"}), "norms": frozenset({"norm"}),
                 "biases": frozenset({"bias"}), "none": frozenset()}


ADAFACTOR_OFFLOAD = (
    "optim.name='adafactor' with optim.host_offload=True: not supported. The offloaded state is "
    "streamed through the device one layer at a time, and Adafactor's update clip reads the "
    "RMS of a whole stacked parameter (every layer). Its state is factored (rows + columns per "
    "matrix, a few MB): keep it on the device, optim.host_offload=False")


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
  moments_dtype: str = "auto"   # "auto" (the parameter's dtype) | "float32" | "bfloat16" | "int8"
  host_offload: bool = False    # optimizer state in host memory (memory kind pinned_host)
  master_weights: bool = False  # a float32 master copy in the state (train.precision=bf16_master)
  # train.skip_nonfinite_updates: 0 off; N > 0 skips a step whose gradients hold NaN/inf (no
  # update, optimizer state kept; optax.apply_if_finite), up to N in a row (then it is applied,
  # and the trainer's finiteness checks stop the run).
  skip_nonfinite_updates: int = 0
  decay_exclude: str = "norms,biases"   # no weight decay for these kinds (DECAY_EXCLUDE); "none"
  # one Adam step count per routed expert, advanced only when the expert is updated
  per_expert_bias_correction: bool = False

  def __post_init__(self):
    if self.schedule not in ("linear", "cosine", "constant"):
      raise ValueError(f"optim.schedule={self.schedule!r}: expected linear, cosine or constant")
    if self.name not in OPTIMIZERS:
      raise ValueError(f"optim.name={self.name!r}: expected one of {OPTIMIZERS}")
    if self.moments_dtype not in MOMENT_DTYPES:
      raise ValueError(f"optim.moments_dtype={self.moments_dtype!r}: expected one of "
                       f"{MOMENT_DTYPES}")
    if self.decay_exclude not in DECAY_EXCLUDE:
      raise ValueError(f"optim.decay_exclude={self.decay_exclude!r}: expected one of "
                       f"{tuple(DECAY_EXCLUDE)}")
    if self.per_expert_bias_correction and (self.name != "adamw" or self.moments_dtype == "int8"):
      raise ValueError(f"optim.per_expert_bias_correction counts AdamW's steps per expert: it "
                       f"needs optim.name='adamw' (not {self.name!r}) with float moments "
                       f"(optim.moments_dtype={self.moments_dtype!r})")
    if self.host_offload and self.name == "adafactor":
      raise ValueError(ADAFACTOR_OFFLOAD)
    if self.moments_dtype == "int8" and self.name != "adamw":
      raise ValueError(f"optim.moments_dtype='int8' quantises AdamW's two moments; "
                       f"optim.name={self.name!r} has none (use auto, float32 or bfloat16)")


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def label_of(variable) -> str:
  """Parameter group of one parameter: its `group` metadata (nn/layers.py), else backbone (also
  for a bare array, which carries no metadata). Given a path (a tuple of names) instead, the
  group its module names say (`_bare_label`)."""
  if isinstance(variable, tuple):
    return _bare_label(variable)
  meta = variable.get_metadata() if _is_variable(variable) else {}
  label = meta.get("group") or "backbone"
  if label not in LABELS:
    raise ValueError(f"parameter group {label!r} is not one of {LABELS}")
  return label


def _bare_label(path) -> str:
  """The group of a bare array (a plain pytree of arrays has no metadata to read), from the
  module names on its path as nn/ and moe/ name them."""
  names = [str(_key(p)) for p in path]
  if "experts" in names or "expert_copies" in names:
    return "routed_experts"
  if "shared_experts" in names or "shared_expert" in names or "shared_expert_gate" in names:
    return "shared_experts"
  if "gate" in names and "mlp" in names and names.index("gate") == names.index("mlp") + 1:
    return "router"
  return "backbone"


def _key(entry):
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
      lambda path, x: (jax.tree.map(lambda _: label_of(x), x) if _is_variable(x)
                       else _bare_label(path)), params, is_leaf=_is_variable)


def kind_of(variable, path=()) -> str:
  """"norm" (a norm's gain), "bias", or "weight": the `kind` metadata of a parameter, else (a
  bare array) what its path says: a leaf named bias/b1/b2, or one inside a module named *norm*."""
  if _is_variable(variable):
    return variable.get_metadata().get("kind") or "weight"
  names = [str(_key(p)) for p in path]
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
        lambda path, x: (jax.tree.map(lambda _: kind_of(x) not in kinds, x) if _is_variable(x)
                         else kind_of(x, path) not in kinds), params, is_leaf=_is_variable)

  return mask


def decayed_weights(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW's decoupled weight decay, on every parameter but the kinds in `decay_exclude`."""
  if not DECAY_EXCLUDE[cfg.decay_exclude]:
    return optax.add_decayed_weights(cfg.weight_decay)
  return optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(cfg.decay_exclude))


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


def _expert_mask_for(leaf, masks, path=()):
  """Per-expert mask broadcastable to a routed-expert leaf ([L, E, ...] experts, or [L, C, ...]
  duplicated copies: `expert_bank` metadata, or the path of a bare array), else None."""
  if _is_variable(leaf):
    meta = leaf.get_metadata()
    group, bank = meta.get("group"), meta.get("expert_bank", "experts")
    value = leaf.get_value()
  else:
    group = _bare_label(path)
    bank = "expert_copies" if "expert_copies" in [str(_key(p)) for p in path] else "experts"
    value = leaf
  if group != "routed_experts" or not hasattr(value, "ndim"):
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
      return u.replace(u.get_value() * m) if _is_variable(u) else u * m

    def keep_state(path, new, old):
      m = _expert_mask_for(new, expert_update_mask, path)
      if m is None:
        return new
      if _is_variable(new):
        return new.replace(jnp.where(m > 0, new.get_value(), old.get_value()))
      return jnp.where(m > 0, new, old)

    new_updates = jax.tree_util.tree_map_with_path(mask_update, new_updates, is_leaf=_is_variable)
    new_state = jax.tree_util.tree_map_with_path(keep_state, new_state, state,
                                                 is_leaf=_is_variable)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def adamw_core(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW direction (Adam moments + decoupled weight decay), before the learning rate."""
  return optax.chain(optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps), decayed_weights(cfg))


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
    if not hasattr(x.get_value() if _is_variable(x) else x, "shape"):
      return x    # optax.masked's MaskedNode: a parameter of another group (multi_transform)
    if not _is_variable(x):
      return jnp.zeros(x.shape[:2], jnp.int32)
    axes = x.get_metadata().get("logical_axes")
    value = jnp.zeros(x.shape[:2], jnp.int32)
    return x.replace(value) if axes is None else x.replace(value, logical_axes=tuple(axes[:2]))

  return jax.tree.map(zeros, params, is_leaf=_is_variable)


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
      mv, vv, cv = (x.get_value() if _is_variable(x) else x for x in (m, v, c))
      if not hasattr(mv, "shape"):
        return m   # optax.masked's MaskedNode: a parameter of another group
      out = _bias_correction(mv, b1, cv) / (jnp.sqrt(_bias_correction(vv, b2, cv)) + eps)
      return m.replace(out) if _is_variable(m) else out

    new_updates = jax.tree.map(corrected, mu, nu, count, is_leaf=_is_variable)
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


# ------------------------------------------------------------------ 8-bit moments

MU_POWER, NU_POWER = 4, 8  # code -> value maps: v = sign(c) |c / 127|^power x block absmax


def _block_size(n: int) -> int:
  """Quantisation block along the last axis: 256 values (or the largest power of two from 128
  down to 32 dividing it), else the whole axis."""
  for size in (256, 128, 64, 32):
    if n % size == 0:
      return size
  return n


def quantize_blockwise(x, power: int):
  """float32 [..., n] -> (int8 codes [..., n], float32 absmax [..., n / block]).

  Per block of the last axis, values are divided by the block's absmax and coded as
  round(127 sign(y) |y|^(1 / power)): a power map, so that a block spanning many orders of
  magnitude (Adam's second moment does) keeps its small values: the smallest nonzero code is
  127^-power of the block's absmax (power 8: 1.5e-17), the relative step near the top
  power / 254 (3% for power 8, 1.6% for 4). Same rank as `x`, so the codes and scales carry
  the parameter's logical axes and are sharded like it."""
  n = x.shape[-1]
  size = _block_size(n)
  xb = x.astype(jnp.float32).reshape(x.shape[:-1] + (n // size, size))
  absmax = jnp.max(jnp.abs(xb), axis=-1)
  y = xb / jnp.where(absmax > 0, absmax, 1.0)[..., None]
  code = jnp.round(jnp.sign(y) * jnp.abs(y) ** (1.0 / power) * 127.0)
  return code.astype(jnp.int8).reshape(x.shape), absmax


def dequantize_blockwise(code, absmax, power: int):
  """Inverse of `quantize_blockwise` (up to its rounding), float32."""
  if not code.size:  # a zero-size view (train_step's streamed update)
    return jnp.zeros(code.shape, jnp.float32)
  n, blocks = code.shape[-1], absmax.shape[-1]
  c = code.astype(jnp.float32).reshape(code.shape[:-1] + (blocks, n // blocks)) / 127.0
  return (jnp.sign(c) * jnp.abs(c) ** power * absmax[..., None]).reshape(code.shape)


class ScaleByAdamInt8State(NamedTuple):
  """Adam's moments as int8 codes + per-block float32 absmax (~2.03 bytes per parameter for
  both moments, against 4 in bfloat16 and 8 in float32)."""
  count: jax.Array
  mu_code: optax.Updates
  mu_scale: optax.Updates
  nu_code: optax.Updates
  nu_scale: optax.Updates


def scale_by_adam_int8(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """optax.scale_by_adam with both moments stored blockwise-quantised in int8. Each step
  dequantises, updates the moments in float32, computes the update from those float32 moments
  (so this step's gradient is used exactly) and stores them quantised again: the rounding
  enters through the next step's moments only. The second moment uses the finer power-8 map:
  a value rounded to 0 would leave the denominator at eps."""

  def codes(params):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.int8), params)

  def scales(params):
    return jax.tree.map(lambda p: jnp.zeros(p.shape[:-1] + (p.shape[-1] // _block_size(
        p.shape[-1]),), jnp.float32), params)

  def init(params):
    return ScaleByAdamInt8State(jnp.zeros([], jnp.int32), codes(params), scales(params),
                                codes(params), scales(params))

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda c, a: dequantize_blockwise(c, a, MU_POWER), state.mu_code,
                      state.mu_scale)
    nu = jax.tree.map(lambda c, a: dequantize_blockwise(c, a, NU_POWER), state.nu_code,
                      state.nu_scale)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                      nu, updates)
    count = optax.safe_increment(state.count)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    new_updates = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
    # Codes and scales as two trees of the parameters' structure (XLA computes each once).
    part = lambda tree, power, i: jax.tree.map(lambda x: quantize_blockwise(x, power)[i], tree)
    return new_updates, ScaleByAdamInt8State(count, part(mu, MU_POWER, 0), part(mu, MU_POWER, 1),
                                             part(nu, NU_POWER, 0), part(nu, NU_POWER, 1))

  return optax.GradientTransformation(init, update)


def adafactor_core(cfg: OptimConfig) -> optax.GradientTransformation:
  """Adafactor's direction (Shazeer & Stern 2018) in AdamW's place: a factored second moment
  (a row and a column statistic per matrix instead of a full moment: ~0 bytes per parameter
  against AdamW's two moments), no first moment, updates clipped to block RMS 1, and the same
  decoupled weight decay, before the same learning rate. optax.adafactor's own relative step
  (`multiply_by_parameter_scale`) is off, so `optim.learning_rate` means what it means for
  AdamW. A flagged alternative, not the paper's optimizer."""
  return optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0),
                     decayed_weights(cfg))


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


def _stochastic_round_bf16(x_f32, key, leaf: int = 0, row_offset=0):
  """float32 -> bfloat16, rounding up with probability equal to the fraction of the bfloat16
  step that `x` lies above the value below it: unbiased, E[result] = x. Adds 16 random bits
  below bfloat16's mantissa and truncates. Non-finite values round to nearest (the random carry
  could otherwise turn a NaN into a finite number and hide a divergence)."""
  return round_bf16_with_noise(x_f32, hashed_bits16(key, leaf, x_f32, row_offset))


def _fmix32(h):
  """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability
  about 1/2."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hashed_bits16(key, leaf: int, like, row_offset=0):
  """16 pseudo-random bits per element of `like`, a function of (key, leaf, element index):
  the counter-based hash of each element's indices with the key's words (`key`: a PRNG key or
  its uint32 data). `row_offset`: `like` holds rows row_offset.. of a larger leaf (a slice
  along axis 0), and gets that leaf's bits: the streamed update (train_step) rounds one layer
  of a stacked leaf at a time exactly as the whole-leaf update would, which a key-split PRNG
  cannot do without drawing the whole leaf. Elementwise integer arithmetic only."""
  data = key if jnp.issubdtype(key.dtype, jnp.unsignedinteger) else jax.random.key_data(key)
  data = data.reshape(-1).astype(jnp.uint32)
  h = _fmix32(data[0] ^ _fmix32(data[-1] + jnp.uint32(leaf) * jnp.uint32(0x9E3779B9)))
  for axis in range(like.ndim):
    index = jax.lax.broadcasted_iota(jnp.uint32, like.shape, axis)
    if axis == 0:
      index = index + jnp.asarray(row_offset).astype(jnp.uint32)
    h = _fmix32(h * jnp.uint32(0x27D4EB2F) + index + jnp.uint32(axis + 1))
  if like.ndim == 0:
    h = _fmix32(h)
  return (h >> 16).astype(jnp.uint16)


def round_bf16_with_noise(x_f32, noise_u16):
  """The rounding of `_stochastic_round_bf16` for given 16-bit noise (uniform noise makes it
  stochastic rounding; averaging over all 65536 values gives its exact expectation)."""
  bits = jax.lax.bitcast_convert_type(x_f32, jnp.uint32)
  noisy = bits + noise_u16.astype(jnp.uint32)
  rounded = jax.lax.bitcast_convert_type(noisy & jnp.uint32(0xFFFF0000), jnp.float32)
  return jnp.where(jnp.isfinite(x_f32), rounded, x_f32).astype(jnp.bfloat16)


class MasterState(NamedTuple):
  """float32 master copy of the (bfloat16) weights, in the optimizer state: checkpointed with
  it and offloaded with it (`optim.host_offload`)."""
  master: optax.Params


def master_weights(trainable_now: Iterable[str]) -> optax.GradientTransformation:
  """The last transform under `train.precision=bf16_master`: the update is added to a float32
  master copy, and the update handed on is (new master - weight), so that `apply_updates`
  (nearest rounding) leaves each weight at its master rounded to bfloat16. The master keeps
  what bfloat16 cannot hold, so no update is lost, deterministically.

  Groups not trained in this phase are not touched at all (their master passes through, their
  update is 0): with `optim.host_offload` their masters are never read."""
  trainable_now = frozenset(trainable_now)

  def init(params):
    return MasterState(jax.tree.map(lambda p: p.astype(jnp.float32), params))

  def update(updates, state, params=None):
    labels = param_labels(params)
    master = jax.tree.map(lambda m, u, label: m + u.astype(jnp.float32)
                          if label in trainable_now else m, state.master, updates, labels)
    out = jax.tree.map(lambda m, p, u, label: m - p.astype(jnp.float32)
                       if label in trainable_now else jnp.zeros(u.shape, jnp.float32),
                       master, params, updates, labels)
    return out, MasterState(master)

  return optax.GradientTransformation(init, update)


def apply_updates(params, updates, key=None, row_offset=0):
  """params + updates, added in float32. A bfloat16 parameter gets the sum rounded
  stochastically when `key` is given (`train.precision=bf16_sr`; each leaf its own bits from
  `key`), to nearest otherwise; float32 parameters are exact. An update of exactly 0 leaves a
  parameter bit for bit (a frozen or masked expert stays frozen whatever the rounding).
  `row_offset`: the leaves are slices from this row (axis 0) of the whole tree's, and get the
  bits the whole leaves would (the streamed update of train_step)."""
  p_leaves, treedef = jax.tree.flatten(params)
  u_leaves = treedef.flatten_up_to(updates)
  out = []
  for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
    x = p.astype(jnp.float32) + u.astype(jnp.float32)
    if p.dtype == jnp.bfloat16 and key is not None:
      out.append(_stochastic_round_bf16(x, key, i, row_offset))
    else:
      out.append(x.astype(p.dtype))
  return jax.tree.unflatten(treedef, out)


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
  for label in LABELS:
    if label not in trainable_ever:
      transforms[label] = optax.set_to_zero()
      continue
    core = direction(cfg, per_expert=cfg.per_expert_bias_correction and label == "routed_experts")
    if label == "router" and router_kd_lambda is not None:
      # The task gradient is clipped with every other gradient (below); the KD gradient, given
      # apart, is clipped by itself at the same norm.
      kd = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), direction(cfg)) \
          if cfg.grad_clip else direction(cfg)
      core = mix_updates(core, kd, router_kd_lambda)
    core = optax.chain(core, decayed_weights(cfg))
    if label == "routed_experts":
      core = mask_experts(core)
    transforms[label] = core if label in trainable_now else hold(core)
  # mask_compatible_extra_args: `router_kd_grads` (a tree like the parameters) reaches each
  # group's transform masked like its updates.
  chain = [in_float32(), optax.multi_transform(transforms, param_labels,
                                               mask_compatible_extra_args=True)]
  if cfg.grad_clip:
    chain.insert(1, clip_by_given_norm(cfg.grad_clip) if norm_given
                 else optax.clip_by_global_norm(cfg.grad_clip))
  chain.append(scale_by_global_lr(learning_rate_schedule(cfg, total_steps)))
  if cfg.master_weights:  # only for groups trained in some phase: the others never move
    chain.append(optax.masked(master_weights(trainable_now), lambda params: jax.tree.map(
        lambda label: label in trainable_ever, param_labels(params))))
  return optax.chain(*chain)


def state_bytes(opt_state) -> int:
  """Bytes held by an optimizer state (frozen-for-the-run groups hold none)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)
             if hasattr(x, "dtype"))


def trainable_filter(labels: Iterable[str]):
  """nnx filter selecting the Params whose group is in `labels`."""
  labels = frozenset(labels)
  return nnx.All(nnx.Param, lambda path, variable: label_of(variable) in labels)
