"""Causal attention a block of queries at a time, with a backward that recomputes the scores
(`attention_impl="blocked"`, the default): the einsum reference's numbers without its two costs.

The einsum reference (`attention_mla.dot_product_attention(impl="einsum")`) computes every
[S, S] score of a causal mask, half of which are masked, and autodiff keeps the [B, H, S, S]
float32 probabilities of every layer alive for the backward (the scan over the MoE layers stacks
them: [L, B, H, S, S], zero-initialised, written and read once per step). On the tiny model at
2 x 1024 tokens that was half of the train step's time on XLA:CPU (bench/RESULTS.md).
Here the queries are cut into blocks of `block` rows; block i attends to keys [0, (i+1)*block)
only, which a causal mask makes exact: the keys after a block's last query are masked for all of
its rows and add exact zeros in the reference. The forward keeps per row only the max and the sum
of the softmax (float32, [B, H, S]); the backward recomputes each block's probabilities with the
very same operations, so they equal the forward's bit for bit.

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

BLOCK = 128  # query rows per block: 56% of the [S, S] scores at S=1024 (128: 4.7% fewer than 256)


def causal_attention(q_bshd, k_bshd, v_bshv, mask_b1qk, scale: float, block: int = BLOCK):
  """softmax(q k^T * scale, masked) v, [B, S, H, Dv], for a causal `mask_b1qk` [B, 1, S, S]."""
  s = q_bshd.shape[1]
  if s % block or s <= block:
    block = s
  return _attention(q_bshd, k_bshd, v_bshv, mask_b1qk, float(scale), block)


def _block_probs(q_bchd, k_bshd, mask_b1ck, scale):
  """(probs [B, H, c, k] float32, row max, row sum) of one query block, the reference's ops."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q_bchd, k_bshd) * jnp.asarray(scale, q_bchd.dtype)
  logits = jnp.where(mask_b1ck, logits, jnp.finfo(logits.dtype).min).astype(jnp.float32)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - m)
  l = jnp.sum(e, axis=-1, keepdims=True)
  return e / l


def _blocks(s, block):
  """(first query row, end of its key range) of every block."""
  return [(r, r + block) for r in range(0, s, block)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, scale, block):
  return _forward(q, k, v, mask, scale, block)


def _forward(q, k, v, mask, scale, block):
  s = q.shape[1]
  valid_b1q1 = jnp.any(mask, axis=-1, keepdims=True)                 # a row with a key
  mean_v = jnp.mean(v.astype(jnp.float32), axis=1, keepdims=True).astype(v.dtype)  # [B,1,H,Dv]
  outs = []
  for r, end in _blocks(s, block):
    probs = _block_probs(q[:, r:end], k[:, :end], mask[:, :, r:end, :end], scale)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(q.dtype), v[:, :end])
    valid = jnp.swapaxes(valid_b1q1[:, :, r:end], 1, 2)            # [B, c, 1, 1]
    outs.append(jnp.where(valid, out, mean_v))
  return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def _fwd(q, k, v, mask, scale, block):
  return _forward(q, k, v, mask, scale, block), (q, k, v, mask)


def _bwd(scale, block, res, g_bshv):
  q, k, v, mask = res
  s = q.shape[1]
  dt = q.dtype
  valid_b1q1 = jnp.any(mask, axis=-1, keepdims=True)
  dq_blocks = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for r, end in _blocks(s, block):
    valid = valid_b1q1[:, :, r:end]                                    # [B, 1, c, 1]
    probs = _block_probs(q[:, r:end], k[:, :end], mask[:, :, r:end, :end], scale)
    probs = jnp.where(valid, probs, 0.0)
    g = g_bshv[:, r:end]                                               # [B, c, H, Dv]
    dv = dv.at[:, :end].add(jnp.einsum("bhqk,bqhd->bkhd", probs.astype(dt), g,
                                       preferred_element_type=jnp.float32))
    dprobs = jnp.einsum("bqhd,bkhd->bhqk", g, v[:, :end]).astype(jnp.float32)
    dlogits = probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True))
    dlogits = (jnp.where(mask[:, :, r:end, :end], dlogits, 0.0).astype(dt)
               * jnp.asarray(scale, dt))
    dq_blocks.append(jnp.einsum("bhqk,bkhd->bqhd", dlogits, k[:, :end]))
    dk = dk.at[:, :end].add(jnp.einsum("bhqk,bqhd->bkhd", dlogits, q[:, r:end],
                                       preferred_element_type=jnp.float32))
  # Rows without a key got mean(V): their gradient reaches every key's V by 1/S.
  invalid = ~jnp.swapaxes(valid_b1q1, 1, 2)                            # [B, S, 1, 1]
  dv = dv + (jnp.sum(jnp.where(invalid, g_bshv, 0).astype(jnp.float32), axis=1, keepdims=True)
             / s)
  dq = jnp.concatenate(dq_blocks, axis=1) if len(dq_blocks) > 1 else dq_blocks[0]
  return dq.astype(dt), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_fwd, _bwd)
