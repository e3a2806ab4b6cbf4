"""attention_impl="tokamax" and "blocked" compute what the einsum reference does (tokamax on CPU
through its XLA path), with MLA's unequal head dims (q/k wider than v) and packed, padded
sequences."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from helpers import batch, tiny_model

from desmoe_jax.nn import attention_mla as attention
from desmoe_jax.nn.attention_mla import attention_mask, dot_product_attention
from desmoe_jax.nn.blocked_attention import causal_attention


def _inputs(seed, b=2, s=12, h=3, dqk=6, dv=4):
  """q, k [b, s, h, dqk], v and an output cotangent [b, s, h, dv]: MLA's q/k wider than v."""
  keys = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(keys[0], (b, s, h, dqk)), jax.random.normal(keys[1], (b, s, h, dqk)),
          jax.random.normal(keys[2], (b, s, h, dv)), jax.random.normal(keys[3], (b, s, h, dv)))


def test_tokamax_attention_matches_einsum_outputs_and_grads():
  b, s, h, dv = 2, 12, 3, 4
  q, k, v, cot = _inputs(0)
  # Row 0: two packed documents and two padding tokens; row 1: one document.
  mask = attention_mask(jnp.asarray([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12]))

  def run(impl):
    f = lambda q, k, v: (dot_product_attention(q, k, v, mask, 0.3, impl) * cot).sum()
    return (dot_product_attention(q, k, v, mask, 0.3, impl),
            jax.grad(f, argnums=(0, 1, 2))(q, k, v))

  ref_y, ref_g = run("einsum")
  y, g = jax.jit(run, static_argnums=0)("tokamax")
  assert y.shape == (b, s, h, dv)
  np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)
  for a, r, name in zip(g, ref_g, "qkv"):
    np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_blocked_attention_matches_einsum_outputs_and_grads():
  """Several query blocks (4 rows each), packed documents that cross a block boundary, padding
  rows (no key: the reference's mean of V, and its gradient to V alone) at the start and end."""
  q, k, v, cot = _inputs(1)
  mask = attention_mask(jnp.asarray([[0] + [1] * 5 + [2] * 4 + [0] * 2, [1] * 12]))

  def run(fn):
    f = lambda q, k, v: (fn(q, k, v) * cot).sum()
    return fn(q, k, v), jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  ref_y, ref_g = run(lambda q, k, v: dot_product_attention(q, k, v, mask, 0.3, "einsum"))
  for block in (4, 12):
    y, g = run(lambda q, k, v: causal_attention(q, k, v, mask, 0.3, block=block))
    np.testing.assert_allclose(y, ref_y, atol=1e-6, rtol=1e-5)
    for a, r, name in zip(g, ref_g, "qkv"):
      np.testing.assert_allclose(a, r, atol=1e-6, rtol=1e-5, err_msg=f"d{name} block={block}")


def test_tokamax_attention_never_pads_v():
  """No branch of the traced program (TPU, GPU, default) pads anything, where "jax" pads V to
  q's head dim; and cuDNN, which tokamax reaches with padded inputs, is not among the kernels."""
  b, s, h, dqk, dv = 1, 8, 2, 24, 16
  q = k = jnp.ones((b, s, h, dqk))
  v = jnp.ones((b, s, h, dv))
  mask = attention_mask(jnp.ones((b, s), jnp.int32))
  pads = lambda impl: str(jax.make_jaxpr(
      lambda q, k, v: dot_product_attention(q, k, v, mask, 0.5, impl))(q, k, v)).count(" pad[")
  assert pads("jax") == 1   # the count sees padding where there is some
  assert pads("tokamax") == 0
  assert not any("cudnn" in impls for impls in attention.TOKAMAX_ATTENTION.values())


def test_model_grads_agree_with_tokamax_attention():
  """A tiny model's loss gradients with attention_impl="tokamax" equal the einsum model's."""
  tokens = batch(1, [0, 1])["tokens"]
  grads = {}
  for impl in ("einsum", "tokamax"):
    model = tiny_model(seed=5, attention_impl=impl)
    loss = lambda m: (m(tokens).logits.astype(jnp.float32) ** 2).mean()
    grads[impl] = dict(nnx.to_flat_state(nnx.jit(nnx.grad(loss))(model)))  # jit: one compile
  for path, a in grads["tokamax"].items():
    np.testing.assert_allclose(a[...], grads["einsum"][path][...], atol=1e-5, rtol=1e-5,
                               err_msg=str(path))
