"""Next-token cross-entropy, either from the model's logits or chunked from its last hidden states.

Why chunked: the plain loss materialises the logits of the whole batch, [B, S, V] with V = 102400
for DeepSeek-V2: per 4096-token sequence 0.8 GiB in bf16, 1.6 GiB more for the float32
log-softmax, and the same again for their gradient in the backward. The TPU compiler's buffer
assignment for V2-Lite (docs/SCALING.md) puts ~3 GiB per chip there at one sequence per chip,
more with more sequences. `chunked_token_losses` computes the same numbers a sequence chunk at
a time: `lax.scan` over chunks of `chunk` positions, each computing its [B, chunk, V] logits,
their log-sum-exp and the target's logit, and a custom VJP whose backward recomputes one chunk's
logits at a time (softmax - one-hot, then the two matmuls) and sums the output weight's
gradient in float32. Live memory: one chunk's logits instead of the batch's.

Chunks run along the sequence axis, not over flattened tokens, so that every chunk keeps the
batch split over the mesh's data-parallel axes (each device computes its own sequences' chunk).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from desmoe_jax.sharding import constrain

KERNEL_AXES = ("embed", "vocab")  # the output projection's logical axes (layers.Linear lm_head)


def token_losses(logits_bsv, tokens_bs):
  """Cross-entropy of predicting tokens[:, t] from position t-1, [B, S] (position 0 gets 0)."""
  targets_bs = jnp.pad(tokens_bs[:, 1:], ((0, 0), (0, 1)))  # the last position predicts nothing
  nll = _target_nll(logits_bsv.astype(jnp.float32), targets_bs)
  return jnp.pad(nll[:, :-1], ((0, 0), (1, 0)))


@jax.custom_vjp
def _target_nll(logits_bsv, targets_bs):
  """-log_softmax(logits)[b, s, targets[b, s]], [B, S], of every position (float32 logits).

  Why not the obvious slice + `take_along_axis`: XLA:CPU builds their gradients as a zeroed
  [B, S-1, V] buffer, a scatter into it and a padded copy, and autodiff's log-softmax backward
  is then fused twice over the [B, S, V] logits, once per layout its two consumers (the lm
  head's two gradient matmuls) read. Here the forward is the same numbers (a one-hot select
  and a sum, adding exact zeros to the target's log-probability) and the backward is written
  out once: softmax - one-hot, times the cotangent (bench/RESULTS.md, "Whole train step")."""
  return _target_nll_fwd(logits_bsv, targets_bs)[0]


def _hit(targets_bs, v):
  return targets_bs[..., None] == jnp.arange(v, dtype=targets_bs.dtype)


def _target_nll_fwd(logits_bsv, targets_bs):
  logp = jax.nn.log_softmax(logits_bsv, axis=-1)
  nll = -jnp.sum(jnp.where(_hit(targets_bs, logp.shape[-1]), logp, 0.0), axis=-1)
  return nll, (logp, targets_bs)


def _target_nll_bwd(res, g_bs):
  logp, targets_bs = res
  hit = _hit(targets_bs, logp.shape[-1])
  return (jnp.exp(logp) - hit.astype(jnp.float32)) * g_bs[..., None], None


_target_nll.defvjp(_target_nll_fwd, _target_nll_bwd)


def chunked_token_losses(hidden_bsd, kernel_dv, tokens_bs, chunk: int):
  """`token_losses(hidden @ kernel, tokens)` without the [B, S, V] logits: [B, S] float32.

  hidden [B, S, D] (the final norm's output), kernel [D, V] (the output projection, or the
  transposed tied embedding), chunk: positions per chunk, a divisor of S. The logits are
  computed in hidden's dtype with float32 accumulation (the plain path rounds them to the
  compute dtype first: in bfloat16 the two differ by that rounding).
  """
  b, s, d = hidden_bsd.shape
  if chunk <= 0 or s % chunk:
    raise ValueError(f"model.ce_chunk={chunk}: must be a positive divisor of the sequence "
                     f"length {s} (or 0 for the plain cross-entropy over the whole logits)")
  # Position t predicts tokens[t + 1]; the last position predicts nothing (target 0, dropped).
  targets_bs = jnp.pad(tokens_bs[:, 1:], ((0, 0), (0, 1)))
  nll = _chunked_nll(hidden_bsd, kernel_dv.astype(hidden_bsd.dtype), targets_bs, chunk)
  return jnp.pad(nll[:, :-1], ((0, 0), (1, 0)))


def _chunks(x_bs, chunk):
  """[B, S, ...] -> [S/chunk, B, chunk, ...]: the scan runs over chunks, the batch stays split."""
  b, s = x_bs.shape[:2]
  return jnp.swapaxes(x_bs.reshape(b, s // chunk, chunk, *x_bs.shape[2:]), 0, 1)


def _unchunks(x_nbc):
  n, b, c = x_nbc.shape[:3]
  return jnp.swapaxes(x_nbc, 0, 1).reshape(b, n * c, *x_nbc.shape[3:])


def _logits(h_bcd, kernel_dv):
  return jnp.einsum("bcd,dv->bcv", h_bcd, kernel_dv, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_nll(hidden_bsd, kernel_dv, targets_bs, chunk):
  """nll[b, t] = logsumexp(logits[b, t]) - logits[b, t, targets[b, t]], float32 [B, S]."""
  return _nll_fwd(hidden_bsd, kernel_dv, targets_bs, chunk)[0]


def _nll_fwd(hidden_bsd, kernel_dv, targets_bs, chunk):
  def one(_, xs):
    h_bcd, t_bc = xs
    logits = _logits(h_bcd, kernel_dv)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, t_bc[..., None], axis=-1)[..., 0]
    return None, (lse - target, lse)

  _, (nll, lse) = jax.lax.scan(one, None, (_chunks(hidden_bsd, chunk),
                                           _chunks(targets_bs, chunk)))
  return _unchunks(nll), (hidden_bsd, kernel_dv, targets_bs, _unchunks(lse))


def _nll_bwd(chunk, res, g_bs):
  hidden_bsd, kernel_dv, targets_bs, lse_bs = res
  v = kernel_dv.shape[1]

  def one(dkernel, xs):
    h_bcd, t_bc, lse_bc, g_bc = xs
    logits = _logits(h_bcd, kernel_dv)
    # d nll / d logits = softmax - onehot(target), times the incoming cotangent.
    dlogits = jnp.exp(logits - lse_bc[..., None]) - jax.nn.one_hot(t_bc, v, dtype=jnp.float32)
    dlogits = (dlogits * g_bc[..., None]).astype(h_bcd.dtype)
    dh = jnp.einsum("bcv,dv->bcd", dlogits, kernel_dv,
                    preferred_element_type=jnp.float32).astype(h_bcd.dtype)
    # This chunk's share, rounded to the compute dtype (a bfloat16 [D, V] partial is half the
    # float32 one; the plain loss rounds its kernel gradient the same way) and laid out like the
    # kernel, so that the partitioner reduce-scatters it here instead of keeping a whole-D
    # float32 accumulator on every device; the sum over chunks is float32.
    part = jnp.einsum("bcd,bcv->dv", h_bcd, dlogits, preferred_element_type=h_bcd.dtype)
    dkernel = constrain(dkernel + constrain(part, KERNEL_AXES).astype(jnp.float32), KERNEL_AXES)
    return dkernel, dh

  dkernel, dh = jax.lax.scan(
      one, constrain(jnp.zeros(kernel_dv.shape, jnp.float32), KERNEL_AXES),
      tuple(_chunks(x, chunk) for x in (hidden_bsd, targets_bs, lse_bs, g_bs.astype(jnp.float32))))
  return _unchunks(dh), dkernel.astype(kernel_dv.dtype), None


_chunked_nll.defvjp(_nll_fwd, _nll_bwd)
