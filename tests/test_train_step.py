"""The train step's StepConfig: gradient accumulation equals the big batch, and the precision
modes lose no update (stochastic rounding unbiased, weight decay applied)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tiny_model

from desmoe_jax import optim
from desmoe_jax import train_step as ts
from desmoe_jax.methods import UNSCHEDULED, MethodConfig, prepare_model
from desmoe_jax.schedule import STABILIZATION, WARMUP

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
  mask = np.zeros(model.moe_blocks().des.expert_mask.shape, np.float32)     # [L, D, E]
  for e in range(mask.shape[2]):
    mask[:, e % D, e] = 1
  mask[:, :, 0] = 1
  model.moe_blocks().des.expert_mask[...] = jnp.asarray(mask)
  model.moe_blocks().des.correlation[...] = jnp.asarray(
      np.random.RandomState(0).rand(*mask.shape).astype(np.float32) * 0.2)
  if mc.use_alr:  # an ALR that has drifted from its teacher: the KD loss is not 0
    w2 = model.moe_blocks().gate.w2
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
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
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
  mlp1, mlp4 = s1["moe_layers"]["mlp"]["des"], s4["moe_layers"]["mlp"]["des"]
  _close(mlp4["correlation"][...], mlp1["correlation"][...], "correlation")
  assert not np.array_equal(mlp1["correlation"][...], state["moe_layers"]["mlp"]["des"]["correlation"][...])
  np.testing.assert_array_equal(mlp4["expert_mask"][...], mlp1["expert_mask"][...])


@pytest.mark.parametrize("method,phase,schedule", [("desmoe", STABILIZATION, "cosine"),
                                                   ("fft", UNSCHEDULED, "linear")])
def test_learning_rate_as_an_argument_is_the_constant_rate_and_one_program(method, phase,
                                                                          schedule):
  """The peak rate given to the compiled step (what the trainer does) gives the step that the
  rate baked into the program gives, to float32 rounding (two programs: XLA fuses a constant
  differently), warm-up and decay included (step 3 of 20, warm-up 5; step 12, decaying); and
  one compiled program serves two rates."""
  mc, _, g, state, _ = _setup(method)
  optim_at = lambda lr: optim.OptimConfig(learning_rate=lr, schedule=schedule, warmup_steps=5,
                                          eps=1e-2)
  # built from the first rate's config: the second rate must not need its own program
  traced = jax.jit(ts.make_train_step(g, mc, optim_at(1e-3), phase))
  for lr in (1e-3, 3e-4):
    oc = optim_at(lr)
    const = jax.jit(ts.make_train_step(g, mc, oc, phase))
    for step in (3, 12):
      opt = ts.init_optimizer(mc, oc, state)
      want = const(state, opt, _batch(), jnp.asarray(step))
      got = traced(state, opt, _batch(), jnp.asarray(step), jnp.asarray(lr, jnp.float32))
      assert float(got[2]["learning_rate"]) == pytest.approx(
          float(want[2]["learning_rate"]), rel=1e-7) and float(want[2]["learning_rate"]) > 0
      for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
  assert traced._cache_size() == 1


def test_microbatch_errors_name_the_field():
  mc, oc, g, state, opt = _setup("fft")
  fn = ts.make_train_step(g, mc, oc, UNSCHEDULED, ts.StepConfig(microbatches=3))
  with pytest.raises(ValueError, match=r"train.microbatches=3 does not divide the batch of 4"):
    jax.eval_shape(fn, state, opt, _batch(), jnp.asarray(0))
  with pytest.raises(ValueError, match="train.microbatches=0"):
    ts.StepConfig(microbatches=0)
  with pytest.raises(ValueError, match="train.precision='bf16'"):
    ts.StepConfig(precision="bf16")


# ------------------------------------------------------------------ precision


def _weights(n=2048, seed=0):
  """bfloat16 weights ~ N(0, 0.02) [n, n], as a model's (HF's initializer_range)."""
  w = np.random.RandomState(seed).randn(n, n).astype(np.float32) * 0.02
  return jnp.asarray(w, jnp.bfloat16)


def test_stochastic_rounding_keeps_every_weights_update_in_expectation():
  """A 1e-5 relative update (100x below bfloat16's resolution): added to nearest, no weight
  moves; rounded stochastically, every weight's expected change is its update. The expectation
  is exact: the rounding averaged over all 65536 values of its 16 noise bits."""
  w = _weights(64)                                           # 4096 weights
  u = 1e-5 * w.astype(jnp.float32)
  nearest = optim.apply_updates(w, u)
  assert nearest.dtype == jnp.bfloat16 and np.array_equal(nearest, w)   # the update is lost
  x = w.astype(jnp.float32) + u
  noise = jnp.arange(65536, dtype=jnp.uint32).astype(jnp.uint16)
  expected = jax.lax.map(lambda xi: optim.round_bf16_with_noise(
      jnp.full(noise.shape, xi), noise).astype(jnp.float32).mean(), x.reshape(-1), batch_size=64)
  ratio = np.asarray(expected - w.reshape(-1).astype(jnp.float32)) / np.asarray(u.reshape(-1))
  nonzero = np.asarray(w.reshape(-1)) != 0
  # float32 itself rounds w + u by up to 2^-24 |w| (0.6% of a 1e-5 |w| update).
  assert np.mean(np.abs(ratio[nonzero] - 1) <= 0.01) >= 0.99, np.percentile(ratio, [0, 1, 50])
  assert np.all(np.abs(ratio[nonzero] - 1) <= 0.01)


def test_stochastic_rounding_in_apply_updates_is_unbiased_and_deterministic():
  w = _weights()                                             # 4.2M weights
  u = 1e-5 * w.astype(jnp.float32)
  key = ts.rounding_key(0, 7)
  new = optim.apply_updates(w, u, key)
  assert new.dtype == jnp.bfloat16
  moved = np.asarray(new != w)
  realised = float(jnp.sum((new.astype(jnp.float32) - w.astype(jnp.float32)) * jnp.sign(w)))
  intended = float(jnp.sum(jnp.abs(u)))
  # Each weight moves one bfloat16 step with probability ~|u| / step (~0.2%): the sum over 4.2M
  # weights has a relative standard deviation of ~1.1%.
  assert abs(realised / intended - 1) < 0.05, realised / intended
  assert 0.001 < moved.mean() < 0.004, moved.mean()
  np.testing.assert_array_equal(optim.apply_updates(w, u, ts.rounding_key(0, 7)), new)
  assert not np.array_equal(optim.apply_updates(w, u, ts.rounding_key(0, 8)), new)
  # An update of exactly zero (a frozen or masked weight) leaves it bit for bit.
  np.testing.assert_array_equal(optim.apply_updates(w, jnp.zeros_like(u), key), w)


@pytest.mark.parametrize("dtype,key", [("float32", None), ("bfloat16", 3)])
def test_weight_decay_moves_the_weights(dtype, key):
  """AdamW at the FFT learning rate with no gradient: the update is the decay lr x 0.1 x w alone
  (3e-6 of each weight). float32 weights move by exactly that; bfloat16 weights rounded
  stochastically by that in expectation. (To nearest in bfloat16 nothing moved: the bug.)"""
  w = _weights().astype(dtype)
  params = {"w": w}
  oc = optim.OptimConfig(learning_rate=3e-5, schedule="constant", weight_decay=0.1)
  tx = optim.build_optimizer(oc, 100, {"backbone"}, {"backbone"})
  updates, _ = tx.update({"w": jnp.zeros_like(w)}, tx.init(params), params, step=0)
  assert updates["w"].dtype == jnp.float32
  rounding = None if key is None else ts.rounding_key(key, 0)
  new = optim.apply_updates(params, updates, rounding)["w"]
  wf = w.astype(jnp.float32)
  delta, decay = new.astype(jnp.float32) - wf, -3e-6 * wf
  if dtype == "float32":
    assert np.mean(np.asarray(delta != 0)) > 0.999
    # float32 rounds w - 3e-6 w to 2^-24 |w|, 2% of the decay.
    np.testing.assert_allclose(delta, decay, rtol=0.03, atol=1e-12)
  else:
    assert float(jnp.sum(delta * decay)) > 0
    ratio = float(jnp.sum(delta * jnp.sign(decay))) / float(jnp.sum(jnp.abs(decay)))
    assert abs(ratio - 1) < 0.1, ratio     # ~2300 weights move: relative std ~2%
    assert np.array_equal(optim.apply_updates(params, updates)["w"], w)  # to nearest: lost


def test_rmsnorm_keeps_the_compute_dtype_with_float32_weights():
  """fp32_master: float32 gains must not promote the bfloat16 activations after a norm."""
  from desmoe_jax.nn.layers import RMSNorm
  x = jnp.ones((2, 8), jnp.bfloat16)
  assert RMSNorm(8, 1e-6, param_dtype=jnp.float32)(x).dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def float32_step():
  """One FFT step (lr 1e-5, float32 moments, step 5) of the tiny model whose weights are
  bfloat16 values held in float32: the exact reference of the bfloat16-weight precisions.
  Returns (method config, graphdef and state of the bfloat16 model, (new state, metrics))."""
  mc = MethodConfig(method="fft", num_domains=D, total_steps=20)
  g, state = nnx.split(prepare_model(tiny_model(seed=4, param_dtype="bfloat16"), mc))
  as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, state)
  g32, state32 = nnx.split(nnx.merge(g, as_f32))
  oc = optim.OptimConfig(learning_rate=1e-5, schedule="constant", moments_dtype="float32")
  exact = jax.jit(ts.make_train_step(g32, mc, oc, UNSCHEDULED))
  new32, _, m32 = exact(state32, ts.init_optimizer(mc, oc, state32), _batch(), jnp.asarray(5))
  return mc, g, state, (new32, m32)


def test_bf16_sr_train_step_matches_the_float32_step_in_expectation(float32_step):
  """The tiny model with bfloat16 weights and float32 compute, one FFT step: bf16_sr keeps the
  dtypes, repeats itself exactly, and its parameter change agrees with the float32-weight
  step's (the same gradients: the weights are bfloat16 values in both) in sum."""
  mc, g, state, (new32, m32) = float32_step
  oc = optim.OptimConfig(learning_rate=1e-5, schedule="constant", moments_dtype="float32")
  sr = jax.jit(ts.make_train_step(g, mc, oc, UNSCHEDULED, ts.StepConfig(precision="bf16_sr")))
  opt = ts.init_optimizer(mc, oc, state)
  new, _, m = sr(state, opt, _batch(), jnp.asarray(5))
  again, _, _ = sr(state, ts.init_optimizer(mc, oc, state), _batch(), jnp.asarray(5))
  np.testing.assert_allclose(m["loss"], m32["loss"], rtol=1e-6)
  realised = intended = 0.0
  for (path, v0), (_, v1), (_, v2), (_, v32) in zip(
      nnx.to_flat_state(state), nnx.to_flat_state(new), nnx.to_flat_state(again),
      nnx.to_flat_state(new32)):
    assert v1.dtype == v0.dtype, path
    np.testing.assert_array_equal(v1[...], v2[...])
    if isinstance(v0, nnx.Param) and v0.dtype == jnp.bfloat16:
      want = np.asarray(v32[...], np.float64) - np.asarray(v0[...], np.float64)
      got = np.asarray(v1[...], np.float64) - np.asarray(v0[...], np.float64)
      realised += np.sum(got * np.sign(want))
      intended += np.sum(np.abs(want))
  assert intended > 0 and abs(realised / intended - 1) < 0.1, realised / intended


def test_precision_must_match_the_weights_dtype():
  mc = MethodConfig(method="fft", num_domains=D, total_steps=20)
  g, state = nnx.split(prepare_model(tiny_model(seed=4, param_dtype="bfloat16"), mc))
  oc = optim.OptimConfig()
  opt = jax.eval_shape(lambda s: ts.init_optimizer(mc, oc, s), state)
  fn = ts.make_train_step(g, mc, oc, UNSCHEDULED, ts.StepConfig(precision="fp32_master"))
  with pytest.raises(ValueError, match="set model.param_dtype=float32"):
    jax.eval_shape(fn, state, opt, _batch(), jnp.asarray(0))


# ------------------------------------------------------------------ optimizer levers


@pytest.mark.parametrize("method,phase,precision,micro,levers", [
    ("fft", UNSCHEDULED, "fp32_master", 1, {"moments_dtype": "int8"}),
    ("desmoe", STABILIZATION, "bf16_sr", 2, {}),   # phase-frozen groups, stochastic rounding
    ("desmoe", STABILIZATION, "bf16_master", 1,    # master copy, [L, E] counts; a NaN batch
     {"per_expert_bias_correction": True, "skip_nonfinite_updates": 2}),
    # the routed experts frozen (never streamed); the router's KD gradients kept apart
    ("desmoe", WARMUP, "bf16_sr", 2, {"alr.mix": "update"}),
    # LoRA: only the factors stream (stacked [L, E, ...] for the routed experts), master copy
    ("lora", UNSCHEDULED, "bf16_master", 2, {}),
])
def test_host_offloaded_optimizer_state_gives_the_same_step(method, phase, precision, micro,
                                                            levers):
  """optim.host_offload: the state is laid out in pinned_host memory and streamed through the
  device a layer at a time (optim.update_streamed), and two steps give the on-device
  update's numbers: every optimizer option, frozen groups, the stochastic-rounding bits, and a
  non-finite batch skipped by every layer alike (the first step's, with skip_nonfinite_updates)."""
  from desmoe_jax import sharding
  from desmoe_jax.router import AlrConfig
  levers = dict(levers)
  alr = AlrConfig(mix=levers.pop("alr.mix", "gradient"))
  mc = MethodConfig(method=method, num_domains=D, total_steps=20, alr=alr)
  model = tiny_model(seed=4)
  if precision != "fp32_master":
    model = nnx.merge(*jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32
                                    and x.ndim > 1 else x, nnx.split(model)))
  g, state = nnx.split(prepare_model(model, mc))
  mesh = sharding.make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
  state_sh = sharding.state_shardings(state, mesh)
  state = jax.device_put(state, state_sh)
  batch_sh = sharding.batch_sharding(mesh)
  step_cfg = ts.StepConfig(microbatches=micro, precision=precision)
  batches = [_batch(), _batch()]
  if levers.get("skip_nonfinite_updates"):
    batches[0]["loss_mask"] = batches[0]["loss_mask"].at[0, 3].set(jnp.nan)
  out = {}
  for offload in (False, True):
    oc = optim.OptimConfig(learning_rate=1e-3, host_offload=offload, grad_clip=0.01,
                           master_weights=precision == "bf16_master", **levers)
    opt_sh = ts.optimizer_shardings(mc, oc, state, mesh)
    kinds = {s.memory_kind for s in jax.tree.leaves(opt_sh)}
    assert kinds == ({"pinned_host"} if offload else {"device"}), kinds
    opt = jax.jit(lambda s: ts.init_optimizer(mc, oc, s), out_shardings=opt_sh)(state)
    step = ts.jit_train_step(g, mc, oc, phase, state_sh, opt_sh, batch_sh, step_cfg)
    new_state = jax.tree.map(jnp.copy, state)
    with jax.set_mesh(mesh):
      for i, bt in enumerate(batches):
        new_state, opt, m = step(new_state, opt, jax.device_put(bt, batch_sh),
                                 jnp.asarray(i + 1), ts.learning_rate_arg(oc))
        if i == 0 and levers.get("skip_nonfinite_updates"):
          assert bool(m["update_skipped"])
          for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert {x.sharding.memory_kind for x in jax.tree.leaves(opt)} == kinds
    out[offload] = (new_state, opt, m)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state),
                                                      jax.tree.leaves(out[True][0]))]
  assert any(changed)
  for a, b in zip(jax.tree.leaves(out[False]), jax.tree.leaves(out[True])):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6,
                               atol=1e-6)


def test_adafactor_with_host_offload_is_refused_naming_the_fields():
  with pytest.raises(ValueError, match="optim.name='adafactor' with optim.host_offload=True"):
    optim.OptimConfig(name="adafactor", host_offload=True)


def test_host_offload_fails_naming_the_field_without_host_memory():
  from types import SimpleNamespace
  device = SimpleNamespace(platform="fake", addressable_memories=lambda: [
      SimpleNamespace(kind="device")])
  with pytest.raises(ValueError, match="optim.host_offload=True needs host memory"):
    ts.check_host_offload(SimpleNamespace(devices=np.array([device], dtype=object)))


def test_trainer_config_errors_name_the_fields():
  import os

  from desmoe_jax import sharding, trainer
  from desmoe_jax.run_config import load_config
  spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "six_domains.py")
  config = load_config(spec + ":tiny")
  assert trainer.step_config(config) == ts.StepConfig(microbatches=1, precision="fp32_master")
  paper = load_config(spec)
  assert (paper.train.precision, paper.model.param_dtype) == ("bf16_sr", "bfloat16")
  assert trainer.step_config(paper).precision == "bf16_sr"
  bad = load_config(spec + ":tiny", {"train.precision": "bf16_sr"})
  with pytest.raises(ValueError, match=r"--config.model.param_dtype=bfloat16"):
    trainer.step_config(bad)
  bad = load_config(spec + ":tiny", {"train.microbatches": 3})
  with pytest.raises(ValueError, match=r"train.microbatches=3 does not divide data.batch_size=4"):
    trainer.step_config(bad)
  # 4 sequences in 2 microbatches of 2 rows: fine on 2 data-parallel devices, not on 4.
  step_cfg = ts.StepConfig(microbatches=2)
  trainer.check_microbatch_split(step_cfg, 4, sharding.batch_sharding(
      sharding.make_mesh({"fsdp": 2}, devices=jax.devices()[:2])))
  with pytest.raises(ValueError, match=r"2 rows per microbatch, not a multiple of the 4 data"):
    trainer.check_microbatch_split(step_cfg, 4, sharding.batch_sharding(
        sharding.make_mesh({"fsdp": 4}, devices=jax.devices()[:4])))
  with pytest.raises(ValueError, match="optim.name='sgd'"):
    optim.OptimConfig(name="sgd")
  with pytest.raises(ValueError, match="optim.moments_dtype='float16'"):
    optim.OptimConfig(moments_dtype="float16")


def _param_tree(dtype):
  rng = np.random.RandomState(0)
  return {"w": jnp.asarray(rng.randn(256, 384) * 0.02, dtype),
          "b": jnp.asarray(rng.randn(384) * 0.02, dtype)}


@pytest.mark.parametrize("param_dtype,moments,want", [
    ("bfloat16", "auto", "bfloat16"), ("bfloat16", "float32", "float32"),
    ("float32", "bfloat16", "bfloat16"), ("float32", "auto", "float32")])
def test_moments_dtype_is_kept_across_steps(param_dtype, moments, want):
  """optim.moments_dtype sets the stored moments' dtype, and it stays so after updates (the
  optimizer computes in float32; donated buffers and checkpoints keep their layout)."""
  params = _param_tree(param_dtype)
  oc = optim.OptimConfig(moments_dtype=moments, schedule="constant")
  tx = optim.build_optimizer(oc, 10, {"backbone"}, {"backbone"})
  state = tx.init(params)
  rng = np.random.RandomState(1)
  for step in range(2):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape), p.dtype), params)
    updates, state = tx.update(grads, state, params, step=step)
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype("float32")}
  floats = {x.dtype.name for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)}
  assert floats == {want}
  n = sum(p.size for p in jax.tree.leaves(params))
  assert optim.state_bytes(state) - 2 * n * jnp.dtype(want).itemsize in (4, 8)  # + counts


def test_adafactor_is_optax_adafactor_with_the_global_learning_rate():
  """optim.name=adafactor: optax's factored second moment and block-RMS clipping, scaled by the
  run's learning rate (no parameter-scale relative step); its state is the row and column
  statistics, not two moments per weight."""
  params = _param_tree("float32")
  lr = 1e-3
  oc = optim.OptimConfig(name="adafactor", learning_rate=lr, schedule="constant",
                         weight_decay=0.0, grad_clip=0.0)
  tx = optim.build_optimizer(oc, 10, {"backbone"}, {"backbone"})
  ref = optax.adafactor(learning_rate=lr, multiply_by_parameter_scale=False)
  state, ref_state = tx.init(params), ref.init(params)
  rng = np.random.RandomState(2)
  for step in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape), p.dtype), params)
    updates, state = tx.update(grads, state, params, step=step)
    want, ref_state = ref.update(grads, ref_state, params)
    for k in params:
      np.testing.assert_allclose(updates[k], want[k], rtol=1e-6, atol=1e-9)
  n = sum(p.size for p in jax.tree.leaves(params))
  assert optim.state_bytes(state) < 0.05 * 4 * n   # w: 256 + 384 floats; b: one vector


def test_adafactor_respects_the_expert_update_mask():
  """A masked expert keeps its factored statistics and gets no update, as with AdamW."""
  rng = np.random.RandomState(3)
  experts = jnp.asarray(rng.randn(2, 4, 128, 160) * 0.02, jnp.float32)   # [L, E, D, F]
  # The parameter group is the Variable's metadata, as nn/layers.py sets it for routed experts.
  params = {"experts": {"up_proj": nnx.Param(experts, group="routed_experts")}}
  oc = optim.OptimConfig(name="adafactor", schedule="constant")
  tx = optim.build_optimizer(oc, 10, {"routed_experts"}, {"routed_experts"})
  state = tx.init(params)
  mask = jnp.asarray([[1, 0, 1, 1], [1, 1, 1, 0]], jnp.float32)            # [L, E]
  grads = jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape), p.dtype), params)
  updates, new_state = tx.update(grads, state, params, step=0,
                                 expert_update_mask={"experts": mask})
  u = np.asarray(updates["experts"]["up_proj"][...])
  assert np.all(u[0, 1] == 0) and np.all(u[1, 3] == 0) and np.all(u[0, 0] != 0)
  for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    if old.ndim >= 2 and old.shape[:2] == mask.shape:
      np.testing.assert_array_equal(np.asarray(new)[0, 1], np.asarray(old)[0, 1])
      assert not np.array_equal(np.asarray(new)[0, 0], np.asarray(old)[0, 0])


def test_blockwise_int8_quantisation_error():
  """Power-map codes: a value y of its block's absmax gets code c = 127 y^(1/power), so its
  relative error is at most (1 + 0.5 / c)^power - 1: power / 254 at the top of a block (1.6%
  for the first moment's power 4, 3.2% for the second moment's 8), more further down; and the
  second moment keeps values 12 decades below the block's largest (nonzero code)."""
  rng = np.random.RandomState(4)
  x = np.exp(rng.uniform(np.log(1e-12), 0, (64, 512))).astype(np.float32)      # 12 decades
  x *= np.where(rng.rand(*x.shape) < 0.5, -1, 1)
  absmax = np.abs(x).reshape(64, 2, 256).max(-1).repeat(256, -1)
  for power in (optim.MU_POWER, optim.NU_POWER):
    code, scale = optim.quantize_blockwise(jnp.asarray(x), power)
    assert code.dtype == jnp.int8 and scale.shape == (64, 2)
    back = np.asarray(optim.dequantize_blockwise(code, scale, power))
    err = np.abs(back - x) / np.abs(x)
    c = 127 * (np.abs(x) / absmax) ** (1 / power)
    coded = c >= 1
    assert np.all(err[coded] <= (1 + 0.5 / c[coded]) ** power - 1 + 1e-5), power
    top = np.abs(x) >= 0.9 * absmax
    assert err[top].max() <= power / 254 * 1.05 and err[top].max() > power / 254 * 0.5
    if power == optim.NU_POWER:
      assert np.all(back != 0)


def test_int8_moments_follow_float32_adam():
  """40 AdamW steps on noisy gradients of a quadratic with curvatures over 6 decades: the
  int8-moment weights stay within 4% of the float32-moment ones (measured 2.8%; bfloat16
  moments 0.4%: 8 bits cost accuracy, which is why they are an option and not the default),
  reach the optimum as closely, and the state is ~2 bytes per parameter."""
  rng = np.random.RandomState(5)
  target = jnp.asarray(rng.randn(128, 512) * 0.05, jnp.float32)
  scale = jnp.asarray(np.exp(rng.uniform(-6, 0, (128, 512))), jnp.float32)  # mixed curvature
  start = {"w": jnp.zeros((128, 512), jnp.float32)}
  runs = {}
  for moments in ("float32", "bfloat16", "int8"):
    oc = optim.OptimConfig(learning_rate=1e-2, schedule="constant", moments_dtype=moments,
                           grad_clip=0.0, weight_decay=0.0)
    tx = optim.build_optimizer(oc, 100, {"backbone"}, {"backbone"})
    update = jax.jit(lambda g, s, p, step: tx.update(g, s, p, step=step))
    params, state = start, tx.init(start)
    noise = np.random.RandomState(6)
    for step in range(40):
      g = scale * (params["w"] - target) + 0.1 * scale * jnp.asarray(noise.randn(128, 512),
                                                                     jnp.float32)
      updates, state = update({"w": g}, state, params, step)
      params = optim.apply_updates(params, updates)
    runs[moments] = (params["w"], optim.state_bytes(state))
  w32, b32 = runs["float32"]
  travelled = float(jnp.linalg.norm(w32 - start["w"]))
  off = {k: float(jnp.linalg.norm(runs[k][0] - w32)) / travelled for k in ("bfloat16", "int8")}
  assert off["bfloat16"] < 0.01 and off["int8"] < 0.04, off
  gap = lambda w: float(jnp.linalg.norm(scale * (w - target)))
  assert gap(runs["int8"][0]) < 1.05 * gap(w32)
  n = 128 * 512
  assert b32 == 8 * n + 4
  assert 2 * n < runs["int8"][1] <= 2 * n + 2 * 4 * n // 256 + 4


def test_int8_moments_in_the_sharded_train_step():
  """int8 moments through the real step on 2 devices: codes and scales are laid out like their
  parameters (scales' last axis is the block count), keep their dtypes, and a masked expert's
  codes do not change."""
  from desmoe_jax import sharding
  mc, _, g, state, _ = _setup("desmoe")
  oc = optim.OptimConfig(learning_rate=1e-3, moments_dtype="int8")
  mesh = sharding.make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
  state_sh = sharding.state_shardings(state, mesh)
  state = jax.device_put(state, state_sh)
  opt_sh = ts.optimizer_shardings(mc, oc, state, mesh)
  opt = jax.jit(lambda s: ts.init_optimizer(mc, oc, s), out_shardings=opt_sh)(state)
  step = ts.jit_train_step(g, mc, oc, STABILIZATION, state_sh, opt_sh,
                           sharding.batch_sharding(mesh))
  batch = {k: v for k, v in _batch().items()}
  batch["domain_id"] = jnp.zeros_like(batch["domain_id"])   # domain 0 only
  before = [(path, np.asarray(x), x.sharding)
            for path, x in jax.tree_util.tree_flatten_with_path(opt)[0]]  # opt is donated
  with jax.set_mesh(mesh):
    _, new_opt, m = step(state, opt, batch, jnp.asarray(3), ts.learning_rate_arg(oc))
  assert np.isfinite(float(m["loss"]))
  codes = 0
  for (path, old, old_sharding), new in zip(before, jax.tree.leaves(new_opt)):
    keys = [str(optim.path_key(k)) for k in path]
    assert new.dtype == old.dtype and new.sharding == old_sharding, keys
    if "mu_code" in keys and "experts" in keys and "up_proj" in keys:   # [L, E, D, F]
      codes += 1
      owned = np.zeros(8, bool)
      owned[[e for e in range(8) if e % D == 0 or e == 0]] = True  # _setup: e % 3 == 0, and 0
      changed = np.any(np.asarray(new) != np.asarray(old), axis=(2, 3))   # [L, E]
      assert not changed[:, ~owned].any() and changed[:, owned].any()
  assert codes == 1


def _master_leaves(opt_state):
  """{param path: master array} of the MasterState in an optimizer state."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    keys = [optim.path_key(k) for k in path]
    if "master" in keys:
      keys = keys[keys.index("master") + 1:]
      out[tuple(keys[:-1] if keys[-1] == "value" else keys)] = np.asarray(leaf)
  return out


def test_bf16_master_weight_decay_moves_the_master_exactly():
  """train.precision=bf16_master at the FFT learning rate with no gradient: the float32 master
  of every weight moves by the decay lr x 0.1 x w (3e-6 of it, 100x below bfloat16's
  resolution), and the bfloat16 weight is its master rounded to nearest."""
  w = _weights()
  params = {"w": w}
  oc = optim.OptimConfig(learning_rate=3e-5, schedule="constant", weight_decay=0.1,
                         master_weights=True)
  tx = optim.build_optimizer(oc, 100, {"backbone"}, {"backbone"})
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.zeros_like(w)}, state, params, step=0)
  new = optim.apply_updates(params, updates)["w"]
  master = _master_leaves(state)[("w",)]
  wf = np.asarray(w, np.float32)
  assert np.mean(master != wf) > 0.999
  np.testing.assert_allclose(master - wf, -3e-6 * wf, rtol=0.03, atol=1e-12)
  np.testing.assert_array_equal(new, jnp.asarray(master).astype(jnp.bfloat16))
  assert optim.state_bytes(state) == 4 * w.size + 2 * 2 * w.size + 4   # master + bf16 moments


def test_bf16_master_train_step_carries_the_float32_step(float32_step):
  """One FFT step of the tiny model with bfloat16 weights (float32 compute): the master after
  the step is the float32-weight step's weights (to 1e-6), and the weights are it rounded to
  nearest; the master exists for trained groups only (esft_token: routed experts)."""
  mc, g, state, (new32, _) = float32_step
  oc = optim.OptimConfig(learning_rate=1e-5, schedule="constant", moments_dtype="float32",
                         master_weights=True)
  step = jax.jit(ts.make_train_step(g, mc, oc, UNSCHEDULED, ts.StepConfig(precision="bf16_master")))
  new, new_opt, _ = step(state, ts.init_optimizer(mc, oc, state), _batch(), jnp.asarray(5))
  masters = _master_leaves(new_opt)
  flat32 = dict(nnx.to_flat_state(new32))
  checked = 0
  for path, v in nnx.to_flat_state(new):
    if not isinstance(v, nnx.Param):
      continue
    # Not bit for bit: the gradient of a bfloat16 weight comes back in bfloat16 (autodiff gives
    # a cotangent the primal's dtype), so the two updates differ by that rounding: up to 0.1%
    # of the step (lr 1e-5) where Adam's g / (|g| + eps) amplifies it for a tiny gradient.
    np.testing.assert_allclose(masters[path], flat32[path][...], rtol=1e-6, atol=1e-8)
    assert v.dtype == dict(nnx.to_flat_state(state))[path].dtype
    if v.dtype == jnp.bfloat16:
      got, want = np.asarray(v[...]), np.asarray(jnp.asarray(masters[path]).astype(jnp.bfloat16))
      assert np.mean(got == want) > 0.999, path
      checked += 1
  assert checked > 5
  esft = MethodConfig(method="esft_token", num_domains=D, total_steps=20)
  opt = jax.eval_shape(lambda s: ts.init_optimizer(esft, oc, s), state)
  assert {optim.label_of(p) for p in _master_leaves(opt)} == {"routed_experts"}


def test_bf16_master_leaves_phase_frozen_groups_untouched():
  """A group frozen in this phase (held by optim.hold) keeps its master as it was and gets an
  update of exactly 0; the trained group's master takes the update."""
  rng = np.random.RandomState(7)
  params = {"embed_tokens": {"embedding": jnp.asarray(rng.randn(64, 32) * 0.02, jnp.bfloat16)},
            "moe_layers": {"mlp": {"experts": {"up_proj": jnp.asarray(
                rng.randn(2, 4, 32, 16) * 0.02, jnp.bfloat16)}}}}
  oc = optim.OptimConfig(learning_rate=1e-3, schedule="constant", master_weights=True)
  ever = {"backbone", "routed_experts"}
  tx = optim.build_optimizer(oc, 10, {"routed_experts"}, ever)     # backbone frozen now
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape), p.dtype), params)
  updates, new_state = tx.update(grads, state, params, step=0)
  before, after = _master_leaves(state), _master_leaves(new_state)
  assert set(before) == {("embed_tokens", "embedding"), ("moe_layers", "mlp", "experts", "up_proj")}
  np.testing.assert_array_equal(after[("embed_tokens", "embedding")],
                                before[("embed_tokens", "embedding")])
  assert np.all(np.asarray(updates["embed_tokens"]["embedding"]) == 0)
  moved = after[("moe_layers", "mlp", "experts", "up_proj")] != before[
      ("moe_layers", "mlp", "experts", "up_proj")]
  assert moved.mean() > 0.99


def test_frozen_zero_gradients_are_laid_out_like_their_parameters():
  """The zeros standing in for a phase-frozen group's gradients are split like the parameters
  (a bare zeros_like was made whole on every device by the TPU partitioner: 8.9 GiB per chip
  for V2-Lite's routed experts)."""
  from desmoe_jax import sharding as sharding_lib
  mesh = sharding_lib.make_mesh({"fsdp": 2, "expert": 2}, devices=jax.devices()[:4])
  params = nnx.eval_shape(lambda: nnx.state(tiny_model(), nnx.Param))
  want = sharding_lib.state_shardings(params, mesh)
  with jax.set_mesh(mesh):
    out = jax.jit(optim.zeros_like_params).lower(params).compile().output_shardings
  for (path, got), (_, sh) in zip(jax.tree_util.tree_leaves_with_path(out),
                                  jax.tree_util.tree_leaves_with_path(want)):
    assert got.is_equivalent_to(sh, 4), path
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(out))


# ------------------------------------------------------------------ issue 17: the method options


@functools.lru_cache(maxsize=None)
def _router_step(alr: tuple, weight_decay=0.0, step=12):
  """One train step at global `step` (phase II of 20 steps: lambda = 1 - step / 20) from a fresh
  optimizer and a fresh ALR, which equals its teacher (the KD gradient is exactly 0): the ALR
  parameters' change {name: [L, ...]}, lambda, the ALR before, and the optimizer state."""
  from desmoe_jax.router import AlrConfig
  mc = MethodConfig(method="desmoe", num_domains=D, total_steps=20, alr=AlrConfig(**dict(alr)))
  graphdef, state = nnx.split(prepare_model(tiny_model(seed=4), mc))
  oc = optim.OptimConfig(learning_rate=1e-3, schedule="constant", weight_decay=weight_decay)
  opt_state = ts.init_optimizer(mc, oc, state)
  phase = mc.phase(step)
  assert phase == STABILIZATION and "router" in mc.trainable(phase)
  fn = jax.jit(ts.make_train_step(graphdef, mc, oc, phase))
  new_state, _, metrics = fn(state, opt_state, _batch(), jnp.asarray(step, jnp.int32))
  gate = lambda s: nnx.merge(graphdef, s).moe_blocks().gate
  names = ("w1", "b1", "w2", "b2", "weight")
  before = {n: np.asarray(getattr(gate(state), n)[...]) for n in names}
  delta = {n: np.asarray(getattr(gate(new_state), n)[...]) - before[n] for n in names}
  return delta, float(metrics["lambda"]), before, opt_state


def test_update_mix_moves_the_router_by_one_minus_lambda_of_a_task_only_step():
  """alr.mix="update": with the KD gradient exactly 0 (a fresh ALR equals its teacher), the
  router's update is (1 - lambda) times the update of the task gradient alone (alr.loss=additive
  with beta=0: the router gets dL_task unscaled). Under alr.mix="gradient", Adam normalises
  (1 - lambda) dL_task back to the task-only step: lambda has no effect."""
  task_only = _router_step((("loss", "additive"), ("beta", 0.0)))[0]
  mixed, lam, _, opt_state = _router_step((("mix", "update"),))
  gradient, lam_g, _, _ = _router_step((("mix", "gradient"),))
  assert lam == lam_g == pytest.approx(1 - 12 / 20)
  for name in ("w2", "b2", "weight"):   # W2 = 0 at init: no gradient reaches W1, b1 yet
    assert np.abs(task_only[name]).max() > 0, name      # the router does train in phase II
  for name in task_only:
    np.testing.assert_allclose(mixed[name], (1 - lam) * task_only[name], rtol=1e-5,
                               atol=1e-9, err_msg=name)
  # "gradient": the same step as task-only, not (1 - lambda) of it (lambda is lost in Adam)
  ratio = np.abs(gradient["weight"]).mean() / np.abs(task_only["weight"]).mean()
  assert 0.9 < ratio <= 1.0 + 1e-6 and 1 - lam < 0.9
  # two Adam states for the router (task, KD)
  is_mix = lambda x: isinstance(x, optim.MixState)
  assert sum(map(is_mix, jax.tree.leaves(opt_state, is_leaf=is_mix))) == 1


def test_update_mix_decays_the_mixed_update_once():
  """Weight decay is added once to the mixed router update (-lr wd w), and not to biases."""
  mixed = _router_step((("mix", "update"),))[0]
  decayed, _, before, _ = _router_step((("mix", "update"),), weight_decay=0.1)
  for name in ("w1", "w2", "weight"):
    np.testing.assert_allclose(decayed[name] - mixed[name], -1e-3 * 0.1 * before[name],
                               rtol=1e-3, atol=1e-9, err_msg=name)
  for name in ("b1", "b2"):
    np.testing.assert_array_equal(decayed[name], mixed[name])


def test_masks_refresh_at_the_end_of_warmup_whatever_update_every_is():
  """Phase II starts with masks: the last warm-up step refreshes them, though update_every
  (1000) would refresh none in this run; the step before it leaves them all ones."""
  from desmoe_jax.specialization import DgesConfig
  mc = MethodConfig(method="desmoe", num_domains=D, total_steps=20,
                    dges=DgesConfig(update_every=1000, phi=0.9))
  assert mc.warmup_end() == 4
  graphdef, state = nnx.split(prepare_model(tiny_model(seed=4), mc))
  oc = optim.OptimConfig(learning_rate=1e-3, schedule="constant")
  opt_state = ts.init_optimizer(mc, oc, state)
  fn = jax.jit(ts.make_train_step(graphdef, mc, oc, mc.phase(0)))
  masks = []
  for step in (2, 3):
    state, opt_state, _ = fn(state, opt_state, _batch(), jnp.asarray(step, jnp.int32))
    masks.append(np.asarray(nnx.merge(graphdef, state).moe_blocks().des.expert_mask[...]))
  assert masks[0].min() == 1.0                     # step 2: not the end of warm-up
  assert 0 < masks[1].mean() < 1                   # step 3 (the last of phase I): refreshed
