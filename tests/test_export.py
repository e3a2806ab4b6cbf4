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
