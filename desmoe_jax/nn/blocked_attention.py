"""Causal attention a block of queries at a time, with a backward that recomputes the scores
(`attention_impl="blocked"`, the default; on CPU in float32 the C++ kernel of cpu_attention.py
runs the same algorithm in 64 x 64 tiles instead, and `"blocked_xla"` keeps this one): the einsum
reference's numbers without its two costs.

The einsum reference (`attention_mla.dot_product_attention(impl="einsum")`) computes every
[S, S] score of a causal mask, half of which are masked, and autodiff keeps the [B, H, S, S]
float32 probabilities of every layer alive for the backward (the scan over the MoE layers stacks
them: [L, B, H, S, S], zero-initialised, written and read once per step). On the tiny model at
2 x 1024 tokens that was half of the train step's time on XLA:CPU (bench/RESULTS.md).
Here the queries are cut into blocks of `block` rows; block i attends to keys [0, (i+1)*block)
only, which a causal mask makes exact: the keys after a block's last query are masked for all of
its rows and add exact zeros in the reference. The forward keeps only its inputs for the
backward, which recomputes each block's exponentials with the very same operations (so they
equal the forward's bit for bit, and XLA merges the two): no [S, S] array outlives its block.
The softmax is normalised after the products, not before: out = (e v) / sum(e) with
e = exp(logits - max), and the backward's dlogits = e (dp - rowsum(dp e) / sum(e)) with
dp = (g / sum(e)) v^T. Both divide [c, Dv] rows instead of the [c, k] block, one pass less over
every block in the forward (the whole tiny-model step 1.03-1.06x faster; bench/RESULTS.md,
"fifth round").

Same semantics as the reference, padding included: a query with no key to attend (a padding row,
segment 0) gets the mean of V over all S keys, as the reference's uniform softmax over
`finfo.min` scores gives, and passes its gradient to V alone. The numbers differ from the
reference only in float32 rounding (sums over a block's keys instead of all S, in XLA's order).
The mask must be causal (what `attention_mask` builds): keys after the query are never attended.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK = 256  # query rows per block: 62.5% of the [S, S] scores at S=1024; 128 (56%) ran no faster
             # on XLA:CPU and doubles the unrolled blocks (compile: +5 s per call site at 256,
             # +14 s at 128, one tiny-model layer at 2 x 1024 on the loaded 2-core machine)


def causal_attention(q_bshd, k_bshd, v_bshv, mask_b1qk, scale: float, block: int = BLOCK):
  """softmax(q k^T * scale, masked) v, [B, S, H, Dv], for a causal `mask_b1qk` [B, 1, S, S]."""
  s = q_bshd.shape[1]
  if s % block or s <= block:
    block = s
  return _attention(q_bshd, k_bshd, v_bshv, mask_b1qk, float(scale), block)


def _block_exp(q_bhcd, kt_bhdk, mask_b1ck, scale):
  """(e [B, H, c, k], sum(e) [B, H, c, 1]), float32, of one query block: the reference's
  softmax before its division, e = exp(logits - rowmax). A masked key's e is exactly 0 in a
  row with a key (finfo.min - max underflows); a row without one has e = 1 everywhere."""
  logits = jnp.einsum("bhqd,bhdk->bhqk", q_bhcd, kt_bhdk) * jnp.asarray(scale, q_bhcd.dtype)
  logits = jnp.where(mask_b1ck, logits, jnp.finfo(logits.dtype).min).astype(jnp.float32)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - m)
  return e, jnp.sum(e, axis=-1, keepdims=True)


def _blocks(s, block):
  """(first query row, end of its key range) of every block."""
  return [(r, r + block) for r in range(0, s, block)]


def _heads_first(x_bshd):
  return jnp.swapaxes(x_bshd, 1, 2)                                   # [B, H, S, D]


def _keys_last(x_bshd):
  """[B, H, D, S]: the score matmuls (q k^T, and g v^T in the backward) read their right
  operand with the keys minor, a plain [c, D] x [D, k] product; with the keys major XLA:CPU's
  fused dot ran slower (one tiny-model layer's attention, forward and backward at 2 x 1024:
  55.7 -> 53.1 ms, same numbers bit for bit)."""
  return jnp.transpose(x_bshd, (0, 2, 3, 1))


def _cat(blocks, axis):
  return jnp.concatenate(blocks, axis=axis) if len(blocks) > 1 else blocks[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, scale, block):
  return _forward(q, k, v, mask, scale, block)


def _forward(q, k, v, mask, scale, block):
  """Blocks run on [B, H, S, D] copies of q and v and a [B, H, D, S] one of k (one transpose
  each, not one per block)."""
  s = q.shape[1]
  qh, kt, vh = _heads_first(q), _keys_last(k), _heads_first(v)
  valid_b1q1 = jnp.any(mask, axis=-1, keepdims=True)                 # a row with a key
  mean_v = jnp.mean(vh.astype(jnp.float32), axis=2, keepdims=True).astype(v.dtype)  # [B,H,1,Dv]
  outs = []
  for r, end in _blocks(s, block):
    e, den = _block_exp(qh[:, :, r:end], kt[..., :end], mask[:, :, r:end, :end], scale)
    out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(q.dtype), vh[:, :, :end],
                     preferred_element_type=jnp.float32) / den
    outs.append(jnp.where(valid_b1q1[:, :, r:end], out.astype(v.dtype), mean_v))
  return jnp.swapaxes(_cat(outs, 2), 1, 2)


def _fwd(q, k, v, mask, scale, block):
  return _forward(q, k, v, mask, scale, block), (q, k, v, mask)


def _bwd(scale, block, res, g_bshv):
  q, k, v, mask = res
  s = q.shape[1]
  dt = q.dtype
  qh, kh, vh, gh = (_heads_first(a) for a in (q, k, v, g_bshv))
  kt, vt = _keys_last(k), _keys_last(v)
  valid_b1q1 = jnp.any(mask, axis=-1, keepdims=True)
  dq_blocks = []
  dk = jnp.zeros(kh.shape, jnp.float32)
  dv = jnp.zeros(vh.shape, jnp.float32)
  for r, end in _blocks(s, block):
    valid = valid_b1q1[:, :, r:end]                                    # [B, 1, c, 1]
    e, den = _block_exp(qh[:, :, r:end], kt[..., :end], mask[:, :, r:end, :end], scale)
    # g / sum(e), 0 on rows without a key (their output is mean(V), not attention's)
    g = jnp.where(valid, gh[:, :, r:end].astype(jnp.float32) / den, 0.0).astype(dt)  # [B,H,c,Dv]
    dv = dv.at[:, :, :end].add(jnp.einsum("bhqk,bhqd->bhkd", e.astype(dt), g,
                                          preferred_element_type=jnp.float32))
    dp = jnp.einsum("bhqd,bhdk->bhqk", g, vt[..., :end]).astype(jnp.float32)  # dprobs / sum(e)
    dlogits = e * (dp - jnp.sum(dp * e, axis=-1, keepdims=True) / den)
    dlogits = (jnp.where(mask[:, :, r:end, :end], dlogits, 0.0).astype(dt)
               * jnp.asarray(scale, dt))
    dq_blocks.append(jnp.einsum("bhqk,bhkd->bhqd", dlogits, kh[:, :, :end]))
    dk = dk.at[:, :, :end].add(jnp.einsum("bhqk,bhqd->bhkd", dlogits, qh[:, :, r:end],
                                          preferred_element_type=jnp.float32))
  # Rows without a key got mean(V): their gradient reaches every key's V by 1/S.
  dv = dv + jnp.sum(jnp.where(valid_b1q1, 0, gh).astype(jnp.float32), axis=2,
                    keepdims=True) / s
  dq = _cat(dq_blocks, 2)
  return (jnp.swapaxes(dq, 1, 2).astype(dt), jnp.swapaxes(dk, 1, 2).astype(k.dtype),
          jnp.swapaxes(dv, 1, 2).astype(v.dtype), None)


_attention.defvjp(_fwd, _bwd)
