"""The chunked cross-entropy (model.ce_chunk) equals the plain one from the logits, value and
gradients, in float32; the remat policies (model.remat) compute the same loss and gradients as
no remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from desmoe_jax import losses
from desmoe_jax.config import REMAT_POLICIES, ModelConfig
from desmoe_jax.model import init_model

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1)


def _plain(h, w, tokens, mask):
  return jnp.sum(losses.token_losses(h @ w, tokens) * mask)


def _chunked(h, w, tokens, mask, chunk):
  return jnp.sum(losses.chunked_token_losses(h, w, tokens, chunk) * mask)


@pytest.mark.parametrize("chunk", [4, 8, 32])
def test_chunked_matches_plain_value_and_gradients(chunk):
  kh, kw, kt, km, kg = jax.random.split(jax.random.key(0), 5)
  b, s, d, v = 2, 32, 16, 50
  h = jax.random.normal(kh, (b, s, d), jnp.float32)
  w = jax.random.normal(kw, (d, v), jnp.float32) * 0.5
  tokens = jax.random.randint(kt, (b, s), 0, v)
  mask = (jax.random.uniform(km, (b, s)) > 0.3).astype(jnp.float32)

  np.testing.assert_allclose(losses.chunked_token_losses(h, w, tokens, chunk),
                             losses.token_losses(h @ w, tokens), rtol=1e-5, atol=1e-6)
  ref, (dh_ref, dw_ref) = jax.value_and_grad(_plain, argnums=(0, 1))(h, w, tokens, mask)
  out, (dh, dw) = jax.value_and_grad(_chunked, argnums=(0, 1))(h, w, tokens, mask, chunk)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  np.testing.assert_allclose(dh, dh_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-6)
  # A non-uniform cotangent per position (the per-domain metrics weight positions differently).
  g = jax.random.uniform(kg, (b, s))
  _, vjp_ref = jax.vjp(lambda h, w: losses.token_losses(h @ w, tokens), h, w)
  _, vjp = jax.vjp(lambda h, w: losses.chunked_token_losses(h, w, tokens, chunk), h, w)
  for a, r in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


def test_chunk_must_divide_the_sequence():
  h, w = jnp.zeros((1, 12, 4)), jnp.zeros((4, 8))
  with pytest.raises(ValueError, match="model.ce_chunk=5"):
    losses.chunked_token_losses(h, w, jnp.zeros((1, 12), jnp.int32), 5)
  with pytest.raises(ValueError, match="ce_chunk=-1"):
    ModelConfig.make(**TINY, ce_chunk=-1)
  with pytest.raises(ValueError, match="remat='everything'"):
    ModelConfig.make(**TINY, remat="everything")


def _loss_and_grads(cfg, tokens):
  model = init_model(cfg, seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    m = nnx.merge(graphdef, params, rest)
    out = m(tokens, logits=not cfg.runtime.ce_chunk)
    return jnp.mean(m.token_losses(out, tokens)) + out.aux_loss

  return jax.jit(jax.value_and_grad(loss))(params)   # as trained; op by op compiles ~300 kernels


@pytest.mark.parametrize("field,value", [("ce_chunk", 8)] +
                         [("remat", r) for r in REMAT_POLICIES if r != "none"])
def test_model_levers_keep_loss_and_gradients(field, value):
  """Each memory lever changes what is stored or recomputed, never the numbers (float32)."""
  cfg = ModelConfig.make(**TINY, remat="none", moe_impl="dense")
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  ref, ref_grads = _loss_and_grads(cfg, tokens)
  out, grads = _loss_and_grads(cfg.replace(**{field: value}), tokens)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  for (path, g), (_, r) in zip(jax.tree_util.tree_leaves_with_path(grads),
                               jax.tree_util.tree_leaves_with_path(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=str(path))
