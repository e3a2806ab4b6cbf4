"""HF export of an adapted model: the ALR folded by least squares, copies merged, every other
tensor exact, and transformers computing what our folded model computes."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from helpers import batch, tiny_model

from desmoe_jax.convert import Checkpoint, from_pretrained, save_pretrained
from desmoe_jax.export import export_hf
from desmoe_jax.methods import MethodConfig, prepare_model
from desmoe_jax.specialization import DgesConfig, duplicate


def test_export_folds_router_and_transformers_agrees(tmp_path):
  mc = MethodConfig(method="desmoe", num_domains=3, total_steps=10,
                    dges=DgesConfig(duplicate_shared_experts=True))
  model = prepare_model(tiny_model(seed=9), mc)
  moe = model.moe_blocks()
  # Pretend training moved the ALR's linear part (a real change of routing; its MLP part is
  # still 0, so a linear router can represent it exactly) and created a copy of expert 1.
  moe.gate.weight[...] = moe.gate.weight[...] + 0.05 * jax.random.normal(
      jax.random.key(1), moe.gate.weight.shape)
  student = np.asarray(moe.gate.weight[...])
  mask = np.zeros(moe.des.expert_mask.shape, np.float32)
  mask[:, 0, 1] = mask[:, 2, 1] = 1
  moe.des.expert_mask[...] = jnp.asarray(mask)
  duplicate(model)
  moe.des.expert_copies.down_proj[...] = moe.des.expert_copies.down_proj[...] * 1.5
  down_before = np.asarray(moe.experts.down_proj[...][:, 1])
  attn_before = np.asarray(model.moe_layers.self_attn.kv_b_proj.kernel[...])

  batches = [{k: v for k, v in batch(i, [0, 1, 2, 1]).items() if k == "tokens"}
             for i in range(6)]
  report = export_hf(model, str(tmp_path), tokenizer_dir=None, fit_batches=batches)
  assert report["merged_expert_copies"] and report["check_batches"] >= 1
  assert report["topk_set_agreement"] > 0.99
  assert abs(report["heldout_loss_folded"] - report["heldout_loss_adapted"]) < 1e-3
  np.testing.assert_allclose(model.moe_blocks().gate.weight[...], student, atol=1e-3)

  reloaded = from_pretrained(str(tmp_path), dtype=jnp.float32)
  np.testing.assert_allclose(reloaded.moe_blocks().experts.down_proj[...][:, 1],
                             down_before * 1.25, rtol=1e-6)  # mean of 1x and 1.5x
  np.testing.assert_array_equal(reloaded.moe_layers.self_attn.kv_b_proj.kernel[...],
                                attn_before)
  assert "model.layers.1.mlp.gate.weight" in Checkpoint(str(tmp_path)).keys()

  from transformers import DeepseekV2ForCausalLM
  hf = DeepseekV2ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  ids = np.asarray(batches[0]["tokens"])
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(reloaded(ids).logits), ref, atol=1e-4)


def test_fold_reports_a_nonlinear_router_honestly(tmp_path):
  model = prepare_model(tiny_model(seed=9), MethodConfig(method="desmoe", num_domains=3))
  gate = model.moe_blocks().gate
  gate.w2[...] = 0.05 * jax.random.normal(jax.random.key(2), gate.w2.shape)  # strongly nonlinear
  batches = [{"tokens": batch(i, [0, 1, 2, 1])["tokens"]} for i in range(6)]
  report = export_hf(model, str(tmp_path), tokenizer_dir=None, fit_batches=batches)
  assert 0.0 <= report["topk_set_agreement"] < 0.99  # measured on held-out tokens, not hidden


def test_plain_save_refuses_des_moe_parts(tmp_path):
  model = prepare_model(tiny_model(), MethodConfig(method="desmoe", num_domains=2))
  try:
    save_pretrained(model, str(tmp_path))
  except ValueError as e:
    assert "export_hf" in str(e)
  else:
    raise AssertionError("save_pretrained accepted an adaptive router")


# ------------------------------------------------------------------ at scale: on the mesh


def _packed(seed, rows=4, seq=16):
  """A packed held-out batch: two segments per row, padding at the end of some rows."""
  b = batch(seed, [0, 1, 2, 1][:rows], seq=seq)
  seg = np.ones((rows, seq), np.int32)
  pos = np.tile(np.arange(seq, dtype=np.int32), (rows, 1))
  for r in range(rows):
    cut, pad = 5 + (seed + r) % 6, (seed * 3 + r) % 4   # second segment from `cut`, then padding
    seg[r, cut:] = 2
    pos[r, cut:] -= cut
    if pad:
      seg[r, -pad:] = 0
      pos[r, -pad:] = 0
  return {"tokens": np.asarray(b["tokens"]), "segment_ids": seg, "positions": pos,
          "loss_mask": (seg > 0).astype(np.float32)}


def _adapted_model():
  """A DES-MoE model after 'training': a nonlinear ALR (nothing a linear router represents
  exactly, so the fit's numbers matter) and a duplicated expert."""
  mc = MethodConfig(method="desmoe", num_domains=3, dges=DgesConfig(duplicate_shared_experts=True))
  model = prepare_model(tiny_model(seed=9), mc)
  moe = model.moe_blocks()
  moe.gate.w2[...] = 0.02 * jax.random.normal(jax.random.key(2), moe.gate.w2.shape)
  mask = np.zeros(moe.des.expert_mask.shape, np.float32)
  mask[:, 0, 3] = 1
  moe.des.expert_mask[...] = jnp.asarray(mask)
  duplicate(model)
  moe.des.expert_copies.up_proj[...] = moe.des.expert_copies.up_proj[...] * 0.5
  return model


def test_mesh_fold_equals_single_device_fold_on_a_bounded_sample(tmp_path):
  from desmoe_jax import sharding
  batches = [_packed(i) for i in range(6)]
  fold_tokens, check_tokens = 100, 70          # 3 batches' worth of a 4 x 16 packed batch or so

  # Reference: the least-squares fit in float64 on exactly the first 100 real tokens.
  model = _adapted_model()
  graphdef, state = nnx.split(model)
  routing = jax.jit(lambda st, b: nnx.merge(graphdef, st)(
      b["tokens"], segment_ids_bs=b["segment_ids"], positions_bs=b["positions"],
      return_routing="inputs"))
  hs, rs = [], []
  for b in batches:
    out = routing(state, {k: b[k] for k in ("tokens", "segment_ids", "positions")})
    real = b["segment_ids"].reshape(-1) > 0
    hs.append(np.asarray(out.routing.inputs, np.float64)[:, real])   # [L, n, D]
    rs.append(np.asarray(out.routing.logits, np.float64)[:, real])   # [L, n, E]
  h, r = np.concatenate(hs, 1)[:, :fold_tokens], np.concatenate(rs, 1)[:, :fold_tokens]
  gram, cross = np.einsum("lnd,lnf->ldf", h, h), np.einsum("lnd,lne->lde", h, r)
  ridge = 1e-6 * np.trace(gram, axis1=1, axis2=2)[:, None, None] / gram.shape[1]
  w_ref = np.linalg.solve(gram + ridge * np.eye(gram.shape[1]), cross)
  real_per_batch = [int((b["segment_ids"] > 0).sum()) for b in batches]
  n_fit = int(np.searchsorted(np.cumsum(real_per_batch), fold_tokens) + 1)

  one = export_hf(model, str(tmp_path / "one"), tokenizer_dir=None, fit_batches=batches,
                  fold_tokens=fold_tokens, check_tokens=check_tokens)
  assert one["fit_tokens"] == fold_tokens and one["fit_batches"] == n_fit
  assert one["check_tokens"] == check_tokens
  assert one["check_batches"] == int(np.searchsorted(
      np.cumsum(real_per_batch[n_fit:]), check_tokens) + 1)
  np.testing.assert_allclose(model.moe_blocks().gate.weight[...], w_ref, rtol=2e-4, atol=2e-5)

  mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})   # batch over fsdp x expert
  with jax.set_mesh(mesh):
    model = sharding.shard_model(_adapted_model(), mesh)
    assert not model.moe_blocks().experts.up_proj[...].sharding.is_fully_replicated
    on_mesh = export_hf(model, str(tmp_path / "mesh"), tokenizer_dir=None, fit_batches=batches,
                        fold_tokens=fold_tokens, check_tokens=check_tokens,
                        batch_sharding=sharding.batch_sharding(mesh))
    assert model.moe_blocks().gate.weight[...].sharding.mesh == mesh

  assert {k: on_mesh[k] for k in ("fit_tokens", "fit_batches", "check_tokens", "check_batches",
                                  "topk_set_agreement", "merged_expert_copies")} == \
      {k: one[k] for k in ("fit_tokens", "fit_batches", "check_tokens", "check_batches",
                           "topk_set_agreement", "merged_expert_copies")}
  assert 0.2 < one["topk_set_agreement"] < 1.0   # a nonlinear router: folded, not reproduced
  for key in ("heldout_loss_adapted", "heldout_loss_folded"):
    np.testing.assert_allclose(on_mesh[key], one[key], rtol=1e-5)
  a, b = Checkpoint(str(tmp_path / "one")), Checkpoint(str(tmp_path / "mesh"))
  assert sorted(a.keys()) == sorted(b.keys())
  for key in a.keys():
    if key.endswith("mlp.gate.weight"):   # the fold: float32 sums in another order
      np.testing.assert_allclose(b.get(key), a.get(key), rtol=1e-5, atol=1e-6, err_msg=key)
    else:                                 # everything else: gathered, not recomputed
      np.testing.assert_array_equal(b.get(key), a.get(key), err_msg=key)


def test_fold_budgets_are_checked():
  model = _adapted_model()
  batches = [_packed(i) for i in range(2)]
  for field, kw in (("fold_tokens", {"fold_tokens": 0}), ("check_tokens", {"check_tokens": 2.5})):
    try:
      export_hf(model, "/nonexistent", tokenizer_dir=None, fit_batches=batches, **kw)
    except ValueError as e:
      assert f"export.{field}" in str(e)
    else:
      raise AssertionError(f"{kw} accepted")
