"""The one continuation scorer: log p(continuation | context) of (context, continuation) pairs.
evaluate.py's multiple-choice metric (`data.general_mc`) and the lm-evaluation-harness adapter
(lm_eval_adapter.py) both score through it, so the built-in score and lm-eval's agree on every
pair (tests/test_lm_eval.py holds them to the same log-likelihoods).

Pairs are encoded as lm-eval's HF model encodes them (`encode_pair`): trailing whitespace of the
context moves to the continuation; the context and context + continuation are encoded without
special tokens and the continuation is the difference (so the boundary token is the one the
joint text has); the context is preceded by the prefix token (BOS, else EOS), which is also what
an empty context conditions on. A sequence longer than `max_length` + 1 tokens keeps its last
ones. Pairs are sorted by length and scored in fixed-size batches padded to power-of-two widths,
so the jitted scorer compiles once per width bucket, not once per request.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from desmoe_jax.generate import bucket


def prefix_token_id(tokenizer) -> int:
  """What an empty context conditions on: BOS if the tokenizer has one, else EOS."""
  return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text: str) -> list[int]:
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids with the prefix token, continuation ids), as lm-eval's HF model encodes."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
  whole = encode(tokenizer, context + continuation)
  ctx = encode(tokenizer, context)
  return [prefix_token_id(tokenizer)] + ctx, whole[len(ctx):]


@functools.partial(jax.jit, static_argnums=0)
def token_logprobs(graphdef, state, tokens, targets, segment_ids):
  """Per position: log p(target) and whether it is the argmax, [B, W] each. Jitted once per
  (model structure, batch, width): scorers over the same model share the compilations."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  logits = nnx.merge(graphdef, state)(tokens, segment_ids_bs=segment_ids,
                                      positions_bs=positions).logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return target_logp, jnp.argmax(logits, axis=-1) == targets


class ContinuationScorer:
  """Scores (context, continuation) pairs on `model` (any family) with `tokenizer`."""

  def __init__(self, model, tokenizer, *, max_length: int = 1024, batch_size: int = 8):
    self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
    self.graphdef, self.state = nnx.split(model)
    self.compiled_widths: set[int] = set()   # the shapes the scorer ran with (for tests)

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    return encode_pair(self.tokenizer, context, continuation)

  def score_ids(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool, int]]:
    """(sum log p(cont | ctx), cont is the greedy continuation, tokens scored) per (ctx ids,
    cont ids) pair; the sequence is cut to its last `max_length` + 1 tokens."""
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    out: list[tuple[float, bool, int] | None] = [None] * len(pairs)
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      rows = []
      for i in idx:
        ctx, cont = pairs[i]
        if not cont:
          raise ValueError("loglikelihood: empty continuation")
        seq = (ctx + cont)[-(self.max_length + 1):]
        rows.append((seq[:-1], seq[1:], min(len(cont), len(seq) - 1)))
      width = min(self.max_length, bucket(max(len(r[0]) for r in rows), 32))
      tokens = np.zeros((self.batch_size, width), np.int32)
      targets = np.zeros_like(tokens)
      segments = np.zeros_like(tokens)
      for r, (inp, tgt, _) in enumerate(rows):
        tokens[r, :len(inp)], targets[r, :len(tgt)], segments[r, :len(inp)] = inp, tgt, 1
      self.compiled_widths.add(width)
      logp, greedy = (np.asarray(a) for a in token_logprobs(self.graphdef, self.state, tokens,
                                                            targets, segments))
      for r, (inp, _, n) in enumerate(rows):
        sl = slice(len(inp) - n, len(inp))
        out[idx[r]] = (float(logp[r, sl].sum()), bool(greedy[r, sl].all()), n)
    return out

  def __call__(self, pairs: list[tuple[str, str]]) -> list[tuple[float, int]]:
    """(sum log p(continuation | context), tokens scored) per text pair: the `score_fn` of
    metrics.multiple_choice_accuracy."""
    scored = self.score_ids([self.encode_pair(c, x) for c, x in pairs])
    return [(logp, n) for logp, _, n in scored]
