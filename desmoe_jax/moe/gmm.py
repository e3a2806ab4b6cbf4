"""Grouped expert FFN for backends without a fast grouped matmul (XLA:CPU).

`jax.lax.ragged_dot` is the right primitive on GPU/TPU, but XLA:CPU lowers it to a dense dot
over every expert, E times the work. Here the (token, k) slots are sorted by expert and each
expert's group is cut into row tiles; a loop runs the whole SwiGLU FFN of one tile (its matmuls
and the activation) while the tile is in cache. No token is ever dropped and no mask is needed:
padding rows read zeros and write nowhere, so they add nothing to any output or gradient.

Why it is built this way (measured on 2 Zen4 cores, T=2048, d=256, F=512, 16 experts, top-2,
forward+backward of the routed experts; see bench/RESULTS.md):
  * Tiles of several sizes. Each expert's group is padded only to a multiple of `min_tile`
    (32) rows and cut into tiles of `max_tile` rows plus at most one tile of each smaller power
    of two (e.g. 300 rows -> 320 = 2*128 + 64). Padding every group to a multiple of one
    128-row tile wastes ~25% of the matmul work, and small tiles everywhere run the matmuls
    slower (64-row tiles ~20% slower than 256-row ones); the bucketed layout keeps big tiles
    and pads < 32 rows per expert (73 ms, against 84 ms with 64-row and 91 ms with 128-row
    tiles in the same loop).
  * Experts outer, tiles inner: a `scan` over experts and, inside it, loops over that expert's
    tiles. A dynamic slice of a weight is a copy on XLA:CPU, so this slices each expert's weights
    once instead of once per tile, and the expert's weight gradients are summed in the inner
    loop's carry and written once per expert (no read-modify-write of an [E, ...] buffer per
    tile).
  * Gather and scatter inside the loop: a tile gathers its token rows from x and its output
    cotangent rows from dy, and scatters its outputs (and dx) straight to the slot (token) rows.
    There is no padded copy of x, y or dy: XLA:CPU page-faults its temporary buffers afresh on
    every call (~2 us per 4 KiB page on the benchmark VM), so big intermediates cost more than
    the arithmetic on them.
  * Gate and up projections fused into one [D, 2F] matmul per tile, and the backward's dx as
    one [2F]-deep contraction; the forward saves the [R, 2F] gate/up pre-activations for the
    backward (recomputing them there was ~6% slower).
  * Weight gradients as `x_tile.T @ dgu`: XLA:CPU runs these transposed-LHS dots well.
Tried without gain: transposed weight copies for the `a @ w.T` matmuls, splitting F in the
backward, a separate pass for the weight gradients, other tile sizes (256 is ~2% faster).
A custom VJP is needed anyway: a loop with a data-dependent trip count cannot be
reverse-differentiated.

Cost: the matmuls of the real rows plus < `min_tile` padding rows per expert.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def tile_sizes(max_tile: int, min_tile: int) -> tuple[int, ...]:
  """(max_tile, max_tile/2, ...) while the halves stay whole and >= min_tile; the last size is
  the padding unit of `tile_layout`."""
  sizes = [max_tile]
  while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= min(min_tile, max_tile):
    sizes.append(sizes[-1] // 2)
  return tuple(sizes)


def tile_layout(ids_tk, num_experts: int, min_tile: int):
  """Where every (token, k) slot goes in the expert-sorted row buffer.

  Expert e's slots occupy rows [start_e, start_e + padded_e) of a buffer of R rows, padded_e
  being its slot count rounded up to a multiple of `min_tile`; the rows after its slots are
  padding. R = ceil(n / min_tile) * min_tile + E * min_tile bounds the buffer for any routing
  (n = T*K slots). Slots with id E (no expert) hold no row. Returns
    row_slot [R]  slot (t*K + k) held by each row; padding rows hold n + row (out of range,
                  distinct and increasing along the buffer, so reads give 0, writes drop)
    start [E], padded [E]
  """
  t, k = ids_tk.shape
  n = t * k
  flat = ids_tk.reshape(-1)
  count = jnp.bincount(flat, length=num_experts).astype(jnp.int32)     # [E]
  padded = (count + min_tile - 1) // min_tile * min_tile                 # [E]
  start = jnp.cumsum(padded) - padded                                    # [E]
  rows = -(-n // min_tile) * min_tile + num_experts * min_tile
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)              # slots by expert
  expert = flat[order]
  rank = jnp.arange(n, dtype=jnp.int32) - (jnp.cumsum(count) - count)[expert]
  # Slots of id E (no expert; sorted last) get no row: their outputs stay 0.
  row = jnp.where(expert < num_experts, start[expert] + rank, rows)     # row of order[i]
  row_slot = (n + jnp.arange(rows, dtype=jnp.int32)).at[row].set(order, mode="drop")
  return row_slot, start, padded


def tile_plan(padded, sizes: tuple[int, ...]):
  """How `padded` rows (a multiple of sizes[-1]) are cut: [(count, first_row_offset)] per size.

  `padded // sizes[0]` tiles of the largest size, then 0 or 1 tile of each smaller size
  (sizes halve, so the remainder's binary digits say which).
  """
  plan, offset, rest = [], 0, padded
  for j, size in enumerate(sizes):
    count = rest // size if j == 0 else (rest // size) % 2
    plan.append((count, offset))
    offset, rest = offset + count * size, rest - count * size
  return plan


def _for_each_tile(carry, start, padded, sizes, fn):
  """carry = fn(carry, first_row, size) for every tile of the rows [start, start + padded)."""
  for (count, offset), size in zip(tile_plan(padded, sizes), sizes):
    carry = jax.lax.fori_loop(
        0, count, lambda i, c, o=start + offset, s=size: fn(c, o + i * s, s), carry)
  return carry


def _as_bits(a):
  """Buffers written a tile at a time hold 16-bit floats as uint16 bits: XLA:CPU updates a
  slice of (or scatters into) a bfloat16 buffer by converting all of it to float32 and back."""
  return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype.itemsize == 2 else a


def _from_bits(a, dtype):
  return jax.lax.bitcast_convert_type(a, dtype) if a.dtype == jnp.uint16 else a


def _zeros(shape, dtype, *like):
  """Zeros for a loop carry that varies over the same manual mesh axes as the arrays `like`:
  inside `jax.shard_map` (expert_parallel.py) a carry must keep one type through the loop, and
  `zeros_like` carries that type (outside shard_map these are plain zeros)."""
  zeros = jnp.zeros(shape, dtype)
  for a in like:
    zeros = zeros + jnp.zeros_like(a, dtype=dtype, shape=())
  return zeros


def _rows(a, idx):
  """a[idx] for sorted idx; out-of-range idx (padding) read zeros."""
  return a.at[idx].get(mode="fill", fill_value=0, indices_are_sorted=True)


def _forward(x_td, gate, up, down, row_slot, start, padded, k, sizes):
  """Returns y_nd [T*K, D] (slot rows) and gu_rf [R, 2F], the gate|up pre-activations of each
  row (as uint16 bits for 16-bit dtypes, see `_as_bits`)."""
  f = gate.shape[-1]
  n, d = x_td.shape[0] * k, x_td.shape[1]

  def expert(carry, xs):
    gate_df, up_df, down_fd, start_e, padded_e = xs
    gate_up = jnp.concatenate([gate_df, up_df], axis=1)                   # [D, 2F]

    def tile(c, r0, size):
      y_nd, gu_rf = c
      slots = jax.lax.dynamic_slice_in_dim(row_slot, r0, size)           # [s]
      xt = _rows(x_td, slots // k)                                        # [s, D]
      gu = xt @ gate_up                                                   # [s, 2F]
      h = jax.nn.silu(gu[:, :f]) * gu[:, f:]                              # [s, F]
      y_nd = y_nd.at[slots].set(_as_bits(h @ down_fd), mode="drop", unique_indices=True,
                                indices_are_sorted=True)
      return y_nd, jax.lax.dynamic_update_slice_in_dim(gu_rf, _as_bits(gu), r0, 0)

    return _for_each_tile(carry, start_e, padded_e, sizes, tile), None

  like = (x_td, gate, up, down, row_slot)
  init = (_as_bits(_zeros((n, d), x_td.dtype, *like)),
          _as_bits(_zeros((row_slot.shape[0], 2 * f), x_td.dtype, *like)))
  (y_nd, gu_rf), _ = jax.lax.scan(expert, init, (gate, up, down, start, padded))
  return _from_bits(y_nd, x_td.dtype), gu_rf


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _grouped_ffn_slots(x_td, gate, up, down, row_slot, start, padded, k, sizes):
  """y[t*K + j] = FFN_{e(t, j)}(x[t]) for every slot, [T*K, D]."""
  return _forward(x_td, gate, up, down, row_slot, start, padded, k, sizes)[0]


def _fwd(x_td, gate, up, down, row_slot, start, padded, k, sizes):
  y_nd, gu_rf = _forward(x_td, gate, up, down, row_slot, start, padded, k, sizes)
  return y_nd, (x_td, gate, up, down, row_slot, start, padded, gu_rf)


def _bwd(k, sizes, res, dy_nd):
  x_td, gate, up, down, row_slot, start, padded, gu_rf = res
  _, d, f = gate.shape
  acc = jnp.promote_types(x_td.dtype, jnp.float32)   # weight gradients are summed in float32
  like = (x_td, gate, up, down, row_slot, dy_nd)

  def expert(dx_td, xs):
    gate_df, up_df, down_fd, start_e, padded_e = xs
    gate_up = jnp.concatenate([gate_df, up_df], axis=1)                   # [D, 2F]

    def tile(c, r0, size):
      dx_td, dgate_up, ddown = c
      slots = jax.lax.dynamic_slice_in_dim(row_slot, r0, size)           # [s]
      tokens = slots // k
      xt = _rows(x_td, tokens)                                            # [s, D]
      dyt = _rows(dy_nd, slots)                                           # [s, D]
      gu = _from_bits(jax.lax.dynamic_slice_in_dim(gu_rf, r0, size), x_td.dtype)  # [s, 2F]
      g, u = gu[:, :f], gu[:, f:]
      sig = jax.nn.sigmoid(g)
      silu = g * sig
      da = dyt @ down_fd.T                                                # [s, F]
      dgu = jnp.concatenate([da * u * sig * (1 + g * (1 - sig)), da * silu], axis=1)  # [s, 2F]
      dgate_up = dgate_up + jnp.dot(xt.T, dgu, preferred_element_type=acc)          # [D, 2F]
      ddown = ddown + jnp.dot((silu * u).T, dyt, preferred_element_type=acc)        # [F, D]
      dx_td = dx_td.at[tokens].add((dgu @ gate_up.T).astype(dx_td.dtype), mode="drop",
                                   indices_are_sorted=True)
      return dx_td, dgate_up, ddown

    init = (dx_td, _zeros((d, 2 * f), acc, *like), _zeros((f, d), acc, *like))
    dx_td, dgate_up, ddown = _for_each_tile(init, start_e, padded_e, sizes, tile)
    dt = gate_df.dtype
    return dx_td, (dgate_up[:, :f].astype(dt), dgate_up[:, f:].astype(dt), ddown.astype(dt))

  dx_td, (dgate, dup, ddown) = jax.lax.scan(
      expert, _zeros(x_td.shape, acc, *like), (gate, up, down, start, padded))
  return dx_td.astype(x_td.dtype), dgate, dup, ddown, None, None, None


_grouped_ffn_slots.defvjp(_fwd, _bwd)


def grouped_ffn(x_td, ids_tk, gate_edf, up_edf, down_efd, *, max_tile: int = 128,
                min_tile: int = 32):
  """Per-slot expert outputs y[t, k] = FFN_{ids[t, k]}(x[t]), [T, K, D].

  SwiGLU experts: FFN_e(x) = (silu(x @ gate[e]) * (x @ up[e])) @ down[e], with gate/up
  [E, D, F] and down [E, F, D]. Differentiable in x and the three weights (ids_tk is not).
  An id equal to E selects no expert: the slot's output is 0 and costs no matmul.
  Tiles have at most `max_tile` rows; each expert's group is padded to a multiple of
  `min_tile` rows, lowered (to 8 at least) when experts get few slots on average.
  """
  t, k = ids_tk.shape
  dt = x_td.dtype
  # Small groups (few slots per expert) get smaller padding: down to 8 rows.
  avg_rows = t * k // gate_edf.shape[0]
  min_tile = min(min_tile, max_tile, max(8, 1 << max(0, (avg_rows // 4 - 1).bit_length())))
  sizes = tile_sizes(max_tile, min_tile)
  row_slot, start, padded = tile_layout(ids_tk, gate_edf.shape[0], sizes[-1])
  # Tiles no longer than the row buffer (a dynamic slice must fit even where it never runs).
  sizes = tuple(s for s in sizes if s <= row_slot.shape[0])
  y_nd = _grouped_ffn_slots(x_td, gate_edf.astype(dt), up_edf.astype(dt), down_efd.astype(dt),
                            row_slot, start, padded, k, sizes)
  return y_nd.reshape(t, k, -1)
