"""Grouped expert FFN for backends without a fast grouped matmul (XLA:CPU).

`jax.lax.ragged_dot` is the right primitive on GPU/TPU, but XLA:CPU lowers it to a dense dot
over every expert, E times the work. Here tokens are sorted by expert into a buffer where every
expert's group is padded to a multiple of `tile` rows, so each tile belongs to exactly one expert;
a `fori_loop` over the used tiles runs the whole SwiGLU FFN of a tile (two matmuls and the
activation) while it is in cache. Padding rows are zero, so they contribute nothing to any
gradient, and the backward pass (a custom VJP, because a loop with a data-dependent trip count
cannot be reverse-differentiated) needs no masks.

Cost: the real rows plus on average `tile/2` padding rows per expert; no token is ever dropped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def choose_tile(num_slots: int, num_experts: int, max_tile: int) -> int:
  """Tile rows: at most `max_tile`, and not much more than an average expert's group."""
  avg = max(1, -(-num_slots // num_experts))
  tile = 8
  while tile < avg and tile < max_tile:
    tile *= 2
  return min(tile, max_tile)


def tile_layout(ids_tk, num_experts: int, tile: int):
  """Where each (token, k) slot goes in the padded expert-sorted buffer.

  Returns src [R] (token feeding each padded row; T = padding, a zero row), dest [T*K]
  (padded row of each slot), tile_expert [R/tile] and the number of used tiles.
  R = (ceil(T*K/tile) + E) * tile bounds the padded size for any routing.
  """
  t, k = ids_tk.shape
  n = t * k
  flat = ids_tk.reshape(-1)
  num_tiles = -(-n // tile) + num_experts
  sizes = jnp.bincount(flat, length=num_experts)                        # [E]
  padded = (sizes + tile - 1) // tile * tile
  padded_start = jnp.cumsum(padded) - padded
  order = jnp.argsort(flat, stable=True)                                 # slots by expert
  rank_sorted = jnp.arange(n) - (jnp.cumsum(sizes) - sizes)[flat[order]]
  rank = jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
  dest = (padded_start[flat] + rank).astype(jnp.int32)
  src = jnp.full((num_tiles * tile,), t, jnp.int32).at[dest].set(
      (jnp.arange(n) // k).astype(jnp.int32))
  tiles_end = jnp.cumsum(padded // tile)
  tile_expert = jnp.searchsorted(tiles_end, jnp.arange(num_tiles), side="right")
  tile_expert = jnp.minimum(tile_expert, num_experts - 1).astype(jnp.int32)
  return src, dest, tile_expert, tiles_end[-1].astype(jnp.int32)


def _slice(a, i, tile):
  return jax.lax.dynamic_slice_in_dim(a, i * tile, tile)


def _put(buf, value, i, tile):
  return jax.lax.dynamic_update_slice_in_dim(buf, value.astype(buf.dtype), i * tile, 0)


def _forward(xp, gate, up, down, tile_expert, n_tiles, tile):
  def body(i, carry):
    y, g_buf, u_buf = carry
    e = tile_expert[i]
    xt = _slice(xp, i, tile)
    g = xt @ gate[e]
    u = xt @ up[e]
    y = _put(y, (jax.nn.silu(g) * u) @ down[e], i, tile)
    return y, _put(g_buf, g, i, tile), _put(u_buf, u, i, tile)

  rows, f = xp.shape[0], gate.shape[-1]
  init = (jnp.zeros_like(xp), jnp.zeros((rows, f), xp.dtype), jnp.zeros((rows, f), xp.dtype))
  return jax.lax.fori_loop(0, n_tiles, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def grouped_ffn_padded(xp, gate, up, down, tile_expert, n_tiles, tile):
  """y[r] = FFN_{e(r)}(xp[r]) for every row r of the used tiles; zero elsewhere."""
  return _forward(xp, gate, up, down, tile_expert, n_tiles, tile)[0]


def _fwd(xp, gate, up, down, tile_expert, n_tiles, tile):
  y, g_buf, u_buf = _forward(xp, gate, up, down, tile_expert, n_tiles, tile)
  return y, (xp, g_buf, u_buf, gate, up, down, tile_expert, n_tiles)


def _bwd(tile, res, dy):
  xp, g_buf, u_buf, gate, up, down, tile_expert, n_tiles = res

  def body(i, carry):
    dx, dgate, dup, ddown = carry
    e = tile_expert[i]
    xt, dyt = _slice(xp, i, tile), _slice(dy, i, tile)
    g, u = _slice(g_buf, i, tile), _slice(u_buf, i, tile)
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    da = dyt @ down[e].T
    dg = da * u * sig * (1 + g * (1 - sig))
    du = da * silu
    ddown = ddown.at[e].add((silu * u).T @ dyt)
    dgate = dgate.at[e].add(xt.T @ dg)
    dup = dup.at[e].add(xt.T @ du)
    dx = _put(dx, dg @ gate[e].T + du @ up[e].T, i, tile)
    return dx, dgate, dup, ddown

  init = (jnp.zeros_like(xp), jnp.zeros_like(gate), jnp.zeros_like(up), jnp.zeros_like(down))
  dx, dgate, dup, ddown = jax.lax.fori_loop(0, n_tiles, body, init)
  return dx, dgate, dup, ddown, None, None


grouped_ffn_padded.defvjp(_fwd, _bwd)


def grouped_ffn(x_td, ids_tk, gate_edf, up_edf, down_efd, *, max_tile: int = 128):
  """Per-slot expert outputs y[t, k] = FFN_{ids[t, k]}(x[t]), [T, K, D]."""
  t, k = ids_tk.shape
  e = gate_edf.shape[0]
  tile = choose_tile(t * k, e, max_tile)
  src, dest, tile_expert, n_tiles = tile_layout(ids_tk, e, tile)
  x_ext = jnp.concatenate([x_td, jnp.zeros((1, x_td.shape[1]), x_td.dtype)])
  yp = grouped_ffn_padded(x_ext[src], gate_edf.astype(x_td.dtype), up_edf.astype(x_td.dtype),
                          down_efd.astype(x_td.dtype), tile_expert, n_tiles, tile)
  return yp[dest].reshape(t, k, -1)
