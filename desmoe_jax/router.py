"""Routers: the pretrained DeepSeek-V2 top-k gate, expert selection, the balance loss, and
DES-MoE part 1, the Adaptive Lightweight Router (ALR) with its distillation loss (METHOD.md s.1).

Routers always run in float32 (HF keeps `gate.weight` in float32 even in a bf16 model),
because a rounding difference in the logits changes which experts a token goes to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from desmoe_jax.config import ModelConfig
from desmoe_jax.distributed import to_host
from desmoe_jax.nn.layers import normal_init, param, stack_modules


@struct.dataclass
class Routing:
  """What one MoE layer decided, per token (tokens flattened: T = batch * seq)."""
  logits: jax.Array        # [T, E] float32 router logits
  topk_ids: jax.Array      # [T, K] int32 expert ids
  topk_weights: jax.Array  # [T, K] gate weights applied to the expert outputs
  inputs: jax.Array | None = None  # [T, D] the hidden states the router saw (if requested)

  @property
  def probs(self) -> jax.Array:  # [T, E] softmax scores
    return jax.nn.softmax(self.logits, axis=-1)


def select_experts(logits_te, cfg: ModelConfig):
  """Top-k selection as DeepSeek-V2 does it; returns (weights [T,K], ids [T,K], scores [T,E])."""
  scores_te = jax.nn.softmax(logits_te.astype(jnp.float32), axis=-1)
  k = cfg.num_experts_per_tok
  choice = scores_te
  if cfg.topk_method == "group_limited_greedy":
    t, e = scores_te.shape
    group_scores = scores_te.reshape(t, cfg.n_group, e // cfg.n_group).max(axis=-1)
    _, group_idx = jax.lax.top_k(group_scores, cfg.topk_group)          # [T, topk_group]
    group_mask = jnp.zeros_like(group_scores).at[
        jnp.arange(t)[:, None], group_idx].set(1.0)                     # [T, n_group]
    score_mask = jnp.repeat(group_mask, e // cfg.n_group, axis=-1) > 0  # [T, E]
    choice = jnp.where(score_mask, scores_te, 0.0)
  weights_tk, ids_tk = jax.lax.top_k(choice, k)
  if k > 1 and cfg.norm_topk_prob:
    # DeepSeek-V2's own modeling code: normalise *instead of* scaling (transformers 5 ignores
    # norm_topk_prob and always scales; for norm_topk_prob=False both agree).
    weights_tk = weights_tk / (weights_tk.sum(axis=-1, keepdims=True) + 1e-20)
  else:
    weights_tk = weights_tk * cfg.routed_scaling_factor
  return weights_tk, ids_tk.astype(jnp.int32), scores_te


def balance_loss(scores_bse, ids_bsk, token_mask_bs, cfg: ModelConfig):
  """DeepSeek's expert-level balance loss (times aux_loss_alpha), over real tokens only.

  seq_aux=True: per sequence, sum_e (load_e / uniform load) * mean score_e, averaged over the
  batch; seq_aux=False: the same over the whole batch. With an all-ones mask this is exactly
  DeepSeek's formula.
  """
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  m = token_mask_bs.astype(jnp.float32)
  counts_bse = jnp.einsum("bske,bs->be", jax.nn.one_hot(ids_bsk, e, dtype=jnp.float32), m)
  mean_scores_be = jnp.einsum("bse,bs->be", scores_bse, m)
  if cfg.seq_aux:
    n_b = jnp.maximum(m.sum(axis=1, keepdims=True), 1.0)
    ce_be = counts_bse / (n_b * k / e)
    loss = (ce_be * mean_scores_be / n_b).sum(axis=1).mean()
  else:
    n = jnp.maximum(m.sum(), 1.0)
    fi_e = counts_bse.sum(0) / (n * k) * e
    loss = (fi_e * mean_scores_be.sum(0) / n).sum()
  return loss * cfg.aux_loss_alpha


class TopKRouter(nnx.Module):
  """The pretrained linear gate: logits = x @ W, W [d_model, n_experts] in float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.weight = param(rngs, normal_init, (cfg.hidden_size, cfg.n_routed_experts),
                        jnp.float32, ("embed", None))

  def __call__(self, x_td):
    return jnp.dot(x_td.astype(jnp.float32), self.weight[...].astype(jnp.float32))


# ------------------------------------------------------------------ DES-MoE: Adaptive Lightweight Router


@dataclasses.dataclass(frozen=True)
class AlrConfig:
  """METHOD.md section 1; every field is a config knob (`alr.*`)."""
  form: str = "residual"      # "residual": R_orig + MLP (W2=0 at init) | "mlp": the paper's plain MLP
  hidden_mult: int = 4        # hidden width in units of d_model
  tau: float = 0.7            # distillation temperature
  loss: str = "convex"        # "convex": router grad = (1-lam) dL_task + lam dL_KD | "additive"
  beta: float = 1.0           # KD weight for loss="additive"
  tau_squared: bool = False   # multiply L_KD by tau^2 (Hinton); the paper does not

  def __post_init__(self):
    if self.form not in ("residual", "mlp"):
      raise ValueError(f"alr.form={self.form!r}: expected 'residual' or 'mlp'")
    if self.loss not in ("convex", "additive"):
      raise ValueError(f"alr.loss={self.loss!r}: expected 'convex' or 'additive'")
    if self.tau <= 0 or self.hidden_mult < 1:
      raise ValueError(f"alr.tau={self.tau} must be > 0 and alr.hidden_mult={self.hidden_mult} >= 1")


class RouterTeacher(nnx.Variable):
  """The frozen pretrained router weight [d_model, E]: the distillation target, never optimised
  (not an nnx.Param, so no gradient, no optimizer state)."""


def kd_lambda(step, total_steps):
  """lambda(alpha) = max(0, 1 - alpha), alpha = step / total_steps."""
  alpha = jnp.asarray(step, jnp.float32) / jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
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


class AdaptiveRouter(nnx.Module):
  """R_adapt(h) = W2 GELU(W1 h + b1) + b2 (+ h W_s for form="residual"), exact at init.

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
      self.weight = nnx.Param(w, logical_axes=("embed", None))
    else:
      if hidden < 2 * e:
        raise ValueError(f"alr.form='mlp' needs hidden_mult * d_model >= 2 * n_experts "
                         f"({hidden} < {2 * e})")
      w1 = w1.at[:, :e].set(w).at[:, e:2 * e].set(-w)
      eye = jnp.eye(e, dtype=jnp.float32)
      w2 = w2.at[:e].set(eye).at[e:2 * e].set(-eye)
    self.w1 = nnx.Param(w1, logical_axes=("embed", "mlp"))
    self.b1 = nnx.Param(jnp.zeros((hidden,), jnp.float32), logical_axes=("mlp",))
    self.w2 = nnx.Param(w2, logical_axes=("mlp", None))
    self.b2 = nnx.Param(jnp.zeros((e,), jnp.float32), logical_axes=(None,))

  def __call__(self, x_td, grad_scale=None):
    """Student logits [T, E] in float32; `grad_scale` scales the gradient reaching the router's
    parameters (not x), which is how the convex KD/task mix is applied."""
    params = (self.w1[...], self.b1[...], self.w2[...], self.b2[...],
              self.weight[...] if self.form == "residual" else None)
    if grad_scale is not None:
      params = scale_grad(params, grad_scale)
    w1, b1, w2, b2, ws = params
    x = x_td.astype(jnp.float32)
    logits = jnp.dot(jax.nn.gelu(jnp.dot(x, w1) + b1, approximate=False), w2) + b2
    return logits + jnp.dot(x, ws) if ws is not None else logits

  def teacher_logits(self, x_td):
    return jnp.dot(x_td.astype(jnp.float32), self.teacher[...])

  def distillation_loss(self, x_td, token_mask_t):
    """L_KD on these (already stop-gradient) hidden states: trains the router only."""
    return kd_loss(self.teacher_logits(x_td), self(x_td), token_mask_t, self.tau,
                   self.tau_squared)


def kd_loss(teacher_logits_te, student_logits_te, token_mask_t, tau: float, tau_squared: bool):
  """mean over real tokens of KL(softmax(teacher/tau) || softmax(student/tau))."""
  log_p = jax.nn.log_softmax(teacher_logits_te / tau, axis=-1)
  log_q = jax.nn.log_softmax(student_logits_te / tau, axis=-1)
  kl_t = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  m = token_mask_t.astype(jnp.float32)
  loss = jnp.sum(kl_t * m) / jnp.maximum(m.sum(), 1.0)
  return loss * tau * tau if tau_squared else loss


def attach_alr(model, cfg: AlrConfig, seed: int = 0):
  """Replaces every MoE layer's pretrained gate by an AdaptiveRouter built from it (in place)."""
  moe = model.moe_layers.mlp
  if isinstance(moe.gate, AdaptiveRouter):
    raise ValueError("the model already has an adaptive router")
  pretrained_lde = to_host(moe.gate.weight[...])  # may span processes; iterated on the host
  rngs = nnx.Rngs(seed)
  moe.gate = stack_modules([AdaptiveRouter(w, cfg, rngs=rngs) for w in pretrained_lde])
  return model
