"""DES-MoE part 1: the Adaptive Lightweight Router (ALR) with its distillation loss
(docs/METHOD.md section 1).

The ALR plugs into the MoE block's router interface (`route`; moe/routing.py): it replaces the
logits (and adds L_KD) and nothing else, so the family's routing function (softmax top-k, top-k
then softmax, sigmoid with group-limited top-k) and its selection bias apply to the adapted
logits unchanged (docs/METHOD.md section 6). The distillation loss is
KL(softmax(z_teacher / tau) || softmax(z_student / tau)) on the pre-activation logits z for every
scoring function; a selection bias is not part of z.

Routers run in float32, because a rounding difference in the logits changes which experts a
token goes to.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from desmoe_jax.distributed import to_host
from desmoe_jax.moe.routing import ROUTER
from desmoe_jax.nn.layers import stack_modules
from desmoe_jax.schema import BOOL, Float, Int, OneOf, knob


# ------------------------------------------------------------------ DES-MoE: Adaptive Lightweight Router


FORMS = ("residual", "mlp")          # alr.form
LOSSES = ("convex", "additive")     # alr.loss
MIXES = ("gradient", "update")      # alr.mix
ALPHAS = ("run", "router")          # alr.alpha


@dataclasses.dataclass(frozen=True)
class AlrConfig:
  """docs/METHOD.md section 1; every field is a config knob (`alr.*`)."""
  # "residual": R_orig + MLP (W2=0 at init) | "mlp": the paper's plain MLP
  form: str = knob("residual", OneOf(*FORMS))
  hidden_mult: int = knob(4, Int(1))  # hidden width in units of d_model
  tau: float = knob(0.7, Float(0, lo_open=True))  # distillation temperature
  # "convex": router grad = (1-lam) dL_task + lam dL_KD | "additive"
  loss: str = knob("convex", OneOf(*LOSSES))
  beta: float = knob(1.0, Float(0))  # KD weight for loss="additive"
  tau_squared: bool = knob(False, BOOL)  # multiply L_KD by tau^2 (Hinton); the paper does not
  # "gradient": one Adam state, router gradient (1-lam) dL_task + lam dL_KD | "update": two Adam
  # states (task, KD), router update lam u_KD + (1-lam) u_task after Adam's normalisation
  mix: str = knob("gradient", OneOf(*MIXES))
  # lambda's clock: "run" alpha = step / T | "router" alpha = step / (steps the router trains)
  alpha: str = knob("run", OneOf(*ALPHAS))

  def __post_init__(self):
    if self.form not in FORMS:
      raise ValueError(f"alr.form={self.form!r}: expected 'residual' or 'mlp'")
    if self.loss not in LOSSES:
      raise ValueError(f"alr.loss={self.loss!r}: expected 'convex' or 'additive'")
    if self.mix not in MIXES:
      raise ValueError(f"alr.mix={self.mix!r}: expected one of {MIXES}")
    if self.alpha not in ALPHAS:
      raise ValueError(f"alr.alpha={self.alpha!r}: expected one of {ALPHAS}")
    if self.mix == "update" and self.loss != "convex":
      raise ValueError(f"alr.mix='update' mixes the convex loss's two terms after Adam; "
                       f"alr.loss={self.loss!r} has no such mix (use alr.loss=convex)")
    if self.tau <= 0 or self.hidden_mult < 1:
      raise ValueError(f"alr.tau={self.tau} must be > 0 and alr.hidden_mult={self.hidden_mult} >= 1")


class RouterTeacher(nnx.Variable):
  """The frozen pretrained router weight [d_model, E]: the distillation target, never optimised
  (not an nnx.Param, so no gradient, no optimizer state)."""


class KdProbe(nnx.Variable):
  """A zero array shaped like one router parameter, present only inside the train step of
  `alr.mix="update"` (`attach_kd_probe`): L_KD is routed through it, so its gradient is the
  router's KD gradient, kept apart from the task gradient that the parameter itself gets."""


def kd_lambda(step, clock_steps):
  """lambda(alpha) = max(0, 1 - alpha), alpha = step / clock_steps: T for `alr.alpha="run"`,
  the steps the router trains for `alr.alpha="router"` (MethodConfig.kd_clock_steps)."""
  alpha = jnp.asarray(step, jnp.float32) / jnp.maximum(jnp.asarray(clock_steps, jnp.float32), 1.0)
  return jnp.maximum(0.0, 1.0 - alpha)


@jax.custom_vjp
def scale_grad(x, scale):
  """Identity whose gradient is multiplied by `scale` (a scalar array)."""
  return x


def _scale_grad_fwd(x, scale):
  return x, scale


def _scale_grad_bwd(scale, g):
  return jax.tree.map(lambda t: (t * scale).astype(t.dtype), g), jnp.zeros_like(scale)


scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def _student_logits(params, x_td):
  """R_adapt(x) [T, E] in float32 from (w1, b1, w2, b2, w_s or None)."""
  w1, b1, w2, b2, ws = params
  x = x_td.astype(jnp.float32)
  logits = jnp.dot(jax.nn.gelu(jnp.dot(x, w1) + b1, approximate=False), w2) + b2
  return logits + jnp.dot(x, ws) if ws is not None else logits


@jax.custom_vjp
def _routed_and_distilled(params, x_td, scale):
  """The student logits twice, from one forward: (for routing, for L_KD).

  Their gradients are those of two separate forwards `R(scale_grad(params, scale), x)` and
  `R(params, stop_gradient(x))` (docs/METHOD.md section 1): the parameters get
  scale * J^T g_route + J^T g_kd, x gets J^T g_route only. The backward is one parameter VJP of the combined cotangent
  and one input VJP of g_route (XLA drops the unused halves), where two forwards cost two
  forwards and two full backwards of the fp32 MLP.
  """
  logits = _student_logits(params, x_td)
  return logits, logits


def _routed_and_distilled_fwd(params, x_td, scale):
  logits, vjp = jax.vjp(_student_logits, params, x_td)
  return (logits, logits), (vjp, scale)


def _routed_and_distilled_bwd(res, g):
  vjp, scale = res
  g_route, g_kd = g
  dparams, _ = vjp(g_route * scale + g_kd)
  _, dx = vjp(g_route)
  return dparams, dx, jnp.zeros_like(scale)


_routed_and_distilled.defvjp(_routed_and_distilled_fwd, _routed_and_distilled_bwd)


@jax.custom_vjp
def _routed_and_probed(params, probe, x_td):
  """The student logits twice, (for routing, for L_KD), for `alr.mix="update"`: the parameters
  and x get the routing (task) path's gradient, `probe` (zeros shaped like `params`, whose
  value is never read) the L_KD path's. One forward and the backward of
  `_routed_and_distilled`, with the two parameter cotangents kept apart."""
  del probe
  logits = _student_logits(params, x_td)
  return logits, logits


def _routed_and_probed_fwd(params, probe, x_td):
  del probe
  logits, vjp = jax.vjp(_student_logits, params, x_td)
  return (logits, logits), vjp


def _routed_and_probed_bwd(vjp, g):
  g_route, g_kd = g
  dparams, dx = vjp(g_route)
  dprobe, _ = vjp(g_kd)
  return dparams, dprobe, dx


_routed_and_probed.defvjp(_routed_and_probed_fwd, _routed_and_probed_bwd)


class AdaptiveRouter(nnx.Module):
  """R_adapt(h) = W2 GELU(W1 h + b1) + b2 (+ h W_s for form="residual"), exact at init.

  Wraps the family's linear router W_orig: the teacher is W_orig itself (frozen), so the
  family's selection rule, applied by the block, sees R_adapt where it saw W_orig h.

  residual: W_s is a trainable copy of the pretrained router, W2 = b2 = 0, so the logits are
            bit-identical to the pretrained router's at step 0.
  mlp:      the first 2E hidden units of W1 are [W_orig, -W_orig] and W2 maps them with
            [I; -I]: since GELU(z) - GELU(-z) = z the logits equal W_orig h up to rounding;
            the other hidden units are Kaiming-initialised with zero outgoing weights.
  """

  def __init__(self, pretrained_de, cfg: AlrConfig, *, rngs: nnx.Rngs):
    w = jnp.asarray(pretrained_de, jnp.float32)
    d, e = w.shape
    hidden = cfg.hidden_mult * d
    self.form = cfg.form
    self.tau, self.tau_squared = cfg.tau, cfg.tau_squared
    self.teacher = RouterTeacher(w, logical_axes=("embed", None))
    w1 = jax.nn.initializers.kaiming_normal()(rngs.params(), (d, hidden), jnp.float32)
    w2 = jnp.zeros((hidden, e), jnp.float32)
    if cfg.form == "residual":
      self.weight = nnx.Param(w, logical_axes=("embed", None), group=ROUTER)
    else:
      if hidden < 2 * e:
        raise ValueError(f"alr.form='mlp' needs hidden_mult * d_model >= 2 * n_experts "
                         f"({hidden} < {2 * e})")
      w1 = w1.at[:, :e].set(w).at[:, e:2 * e].set(-w)
      eye = jnp.eye(e, dtype=jnp.float32)
      w2 = w2.at[:e].set(eye).at[e:2 * e].set(-eye)
    self.w1 = nnx.Param(w1, logical_axes=("embed", "mlp"), group=ROUTER)
    self.b1 = nnx.Param(jnp.zeros((hidden,), jnp.float32), logical_axes=("mlp",), group=ROUTER,
                        kind="bias")
    self.w2 = nnx.Param(w2, logical_axes=("mlp", None), group=ROUTER)
    self.b2 = nnx.Param(jnp.zeros((e,), jnp.float32), logical_axes=(None,), group=ROUTER,
                        kind="bias")
    self.kd_probe = nnx.data(None)   # {parameter name: KdProbe} inside an alr.mix="update" step

  def __call__(self, x_td, grad_scale=None):
    """Student logits [T, E] in float32; `grad_scale` scales the gradient reaching the router's
    parameters (not x), which is how the convex KD/task mix is applied."""
    params = self._params()
    if grad_scale is not None:
      params = scale_grad(params, grad_scale)
    return _student_logits(params, x_td)

  def _params(self):
    return (self.w1[...], self.b1[...], self.w2[...], self.b2[...],
            self.weight[...] if self.form == "residual" else None)

  def route_and_distill(self, x_td, token_mask_t, grad_scale=None):
    """(student logits [T, E], L_KD) from one forward of the MLP: what the MoE layer uses.

    Same values and gradients as `self(x_td, grad_scale)` for routing plus
    `self.distillation_loss(stop_gradient(x_td), token_mask_t)` (tests/test_router.py holds
    them equal): L_KD trains the router only, the routing gradient reaches x and, scaled by
    `grad_scale`, the router.
    """
    if self.kd_probe is not None:   # alr.mix="update": L_KD's gradient goes to the probe
      if grad_scale is not None:
        raise ValueError("alr.mix='update' keeps the task gradient unscaled (grad_scale=None)")
      logits, student = _routed_and_probed(self._params(), self._probe(), x_td)
    else:
      scale = jnp.asarray(1.0 if grad_scale is None else grad_scale, jnp.float32)
      logits, student = _routed_and_distilled(self._params(), x_td, scale)
    kd = kd_loss(self.teacher_logits(jax.lax.stop_gradient(x_td)), student, token_mask_t,
                 self.tau, self.tau_squared)
    return logits, kd

  def _probe(self):
    p = self.kd_probe
    return (p["w1"][...], p["b1"][...], p["w2"][...], p["b2"][...],
            p["weight"][...] if self.form == "residual" else None)

  def route(self, x_td, token_mask_t, adapt=None):
    """The router interface (moe/routing.py): (student logits [T, E], L_KD) from one forward
    (`route_and_distill`), the task path's gradient to the router parameters scaled by
    `adapt.router_grad_scale` (the convex KD/task mix)."""
    return self.route_and_distill(x_td, token_mask_t,
                                  None if adapt is None else adapt.router_grad_scale)

  def teacher_logits(self, x_td):
    return jnp.dot(x_td.astype(jnp.float32), self.teacher[...])

  def distillation_loss(self, x_td, token_mask_t):
    """L_KD on these (already stop-gradient) hidden states: trains the router only."""
    return kd_loss(self.teacher_logits(x_td), self(x_td), token_mask_t, self.tau,
                   self.tau_squared)


def kd_loss(teacher_logits_te, student_logits_te, token_mask_t, tau: float, tau_squared: bool):
  """mean over real tokens of KL(softmax(teacher/tau) || softmax(student/tau))."""
  kl_t = _kl_t(teacher_logits_te, student_logits_te, tau)
  m = token_mask_t.astype(jnp.float32)
  loss = jnp.sum(kl_t * m) / jnp.maximum(m.sum(), 1.0)
  return loss * tau * tau if tau_squared else loss


ROUTER_PARAMS = ("w1", "b1", "w2", "b2", "weight")   # AdaptiveRouter's parameter names


def kd_probe_zeros(model) -> dict:
  """{parameter name: zeros} shaped like the model's stacked ALR parameters ([L, ...]): the
  probe of an `alr.mix="update"` step, made inside the step (it is never stored)."""
  gate = model.moe_blocks().gate
  return {n: jnp.zeros(getattr(gate, n).shape, jnp.float32) for n in ROUTER_PARAMS
          if isinstance(getattr(gate, n, None), nnx.Param)}


def attach_kd_probe(model, probe: dict):
  """Routes every layer's L_KD through `probe` (`kd_probe_zeros`; in place): the gradient of
  the loss with respect to `probe[name]` is then the KD gradient of router parameter `name`,
  and the parameter itself gets the task gradient only."""
  gate = model.moe_blocks().gate
  if not isinstance(gate, AdaptiveRouter):
    raise ValueError("alr.mix='update' needs the adaptive router (a method with the ALR)")
  gate.kd_probe = nnx.data({n: KdProbe(v) for n, v in probe.items()})
  return model


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kl_t(teacher_te, student_te, tau: float):
  """KL(softmax(teacher/tau) || softmax(student/tau)) per token [T].

  The KL and its gradient, written out as (softmax(student/tau) - softmax(teacher/tau)) / tau
  for the student, are EXACTLY zero for a token whose student logits equal the teacher's (the
  ALR at initialisation): there the KL is at its minimum. Computed, both would be rounding noise
  (XLA may round the two softmaxes differently in two fusions; autodiff gives
  (q sum(p) - p) / tau), which Adam would normalise into a full step under `alr.mix="update"`."""
  log_p = jax.nn.log_softmax(teacher_te / tau, axis=-1)
  log_q = jax.nn.log_softmax(student_te / tau, axis=-1)
  differ_t = jnp.any(student_te != teacher_te, axis=-1)
  return jnp.where(differ_t, jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1), 0.0)


def _kl_t_fwd(teacher_te, student_te, tau):
  return _kl_t(teacher_te, student_te, tau), (teacher_te, student_te)


def _kl_t_bwd(tau, res, g_t):
  teacher_te, student_te = res
  p = jax.nn.softmax(teacher_te / tau, axis=-1)
  q = jax.nn.softmax(student_te / tau, axis=-1)
  log_ratio = jax.nn.log_softmax(teacher_te / tau, axis=-1) - jax.nn.log_softmax(
      student_te / tau, axis=-1)
  kl = jnp.sum(p * log_ratio, axis=-1, keepdims=True)
  differ_t1 = jnp.any(student_te != teacher_te, axis=-1, keepdims=True)
  d_teacher = jnp.where(differ_t1, g_t[:, None] * p * (log_ratio - kl) / tau, 0.0)
  d_student = jnp.where(differ_t1, g_t[:, None] * (q - p) / tau, 0.0)
  return d_teacher.astype(teacher_te.dtype), d_student.astype(student_te.dtype)


_kl_t.defvjp(_kl_t_fwd, _kl_t_bwd)


def attach_alr(model, cfg: AlrConfig, seed: int = 0):
  """Replaces the router of every MoE block by an AdaptiveRouter built from it (in place)."""
  moe = model.moe_blocks()
  if isinstance(moe.gate, AdaptiveRouter):
    raise ValueError("the model already has an adaptive router")
  pretrained_lde = to_host(moe.gate.weight[...])  # may span processes; iterated on the host
  rngs = nnx.Rngs(seed)
  moe.gate = stack_modules([AdaptiveRouter(w, cfg, rngs=rngs) for w in pretrained_lde])
  return model
