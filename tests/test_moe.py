"""MoE layer: the dispatch implementations agree, and the layer matches hand-written
references for what transformers does not compute (norm_topk_prob, the balance loss)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from desmoe_jax.config import ModelConfig
from desmoe_jax.moe.block import MoEBlock, expert_outputs
from desmoe_jax.moe.routing import balance_loss, select_experts

E, D, F = 6, 16, 12


def _weights(seed):
  k = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(k[0], (E, D, F)) * 0.3, jax.random.normal(k[1], (E, D, F)) * 0.3,
          jax.random.normal(k[2], (E, F, D)) * 0.3)


ROUTINGS = {
    "random": lambda t, k: np.stack([np.random.RandomState(i).choice(E, k, replace=False)
                                     for i in range(t)]),
    "one_expert_gets_all": lambda t, k: np.stack([[3] + list(range(4, 4 + k - 1))] * t) % E,
    "some_experts_empty": lambda t, k: np.stack([[0, 5][:k]] * t),
}


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("t", [1, 37])
def test_impls_agree_outputs_and_grads(routing, t):
  k = 2
  ids = jnp.asarray(ROUTINGS[routing](t, k), jnp.int32)
  x = jax.random.normal(jax.random.key(t), (t, D))
  gate, up, down = _weights(1)
  cot = jax.random.normal(jax.random.key(2), (t, k, D))

  def run(impl):
    f = lambda x, g, u, d: (expert_outputs(x, ids, g, u, d, impl=impl, tile_size=8) * cot).sum()
    y = expert_outputs(x, ids, gate, up, down, impl=impl, tile_size=8)
    return y, jax.grad(f, argnums=(0, 1, 2, 3))(x, gate, up, down)

  ref_y, ref_g = run("dense")
  for impl in ("ragged", "tokamax", "tiled"):
    y, g = jax.jit(run, static_argnums=0)(impl)
    np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5, err_msg=impl)
    for a, b, name in zip(g, ref_g, ("x", "gate", "up", "down")):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"{impl} d{name}")


@pytest.mark.parametrize("impl", ["dense", "ragged", "tokamax", "tiled"])
def test_no_expert_id_selects_nothing(impl):
  """Id E (the unused rows of expert parallelism's buffers): output 0 and no gradient; the
  other slots are computed as if those were absent."""
  t, k = 21, 2
  ids = ROUTINGS["random"](t, k)
  ids[::3, 1] = E
  valid = jnp.asarray(ids < E)[..., None]
  x = jax.random.normal(jax.random.key(7), (t, D))
  cot = jax.random.normal(jax.random.key(8), (t, k, D))
  weights = _weights(3)

  def run(impl, ids, cot):
    f = lambda x, g, u, d: (expert_outputs(x, ids, g, u, d, impl=impl, tile_size=8) * cot).sum()
    return (expert_outputs(x, ids, *weights, impl=impl, tile_size=8),
            jax.grad(f, argnums=(0, 1, 2, 3))(x, *weights))

  y, grads = jax.jit(run, static_argnums=0)(impl, jnp.asarray(ids), cot)
  ref_y, ref_grads = run("dense", jnp.asarray(np.minimum(ids, E - 1)), cot * valid)
  assert not np.any(np.asarray(y)[ids == E])
  np.testing.assert_allclose(y, ref_y * valid, atol=1e-5, rtol=1e-5)
  for a, b, name in zip(grads, ref_grads, ("x", "gate", "up", "down")):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def _cfg(**kw):
  base = dict(vocab_size=32, hidden_size=D, intermediate_size=24, moe_intermediate_size=F,
              num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=4,
              qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=E, n_shared_experts=1,
              num_experts_per_tok=3, first_k_dense_replace=0)
  base.update(kw)
  return ModelConfig.make(**base)


def _naive_moe(layer: MoEBlock, x_bsd, cfg):
  """Token-by-token transcription of DeepSeek-V2's MoEGate + DeepseekV2MoE, in numpy float64."""
  w = {k: np.asarray(v, np.float64) for k, v in (
      ("router", layer.gate.weight[...]), ("gate", layer.experts.gate_proj[...]),
      ("up", layer.experts.up_proj[...]), ("down", layer.experts.down_proj[...]))}
  sh = layer.shared_experts
  silu = lambda z: z / (1 + np.exp(-z))
  out = []
  for h in np.asarray(x_bsd, np.float64).reshape(-1, D):
    logits = h @ w["router"]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    cand = p.copy()
    if cfg.topk_method == "group_limited_greedy":
      g = p.reshape(cfg.n_group, -1).max(-1)
      keep = np.argsort(-g)[:cfg.topk_group]
      cand = np.where(np.repeat(np.isin(np.arange(cfg.n_group), keep), E // cfg.n_group), p, 0)
    ids = np.argsort(-cand)[:cfg.num_experts_per_tok]
    wts = cand[ids]
    if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
      wts = wts / (wts.sum() + 1e-20)
    else:
      wts = wts * cfg.routed_scaling_factor
    y = sum(wt * (silu(h @ w["gate"][e]) * (h @ w["up"][e])) @ w["down"][e]
            for e, wt in zip(ids, wts))
    g_, u_, d_ = (np.asarray(m.kernel[...], np.float64) for m in
                  (sh.gate_proj, sh.up_proj, sh.down_proj))
    out.append(y + (silu(h @ g_) * (h @ u_)) @ d_)
  return np.stack(out).reshape(x_bsd.shape)


@pytest.mark.parametrize("kw", [
    dict(norm_topk_prob=True),
    dict(norm_topk_prob=False, routed_scaling_factor=2.5),
    dict(topk_method="group_limited_greedy", n_group=3, topk_group=2, norm_topk_prob=True),
])
@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_layer_matches_naive_reference(kw, impl):
  cfg = _cfg(moe_impl=impl, **kw)
  layer = MoEBlock(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 5, D))
  y, routing, _ = layer(x)
  np.testing.assert_allclose(y, _naive_moe(layer, x, cfg), atol=1e-5)
  if cfg.norm_topk_prob:
    np.testing.assert_allclose(routing.topk_weights.sum(-1), 1.0, atol=1e-6)
  assert routing.topk_ids.shape == (10, 3) and routing.logits.shape == (10, E)


def test_group_limited_selection_hand_example():
  cfg = _cfg(topk_method="group_limited_greedy", n_group=3, topk_group=1, num_experts_per_tok=2)
  # groups {0,1} {2,3} {4,5}: the best single expert (4) lives in group 2, so only 4 and 5 qualify
  # even though expert 0 has the second-highest score.
  logits = jnp.log(jnp.array([[0.2, 0.01, 0.15, 0.15, 0.4, 0.09]]))
  w, ids, _ = select_experts(logits, cfg)
  assert sorted(np.asarray(ids[0]).tolist()) == [4, 5]
  np.testing.assert_allclose(sorted(np.asarray(w[0])), [0.09, 0.4], atol=1e-6)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_balance_loss_matches_deepseek_formula(seq_aux):
  cfg = _cfg(seq_aux=seq_aux, aux_loss_alpha=0.01)
  b, s, k = 3, 7, cfg.num_experts_per_tok
  scores = np.asarray(jax.nn.softmax(jax.random.normal(jax.random.key(0), (b, s, E)), -1))
  ids = np.stack([[np.random.RandomState(i * s + j).choice(E, k, replace=False)
                   for j in range(s)] for i in range(b)])
  # DeepSeek-V2 MoEGate, transcribed.
  if seq_aux:
    ce = np.zeros((b, E))
    for i in range(b):
      np.add.at(ce[i], ids[i].reshape(-1), 1.0)
    ce /= s * k / E
    ref = (ce * scores.mean(1)).sum(1).mean() * 0.01
  else:
    ce = np.eye(E)[ids.reshape(-1)].mean(0)
    ref = (scores.reshape(-1, E).mean(0) * ce * E).sum() * 0.01
  got = balance_loss(jnp.asarray(scores), jnp.asarray(ids), jnp.ones((b, s), bool), cfg)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  # Padding tokens do not count: masking the last 2 tokens = dropping them.
  mask = np.ones((b, s), bool)
  mask[:, -2:] = False
  dropped = balance_loss(jnp.asarray(scores[:, :-2]), jnp.asarray(ids[:, :-2]),
                         jnp.ones((b, s - 2), bool), cfg)
  np.testing.assert_allclose(balance_loss(jnp.asarray(scores), jnp.asarray(ids),
                                          jnp.asarray(mask), cfg), dropped, rtol=1e-5)


def test_layer_grads_agree_across_impls():
  x = jax.random.normal(jax.random.key(5), (2, 9, D))
  grads = {}
  for impl in ("dense", "ragged", "tokamax", "tiled"):
    layer = MoEBlock(_cfg(moe_impl=impl), rngs=nnx.Rngs(0))
    loss = lambda m: (m(x)[0] ** 2).sum() + m(x)[2].balance
    grads[impl] = nnx.to_flat_state(nnx.grad(loss)(layer))
  for impl in ("ragged", "tokamax", "tiled"):
    for (path, a), (_, b) in zip(grads[impl], grads["dense"]):
      np.testing.assert_allclose(a[...], b[...], atol=1e-5, rtol=1e-5, err_msg=f"{impl} {path}")


def test_tokamax_tpu_kernel_matches_dense_in_interpret_mode(monkeypatch):
  """The "tokamax" path with the TPU Pallas kernel (GMM forward, its transposed-RHS and TGMM
  gradient kernels) run by Pallas' interpreter on CPU: outputs and gradients equal "dense" to
  1e-5, including the row padding to whole 128-row tiles (180 slots -> 256 rows) and slots of
  id E. The kernel reads the TPU generation for its tiling, so the test says v5e.

  On CPU, "tokamax" otherwise runs tokamax's XLA path (the tests above); this one checks the
  kernel that a TPU runs, at the smallest shapes it takes (every dim >= 128).
  """
  import functools  # pylint: disable=import-outside-toplevel
  from jax._src.pallas.mosaic import tpu_info  # pylint: disable=import-outside-toplevel
  from tokamax._src.ops.ragged_dot import base  # pylint: disable=import-outside-toplevel
  from tokamax._src.ops.ragged_dot.pallas_mosaic_tpu import (  # pylint: disable=import-outside-toplevel
      PallasMosaicTpuRaggedDot)
  from desmoe_jax.moe import block as moe  # pylint: disable=import-outside-toplevel

  class Interpreted(PallasMosaicTpuRaggedDot):
    def supported_on(self, device):  # tokamax refuses the TPU kernel on a CPU device
      return True

  monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
  monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
  inner = Interpreted(interpret=True)
  kernel = Interpreted(interpret=True, vjp=functools.partial(
      base.vjp, dlhs_ragged_dot=inner, drhs_ragged_dot=inner))
  monkeypatch.setitem(moe.TOKAMAX_RAGGED_DOT, "default", (kernel,))  # no "xla" to fall back on

  e, d, f, t, k = 4, 128, 128, 90, 2
  keys = jax.random.split(jax.random.key(0), 5)
  weights = (jax.random.normal(keys[0], (e, d, f)) * 0.1, jax.random.normal(keys[1], (e, d, f)) * 0.1,
             jax.random.normal(keys[2], (e, f, d)) * 0.1)
  x = jax.random.normal(keys[3], (t, d))
  cot = jax.random.normal(keys[4], (t, k, d))
  ids = np.stack([np.random.RandomState(i).choice(e, k, replace=False) for i in range(t)])
  ids[::5, 1] = e
  valid = jnp.asarray(ids < e)[..., None]

  def run(impl, ids, cot):
    f_ = lambda x, g, u, dn: (expert_outputs(x, ids, g, u, dn, impl=impl) * cot).sum()
    return expert_outputs(x, ids, *weights, impl=impl), jax.grad(f_, argnums=(0, 1, 2, 3))(
        x, *weights)

  y, grads = jax.jit(run, static_argnums=0)("tokamax", jnp.asarray(ids), cot)
  ref_y, ref_grads = run("dense", jnp.asarray(np.minimum(ids, e - 1)), cot * valid)
  np.testing.assert_allclose(y, ref_y * valid, atol=1e-5, rtol=1e-5)
  for a, b, name in zip(grads, ref_grads, ("x", "gate", "up", "down")):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
