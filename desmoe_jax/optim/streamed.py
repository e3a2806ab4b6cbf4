"""The optimizer update with `optim.host_offload`: the optimizer state stays in host memory and
is streamed through the device one stacked layer at a time (docs/SCALING.md, "The streamed
update", has the measurements that chose this design).

The update is `tx.update` + `apply_updates`, run on views of the trees: once on the leaves
outside the stacked layers (embeddings, LM head, dense layers: their state is copied in whole,
small), then in a `lax.scan` over the L stacked layers on the [1, ...] slice of every stacked
leaf: each layer's moments are read from host memory, updated on the device and written back
(`dynamic_update_slice` into the host buffer, as remat offload does), so one layer's state is on
the device at a time. Leaves absent from a view are zero-size ([0, ...]), so the transform
chain, its masks and its per-leaf stochastic-rounding bits (offset by the layer:
`apply_updates(row_offset=)`) are those of the whole-tree update, leaf for leaf. Groups frozen
in this phase are in neither view: their weights and state are not touched. Everything that
reduces over all gradients (the clip's global norm, their finiteness) is computed once, before.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from desmoe_jax.optim.extra_args import finiteness, router_kd_grads
from desmoe_jax.optim.labels import path_key
from desmoe_jax.optim.rounding import apply_updates

STACK = "moe_layers"   # the model's stacked layers (model.MoECausalLM): one leading [L] axis
HOST, DEVICE = jax.memory.Space.Host, jax.memory.Space.Device


def _names(path) -> list:
  return [path_key(p) for p in path]


def leaf_kind(path, x, of_state: bool, trained_labels, grad_paths, num_layers: int) -> str:
  """"stack" (a leaf of the stacked layers), "flat" (any other trained leaf) or "skip"."""
  names = _names(path)
  if of_state:
    i = names.index("inner_states") if "inner_states" in names else -1
    if i >= 0 and i + 1 < len(names) and names[i + 1] not in trained_labels:
      return "skip"
  elif path not in grad_paths:
    return "skip"
  ndim = getattr(x, "ndim", 0)
  return "stack" if STACK in names and ndim and x.shape[0] == num_layers else "flat"


def _empty(x):
  return jnp.zeros((0,) + x.shape[1:], x.dtype) if x.ndim else x


def view(x, kind: str, layer):
  """x as the pass `layer` sees it: the flat pass (None) its flat leaves whole, a layer's pass
  the [1, ...] slice of its stacked leaves; everything else zero-size."""
  if layer is None:
    return x if kind == "flat" else _empty(x)
  return jax.lax.dynamic_slice_in_dim(x, layer, 1, 0) if kind == "stack" else _empty(x)


def to_device(x):
  return jax.device_put(x, DEVICE) if jax.typeof(x).memory_space == HOST else x


@dataclasses.dataclass
class Streams:
  """The flattened trees of one streamed update, each leaf with its kind (`leaf_kind`)."""
  p_flat: list
  p_def: object
  p_kind: list
  s_def: object
  s_kind: list
  g_by_path: dict
  kd_by_path: dict | None

  def like_grads(self, by_path: dict, layer):
    return self.p_def.unflatten([view(by_path[path], k, layer) if k != "skip" else _empty(x)
                                 for (path, x), k in zip(self.p_flat, self.p_kind)])


def update_pass(tx, streams: Streams, p_leaves, s_leaves, layer, *, step, update_mask, key,
                grad_norm, given):
  """tx.update + apply_updates on the view of one pass: (new params, new state) leaves."""
  p = [view(x, k, layer) for x, k in zip(p_leaves, streams.p_kind)]
  g = streams.like_grads(streams.g_by_path, layer)
  extra = ({} if streams.kd_by_path is None
           else {"router_kd_grads": streams.like_grads(streams.kd_by_path, layer)})
  s = [to_device(view(x, k, layer)) for x, k in zip(s_leaves, streams.s_kind)]
  mask = {name: (m[:0] if layer is None else jax.lax.dynamic_slice_in_dim(m, layer, 1, 0))
          for name, m in update_mask.items()}
  p, s = streams.p_def.unflatten(p), streams.s_def.unflatten(s)
  updates, new_s = tx.update(g, s, p, step=step, expert_update_mask=mask, grad_norm=grad_norm,
                             **given, **extra)
  new_p = apply_updates(p, updates, key, row_offset=0 if layer is None else layer)
  return jax.tree.leaves(new_p), jax.tree.leaves(new_s)


def _pick(leaves, kinds, kind):
  return [x for x, k in zip(leaves, kinds) if k == kind]


def _put(leaves, kinds, stack):
  """Full leaf list from the stacked leaves `stack` (in order) and the others unchanged."""
  it = iter(stack)
  return [next(it) if k == "stack" else x for x, k in zip(leaves, kinds)]


def _merge(old, kinds, flat, stack):
  """The new leaves: a skipped leaf unchanged, the others from their pass, in their memory."""
  it = iter(stack)
  out = []
  for x, k, f in zip(old, kinds, flat):
    new = x if k == "skip" else next(it) if k == "stack" else f
    if new is not x and jax.typeof(x).memory_space == HOST:
      new = jax.device_put(new, HOST)
    out.append(new)
  return out


def update_streamed(tx, params, grads, opt_state, step, update_mask, key, trained_labels,
                    probe_grads=None, learning_rate=None):
  """(new params, new optimizer state), the optimizer state streamed from and to host memory
  (module docstring). `tx` is built with `norm_given=True`; `probe_grads` (alr.mix="update"):
  the router's KD gradients, viewed like the gradients; `learning_rate`: the peak rate or None
  (optim.scale_by_global_lr)."""
  grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
  given = dict(finiteness(grads, opt_state), learning_rate=learning_rate)
  p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
  s_flat, s_def = jax.tree_util.tree_flatten_with_path(opt_state)
  g_by_path = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
  kd_by_path = None if probe_grads is None else dict(
      jax.tree_util.tree_flatten_with_path(router_kd_grads(grads, probe_grads))[0])
  stacked = [x.shape[0] for path, x in p_flat if STACK in _names(path) and x.ndim]
  num_layers = stacked[0] if stacked else 0
  kinds = [[leaf_kind(path, x, of_state, trained_labels, g_by_path, num_layers)
            for path, x in flat] for flat, of_state in ((p_flat, False), (s_flat, True))]
  streams = Streams(p_flat, p_def, kinds[0], s_def, kinds[1], g_by_path, kd_by_path)
  p_leaves = [x for _, x in p_flat]
  s_leaves = [x for _, x in s_flat]
  run = lambda p, s, layer: update_pass(tx, streams, p, s, layer, step=step,
                                        update_mask=update_mask, key=key, grad_norm=grad_norm,
                                        given=given)
  flat_p, flat_s = run(p_leaves, s_leaves, None)

  def layer_step(carry, layer):
    p_stack, s_stack = carry
    new_p, new_s = run(_put(p_leaves, streams.p_kind, p_stack),
                       _put(s_leaves, streams.s_kind, s_stack), layer)
    p_stack = [jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), layer, 0)
               for x, y in zip(p_stack, _pick(new_p, streams.p_kind, "stack"))]
    s_stack = [jax.lax.dynamic_update_slice_in_dim(
        x, jax.device_put(y.astype(x.dtype), jax.typeof(x).memory_space), layer, 0)
        for x, y in zip(s_stack, _pick(new_s, streams.s_kind, "stack"))]
    return (p_stack, s_stack), None

  p_stack = _pick(p_leaves, streams.p_kind, "stack")
  s_stack = _pick(s_leaves, streams.s_kind, "stack")
  # Stacked vectors ([L, n]: norms, biases, per-expert counts) cross to the device whole: small,
  # and one row of a bfloat16 one cannot be sliced out of host memory (the TPU compiler slices
  # sublanes in pairs there: "Sublane slicing size must be multiple of element packing factor").
  s_stack = [to_device(x) if x.ndim <= 2 else x for x in s_stack]
  if num_layers and (p_stack or s_stack):
    (p_stack, s_stack), _ = jax.lax.scan(layer_step, (p_stack, s_stack),
                                         jnp.arange(num_layers))
  new_params = p_def.unflatten(_merge(p_leaves, streams.p_kind, flat_p, p_stack))
  new_state = s_def.unflatten(_merge(s_leaves, streams.s_kind, flat_s, s_stack))
  return new_params, new_state
