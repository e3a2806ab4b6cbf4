"""How updates reach bfloat16 weights: stochastic rounding from counter-based hashed bits
(`train.precision=bf16_sr`), a float32 master copy (`bf16_master`), and `apply_updates`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from desmoe_jax.optim.labels import param_labels


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
