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
from desmoe_jax.specialization import DgesConfig, merge_copies

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
                "domain_id": jnp.asarray(np.repeat(dom[:, None], 16, 1), jnp.int32)})
  return out


def _eval_loss(graphdef, model_state, batches):
  @jax.jit
  def loss(model_state, tokens):
    logits = nnx.merge(graphdef, model_state)(tokens).logits
    return ts.token_losses(logits, tokens)[:, 1:].mean()
  return float(np.mean([loss(model_state, b["tokens"]) for b in batches]))


@pytest.mark.parametrize("method", METHODS + ("desmoe+duplication",))
def test_method_trains_and_loss_goes_down(method):
  duplication = method.endswith("+duplication")
  mc = MethodConfig(method=method.split("+")[0], num_domains=DOMAINS, total_steps=20,
                    dges=DgesConfig(duplicate_shared_experts=duplication, update_every=2))
  model = prepare_model(tiny_model(seed=0), mc)
  train, held_out = _batches(20, seed=1), _batches(3, seed=2)
  if mc.is_esft:
    masks = esft.esft_masks(model, {d: train for d in range(DOMAINS)}, mc.esft_score, mc.esft,
                            DOMAINS)
    model.moe_blocks().des.expert_mask[...] = jnp.asarray(masks)
    assert 0 < masks.mean() < 1
  g, model_state = nnx.split(model)
  oc = optim.OptimConfig(learning_rate=1e-2, schedule="constant")
  opt = ts.init_optimizer(mc, oc, model_state)
  before = _eval_loss(g, model_state, held_out)
  steps, losses = {}, []
  for step, b in enumerate(train):
    phase = mc.phase(step)
    if step and phase != mc.phase(step - 1):
      model_state, info = ts.between_phases(g, model_state, mc, mc.phase(step - 1))
      if duplication and mc.phase(step - 1) == 0:
        assert info["copies"] > 0
    if phase not in steps:
      steps[phase] = jax.jit(ts.make_train_step(g, mc, oc, phase))
    model_state, opt, metrics = steps[phase](model_state, opt, b, jnp.asarray(step))
    losses.append(float(metrics["loss"]))
    assert np.isfinite(losses[-1])
  after = _eval_loss(g, model_state, held_out)
  assert after < before - 0.05, (method, before, after)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
  assert sorted(steps) == ([0, 1, 2] if mc.use_schedule else [UNSCHEDULED])
  for key in ("domain_loss", "domain_tokens", "kd_loss", "lambda", "mask_density",
              "expert_overlap"):
    assert key in metrics
  assert metrics["domain_loss"].shape == (DOMAINS,)
  if duplication:  # copies trained, and merging them back keeps a working, standard model
    model = nnx.merge(g, model_state)
    copies = model.moe_blocks().des.expert_copies
    origin = np.asarray(copies.origin[...])
    bank, base = np.asarray(copies.up_proj[...]), np.asarray(model.moe_blocks().experts.up_proj[...])
    used = list(zip(*np.nonzero(origin >= 0)))
    assert used and max(np.abs(bank[l, c] - base[l, origin[l, c]]).max() for l, c in used) > 0
    merged = merge_copies(model)
    assert merged.moe_blocks().des.expert_copies is None
    assert np.isfinite(np.asarray(merged(held_out[0]["tokens"]).logits)).all()


def test_ablation_freeze_keeps_its_groups_bit_identical():
  """ablation.freeze: the named groups never change (here the backbone, which DES-MoE's warm-up
  would train), the others still train; names outside the freezable groups, or a freeze that
  leaves a phase with nothing to train, are refused naming the field."""
  from desmoe_jax.optim.labels import label_of
  mc = MethodConfig(method="desmoe", num_domains=DOMAINS, total_steps=3,   # warm-up, phase II
                    dges=DgesConfig(update_every=2), freeze=frozenset({"backbone"}))
  assert mc.trainable(0) == {"router", "shared_experts"}
  model = prepare_model(tiny_model(seed=0), mc)
  g, model_state = nnx.split(model)
  def params(state):   # path -> (group, value) of every Param
    return {p: (label_of(v), np.asarray(v[...])) for p, v in nnx.to_flat_state(state)
            if isinstance(v, nnx.Param)}
  before = params(model_state)
  oc = optim.OptimConfig(learning_rate=1e-2, schedule="constant")
  opt = ts.init_optimizer(mc, oc, model_state)
  for step, b in enumerate(_batches(3, seed=1)):
    if step and mc.phase(step) != mc.phase(step - 1):
      model_state, _ = ts.between_phases(g, model_state, mc, mc.phase(step - 1))
    model_state, opt, _ = jax.jit(ts.make_train_step(g, mc, oc, mc.phase(step)))(
        model_state, opt, b, jnp.asarray(step))
  changed = {}
  for path, (label, value) in params(model_state).items():
    changed.setdefault(label, []).append(not np.array_equal(before[path][1], value))
  assert not any(changed["backbone"])
  assert any(changed["router"]) and any(changed["shared_experts"]) and any(changed["routed_experts"])
  with pytest.raises(ValueError, match="ablation.freeze='routed_experts'"):
    MethodConfig(method="desmoe", freeze=frozenset({"routed_experts"}))
  with pytest.raises(ValueError, match="leaves nothing to train in phase 0"):
    MethodConfig(method="desmoe", freeze=frozenset({"backbone", "router", "shared_experts"}))
