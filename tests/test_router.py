"""Adaptive Lightweight Router: exact at init, KD loss, lambda schedule, convex gradient mix."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import batch, tiny_model

from desmoe_jax import train_step as ts
from desmoe_jax.methods import MethodConfig, prepare_model
from desmoe_jax.moe.block import Adaptation
from desmoe_jax.optim import OptimConfig
from desmoe_jax.router import AdaptiveRouter, AlrConfig, attach_alr, kd_lambda, kd_loss


@pytest.mark.parametrize("form", ["residual", "mlp"])
def test_alr_reproduces_pretrained_routing_at_init(form):
  base = tiny_model(seed=3)
  ids = batch(0, [0, 1, 2])["tokens"]
  ref = base(ids, return_routing=True)
  adapted = attach_alr(tiny_model(seed=3), AlrConfig(form=form))
  out = adapted(ids, return_routing=True)
  np.testing.assert_array_equal(out.routing.topk_ids, ref.routing.topk_ids)
  if form == "residual":  # bit for bit
    np.testing.assert_array_equal(out.routing.topk_weights, ref.routing.topk_weights)
    np.testing.assert_array_equal(out.routing.logits, ref.routing.logits)
    np.testing.assert_array_equal(out.logits, ref.logits)
  else:
    np.testing.assert_allclose(out.routing.topk_weights, ref.routing.topk_weights, atol=1e-6)
  assert float(out.kd_loss) < (1e-12 if form == "residual" else 1e-7)


def test_mlp_form_needs_room_for_the_identity_trick():
  with pytest.raises(ValueError, match="hidden_mult"):
    AdaptiveRouter(jnp.ones((2, 8)), AlrConfig(form="mlp", hidden_mult=1), rngs=nnx.Rngs(0))


def test_kd_loss_hand_computation():
  t = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
  s = np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]])
  tau = 0.7

  def softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)

  p, q = softmax(t / tau), softmax(s / tau)
  kl = (p * np.log(p / q)).sum(-1)
  mask = np.array([True, False])  # the second token is padding
  got = kd_loss(jnp.asarray(t), jnp.asarray(s), jnp.asarray(mask), tau, False)
  np.testing.assert_allclose(got, kl[0], rtol=1e-6)
  got2 = kd_loss(jnp.asarray(t), jnp.asarray(s), jnp.ones(2, bool), tau, True)
  np.testing.assert_allclose(got2, kl.mean() * tau * tau, rtol=1e-6)


def test_lambda_schedule():
  np.testing.assert_allclose([kd_lambda(0, 100), kd_lambda(50, 100), kd_lambda(100, 100),
                              kd_lambda(150, 100)], [1.0, 0.5, 0.0, 0.0])


def test_lambda_clock_run_and_router():
  """alr.alpha: lambda = max(0, 1 - step / T) on the run's clock; on the router's, T is the
  steps the router trains: the end of phase II (ceil(0.7 * 100) = 70) under the schedule, the
  whole run without it (desmoe_no_schedule)."""
  steps = [0, 14, 35, 63, 70, 90]
  run = MethodConfig(method="desmoe", num_domains=3, total_steps=100)
  router = MethodConfig(method="desmoe", num_domains=3, total_steps=100,
                        alr=AlrConfig(alpha="router"))
  assert (run.kd_clock_steps(), router.router_steps(), router.kd_clock_steps()) == (100, 70, 70)
  np.testing.assert_allclose([run.kd_lambda(s) for s in steps],
                             [1.0, 0.86, 0.65, 0.37, 0.30, 0.10], rtol=1e-6)
  np.testing.assert_allclose([router.kd_lambda(s) for s in steps],
                             [1.0, 0.8, 0.5, 0.1, 0.0, 0.0], rtol=1e-6, atol=1e-7)
  odd = MethodConfig(method="desmoe", num_domains=3, total_steps=7,
                     alr=AlrConfig(alpha="router"))      # T2 = ceil(0.7 * 7) = 5
  np.testing.assert_allclose([odd.kd_lambda(s) for s in range(7)],
                             [1, 0.8, 0.6, 0.4, 0.2, 0, 0], rtol=1e-6, atol=1e-7)
  unscheduled = MethodConfig(method="desmoe_no_schedule", num_domains=3, total_steps=100,
                             alr=AlrConfig(alpha="router"))
  assert unscheduled.kd_clock_steps() == 100
  with pytest.raises(ValueError, match="alr.alpha"):
    AlrConfig(alpha="phase")
  with pytest.raises(ValueError, match="alr.mix='update'.*alr.loss='additive'"):
    AlrConfig(mix="update", loss="additive")


def test_kd_gradient_is_exactly_zero_where_the_student_equals_the_teacher():
  """Under jit XLA may round the two softmaxes differently; the written-out gradient is 0 for a
  token whose student logits equal the teacher's, and (q - p) / tau elsewhere."""
  t = jax.random.normal(jax.random.key(0), (6, 8))
  s = t.at[3].add(0.1)                               # token 3 differs
  grad = jax.jit(jax.grad(lambda s: kd_loss(t, s, jnp.ones(6, bool), 0.7, False)))(s)
  assert float(jnp.abs(grad[jnp.asarray([0, 1, 2, 4, 5])]).max()) == 0.0
  want = (jax.nn.softmax(s[3] / 0.7) - jax.nn.softmax(t[3] / 0.7)) / 0.7 / 6
  np.testing.assert_allclose(grad[3], want, rtol=1e-5, atol=1e-8)


def _packed_batch(seed=0, rows=2, seq=16):
  b = batch(seed, list(range(rows)), seq=seq)
  segment_ids = np.ones((rows, seq), np.int32)
  segment_ids[1, 11:] = 0                            # padding: not counted
  return {"tokens": b["tokens"], "segment_ids": jnp.asarray(segment_ids),
          "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq)),
          "loss_mask": b["loss_mask"]}


def test_alr_teacher_agreement_is_one_at_init_and_matches_numpy_after_a_perturbation():
  """trainer.alr_teacher_agreement: the fraction of (layer, real token) pairs whose top-k SET
  is the same under the ALR and its frozen teacher; 1.0 at init; after perturbing the ALR, the
  same number as numpy's top-k of the teacher's and the student's logits on the router inputs."""
  from desmoe_jax import trainer
  model = prepare_model(tiny_model(seed=2), MethodConfig(method="desmoe", num_domains=3))
  batches = [_packed_batch(0), _packed_batch(1)]
  graphdef, state = nnx.split(model)
  assert trainer.alr_teacher_agreement(graphdef, state, batches) == 1.0
  gate = model.moe_blocks().gate
  w = np.asarray(gate.weight[...])
  gate.weight[...] = jnp.asarray(w + 0.3 * np.abs(w).mean()
                                 * np.random.RandomState(0).randn(*w.shape).astype(np.float32))
  graphdef, state = nnx.split(model)
  got = trainer.alr_teacher_agreement(graphdef, state, batches)
  k = model.config.num_experts_per_tok
  teacher = np.asarray(gate.teacher[...])                              # [L, D, E]
  same, total = 0, 0
  for b in batches:
    out = model(b["tokens"], segment_ids_bs=b["segment_ids"], positions_bs=b["positions"],
                return_routing="inputs")
    x_ltd, student_lte = np.asarray(out.routing.inputs), np.asarray(out.routing.logits)
    real_t = np.asarray(b["segment_ids"]).reshape(-1) != 0
    for layer in range(teacher.shape[0]):
      top = lambda z: np.sort(np.argsort(-z, axis=-1, kind="stable")[:, :k], axis=-1)
      agree_t = np.all(top(x_ltd[layer] @ teacher[layer]) == top(student_lte[layer]), axis=-1)
      same, total = same + agree_t[real_t].sum(), total + real_t.sum()
  assert 0 < got < 1
  assert got == pytest.approx(same / total)
  # a model without the ALR has nothing to compare
  plain = prepare_model(tiny_model(seed=2), MethodConfig(method="fft", num_domains=3))
  assert trainer.alr_teacher_agreement(*nnx.split(plain), batches) is None


def test_kd_weight_reaches_zero_in_training():
  mc = MethodConfig(method="desmoe", num_domains=3, total_steps=10)
  model = prepare_model(tiny_model(), mc)
  g, ms = nnx.split(model)
  oc = OptimConfig()
  opt = ts.init_optimizer(mc, oc, ms)
  step_fn = jax.jit(ts.make_train_step(g, mc, oc, mc.phase(9)))
  *_, m = step_fn(ms, opt, batch(1, [0, 1, 2]), jnp.asarray(9))
  np.testing.assert_allclose(m["lambda"], 0.1, rtol=1e-6)
  *_, m = step_fn(ms, opt, batch(1, [0, 1, 2]), jnp.asarray(10))
  assert float(m["lambda"]) == 0.0


def test_convex_mix_scales_router_gradient_only():
  """grad_router = (1-lam) dL_task + lam dL_KD; every other gradient = dL_task."""
  model = attach_alr(tiny_model(seed=1), AlrConfig())
  # Move the student away from the teacher so that KD has a gradient.
  moe = model.moe_blocks()
  moe.gate.w2[...] = 0.1 * jax.random.normal(jax.random.key(0), moe.gate.w2.shape)
  b = batch(2, [0, 1])
  lam = 0.3
  g, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def grads(scale, kd_weight):
    def loss(p):
      out = nnx.merge(g, p, rest)(b["tokens"], adapt=Adaptation(router_grad_scale=scale))
      nll = ts.token_losses(out.logits, b["tokens"]).mean()
      return nll + kd_weight * out.kd_loss
    return jax.grad(loss)(params)

  flat = lambda s: dict(nnx.to_flat_state(s))
  mixed = flat(grads(jnp.float32(1 - lam), jnp.float32(lam)))
  task = flat(grads(jnp.float32(1.0), jnp.float32(0.0)))  # scale 1: the plain task gradient
  kd = flat(grads(jnp.float32(0.0), jnp.float32(1.0)))    # task gradient to the router off
  for path, v in mixed.items():
    if path[:3] == ("moe_layers", "mlp", "gate"):
      np.testing.assert_allclose(v[...], (1 - lam) * task[path][...] + lam * kd[path][...],
                                 atol=1e-6, err_msg=str(path))
    else:
      np.testing.assert_allclose(v[...], task[path][...], atol=1e-7, err_msg=str(path))
  assert np.abs(kd[("moe_layers", "mlp", "gate", "w2")][...]).max() > 0


def _two_forwards(self, x_td, token_mask_t, grad_scale=None):
  """The ALR as it ran before route_and_distill: one forward to route, one for L_KD."""
  return (self(x_td, grad_scale=grad_scale),
          self.distillation_loss(jax.lax.stop_gradient(x_td), token_mask_t))


@pytest.mark.parametrize("form", ["residual", "mlp"])
@pytest.mark.parametrize("scale", [0.7, None])  # convex loss (1 - lambda), additive (None)
def test_shared_alr_forward_keeps_the_gradients_of_two_forwards(form, scale, monkeypatch):
  """route_and_distill (one MLP forward) gives the loss and every gradient (router, experts,
  attention, embeddings: what reaches x) of the two separate forwards of METHOD.md s.1."""
  model = attach_alr(tiny_model(seed=2), AlrConfig(form=form))
  moe = model.moe_blocks()
  moe.gate.w2[...] = moe.gate.w2[...] + 0.1 * jax.random.normal(jax.random.key(1),
                                                                  moe.gate.w2.shape)
  b = batch(3, [0, 1])
  g, params, rest = nnx.split(model, nnx.Param, ...)
  adapt = Adaptation(router_grad_scale=None if scale is None else jnp.float32(scale))

  def value_and_grads():
    def loss(p):
      out = nnx.merge(g, p, rest)(b["tokens"], adapt=adapt)
      return ts.token_losses(out.logits, b["tokens"]).mean() + 0.3 * out.kd_loss
    return jax.jit(jax.value_and_grad(loss))(params)

  shared_loss, shared = value_and_grads()
  monkeypatch.setattr(AdaptiveRouter, "route_and_distill", _two_forwards)
  ref_loss, ref = value_and_grads()
  np.testing.assert_allclose(shared_loss, ref_loss, rtol=1e-6)
  ref = dict(nnx.to_flat_state(ref))
  for path, v in nnx.to_flat_state(shared):
    np.testing.assert_allclose(v[...], ref[path][...], rtol=1e-5, atol=1e-7, err_msg=str(path))
  assert np.abs(ref[("moe_layers", "mlp", "gate", "w1")][...]).max() > 0


def test_alr_mlp_runs_once_per_layer(monkeypatch):
  """The forward holds one [T, d_model] x [d_model, hidden] matmul per ALR (it held two)."""
  model = attach_alr(tiny_model(seed=2), AlrConfig())
  d, hidden = model.moe_blocks().gate.w1.shape[-2:]
  tokens = batch(3, [0, 1])["tokens"]
  g, state = nnx.split(model)

  def count(fn):  # matmuls with a [T, hidden] result, in the jaxpr and every nested one
    text = str(jax.make_jaxpr(lambda s: fn(s))(state))  # a new function: no cached trace
    return len(re.findall(rf":f32\[\d+,{hidden}\] = dot_general", text))

  forward = lambda s: nnx.merge(g, s)(tokens).kd_loss
  assert count(forward) == 1  # the MoE layers are scanned: one body
  monkeypatch.setattr(AdaptiveRouter, "route_and_distill", _two_forwards)
  assert count(forward) == 2  # the old form, seen by the same count
