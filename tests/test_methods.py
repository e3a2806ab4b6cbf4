"""Every method trains 20 steps on a tiny model with the same step function, loss going down."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_model

from desmoe_jax import esft, optim
from desmoe_jax import train_step as ts
from desmoe_jax.methods import METHODS, UNSCHEDULED, MethodConfig, prepare_model

DOMAINS = 3


def _batches(n, seed=0):
  """Domain d's sequences count upwards with stride d + 1 (learnable, domain-specific)."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    dom = rng.randint(0, DOMAINS, 4)
    start = rng.randint(0, 64, 4)
    tokens = (start[:, None] + np.arange(16)[None] * (dom[:, None] + 1)) % 64
    out.append({"tokens": jnp.asarray(tokens, jnp.int32),
                "loss_mask": jnp.ones((4, 16), jnp.float32),
                "domain_ids": jnp.asarray(np.repeat(dom[:, None], 16, 1), jnp.int32)})
  return out


def _eval_loss(graphdef, params, state, batches):
  @jax.jit
  def loss(params, tokens):
    logits = nnx.merge(graphdef, params, state)(tokens).logits
    return ts.token_losses(logits, tokens)[:, 1:].mean()
  return float(np.mean([loss(params, b["tokens"]) for b in batches]))


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_loss_goes_down(method):
  mc = MethodConfig(method=method, num_domains=DOMAINS, total_steps=20)
  model = prepare_model(tiny_model(seed=0), mc)
  train, held_out = _batches(20, seed=1), _batches(3, seed=2)
  if mc.is_esft:
    masks = esft.esft_masks(model, {d: train for d in range(DOMAINS)}, mc.esft_score, mc.esft,
                            DOMAINS)
    model.moe_layers.mlp.expert_mask[...] = jnp.asarray(masks)
    assert 0 < masks.mean() < 1
  g, params, state = ts.split_model(model)
  oc = optim.OptimConfig(learning_rate=1e-2, schedule="constant")
  opt = ts.init_optimizer(mc, oc, params)
  before = _eval_loss(g, params, state, held_out)
  steps, losses = {}, []
  for step, b in enumerate(train):
    phase = mc.phase(step)
    if phase not in steps:
      steps[phase] = jax.jit(ts.make_train_step(g, mc, oc, phase))
    params, state, opt, metrics = steps[phase](params, state, opt, b, jnp.asarray(step))
    losses.append(float(metrics["loss"]))
    assert np.isfinite(losses[-1])
  after = _eval_loss(g, params, state, held_out)
  assert after < before - 0.05, (method, before, after)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
  assert sorted(steps) == ([0, 1, 2] if mc.use_schedule else [UNSCHEDULED])
  for key in ("domain_loss", "domain_tokens", "kd_loss", "lambda", "mask_density",
              "expert_overlap"):
    assert key in metrics
  assert metrics["domain_loss"].shape == (DOMAINS,)
