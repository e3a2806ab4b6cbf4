"""Phases, labels and masks in the optimizer: what must not move, does not move, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import batch, tiny_model

from desmoe_jax import optim
from desmoe_jax import train_step as ts
from desmoe_jax.methods import METHODS, MethodConfig, prepare_model
from desmoe_jax.schedule import CONSOLIDATION, STABILIZATION, WARMUP, ScheduleConfig


def _setup(method="desmoe", owners=None, **kw):
  mc = MethodConfig(method=method, num_domains=3, total_steps=10, **kw)
  model = prepare_model(tiny_model(seed=11), mc)
  if owners is not None:  # hand-made ownership: owners[e] = domains owning expert e (all layers)
    mask = np.zeros(model.moe_blocks().des.expert_mask.shape, np.float32)
    for e, doms in owners.items():
      mask[:, doms, e] = 1
    model.moe_blocks().des.expert_mask[...] = jnp.asarray(mask)
  g, model_state = nnx.split(model)
  oc = optim.OptimConfig(learning_rate=1e-2, weight_decay=0.1)
  return mc, oc, g, model_state, ts.init_optimizer(mc, oc, model_state)


def _flat(model_state):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(model_state)
          if isinstance(v, nnx.Param)}


def _labels(model_state):
  """path -> parameter group, from each Param's metadata."""
  return {p: optim.label_of(v) for p, v in nnx.to_flat_state(model_state)
          if isinstance(v, nnx.Param)}


def _key(entry):
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


OWNERS = {0: [0], 1: [1], 2: [2], 3: [0, 2], 4: [], 5: [1], 6: [0, 1, 2], 7: [2]}


def _changed_experts(before, after):
  """[L, E] bool: expert changed in any of its three matrices."""
  out = 0
  for name in ("gate_proj", "up_proj", "down_proj"):
    path = ("moe_layers", "mlp", "experts", name)
    out = out | (before[path] != after[path]).any(axis=(2, 3))
  return out


def test_only_experts_owned_by_batch_domains_move_and_momentum_cannot_move_them():
  mc, oc, g, ms, opt = _setup(owners=OWNERS)
  step_fn = jax.jit(ts.make_train_step(g, mc, oc, STABILIZATION))
  p0 = _flat(ms)
  # Mixed batch of domains 0 and 1: experts owned by 0 or 1 may move; 2, 4, 7 may not.
  ms, opt, m = step_fn(ms, opt, batch(0, [0, 1, 0, 1]), jnp.asarray(3))
  p1 = _flat(ms)
  changed = _changed_experts(p0, p1)
  allowed = np.array([bool(set(OWNERS[e]) & {0, 1}) for e in range(8)])
  np.testing.assert_array_equal(changed, np.broadcast_to(allowed, changed.shape))
  # Next step with domain 2 only: experts 0, 1, 5 have Adam momentum from step 1 but no owner in
  # the batch now; they must stay bit-for-bit (no momentum step, no weight decay).
  ms, opt, _ = step_fn(ms, opt, batch(1, [2, 2]), jnp.asarray(4))
  p2 = _flat(ms)
  changed = _changed_experts(p1, p2)
  allowed = np.array([2 in OWNERS[e] for e in range(8)])
  np.testing.assert_array_equal(changed, np.broadcast_to(allowed, changed.shape))


@pytest.mark.parametrize("phase,warmup,moves", [
    (WARMUP, "router+backbone", {"backbone", "router", "shared_experts"}),
    (WARMUP, "router+experts", {"router", "routed_experts"}),
    (WARMUP, "all", {"backbone", "router", "shared_experts", "routed_experts"}),
    (STABILIZATION, "router+backbone", {"router", "routed_experts"}),
    (CONSOLIDATION, "router+backbone", {"routed_experts"}),
])
def test_frozen_groups_do_not_move_in_each_phase(phase, warmup, moves):
  mc, oc, g, ms, opt = _setup(owners={e: [0, 1, 2] for e in range(8)},
                              schedule=ScheduleConfig(warmup_trains=warmup))
  step_fn = jax.jit(ts.make_train_step(g, mc, oc, phase))
  p0, labels = _flat(ms), _labels(ms)
  ms, *_ = step_fn(ms, opt, batch(2, [0, 1, 2]), jnp.asarray(1))
  p1 = _flat(ms)
  moved = set()
  for path in p0:
    label = labels[path]
    if not np.array_equal(p0[path], p1[path]):
      assert label in moves, (path, label, phase)  # a frozen group: bit-for-bit unchanged
      moved.add(label)
  # (A trainable leaf may legitimately stay put, e.g. the ALR's b1 while W2 is still 0.)
  assert moved == moves


def test_teacher_and_dges_state_are_not_parameters():
  mc, oc, g, ms, opt = _setup()
  params, state = nnx.split_state(ms, nnx.Param, ...)
  labels = {optim.label_of(v) for _, v in nnx.to_flat_state(params)}
  assert labels == {"backbone", "router", "shared_experts", "routed_experts"}
  kinds = {type(v).__name__ for _, v in nnx.to_flat_state(state)}
  assert kinds == {"RouterTeacher", "Correlation", "ExpertMask"}


@pytest.mark.parametrize("method", METHODS)
def test_optimizer_state_holds_trainable_groups_only(method):
  mc, oc, g, ms, opt = _setup(method=method)
  params = nnx.filter_state(ms, nnx.Param)
  ever = mc.trainable_ever()
  trainable_bytes = sum(np.asarray(v[...]).nbytes for p, v in nnx.to_flat_state(params)
                        if optim.label_of(v) in ever)
  # AdamW: two moments per trainable parameter, plus a step count per group.
  assert 2 * trainable_bytes <= optim.state_bytes(opt) <= 2 * trainable_bytes + 64
  if method.startswith("esft"):
    expert_bytes = sum(np.asarray(v[...]).nbytes for p, v in nnx.to_flat_state(params)
                       if optim.label_of(v) == "routed_experts")
    assert trainable_bytes == expert_bytes


def test_optimizer_state_is_sharded_like_its_parameters():
  """A jitted init's outputs depend on shapes only: without explicit shardings every moment
  would land whole on device 0 (and a checkpoint would restore there, next to an 8-device
  model)."""
  from desmoe_jax import sharding
  mc, oc, g, ms, _ = _setup()
  mesh = sharding.make_mesh({"fsdp": 8})
  shardings = sharding.state_shardings(ms, mesh)
  ms = jax.device_put(ms, shardings)
  opt_shardings = ts.optimizer_shardings(mc, oc, ms, mesh)
  opt = jax.jit(lambda m: ts.init_optimizer(mc, oc, m), out_shardings=opt_shardings)(ms)
  param_specs = {tuple(p): v.sharding.spec for p, v in nnx.to_flat_state(
      nnx.filter_state(ms, nnx.Param))}
  labels = {tuple(p): optim.label_of(v) for p, v in nnx.to_flat_state(
      nnx.filter_state(ms, nnx.Param))}
  moments = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt)[0]:
    keys = [str(_key(k)) for k in path]
    assert len(leaf.sharding.device_set) == 8, keys
    if "mu" in keys or "nu" in keys:  # [..., "mu", *param path, "value"]
      param = tuple(keys[keys.index("mu" if "mu" in keys else "nu") + 1:-1])
      param = tuple(int(k) if k.isdigit() else k for k in param)
      assert leaf.sharding.spec == param_specs[param], keys
      moments += 1
    else:
      assert leaf.ndim == 0 and leaf.sharding.is_fully_replicated, keys
  assert moments == 2 * len([p for p in param_specs if labels[p] in mc.trainable_ever()])


def test_skip_nonfinite_updates_leaves_params_moments_and_routing_statistics_alone():
  """train.skip_nonfinite_updates: a step whose gradients hold NaN (here a NaN loss weight)
  changes nothing, says so in its metrics, and the next finite step trains normally."""
  mc = MethodConfig(method="desmoe", num_domains=3, total_steps=10)
  model = prepare_model(tiny_model(seed=11), mc)
  g, ms = nnx.split(model)
  oc = optim.OptimConfig(learning_rate=1e-2, skip_nonfinite_updates=2)
  opt = ts.init_optimizer(mc, oc, ms)
  step_fn = jax.jit(ts.make_train_step(g, mc, oc, STABILIZATION))
  bad = dict(batch(0, [0, 1]))
  bad["loss_mask"] = bad["loss_mask"].at[0, 3].set(jnp.nan)
  ms1, opt1, m = step_fn(ms, opt, bad, jnp.asarray(3))
  assert bool(m["update_skipped"]) and int(m["skipped_updates"]) == 1
  assert not np.isfinite(float(m["loss"]))
  for a, b in zip(jax.tree.leaves((ms, opt.inner_state)), jax.tree.leaves((ms1, opt1.inner_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # bit for bit: nothing moved
  ms2, opt2, m = step_fn(ms1, opt1, batch(0, [0, 1]), jnp.asarray(4))
  assert not bool(m["update_skipped"]) and int(m["skipped_updates"]) == 1
  assert np.isfinite(float(m["loss"]))
  assert any(not np.array_equal(a, b) for a, b in zip(_flat(ms1).values(), _flat(ms2).values()))


def test_without_skipping_a_nan_gradient_poisons_the_parameters():
  """The control of the test above: the same batch without the option makes parameters NaN
  (what the trainer's pre-save check then refuses to save)."""
  mc, oc, g, ms, opt = _setup()
  bad = dict(batch(0, [0, 1]))
  bad["loss_mask"] = bad["loss_mask"].at[0, 3].set(jnp.nan)
  ms1, _, m = jax.jit(ts.make_train_step(g, mc, oc, STABILIZATION))(ms, opt, bad, jnp.asarray(3))
  assert "update_skipped" not in m
  assert not all(np.isfinite(v).all() for v in _flat(ms1).values())


# ------------------------------------------------------------------ issue 17: decay, per-expert count


def _decay_only_step(decay_exclude):
  """One optimizer step with zero gradients on a tiny model with biases: only weight decay
  moves anything. Returns ({path: before}, {path: after}, {path: kind})."""
  model = tiny_model(seed=11, mlp_bias=True)
  params = nnx.state(model, nnx.Param)
  oc = optim.OptimConfig(learning_rate=1e-2, weight_decay=0.1, schedule="constant",
                         decay_exclude=decay_exclude)
  tx = optim.build_optimizer(oc, 10, {"backbone", "shared_experts", "router", "routed_experts"},
                             {"backbone", "shared_experts", "router", "routed_experts"})
  zeros = jax.tree.map(jnp.zeros_like, params)

  @jax.jit  # one compile; op by op, every leaf's shape compiles its own kernels (~20 s)
  def step(params):
    updates, _ = tx.update(zeros, tx.init(params), params, step=jnp.asarray(0),
                           expert_update_mask=None)
    return optim.apply_updates(params, updates)
  after = step(params)
  flat = lambda s: {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(s)}
  kinds = {p: optim.kind_of(v) for p, v in nnx.to_flat_state(params)}
  return flat(params), flat(after), kinds


def test_decay_exclude_spares_norms_and_biases_and_decays_kernels():
  """optim.decay_exclude="norms,biases" (default): a norm gain and a bias do not move by weight
  decay, a kernel moves by exactly -lr * wd * w. "none" decays the norm gain too."""
  before, after, kinds = _decay_only_step("norms,biases")
  assert {"norm", "bias", "weight"} <= set(kinds.values())
  for path, kind in kinds.items():
    if kind == "weight":
      np.testing.assert_allclose(after[path], before[path] * (1 - 1e-2 * 0.1), rtol=1e-6)
    else:
      np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))
  before, after, kinds = _decay_only_step("none")
  norm = next(p for p, k in kinds.items() if k == "norm")
  np.testing.assert_allclose(after[norm], before[norm] * (1 - 1e-2 * 0.1), rtol=1e-6)


def test_kinds_come_from_the_modules_and_bare_paths_agree():
  model = prepare_model(tiny_model(seed=11, mlp_bias=True), MethodConfig(num_domains=3))
  params = nnx.state(model, nnx.Param)
  by_meta = {p: optim.kind_of(v) for p, v in nnx.to_flat_state(params)}
  bare = jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda v: v[...], params,
                                                           is_leaf=optim.is_variable))[0]
  by_path = {tuple(str(_key(k)) for k in path): optim.kind_of(x, path) for path, x in bare}
  assert {tuple(map(str, p)): k for p, k in by_meta.items()} == by_path
  assert by_meta[("moe_layers", "mlp", "gate", "b1")] == "bias"            # the ALR's biases
  assert by_meta[("moe_layers", "mlp", "gate", "w1")] == "weight"
  assert by_meta[("norm", "weight")] == "norm"


def _adam_expert_run(per_expert, masks, grads):
  """Runs the routed-experts optimizer on one leaf [L=1, E=2, 2, 3] with `masks[t]` ([1, 2])
  and gradients `grads[t]`; returns the parameter after each step."""
  params = {"experts": {"gate_proj": jnp.ones((1, 2, 2, 3), jnp.float32)}}
  oc = optim.OptimConfig(learning_rate=0.1, schedule="constant", weight_decay=0.0, grad_clip=0,
                         b1=0.9, b2=0.95, eps=1e-8, per_expert_bias_correction=per_expert)
  tx = optim.build_optimizer(oc, 100, {"routed_experts"}, {"routed_experts"})
  state, out = tx.init(params), []
  for t, (m, g) in enumerate(zip(masks, grads)):
    updates, state = tx.update({"experts": {"gate_proj": g}}, state, params,
                               step=jnp.asarray(t), expert_update_mask={"experts": m})
    params = optim.apply_updates(params, updates)
    out.append(np.asarray(params["experts"]["gate_proj"]))
  return out


def test_per_expert_bias_correction_follows_a_hand_computed_adam_sequence():
  """Expert 1 is masked for k = 3 steps, then trained 2 steps. With per-expert counts its
  updates are Adam's first and second steps (bias corrections 1 - b1, 1 - b1^2), computed here
  by hand; it does not move while masked; expert 0 follows Adam from step 1. With the shared
  count, expert 1's first update is divided by 1 - b1^4 instead: a smaller step."""
  k, n, b1, b2, eps, lr = 3, 5, 0.9, 0.95, 1e-8, 0.1
  rng = np.random.RandomState(0)
  grads = [jnp.asarray(rng.randn(1, 2, 2, 3).astype(np.float32)) for _ in range(n)]
  masks = [jnp.asarray([[1.0, 0.0 if t < k else 1.0]]) for t in range(n)]

  def hand(expert, first):
    w, m, v, c, out = np.ones((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), 0, []
    for t in range(n):
      if t >= first:
        g = np.asarray(grads[t])[0, expert].astype(np.float64)
        m, v, c = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g, c + 1
        w = w - lr * (m / (1 - b1 ** c)) / (np.sqrt(v / (1 - b2 ** c)) + eps)
      out.append(w.copy())
    return out

  got = _adam_expert_run(True, masks, grads)
  for t in range(n):
    np.testing.assert_allclose(got[t][0, 0], hand(0, 0)[t], rtol=1e-5)
    np.testing.assert_allclose(got[t][0, 1], hand(1, k)[t], rtol=1e-5)
  assert all((got[t][0, 1] == 1.0).all() for t in range(k))   # masked: bit-identical
  shared = _adam_expert_run(False, masks, grads)
  first_step = lambda run: np.abs(run[k][0, 1] - 1.0).mean()
  # shared count 4: (0.1 / 0.344) / sqrt(0.05 / 0.185) = 0.56 of Adam's first step
  assert first_step(shared) < 0.6 * first_step(got)
