"""The Flax model against transformers' DeepseekV2ForCausalLM, logits to 1e-4 in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import VARIANTS
from flax import nnx

from desmoe_jax.convert import from_pretrained


# Forwards jitted, as the trainer and evaluator run them: op by op, each model call compiles
# its ~100-300 kernels one at a time (most of these tests' time).
_logits = nnx.jit(lambda m, ids, **kw: m(ids, **kw).logits)


def _ids(seed, shape, vocab):
  return np.random.RandomState(seed).randint(0, vocab, shape)


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(hf_checkpoint, variant):
  path, hf = hf_checkpoint(variant)
  ids = _ids(0, (2, 13), hf.config.vocab_size)
  model = from_pretrained(path, dtype=jnp.float32)
  ours = np.asarray(_logits(model, ids))
  ref = _torch_logits(hf, ids)
  assert ours.shape == ref.shape == (2, 13, hf.config.vocab_size)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_yarn_long_positions_match(hf_checkpoint):
  """Positions past original_max_position_embeddings exercise YaRN's interpolated band."""
  path, hf = hf_checkpoint("v2lite_like")
  ids = _ids(1, (1, 150), hf.config.vocab_size)
  ours = np.asarray(_logits(from_pretrained(path, dtype=jnp.float32), ids))
  np.testing.assert_allclose(ours, _torch_logits(hf, ids), atol=1e-4, rtol=0)


def test_scan_and_unrolled_layers_agree(hf_checkpoint):
  path, hf = hf_checkpoint("qlora_grouped")
  ids = _ids(2, (2, 9), hf.config.vocab_size)
  routed = nnx.jit(lambda m, ids: (lambda o: (o.logits, o.routing.topk_ids))(
      m(ids, return_routing=True)))
  scanned, scanned_ids = routed(from_pretrained(path, dtype=jnp.float32, scan_layers=True), ids)
  unrolled, unrolled_ids = routed(from_pretrained(path, dtype=jnp.float32, scan_layers=False),
                                  ids)
  np.testing.assert_allclose(scanned, unrolled, atol=1e-6)
  np.testing.assert_array_equal(scanned_ids, unrolled_ids)
  assert scanned_ids.shape == (2, 2 * 9, 3)  # [moe layers, tokens, k]


def test_attention_impls_agree(hf_checkpoint):
  path, hf = hf_checkpoint("v2lite_like")
  ids = _ids(3, (2, 10), hf.config.vocab_size)
  a = _logits(from_pretrained(path, dtype=jnp.float32, attention_impl="einsum"), ids)
  b = _logits(from_pretrained(path, dtype=jnp.float32, attention_impl="jax"), ids)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_packed_segments_do_not_attend_across(hf_checkpoint):
  """Two examples packed in one row (segment ids, positions restarting) = run separately."""
  path, hf = hf_checkpoint("v2lite_like")
  model = from_pretrained(path, dtype=jnp.float32)
  a, b = _ids(4, (1, 7), 96), _ids(5, (1, 5), 96)
  packed = np.concatenate([a, b, np.zeros((1, 3), int)], axis=1)          # 3 padding tokens
  segments = np.array([[1] * 7 + [2] * 5 + [0] * 3])
  positions = np.array([list(range(7)) + list(range(5)) + [0] * 3])
  out = _logits(model, packed, segment_ids_bs=segments, positions_bs=positions)
  np.testing.assert_allclose(out[:, :7], _logits(model, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 7:12], _logits(model, b), atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()


def test_bf16_load_is_close(hf_checkpoint):
  path, hf = hf_checkpoint("v2lite_like")
  ids = _ids(6, (1, 8), hf.config.vocab_size)
  model = from_pretrained(path)  # bf16 by default
  assert model.lm_head.kernel.dtype == jnp.bfloat16
  assert model.moe_blocks().gate.weight.dtype == jnp.float32  # routers stay float32
  out = np.asarray(_logits(model, ids).astype(jnp.float32))
  np.testing.assert_allclose(out, _torch_logits(hf, ids), atol=5e-2)


def test_jit_and_grad_run(hf_checkpoint):
  path, _ = hf_checkpoint("v2lite_like")
  model = from_pretrained(path, dtype=jnp.float32)
  ids = _ids(7, (2, 6), 96)

  @nnx.jit
  def loss_fn(m):
    return nnx.grad(lambda m: m(ids).logits.mean() + m(ids).aux_loss)(m)

  grads = loss_fn(model)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert float(jnp.abs(grads["moe_layers"]["mlp"]["experts"]["up_proj"][...]).sum()) > 0
