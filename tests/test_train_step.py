"""The train step's StepConfig: gradient accumulation equals the big batch, and the precision
modes lose no update (stochastic rounding unbiased, weight decay applied)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_model

from desmoe_jax import optim
from desmoe_jax import train_step as ts
from desmoe_jax.methods import UNSCHEDULED, MethodConfig, prepare_model
from desmoe_jax.schedule import STABILIZATION

D, B, S = 3, 4, 12


def _batch():
  """4 rows that differ in everything a wrong normalisation would weigh differently: domains
  (mixed inside row 3), target counts (prompt tokens masked), padding (segment 0), packing."""
  rng = np.random.RandomState(3)
  tokens = rng.randint(0, 64, (B, S))
  domain = np.array([[0] * S, [1] * S, [2] * S, [0] * 5 + [2] * 7])
  loss_mask = np.ones((B, S), np.float32)
  loss_mask[0, :9] = 0          # row 0: 3 targets
  loss_mask[2, :4] = 0          # row 2: 8 targets
  segment_ids = np.ones((B, S), np.int32)
  segment_ids[1, 7:] = 0        # row 1: 5 padding tokens (no targets, no routing statistics)
  loss_mask[1, 7:] = 0
  segment_ids[3, 5:] = 2        # row 3: two packed examples
  positions = np.concatenate([np.arange(S)[None].repeat(3, 0),
                              np.r_[np.arange(5), np.arange(7)][None]])
  return {"tokens": jnp.asarray(tokens, jnp.int32), "loss_mask": jnp.asarray(loss_mask),
          "domain_id": jnp.asarray(domain, jnp.int32),
          "segment_ids": jnp.asarray(segment_ids), "positions": jnp.asarray(positions, jnp.int32)}


def _setup(method):
  mc = MethodConfig(method=method, num_domains=D, total_steps=20)
  model = prepare_model(tiny_model(seed=4), mc)
  # Masks that isolate: expert e is owned by domains {e % 3} (and expert 0 by all).
  mask = np.zeros(model.moe_layers.mlp.expert_mask.shape, np.float32)     # [L, D, E]
  for e in range(mask.shape[2]):
    mask[:, e % D, e] = 1
  mask[:, :, 0] = 1
  model.moe_layers.mlp.expert_mask[...] = jnp.asarray(mask)
  model.moe_layers.mlp.correlation[...] = jnp.asarray(
      np.random.RandomState(0).rand(*mask.shape).astype(np.float32) * 0.2)
  if mc.use_alr:  # an ALR that has drifted from its teacher: the KD loss is not 0
    w2 = model.moe_layers.mlp.gate.w2
    w2[...] = jnp.asarray(np.random.RandomState(1).randn(*w2.shape).astype(np.float32) * 0.05)
  graphdef, state = nnx.split(model)
  # eps=1e-2: Adam's first step g / (|g| + eps) would otherwise turn the float32 rounding of a
  # near-zero gradient element (a sum of cancelling terms, summed in another order) into a
  # full-size change of the update; the gradients themselves are compared directly.
  oc = optim.OptimConfig(learning_rate=1e-3, schedule="constant", eps=1e-2)
  return mc, oc, graphdef, state, ts.init_optimizer(mc, oc, state)


def _moments(opt_state, name):
  """{path: array} of Adam's `name` ("mu" or "nu") moment leaves of the optimizer state."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    keys = [str(optim._key(k)) for k in path]
    if name in keys:
      out[tuple(keys)] = np.asarray(leaf)
  return out


def _close(got, want, what, rtol=1e-6):
  """|got - want| <= rtol * max|want| leaf-wise: relative to the leaf's scale, since an element
  that is a sum of cancelling terms has no meaningful elementwise relative error."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= rtol * scale + 1e-30, (
      what, np.abs(got - want).max(), scale)


@pytest.mark.parametrize("method,phase", [("desmoe", STABILIZATION), ("fft", UNSCHEDULED),
                                          ("esft_token", UNSCHEDULED)])
def test_microbatches_equal_one_big_batch(method, phase):
  """4 microbatches of one row each against the 4-row batch, float32: losses and metrics,
  gradients (Adam's first moment after one step is (1 - b1) x the clipped gradient), updated
  parameters, the correlation matrices and the refreshed masks."""
  mc, oc, g, state, opt = _setup(method)
  step = jnp.asarray(9)  # (9 + 1) % update_every == 0: masks refresh from the new correlation
  results = {}
  for n in (1, 4):
    fn = jax.jit(ts.make_train_step(g, mc, oc, phase, ts.StepConfig(microbatches=n)))
    results[n] = fn(state, opt, _batch(), step)
  (s1, o1, m1), (s4, o4, m4) = results[1], results[4]
  for key in ("loss", "total_loss", "kd_loss", "balance_loss", "grad_norm", "domain_loss",
              "domain_tokens", "experts_updated", "mask_density"):
    _close(m4[key], m1[key], key)
  assert float(m1["balance_loss"]) > 0 and float(m1["grad_norm"]) > 0
  if mc.use_alr:
    assert float(m1["kd_loss"]) > 0
  for name in ("mu", "nu"):
    mom1, mom4 = _moments(o1, name), _moments(o4, name)
    assert mom1.keys() == mom4.keys() and mom1
    for path in mom1:
      _close(mom4[path], mom1[path], path)
  before = dict(nnx.to_flat_state(state))
  moved = 0
  for (path, v1), (_, v4) in zip(nnx.to_flat_state(s1), nnx.to_flat_state(s4)):
    _close(v4[...], v1[...], path)
    moved += isinstance(v1, nnx.Param) and not np.array_equal(v1[...], before[path][...])
  assert moved > 0
  mlp1, mlp4 = s1["moe_layers"]["mlp"], s4["moe_layers"]["mlp"]
  _close(mlp4["correlation"][...], mlp1["correlation"][...], "correlation")
  assert not np.array_equal(mlp1["correlation"][...], state["moe_layers"]["mlp"]["correlation"][...])
  np.testing.assert_array_equal(mlp4["expert_mask"][...], mlp1["expert_mask"][...])


def test_microbatch_errors_name_the_field():
  mc, oc, g, state, opt = _setup("fft")
  fn = ts.make_train_step(g, mc, oc, UNSCHEDULED, ts.StepConfig(microbatches=3))
  with pytest.raises(ValueError, match=r"train.microbatches=3 does not divide the batch of 4"):
    jax.eval_shape(fn, state, opt, _batch(), jnp.asarray(0))
  with pytest.raises(ValueError, match="train.microbatches=0"):
    ts.StepConfig(microbatches=0)
  with pytest.raises(ValueError, match="train.precision='bf16'"):
    ts.StepConfig(precision="bf16")
