"""The optimizer of one training phase, built, laid out, initialised and applied.

`phase_optimizer` builds the optax transform of a phase (`build_optimizer` with the method's
trainable groups); every phase's transform shares one state structure, so `init_optimizer`
(any phase) makes the state all of them use, and `optimizer_shardings` lays it out like the
parameters. `make_update` returns the step's update: the whole-tree update on the device, or
the streamed update with `optim.host_offload` (optim/streamed.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from desmoe_jax import sharding as sharding_lib
from desmoe_jax.optim.config import OptimConfig
from desmoe_jax.optim.extra_args import finiteness, router_kd_grads
from desmoe_jax.optim.rounding import apply_updates
from desmoe_jax.optim.streamed import update_streamed
from desmoe_jax.optim.transforms import apply_if_finite_given, build_optimizer


def mixes_updates(method_cfg) -> bool:
  """`alr.mix="update"` on a method with the ALR: the router's task and KD gradients are kept
  apart (router.attach_kd_probe) and mixed after Adam (optim.mix_updates)."""
  return method_cfg.use_alr and method_cfg.alr.mix == "update"


def phase_optimizer(method_cfg, optim_cfg: OptimConfig, phase: int, norm_given: bool = False):
  """The optax transform of `phase` (`method_cfg`: a methods.MethodConfig). Every phase's
  shares one state structure, so the state made by `init_optimizer` (any phase) serves them
  all. With `skip_nonfinite_updates`, the whole transform is wrapped in `apply_if_finite_given`
  (optax.apply_if_finite's state, which says whether the last update was skipped;
  `update(..., all_finite=)`, see `finiteness`). `norm_given`: see `build_optimizer`."""
  tx = build_optimizer(optim_cfg, method_cfg.total_steps, method_cfg.trainable(phase),
                       method_cfg.trainable_ever(),
                       router_kd_lambda=method_cfg.kd_lambda if mixes_updates(method_cfg)
                       else None, norm_given=norm_given)
  if optim_cfg.skip_nonfinite_updates:
    tx = apply_if_finite_given(tx, optim_cfg.skip_nonfinite_updates)
  return tx


def init_optimizer(method_cfg, optim_cfg: OptimConfig, model_state):
  """Optimizer state over the model's parameters (trainable-for-the-run groups only)."""
  params = nnx.filter_state(model_state, nnx.Param)
  return phase_optimizer(method_cfg, optim_cfg, method_cfg.phases()[0][0]).init(params)


def optimizer_shardings(method_cfg, optim_cfg: OptimConfig, model_state, mesh, rules=None):
  """Layout of `init_optimizer`'s state on `mesh`: every moment like its parameter, counts
  replicated. `jit(init_optimizer)` alone has nothing to follow (moments are fresh zeros, not
  computed from the sharded parameters) and would put the whole state on one device."""
  abstract = jax.eval_shape(lambda ms: init_optimizer(method_cfg, optim_cfg, ms), model_state)
  shardings = sharding_lib.state_shardings(abstract, mesh, rules)
  if optim_cfg.host_offload:
    check_host_offload(mesh)
    shardings = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), shardings,
                             is_leaf=lambda x: isinstance(x, NamedSharding))
  return shardings


def check_host_offload(mesh):
  """optim.host_offload keeps the optimizer state in each device's host memory (the memory kind
  `pinned_host`, as MaxText's optimizer_memory_host_offload); fails, naming the field, on a
  backend whose devices have none."""
  device = mesh.devices.flat[0]
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except Exception as e:  # a compile-only (topology) device may not list its memories
    kinds = {"unknown: " + type(e).__name__}
  if "pinned_host" not in kinds:
    raise ValueError(f"optim.host_offload=True needs host memory (memory kind 'pinned_host') on "
                     f"the devices; {device.platform} device {device} has {sorted(kinds)}: set "
                     "optim.host_offload=False")


def zeros_like_params(params):
  """Zeros shaped and laid out like `params` (each split as its logical axes say). A bare
  zeros_like has no layout of its own, and the partitioner, blocked by the host-offload
  barrier, made them whole on every device (docs/SCALING.md)."""
  def zeros(var):
    if not isinstance(var, nnx.Variable):
      return jnp.zeros_like(var)
    value = jnp.zeros(var.shape, var.dtype)
    axes = var.get_metadata().get("logical_axes")
    return var.replace(value if axes is None else sharding_lib.constrain(value, axes))

  return jax.tree.map(zeros, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_update(method_cfg, optim_cfg: OptimConfig, phase: int):
  """The optimizer update of `phase`: `update(params, frozen, grads, opt_state, *, step,
  update_mask, key, probe_grads, learning_rate)` -> (new params, new optimizer state).
  `grads` covers the groups differentiated in this phase, `frozen` the other parameters (given
  zero gradients, which keep the optimizer's tree); `update_mask` the per-expert masks
  (`mask_experts`); `key` the stochastic-rounding key or None; `probe_grads` the router's KD
  gradients or None; `learning_rate` the peak rate as an array, or None for
  optim_cfg.learning_rate (`scale_by_global_lr`)."""
  trained = method_cfg.trainable(phase)
  if optim_cfg.host_offload:
    # The streamed update sees a layer at a time: the clip's norm is given.
    streamed_tx = phase_optimizer(method_cfg, optim_cfg, phase, norm_given=True)

    def update(params, frozen, grads, opt_state, *, step, update_mask, key, probe_grads=None,
               learning_rate=None):
      del frozen  # frozen groups are in neither of the streamed views
      return update_streamed(streamed_tx, params, grads, opt_state, step, update_mask, key,
                             trained, probe_grads, learning_rate)
    return update
  tx = phase_optimizer(method_cfg, optim_cfg, phase)

  def update(params, frozen, grads, opt_state, *, step, update_mask, key, probe_grads=None,
             learning_rate=None):
    full_grads = nnx.merge_state(zeros_like_params(frozen), grads)
    extra = ({} if probe_grads is None
             else {"router_kd_grads": router_kd_grads(full_grads, probe_grads)})
    updates, new_opt_state = tx.update(full_grads, opt_state, params, step=step,
                                       learning_rate=learning_rate,
                                       expert_update_mask=update_mask, **extra,
                                       **finiteness(grads, opt_state))
    return apply_updates(params, updates, key), new_opt_state
  return update
