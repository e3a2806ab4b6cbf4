"""DGES: correlation updates, mask rules, per-token gradient isolation, expert duplication."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import batch, tiny_model

from desmoe_jax import specialization as sp
from desmoe_jax import train_step as ts
from desmoe_jax.methods import MethodConfig, prepare_model
from desmoe_jax.moe.block import Adaptation
from desmoe_jax.optim import OptimConfig


def test_correlation_update_matches_numpy_over_steps():
  """Several train steps on mixed-domain batches (lr = 0 so routing is fixed per batch)."""
  d, momentum = 3, 0.9
  mc = MethodConfig(method="desmoe", num_domains=d, total_steps=100)
  model = prepare_model(tiny_model(seed=5), mc)
  g, ms = nnx.split(model)
  oc = OptimConfig(learning_rate=0.0)
  opt = ts.init_optimizer(mc, oc, ms)
  step_fn = jax.jit(ts.make_train_step(g, mc, oc, mc.phase(0)))
  batches = [batch(i, doms) for i, doms in enumerate([[0, 1, 1], [2, 0, 0], [1, 1, 1], [2, 2, 0]])]
  mask = [[1] * 12, [1] * 8 + [0] * 4, [1] * 12]  # padding does not count
  batches[0]["segment_ids"] = jnp.asarray(mask, jnp.int32)

  ref = np.zeros(ms["moe_layers"]["mlp"]["des"]["correlation"][...].shape)  # [L, D, E]
  topk_ids = jax.jit(lambda ms, tokens, seg: nnx.merge(g, ms)(
      tokens, segment_ids_bs=seg, return_routing=True).routing.topk_ids)
  for step, b in enumerate(batches):
    seg = np.asarray(b.get("segment_ids", np.ones(b["tokens"].shape, np.int32)))
    ids = np.asarray(topk_ids(ms, b["tokens"], seg))               # [L, T, K]
    dom = np.asarray(b["domain_id"]).reshape(-1)
    real = seg.reshape(-1) > 0
    for dd in range(d):
      sel = real & (dom == dd)
      if not sel.any():
        continue
      for layer in range(ids.shape[0]):
        f = np.zeros(ref.shape[2])
        for t in np.flatnonzero(sel):
          f[np.unique(ids[layer, t])] += 1
        ref[layer, dd] = momentum * ref[layer, dd] + (1 - momentum) * f / sel.sum()
    ms, opt, _ = step_fn(ms, opt, b, jnp.asarray(step))
    np.testing.assert_allclose(ms["moe_layers"]["mlp"]["des"]["correlation"][...], ref, atol=1e-6)


def test_mask_rules_hand_examples():
  a = jnp.asarray([[[0.30, 0.20, 0.05, 0.45],     # relative: >= 0.6 * 0.45 = 0.27 -> {0, 3}
                    [0.00, 0.00, 0.00, 0.00]]])   # unseen domain -> all ones
  np.testing.assert_array_equal(sp.mask_from_correlation(a, 0.6, "relative"),
                                [[[1, 0, 0, 1], [1, 1, 1, 1]]])
  # cumulative: shares .45 .30 .20 .05; phi=0.6 -> {3, 0} (0.45 < 0.6, 0.75 >= 0.6)
  np.testing.assert_array_equal(sp.mask_from_correlation(a, 0.6, "cumulative"),
                                [[[1, 0, 0, 1], [1, 1, 1, 1]]])
  np.testing.assert_array_equal(sp.mask_from_correlation(a, 0.8, "cumulative")[0, 0], [1, 1, 0, 1])
  overlap = sp.mask_overlap(jnp.asarray([[[1, 1, 0, 0], [0, 1, 1, 0]]], jnp.float32))
  np.testing.assert_allclose(overlap, [[1, 1 / 3], [1 / 3, 1]])


def _masked_model(seed=7):
  model = sp.attach(tiny_model(seed=seed), num_domains=3)
  rng = np.random.RandomState(0)
  mask = (rng.rand(*model.moe_blocks().des.expert_mask.shape) < 0.5).astype(np.float32)
  mask[:, :, 0] = 0  # expert 0 owned by nobody
  model.moe_blocks().des.expert_mask[...] = jnp.asarray(mask)
  return model, mask


def test_expert_gradient_comes_only_from_owning_domains():
  model, mask = _masked_model()
  b = batch(3, [0, 1, 2, 1, 0, 2])
  g, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def expert_grads(tokens, domains, isolate=True):
    def loss(p):
      out = nnx.merge(g, p, rest)(tokens, adapt=Adaptation(domain_bs=domains, isolate=isolate))
      return ts.token_losses(out.logits, tokens).sum()  # a sum: batch rows are independent
    return jax.grad(loss)(params)["moe_layers"]["mlp"]["experts"]

  mixed = expert_grads(b["tokens"], b["domain_id"])
  rows_domain = np.asarray(b["domain_id"][:, 0])
  refs = {}
  for layer in range(mask.shape[0]):
    for e in range(mask.shape[2]):
      keep = np.isin(rows_domain, np.flatnonzero(mask[layer, :, e]))
      if not keep.any():  # owned by nobody in the batch: exactly zero
        for name in ("gate_proj", "up_proj", "down_proj"):
          assert not np.asarray(mixed[name][...][layer, e]).any(), (layer, e, name)
        continue
      # Same masks (they shape every layer's backward), but only the owners' sequences.
      if keep.tobytes() not in refs:
        refs[keep.tobytes()] = expert_grads(b["tokens"][keep], b["domain_id"][keep])
      ref = refs[keep.tobytes()]
      for name in ("gate_proj", "up_proj", "down_proj"):
        np.testing.assert_allclose(mixed[name][...][layer, e], ref[name][...][layer, e],
                                   atol=2e-6, err_msg=f"layer {layer} expert {e} {name}")
  assert len(refs) >= 3


def test_duplicated_experts_dispatch_and_merge():
  mc = MethodConfig(method="desmoe", num_domains=3, total_steps=10,
                    dges=sp.DgesConfig(duplicate_shared_experts=True, max_copies=4))
  model = prepare_model(tiny_model(seed=2), mc)
  moe = model.moe_blocks().des
  mask = np.zeros(moe.expert_mask.shape, np.float32)
  mask[:, 0, 1] = mask[:, 2, 1] = 1  # expert 1 owned by domains 0 and 2 in every layer
  mask[:, 1, 2] = 1
  moe.expert_mask[...] = jnp.asarray(mask)
  b = batch(4, [0, 1, 2])
  before = model(b["tokens"], adapt=Adaptation(domain_bs=b["domain_id"])).logits
  summary = sp.duplicate(model)
  assert summary == {"copies": 2, "not_copied_bank_full": 0}      # one copy per layer
  np.testing.assert_array_equal(moe.expert_copies.table[...][:, 2, 1], [0, 0])
  # Fresh copies compute exactly what the original did.
  after = model(b["tokens"], adapt=Adaptation(domain_bs=b["domain_id"])).logits
  np.testing.assert_allclose(after, before, atol=1e-6)
  # Move the copy: domain 2's tokens now see it, domain 0's do not.
  moe.expert_copies.up_proj[...] = moe.expert_copies.up_proj[...] + 0.5
  moved = model(b["tokens"], adapt=Adaptation(domain_bs=b["domain_id"])).logits
  routed = np.asarray(model(b["tokens"], return_routing=True).routing.topk_ids)  # [L, T, K]
  assert (routed.reshape(routed.shape[0], 3, -1, routed.shape[-1])[:, 2] == 1).any()
  assert not np.allclose(moved[2], before[2])                  # row of domain 2
  np.testing.assert_allclose(moved[:2], before[:2], atol=1e-6)  # domains 0 and 1 untouched
  # Merge: expert 1 becomes the mean of its two versions; the bank is gone.
  up_before = np.asarray(model.moe_blocks().experts.up_proj[...][:, 1])
  # As the trainer's export hands it over: host copies of the state (read-only numpy arrays).
  nnx.update(model, jax.device_get(nnx.state(model)))
  sp.merge_copies(model)
  assert model.moe_blocks().des.expert_copies is None
  np.testing.assert_allclose(model.moe_blocks().experts.up_proj[...][:, 1], up_before + 0.25,
                             atol=1e-6)


def test_routing_overlap_and_premise_hand_example():
  """One layer, 4 experts: general text spreads over experts 0-3, the domain over 0 and 1."""
  general = np.array([[0.4, 0.3, 0.2, 0.1]])
  domain = np.array([[0.5, 0.5, 0.0, 0.0]])
  # sum_e min: 0.4 + 0.3 + 0 + 0
  assert sp.routing_overlap(general, domain) == pytest.approx([0.7])
  assert sp.routing_overlap(general, general) == pytest.approx([1.0])
  assert sp.routing_overlap(domain, np.array([[0.0, 0.0, 0.5, 0.5]])) == pytest.approx([0.0])
  # phi = 0.6: the domain's mask is {0, 1} (0.5 >= 0.6 * 0.5); a second domain's is {3}
  premise = sp.routing_premise(general, {"a": domain, "b": np.array([[0.1, 0.1, 0.1, 0.7]])},
                               phi=0.6)
  a = premise["per_domain"]["a"]
  assert a["overlap"] == pytest.approx([0.7])
  assert a["mask_fraction"] == pytest.approx([0.5])
  assert a["general_on_mask"] == pytest.approx([0.7])        # 0.4 + 0.3
  assert a["domain_on_mask"] == pytest.approx([1.0])
  assert premise["per_domain"]["b"]["general_on_mask"] == pytest.approx([0.1])
  assert premise["union"]["mask_fraction"] == pytest.approx([0.75])   # {0, 1, 3}
  assert premise["union"]["general_on_mask"] == pytest.approx([0.8])
  assert premise["overlap_mean"] == pytest.approx((0.7 + 0.1 + 0.1 + 0.1 + 0.1) / 2)
  assert premise["general_top_share"][4] == pytest.approx([1.0])


def test_top_share_experts_picks_the_largest_per_layer_ties_to_lower_index():
  share = np.array([[0.1, 0.4, 0.1, 0.4], [0.7, 0.1, 0.1, 0.1]])
  np.testing.assert_array_equal(sp.top_share_experts(share, 2),
                                [[False, True, False, True], [True, True, False, False]])


def test_excluded_experts_never_join_a_mask_and_stay_bit_identical():
  """The oracle DGES control: with experts removed from every mask, refreshes every step
  (update_every=1) and a low phi that would give each domain most experts, the excluded ones
  are in no mask, receive no update (weight decay included) and keep their pretrained bits,
  while other experts train."""
  d = 3
  mc = MethodConfig(method="desmoe_no_schedule", num_domains=d, total_steps=4,
                    dges=sp.DgesConfig(update_every=1, phi=0.05,
                                       exclude_general_top=2))
  model = prepare_model(tiny_model(seed=6), mc)
  layers, e = model.moe_blocks().experts.gate_proj.shape[:2]
  excluded = np.zeros((layers, e), bool)
  excluded[:, [0, 5]] = True
  excluded[1, 5], excluded[1, 3] = False, True           # per layer
  sp.exclude_experts(model, excluded)
  before = np.asarray(model.moe_blocks().experts.gate_proj[...])
  g, ms = nnx.split(model)
  oc = OptimConfig(learning_rate=1e-2, weight_decay=0.1)
  opt = ts.init_optimizer(mc, oc, ms)
  step_fn = jax.jit(ts.make_train_step(g, mc, oc, mc.phase(0)))
  for step in range(4):
    ms, opt, _ = step_fn(ms, opt, batch(step, [0, 1, 2, 0]), jnp.asarray(step))
    mask = np.asarray(ms["moe_layers"]["mlp"]["des"]["expert_mask"][...])   # [L, D, E]
    assert not mask.transpose(0, 2, 1)[excluded].any()
    assert mask.transpose(0, 2, 1)[~excluded].any()
  after = np.asarray(nnx.merge(g, ms).moe_blocks().experts.gate_proj[...])  # [L, E, d, f]
  moved = (after != before).reshape(layers, e, -1).any(-1)
  assert not moved[excluded].any()
  assert moved[~excluded].any()


def test_exclusion_needs_a_method_that_applies_masks():
  with pytest.raises(ValueError, match="exclude_general_top"):
    MethodConfig(method="fft", dges=sp.DgesConfig(exclude_general_top=4))
  with pytest.raises(ValueError, match="exclude_general_top"):
    MethodConfig(method="esft_token", dges=sp.DgesConfig(exclude_general_top=4))
  with pytest.raises(ValueError, match="exclude_general_top"):
    sp.DgesConfig(exclude_general_top=-1)
