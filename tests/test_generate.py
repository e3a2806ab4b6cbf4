"""Greedy generation with the compressed MLA cache = argmax of full forwards, token by token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from desmoe_jax.convert import from_pretrained
from desmoe_jax.generate import greedy_generate


def _naive(model, prompt, steps, width=32):
  """Greedy decoding by re-running the full forward pass (fixed width: one compilation)."""
  forward = jax.jit(lambda ids, seg: model(ids, segment_ids_bs=seg).logits)
  seq = list(prompt)
  for _ in range(steps):
    ids = np.zeros((1, width), np.int32)
    ids[0, :len(seq)] = seq
    seg = (np.arange(width) < len(seq)).astype(np.int32)[None]
    seq.append(int(np.argmax(np.asarray(forward(ids, seg))[0, len(seq) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize("variant", ["v2lite_like", "qlora_grouped"])
def test_cached_greedy_equals_full_forward_argmax(hf_checkpoint, variant):
  path, _ = hf_checkpoint(variant)
  model = from_pretrained(path, dtype=jnp.float32)
  rng = np.random.RandomState(0)
  prompts = [rng.randint(3, 96, n).tolist() for n in (5, 9, 1, 17)]  # ragged, one > 16 slots
  got = greedy_generate(model, prompts, max_new_tokens=6, eos_ids=[-1], batch_size=3)
  for prompt, out in zip(prompts, got):
    assert out == _naive(model, prompt, 6), prompt


def test_generation_stops_at_eos(hf_checkpoint):
  path, _ = hf_checkpoint("v2lite_like")
  model = from_pretrained(path, dtype=jnp.float32)
  prompt = [7, 8, 9]
  free = greedy_generate(model, [prompt], max_new_tokens=5, eos_ids=[-1])[0]
  stop = free[2]
  cut = greedy_generate(model, [prompt], max_new_tokens=5, eos_ids=[stop])[0]
  assert cut == free[:free.index(stop)]
