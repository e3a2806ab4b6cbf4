"""Expert parallelism: the routed experts split over the mesh's expert axis, token rows exchanged
explicitly between devices (`jax.shard_map` + all-to-all), MaxText style.

With `model.expert_parallel="shard_map"` the MoE layer runs its routed experts through
`expert_outputs` below instead of handing the single-program dispatch of moe.py to XLA's SPMD
partitioner ("compiler"). Every device holds its own tokens (the batch is split over data x
fsdp x expert) and E/ep consecutive experts (as `sharding.py` stores them). Per MoE layer:
  1. route locally: a device sorts its (token, k) slots by the device holding their expert,
     then by expert;
  2. dispatch: an all-to-all over the expert axis sends each slot's token row to that device;
  3. compute: each device runs its E/ep experts on the rows it received with the single-device
     kernel (`moe.expert_outputs`: ragged_dot on GPU/TPU, gmm.py's tiled loop on CPU); where the
     experts' hidden width is split over `tensor`, the partial outputs are summed over it;
  4. combine: the reverse all-to-all brings every output back to its slot.
Expert weights are gathered over `fsdp` on the way in (FSDP). Gradients flow through all of it:
the transpose of an all-to-all is the reverse all-to-all, and shard_map's replication typing
sums the weight gradients over the data axes.

Exchange ("auto": "fixed" on CPU, "ragged" elsewhere):
  "ragged"  `jax.lax.ragged_all_to_all`: only the real rows travel (GPU/TPU).
  "fixed"   `jax.lax.all_to_all` of a fixed-capacity buffer, C rows for each peer (XLA:CPU
            implements no ragged all-to-all).

No token is ever dropped, so the buffers have worst-case sizes: the n = t*K slots of a device
(t local tokens) may all pick experts of one peer (C = n), and a device may receive all the
slots of its ep peers (ep*n rows). Transient memory per device and MoE layer, in rows of D:
  fixed:  send, receive, expert-output and return buffers of ep*n rows each (4 ep n), plus the
          local kernel's buffers over ep*n rows (tiled: its [rows, 2F] gate/up residuals);
  ragged: sorted slots n, receive and expert output ep*n each, return n (2 (ep+1) n), plus
          ragged_dot's [ep*n, F] intermediates;
i.e. about ep times the n x D slot rows of the unsharded layer (remat frees them per layer).
Unused buffer rows carry the id "no expert" of `moe.expert_outputs`: the tiled kernel spends no
matmul on them; whether ragged_dot skips them depends on the backend's kernel. The fixed
exchange does move the padding between devices.

DES-MoE is unaffected: routing, statistics and gradient isolation happen in `moe.block.MoEBlock` around
this call. The copy bank of duplicated experts (C per layer) is split over the expert axis like
the routed experts, C/ep per device, so C (`dges.max_copies`) must be a multiple of ep.

The mesh is the one in context (`with jax.set_mesh(mesh):`, as the trainer runs); the axes come
from `sharding.py`'s logical rules ("batch", "experts", "expert_mlp"). The tokens of a call
(batch x seq) must split evenly over the batch axes that include the expert axis.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.experimental import layout
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from desmoe_jax import sharding

EXCHANGES = ("auto", "fixed", "ragged")


def resolve_exchange(exchange: str) -> str:
  if exchange == "auto":
    return "fixed" if jax.default_backend() == "cpu" else "ragged"
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange={exchange!r}: expected one of {EXCHANGES}")
  return exchange


def _axes(entry) -> tuple[str, ...]:
  """One PartitionSpec entry as a tuple of mesh axis names."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def expert_outputs(local, x_td, ids_tk, gate_edf, up_edf, down_efd, *, num_experts: int,
                   exchange: str = "auto"):
  """y[t, k] = FFN_{ids[t,k]}(x[t]), [T, K, D], the experts sharded over the mesh's expert axis.

  local(x_rd, ids_rk, gate, up, down) -> [R, K, D] is the single-device dispatch run on each
  device's experts (`moe.expert_outputs` with its impl). Experts [0, num_experts) are the routed
  experts; any beyond are DES-MoE's copy bank (`specialization.ExpertCopies.dispatch` appends
  it), split over the expert axis in blocks of their own so that no routed expert moves.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError("model.expert_parallel='shard_map' needs the device mesh in context: call "
                     "the model inside `with jax.set_mesh(mesh):` (the trainer does)")
  exchange = resolve_exchange(exchange)
  t, d = x_td.shape
  e_all, _, f = gate_edf.shape
  ep_entry, _, tp_entry = sharding.logical_to_spec(("experts", None, "expert_mlp"),
                                                   (num_experts, d, f), mesh)
  tok_entry = sharding.logical_to_spec(("batch", None), x_td.shape, mesh)[0]
  ep = math.prod(mesh.shape[a] for a in _axes(ep_entry))
  if not set(_axes(ep_entry)) <= set(_axes(tok_entry)):
    raise ValueError(
        f"model.expert_parallel='shard_map': the {t} tokens (batch x seq) of this MoE call do not "
        f"split over the expert mesh axis {ep_entry} (size {ep}) with the other 'batch' axes; "
        f"make batch x seq divisible by the product of the batch axes of mesh {dict(mesh.shape)}")
  n_copies = e_all - num_experts
  if n_copies % ep:
    raise ValueError(
        f"model.expert_parallel='shard_map': the expert copy bank holds {n_copies} experts per "
        f"layer, not divisible by the {ep} devices of the expert mesh axis {ep_entry}; set "
        f"dges.max_copies to a multiple of {ep}")

  # The weights stay laid out as stored (split over fsdp) up to this call, so that each layer
  # gathers its own experts here, not the partitioner propagating the shard_map's replicated
  # in_specs back through the layer scan to a gather of every layer's weights before it. (The
  # whole-stack [26, 64, 2048, 1408] buffers the TPU plan of V2-Lite's warm-up once showed were
  # the frozen experts' zero gradients, optim.zeros_like_params; this constraint alone did
  # not change that plan.)
  gate_edf, up_edf = (sharding.constrain(w, ("experts", "embed", "expert_mlp"))
                      for w in (gate_edf, up_edf))
  down_efd = sharding.constrain(down_efd, ("experts", "expert_mlp", "embed"))
  gate_edf, up_edf, down_efd = (_row_major(w) for w in (gate_edf, up_edf, down_efd))
  dt = x_td.dtype
  experts = tuple(w[:num_experts].astype(dt) for w in (gate_edf, up_edf, down_efd))
  copies = tuple(w[num_experts:].astype(dt) for w in (gate_edf, up_edf, down_efd)) \
      if n_copies else ()
  w_specs = (P(ep_entry, None, tp_entry), P(ep_entry, None, tp_entry), P(ep_entry, tp_entry, None))
  per_device = functools.partial(_per_device, local, num_experts, ep, ep_entry, tp_entry,
                                 _axes(tok_entry), exchange)
  return jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(tok_entry, None), P(tok_entry, None), w_specs, w_specs if copies else ()),
      out_specs=P(tok_entry, None, None))(x_td, ids_tk, experts, copies)


def _row_major(w):
  """w, pinned to the row-major layout at this point of the program. The backward's grouped
  matmul reads each layer's gathered weights transposed ([E, F, D] in memory); without a pin,
  the TPU compiler's layout assignment carries that wish back through the all-gather and the
  layer scan's slice to the stacked parameter, and copies every layer's weights to the
  transposed layout before the step (3 x 1.12 GiB per v5e chip for V2-Lite, docs/SCALING.md).
  Pinned, the transpose is of one layer's weights, inside the layer."""
  return layout.with_layout_constraint(w, layout.Layout(tuple(range(w.ndim))))


def _per_device(local, num_experts, ep, ep_axis, tp_axis, tok_axes, exchange, x_td, ids_tk,
                experts, copies):
  """One device: its t tokens [t, D], their ids [t, K], its E/ep experts and C/ep copies."""
  t, k = ids_tk.shape
  e_loc = experts[0].shape[0]
  c_loc = copies[0].shape[0] if copies else 0
  el = e_loc + c_loc
  weights = tuple(jnp.concatenate(w) for w in zip(experts, copies)) if copies else experts
  # The local kernel (a custom VJP on CPU) gets token rows and weights that vary over the same
  # mesh axes; the transposes of these casts sum the weight gradients over the token axes and
  # the token-row gradients over the tensor axis.
  w_axes = set(_axes(ep_axis)) | set(_axes(tp_axis))
  to_weights = tuple(a for a in tok_axes if a not in w_axes)
  to_rows = tuple(a for a in _axes(tp_axis) if a not in tok_axes)
  if to_weights:
    weights = tuple(jax.lax.pcast(w, to_weights, to="varying") for w in weights)
  # Device-major ids: device p holds experts [p*el, (p+1)*el), its routed experts then its copies.
  ids = ids_tk.reshape(-1)
  gid = (ids // e_loc) * el + ids % e_loc
  if c_loc:
    copy = ids - num_experts
    gid = jnp.where(copy < 0, gid, (copy // c_loc) * el + e_loc + copy % c_loc)

  def run(x_rd, ids_rk):  # the local experts; partial sums over the hidden width are added
    if to_rows:
      x_rd = jax.lax.pcast(x_rd, to_rows, to="varying")
    y = local(x_rd, ids_rk, *weights)
    return jax.lax.psum(y, tp_axis) if tp_axis is not None else y

  if ep == 1:
    return run(x_td, gid.reshape(t, k))
  exchange_fn = _fixed_exchange if exchange == "fixed" else _ragged_exchange
  y_nd = exchange_fn(x_td, gid, k, ep, el, ep_axis,
                     lambda x_rd, ids_r: run(x_rd, ids_r[:, None])[:, 0])
  return y_nd.reshape(t, k, -1)


def _route(gid_n, ep: int, el: int):
  """Slot counts per (device, local expert) [ep, el]; each slot's position in the slots sorted
  by device-major id [n]; slots per device [ep] and where each device's run starts [ep]."""
  n = gid_n.shape[0]
  counts_pl = jnp.bincount(gid_n, length=ep * el).astype(jnp.int32).reshape(ep, el)
  order = jnp.argsort(gid_n, stable=True)
  rank_n = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  sent_p = counts_pl.sum(axis=1)
  return counts_pl, order, rank_n, sent_p, jnp.cumsum(sent_p) - sent_p


def _fixed_exchange(x_td, gid_n, k, ep, el, axis, run):
  """Dense all-to-all of [ep * C, D] buffers, C = n rows for each peer (the worst case)."""
  n, d = gid_n.shape[0], x_td.shape[1]
  counts_pl, _, rank_n, _, start_p = _route(gid_n, ep, el)
  cap = n
  dest_n = gid_n // el
  row_n = dest_n * cap + rank_n - start_p[dest_n]      # each slot's row in the send buffer
  send = jnp.zeros((ep * cap, d), x_td.dtype).at[row_n].set(
      jnp.repeat(x_td, k, axis=0), unique_indices=True)
  recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)           # block q: from device q
  recv_ql = jax.lax.all_to_all(counts_pl, axis, 0, 0, tiled=True)   # [ep (source), el]
  # Block q holds recv_ql[q].sum() rows sorted by local expert, then padding, whose id el
  # (one past the local experts) means "no expert".
  ids_qc = jax.vmap(lambda c: jnp.searchsorted(jnp.cumsum(c), jnp.arange(cap), side="right"))(
      recv_ql)
  y_rd = run(recv, ids_qc.reshape(-1))
  back = jax.lax.all_to_all(y_rd, axis, 0, 0, tiled=True)
  return back[row_n]


def _ragged_exchange(x_td, gid_n, k, ep, el, axis, run):
  """`ragged_all_to_all` of the sorted slots; a receive buffer of ep * n rows (the worst case)."""
  n, d = gid_n.shape[0], x_td.shape[1]
  counts_pl, order, rank_n, sent_p, start_p = _route(gid_n, ep, el)
  xs_nd = x_td[order // k]                                  # slots sorted by device, expert
  sent_qp = jax.lax.all_gather(sent_p, axis)               # [ep, ep]: rows device q sends p
  at_qp = jnp.cumsum(sent_qp, axis=0) - sent_qp           # where q's rows start in p's buffer
  me = jax.lax.axis_index(axis)
  # Output buffers typed like the rows (varying over the token axes): the result takes their type.
  recv = jax.lax.ragged_all_to_all(xs_nd, jnp.zeros_like(xs_nd, shape=(ep * n, d)), start_p,
                                   sent_p, at_qp[me], sent_qp[:, me], axis_name=axis)
  # Rows by (source, local expert) without gaps, then unused rows: id el = "no expert".
  recv_ql = jax.lax.all_to_all(counts_pl, axis, 0, 0, tiled=True)
  group = jnp.searchsorted(jnp.cumsum(recv_ql.reshape(-1)), jnp.arange(ep * n), side="right")
  y_rd = run(recv, jnp.where(group < ep * el, group % el, el))
  # Back: each sender's rows to where they came from in its sorted slots.
  home_qp = jnp.cumsum(sent_qp, axis=1) - sent_qp          # q's start_p[p]
  ys_nd = jax.lax.ragged_all_to_all(y_rd, jnp.zeros_like(y_rd, shape=(n, d)), at_qp[:, me],
                                    sent_qp[:, me], home_qp[:, me], sent_p, axis_name=axis)
  return ys_nd[rank_n]
