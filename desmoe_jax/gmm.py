"""Grouped expert FFN for backends without a fast grouped matmul (XLA:CPU).

`jax.lax.ragged_dot` is the right primitive on GPU/TPU, but XLA:CPU lowers it to a dense dot
over every expert, E times the work. Here the (token, k) slots are sorted by expert and each
expert's group is cut into row tiles; a loop runs the whole SwiGLU FFN of one tile (its matmuls
and the activation) while the tile is in cache. No token is ever dropped and no mask is needed:
padding rows read zeros and write nowhere, so they add nothing to any output or gradient.

Why it is built this way (measured on 2 Zen4 cores, T=2048, d=256, F=512, 16 experts, top-2;
see bench/RESULTS.md):
  * Tiles of several sizes. Each expert's group is padded only to a multiple of `min_tile`
    (32) rows and cut into tiles of `max_tile` rows plus at most one tile of each smaller power
    of two (e.g. 300 rows -> 320 = 2*128 + 64). Padding every group to a multiple of one big
    tile wasted ~25% of the matmul work at 128 rows; tiles of 32 rows everywhere run the matmuls
    at half speed. The bucketed layout keeps big tiles and ~3% padding.
  * Experts outer, tiles inner: a `scan` over experts and, inside it, loops over that expert's
    tiles. A dynamic slice of a weight is a copy on XLA:CPU, so this slices each expert's weights
    once instead of once per tile, and the expert's weight gradients are summed in the inner
    loop's carry and written once per expert (no read-modify-write of a [E, ...] buffer per tile).
  * Gather and scatter inside the loop: a tile gathers its token rows from x and its output
    cotangent rows from dy, and scatters its outputs (and dx) straight to the slot (token) rows.
    There is no padded copy of x, y or dy: big temporary buffers cost more than the arithmetic
    here (fresh allocations are page-faulted on every call).
  * Gate and up projections fused into one [D, 2F] matmul per tile, and the backward's dx as
    one [2F] contraction; the forward saves the [R, 2F] gate/up pre-activations for the
    backward rather than recomputing them (two fewer matmuls per tile).
  * Weight gradients as `x_tile.T @ dgu`: XLA:CPU runs these transposed-LHS dots well.
A custom VJP is needed anyway: a loop with a data-dependent trip count cannot be
reverse-differentiated.

Cost: the matmuls of the real rows plus < `min_tile` padding rows per expert.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def tile_sizes(max_tile: int, min_tile: int) -> tuple[int, ...]:
  """(max_tile, max_tile/2, ...) down to the last size >= min_tile."""
  sizes = [max_tile]
  while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= min(min_tile, max_tile):
    sizes.append(sizes[-1] // 2)
  return tuple(sizes)


def tile_layout(ids_tk, num_experts: int, sizes: tuple[int, ...]):
  """Where every (token, k) slot goes, and the tiles of each expert.

  Expert e's slots occupy rows [start_e, start_e + m_e) of a buffer of R rows, m_e being its
  slot count rounded up to a multiple of the smallest size; those rows are cut into
  `counts[e, 0]` tiles of `sizes[0]` rows, then `counts[e, j]` (0 or 1) tiles of `sizes[j]`.
  Returns
    row_slot [R]   slot (t*K + k) held by each row; padding rows hold n + row (>= n = T*K,
                   so that they are out of range, distinct and increasing along the buffer)
    counts [E, S]  number of tiles of each size
    offsets [E, S] first row of the first tile of each size
  R = ceil(n / min) * min + E * min bounds the buffer for any routing.
  """
  t, k = ids_tk.shape
  n = t * k
  small = sizes[-1]
  flat = ids_tk.reshape(-1)
  count = jnp.bincount(flat, length=num_experts).astype(jnp.int32)     # [E]
  padded = (count + small - 1) // small * small                          # [E]
  start = jnp.cumsum(padded) - padded                                    # [E]
  rows = -(-n // small) * small + num_experts * small
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)              # slots by expert
  rank = jnp.arange(n, dtype=jnp.int32) - (jnp.cumsum(count) - count)[flat[order]]
  row = start[flat[order]] + rank                                        # row of order[i]
  row_slot = (n + jnp.arange(rows, dtype=jnp.int32)).at[row].set(order)
  counts, offsets = [], []
  offset, rest = start, padded
  for size in sizes:
    c = rest // size if size == sizes[0] else (rest // size) % 2
    counts.append(c)
    offsets.append(offset)
    offset, rest = offset + c * size, rest - c * size
  return row_slot, jnp.stack(counts, 1), jnp.stack(offsets, 1)


def _for_each_tile(carry, counts_s, offsets_s, sizes, fn):
  """carry = fn(carry, first_row, size) for every tile of one expert, in row order."""
  for j, size in enumerate(sizes):
    carry = jax.lax.fori_loop(
        0, counts_s[j], lambda i, c, j=j, size=size: fn(c, offsets_s[j] + i * size, size), carry)
  return carry


def _rows(a, idx):
  """a[idx] for sorted idx; out-of-range idx (padding) read zeros."""
  return a.at[idx].get(mode="fill", fill_value=0, indices_are_sorted=True)


def _forward(x_td, gate, up, down, row_slot, counts, offsets, k, sizes):
  """Returns y_nd [T*K, D] (slot rows) and gu_rd [R, 2F] (gate|up pre-activations per row)."""
  f = gate.shape[-1]
  n, d = x_td.shape[0] * k, x_td.shape[1]

  def expert(carry, xs):
    gate_df, up_df, down_fd, counts_s, offsets_s = xs
    gate_up = jnp.concatenate([gate_df, up_df], axis=1)                   # [D, 2F]

    def tile(c, r0, size):
      y_nd, gu_rf = c
      slots = jax.lax.dynamic_slice_in_dim(row_slot, r0, size)           # [s]
      xt = _rows(x_td, slots // k)                                        # [s, D]
      gu = xt @ gate_up                                                   # [s, 2F]
      h = jax.nn.silu(gu[:, :f]) * gu[:, f:]                              # [s, F]
      y_nd = y_nd.at[slots].set(h @ down_fd, mode="drop", unique_indices=True,
                                indices_are_sorted=True)
      return y_nd, jax.lax.dynamic_update_slice_in_dim(gu_rf, gu, r0, 0)

    return _for_each_tile(carry, counts_s, offsets_s, sizes, tile), None

  init = (jnp.zeros((n, d), x_td.dtype), jnp.zeros((row_slot.shape[0], 2 * f), x_td.dtype))
  (y_nd, gu_rf), _ = jax.lax.scan(expert, init, (gate, up, down, counts, offsets))
  return y_nd, gu_rf


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _grouped_ffn_slots(x_td, gate, up, down, row_slot, counts, offsets, k, sizes):
  """y[t*K + j] = FFN_{e(t, j)}(x[t]) for every slot, [T*K, D]."""
  return _forward(x_td, gate, up, down, row_slot, counts, offsets, k, sizes)[0]


def _fwd(x_td, gate, up, down, row_slot, counts, offsets, k, sizes):
  y_nd, gu_rf = _forward(x_td, gate, up, down, row_slot, counts, offsets, k, sizes)
  return y_nd, (x_td, gate, up, down, row_slot, counts, offsets, gu_rf)


def _bwd(k, sizes, res, dy_nd):
  x_td, gate, up, down, row_slot, counts, offsets, gu_rf = res
  _, d, f = gate.shape
  acc = jnp.promote_types(x_td.dtype, jnp.float32)   # weight gradients are summed in float32

  def expert(dx_td, xs):
    gate_df, up_df, down_fd, counts_s, offsets_s = xs
    # Transposed copies of this expert's weights, so that the tile matmuls below are in the
    # standard [M, K] @ [K, N] form (XLA:CPU runs `a @ w.T` with w [N, K] at half the speed);
    # the barrier keeps XLA from folding the transposes back into the dots.
    gate_up_t, down_t = jax.lax.optimization_barrier(
        (jnp.concatenate([gate_df, up_df], axis=1).T, down_fd.T))        # [2F, D], [D, F]

    def tile(c, r0, size):
      dx_td, dgate_up, ddown = c
      slots = jax.lax.dynamic_slice_in_dim(row_slot, r0, size)           # [s]
      tokens = slots // k
      xt = _rows(x_td, tokens)                                            # [s, D]
      dyt = _rows(dy_nd, slots)                                           # [s, D]
      gu = jax.lax.dynamic_slice_in_dim(gu_rf, r0, size)                  # [s, 2F]
      g, u = gu[:, :f], gu[:, f:]
      sig = jax.nn.sigmoid(g)
      silu = g * sig
      da = dyt @ down_t                                                    # [s, F]
      dgu = jnp.concatenate([da * u * sig * (1 + g * (1 - sig)), da * silu], axis=1)  # [s, 2F]
      dgate_up = dgate_up + jnp.dot(xt.T, dgu, preferred_element_type=acc)          # [D, 2F]
      ddown = ddown + jnp.dot((silu * u).T, dyt, preferred_element_type=acc)        # [F, D]
      dx_td = dx_td.at[tokens].add((dgu @ gate_up_t).astype(dx_td.dtype), mode="drop",
                                   indices_are_sorted=True)
      return dx_td, dgate_up, ddown

    init = (dx_td, jnp.zeros((d, 2 * f), acc), jnp.zeros((f, d), acc))
    dx_td, dgate_up, ddown = _for_each_tile(init, counts_s, offsets_s, sizes, tile)
    dt = gate_df.dtype
    return dx_td, (dgate_up[:, :f].astype(dt), dgate_up[:, f:].astype(dt), ddown.astype(dt))

  dx_td, (dgate, dup, ddown) = jax.lax.scan(
      expert, jnp.zeros(x_td.shape, acc), (gate, up, down, counts, offsets))
  return dx_td.astype(x_td.dtype), dgate, dup, ddown, None, None, None


_grouped_ffn_slots.defvjp(_fwd, _bwd)


def grouped_ffn(x_td, ids_tk, gate_edf, up_edf, down_efd, *, max_tile: int = 128,
                min_tile: int = 32):
  """Per-slot expert outputs y[t, k] = FFN_{ids[t, k]}(x[t]), [T, K, D].

  SwiGLU experts: FFN_e(x) = (silu(x @ gate[e]) * (x @ up[e])) @ down[e], with gate/up
  [E, D, F] and down [E, F, D]. Differentiable in x and the three weights.
  """
  t, k = ids_tk.shape
  dt = x_td.dtype
  sizes = tile_sizes(max_tile, min_tile)
  row_slot, counts, offsets = tile_layout(ids_tk, gate_edf.shape[0], sizes)
  y_nd = _grouped_ffn_slots(x_td, gate_edf.astype(dt), up_edf.astype(dt), down_efd.astype(dt),
                            row_slot, counts, offsets, k, sizes)
  return y_nd.reshape(t, k, -1)
