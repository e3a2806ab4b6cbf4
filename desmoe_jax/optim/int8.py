"""Adam with its two moments stored blockwise-quantised in int8 (`optim.moments_dtype=int8`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

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
