"""Batched greedy generation with a KV cache (MLA's compressed one, or GQA's), jitted end to end.

Prompts are LEFT-padded to a common length P, so every row writes its next token to the same
cache slot and one `dynamic_update_slice` serves the batch; each row's RoPE positions start at 0
at its first real token and padded slots are masked out. The prompt is processed in one
full-attention pass (prefill), then a `while_loop` decodes one token per step until every row
has produced EOS or `max_new_tokens` tokens. Prompt and batch sizes are bucketed (powers of two)
so that a whole evaluation compiles a handful of programs, not one per prompt.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx



def bucket(n: int, minimum: int) -> int:
  size = minimum
  while size < n:
    size *= 2
  return size


@functools.partial(jax.jit, static_argnums=(0, 4))
def _generate(graphdef, state, tokens_bp, pad_b, max_new_tokens: int, eos_ids):
  """tokens_bp: left-padded prompts [B, P]; pad_b: [B] number of padding slots per row."""
  model = nnx.merge(graphdef, state)
  b, p = tokens_bp.shape
  slots = jnp.arange(p)
  real_bp = slots[None, :] >= pad_b[:, None]
  positions_bp = jnp.maximum(slots[None, :] - pad_b[:, None], 0)
  out = model(tokens_bp, segment_ids_bs=real_bp.astype(jnp.int32), positions_bs=positions_bp,
              return_latents=True)
  total = p + max_new_tokens

  cache = out.latents.grow(max_new_tokens)  # prompt cache -> room for the new tokens
  first = jnp.argmax(out.logits[:, -1].astype(jnp.float32), axis=-1).astype(jnp.int32)
  is_eos = lambda t: jnp.isin(t, eos_ids)
  generated = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, token, cache, done, generated = carry   # `token` was produced at step i - 1
    slot = p + i - 1
    t = jnp.arange(total)[None, :]
    valid = (t >= pad_b[:, None]) & (t <= slot)                  # [B, total]
    logits, cache = model.decode_step(token[:, None], (slot - pad_b)[:, None], cache, slot,
                                      valid)
    nxt = jnp.argmax(logits[:, 0].astype(jnp.float32), axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, 0, nxt)
    generated = generated.at[:, i].set(nxt)
    return i + 1, nxt, cache, done | is_eos(nxt), generated

  init = (jnp.asarray(1), first, cache, is_eos(first), generated)
  _, _, _, _, generated = jax.lax.while_loop(cond, body, init)
  return generated


def greedy_generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids,
                    pad_id: int = 0, batch_size: int = 8) -> list[list[int]]:
  """Greedy continuations (token ids, EOS excluded) of each prompt (a list of token ids)."""
  if not prompts:
    return []
  if any(len(p) == 0 for p in prompts):
    raise ValueError("greedy_generate: every prompt needs at least one token")
  eos = jnp.asarray(np.atleast_1d(np.asarray(eos_ids, np.int32)))
  graphdef, state = nnx.split(model)
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together
  results: list[list[int] | None] = [None] * len(prompts)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    p = bucket(max(len(prompts[i]) for i in idx), 16)
    b = bucket(len(idx), 1)
    tokens = np.full((b, p), pad_id, np.int32)
    pad = np.full((b,), p - 1, np.int32)  # filler rows: one token, discarded
    for row, i in enumerate(idx):
      tokens[row, p - len(prompts[i]):] = prompts[i]
      pad[row] = p - len(prompts[i])
    out = np.asarray(_generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(pad),
                               max_new_tokens, eos))
    eos_set = set(np.asarray(eos).tolist())
    for row, i in enumerate(idx):
      seq = out[row].tolist()
      cut = next((j for j, t in enumerate(seq) if t in eos_set), len(seq))
      results[i] = seq[:cut]
  return results
