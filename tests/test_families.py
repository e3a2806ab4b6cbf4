"""The suite every family passes (families/: DeepSeek-V2/V3, Qwen3-MoE, OLMoE, Mixtral, Qwen2-MoE),
each on a tiny random model that transformers builds offline:
  * float32 logits equal transformers' to 1e-4;
  * our export reloads in transformers to the same logits, and back into ours bit for bit;
  * the scanned and the unrolled layer stacks agree;
  * one decode step against the prefill cache equals the full forward's next-token logits;
  * an 8-device sharded forward equals the 1-device one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from desmoe_jax import sharding
from desmoe_jax.convert import Checkpoint, from_pretrained, save_pretrained
from desmoe_jax.families import FAMILIES

FAMILY_NAMES = sorted(FAMILIES)


def _ids(seed, shape, vocab):
  return np.random.RandomState(seed).randint(0, vocab, shape)


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_match_transformers_and_export_reloads(family_checkpoint, family, tmp_path):
  import transformers
  path, hf = family_checkpoint(family)
  ids = _ids(0, (2, 13), hf.config.vocab_size)
  ref = _torch_logits(hf, ids)
  model = from_pretrained(path, dtype=jnp.float32)
  assert model.config.model_type == family
  np.testing.assert_allclose(np.asarray(model(ids).logits), ref, atol=1e-4, rtol=0)

  save_pretrained(model, str(tmp_path))
  src, ours = Checkpoint(path), Checkpoint(str(tmp_path))
  assert set(ours.keys()) == set(src.keys())
  for key in ours.keys():
    np.testing.assert_array_equal(ours.get(key), src.get(key), err_msg=key)
  cls = getattr(transformers, FAMILIES[family].HF_ARCHITECTURE)
  reloaded = cls.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  np.testing.assert_array_equal(_torch_logits(reloaded, ids), ref)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_scan_unrolled_and_decode_agree(family_checkpoint, family):
  path, hf = family_checkpoint(family)
  ids = _ids(1, (2, 9), hf.config.vocab_size)
  scanned = from_pretrained(path, dtype=jnp.float32, scan_layers=True)
  unrolled = from_pretrained(path, dtype=jnp.float32, scan_layers=False)

  # Jitted as the trainer and the evaluator run them (op by op, the unrolled model compiles
  # each of its ~300 kernels apart).
  @nnx.jit
  def forward(m, ids):
    out = m(ids, return_routing=True)
    return out.logits, out.routing.topk_ids

  @nnx.jit
  def prefill_then_decode(m, ids):
    """Prefill 8 tokens, decode the 9th against the cache."""
    cache = m(ids[:, :8], return_latents=True).latents.grow(1)
    positions = jnp.full((2, 1), 8, jnp.int32)
    logits, _ = m.decode_step(ids[:, 8:9], positions, cache, 8, jnp.ones((2, 9), jnp.bool_))
    return logits

  (a, a_ids), (b, b_ids) = forward(scanned, ids), forward(unrolled, ids)
  np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_array_equal(a_ids, b_ids)
  logits = prefill_then_decode(scanned, jnp.asarray(ids))   # the full forward's logits at 9
  np.testing.assert_allclose(logits[:, 0], a[:, 8], atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sharded_forward_equals_single_device(family_checkpoint, family):
  path, hf = family_checkpoint(family)
  ids = _ids(2, (8, 12), hf.config.vocab_size)
  ref = np.asarray(from_pretrained(path, dtype=jnp.float32)(ids).logits)
  mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
  model = from_pretrained(path, dtype=jnp.float32, mesh=mesh)
  assert len(model.moe_blocks().experts.gate_proj[...].sharding.device_set) == 8

  @nnx.jit
  def forward(m, ids):
    return m(ids).logits

  with jax.set_mesh(mesh):
    out = forward(model, jax.device_put(ids, sharding.batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
