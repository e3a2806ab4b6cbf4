"""The extra arguments the optimizer's `update` takes beyond the gradients, and what its state
says back: the router's KD gradients (`alr.mix="update"`), whether every gradient is finite,
and whether the last update was skipped (`train.skip_nonfinite_updates`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from desmoe_jax.optim.config import OptimConfig
from desmoe_jax.optim.labels import label_of, path_key


def router_kd_grads(full_grads, probe_grads: dict):
  """A tree like the gradients holding the router parameters' KD gradients (by parameter name,
  from the probe) and zeros elsewhere (masked away before any transform reads them)."""
  def kd(path, g):
    if label_of(g) != "router":
      return jax.tree.map(jnp.zeros_like, g)
    return g.replace(probe_grads[str(path_key(path[-1]))].astype(g.dtype))

  return jax.tree_util.tree_map_with_path(kd, full_grads,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def finiteness(grads, opt_state) -> dict:
  """The `all_finite=` extra argument of `apply_if_finite_given` (with
  `optim.skip_nonfinite_updates`; else no argument): whether every gradient is finite."""
  if not isinstance(opt_state, optax.ApplyIfFiniteState):
    return {}
  return {"all_finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(g))
                                           for g in jax.tree.leaves(grads)]))}


def update_skipped(opt_state, optim_cfg: OptimConfig):
  """Whether `apply_if_finite` skipped the update that produced `opt_state` (False if off)."""
  if not optim_cfg.skip_nonfinite_updates:
    return jnp.asarray(False)
  finite, count = opt_state.last_finite, opt_state.notfinite_count
  if optim_cfg.host_offload:  # the state is in host memory
    finite, count = jax.device_put((finite, count), jax.memory.Space.Device)
  return ~finite & (count <= optim_cfg.skip_nonfinite_updates)
