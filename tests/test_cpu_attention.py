"""The CPU attention kernel (desmoe_jax/nn/cpu_attention.cc) computes what the einsum reference
does, outputs and gradients, on the cases its tiling has to get right: several query and key
tiles with a last partial one, packed documents crossing a tile boundary, padding rows (no key)
at the start and at the end, a mask broadcast over the batch; and the model picks it only where
it applies, falling back to XLA where it cannot be built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from desmoe_jax.nn import cpu_attention
from desmoe_jax.nn.attention_mla import attention_mask, dot_product_attention

pytestmark = pytest.mark.skipif(not cpu_attention.available()[0],
                                reason=f"no CPU attention kernel: {cpu_attention.available()[1]}")


def _inputs(seed, b, s, h, d, dv):
  keys = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(keys[0], (b, s, h, d)), jax.random.normal(keys[1], (b, s, h, d)),
          jax.random.normal(keys[2], (b, s, h, dv)), jax.random.normal(keys[3], (b, s, h, dv)))


def _run(fn, q, k, v, cot):
  loss = lambda q, k, v: (fn(q, k, v) * cot).sum()
  return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(
      q, k, v)


def _assert_matches_einsum(q, k, v, cot, mask, scale):
  ref_y, ref_g = _run(lambda q, k, v: dot_product_attention(q, k, v, mask, scale, "einsum"),
                      q, k, v, cot)
  y, g = _run(lambda q, k, v: cpu_attention.causal_attention(q, k, v, mask, scale), q, k, v, cot)
  np.testing.assert_allclose(y, ref_y, atol=2e-6, rtol=1e-5)
  for a, r, name in zip(g, ref_g, "qkv"):
    np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_kernel_matches_einsum_with_packing_and_padding():
  """S = 144: two full 64-row tiles and a partial one of 16. Row 0: padding first, a document
  across the first tile boundary, another to the end of the padding at the tail; row 1: one
  document."""
  b, s, h, d, dv = 2, 144, 3, 32, 16
  q, k, v, cot = _inputs(0, b, s, h, d, dv)
  seg = np.ones((b, s), np.int32)
  seg[0, :5] = 0
  seg[0, 5:70] = 1
  seg[0, 70:130] = 2
  seg[0, 130:] = 0
  _assert_matches_einsum(q, k, v, cot, attention_mask(jnp.asarray(seg)), 0.3)


def test_kernel_matches_einsum_tiny_model_dims_and_broadcast_mask():
  """The embedded tiny DeepSeek-V2's head dims (q/k 48, v 32), one causal mask for the batch."""
  b, s, h, d, dv = 2, 128, 4, 48, 32
  q, k, v, cot = _inputs(1, b, s, h, d, dv)
  mask = jnp.tril(jnp.ones((s, s), jnp.bool_))[None, None]                 # [1, 1, S, S]
  _assert_matches_einsum(q * 3, k, v, cot, mask, 48 ** -0.5)                # peaked softmax


def test_blocked_lowers_the_kernel_on_cpu_only_where_it_applies():
  s = 32
  mask = attention_mask(jnp.ones((1, s), jnp.int32))

  def hlo(impl, d=32, dv=16, dtype=jnp.float32, platform="cpu"):
    q = jnp.ones((1, s, 2, d), dtype)
    v = jnp.ones((1, s, 2, dv), dtype)
    f = lambda q, v: dot_product_attention(q, q, v, mask, 0.5, impl)
    return jax.jit(f).trace(q, v).lower(lowering_platforms=(platform,)).as_text()

  kernel = "desmoe_causal_attention_fwd"
  assert kernel in hlo("blocked")
  assert kernel not in hlo("blocked_xla")
  assert kernel not in hlo("blocked", d=24)                # head dim not a multiple of 16
  assert kernel not in hlo("blocked", dtype=jnp.bfloat16)  # float32 only
  assert kernel not in hlo("blocked", platform="tpu")      # compile-only plans for accelerators


def test_build_failure_is_reported_and_xla_runs(tmp_path, monkeypatch):
  """A compiler that fails gives (None, the command and its error), never an exception; and
  where the kernel is unavailable the model's "blocked" attention runs XLA's, with a warning."""
  bad = tmp_path / "bad-cxx"
  bad.write_text("#!/bin/sh\necho 'no such toolchain' >&2\nexit 3\n")
  bad.chmod(0o755)
  lib, why = cpu_attention.build(str(bad), tmp_path / "cache")
  assert lib is None and "no such toolchain" in why and str(bad) in why
  assert not list((tmp_path / "cache").glob("*.so"))       # nothing half-written is left
  monkeypatch.setattr(cpu_attention, "available", lambda: (False, "test: no kernel"))
  cpu_attention._warn_once.cache_clear()
  q = jnp.ones((1, 32, 2, 32))
  mask = attention_mask(jnp.ones((1, 32), jnp.int32))
  with pytest.warns(RuntimeWarning, match="test: no kernel"):
    text = jax.jit(lambda q: dot_product_attention(q, q, q, mask, 0.5, "blocked")).lower(
        q).as_text()
  assert "desmoe_causal_attention_fwd" not in text
