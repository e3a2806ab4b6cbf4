"""Routers and routing functions of every supported family.

A router has one job, `route(x, ...) -> (logits [T, E], loss)` (float32 pre-activation logits);
a routing function turns logits into the top-k expert ids and gate weights as the family does.
DES-MoE's adaptive router (router.py) replaces the logits only (and adds its KD loss), so the
family's selection rule, selection bias and gate weights apply unchanged to the adapted router
(docs/METHOD.md section 6).

  greedy               softmax, top-k of the scores; weights = scores (normalised if
                       norm_topk_prob, else times routed_scaling_factor): DeepSeek-V2, Qwen3-MoE,
                       OLMoE, Qwen2-MoE
  group_limited_greedy the same, top-k only within the `topk_group` groups with the highest
                       max score (DeepSeek-V2 236B)
  topk_softmax         top-k of the logits, softmax over the k selected logits (Mixtral)
  noaux_tc             sigmoid scores; selection by score + e_score_correction_bias within the
                       `topk_group` groups with the highest sum of their two best biased
                       scores; weights = unbiased scores, normalised if norm_topk_prob, times
                       routed_scaling_factor (DeepSeek-V3, Moonlight)

Routers run in float32 (HF keeps `gate.weight` in float32 even in a bf16 model), because a
rounding difference in the logits changes which experts a token goes to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from desmoe_jax.config import ModelConfig
from desmoe_jax.nn.layers import normal_init, param

ROUTER = "router"                  # parameter group (Variable metadata `group`, see optim.py)


@struct.dataclass
class Routing:
  """What one MoE layer decided, per token (tokens flattened: T = batch * seq)."""
  logits: jax.Array        # [T, E] float32 router logits (pre-activation)
  topk_ids: jax.Array      # [T, K] int32 expert ids
  topk_weights: jax.Array  # [T, K] gate weights applied to the expert outputs
  inputs: jax.Array | None = None  # [T, D] the hidden states the router saw (if requested)
  # [T, K] the experts the router's frozen teacher (DES-MoE's pretrained router) would pick for
  # the same tokens under the same rule; None for a router without one. Computed only where it
  # is read (unused outputs are dropped by XLA): the ALR/teacher agreement diagnostic.
  teacher_topk_ids: jax.Array | None = None

  @property
  def probs(self) -> jax.Array:  # [T, E] softmax of the logits
    return jax.nn.softmax(self.logits, axis=-1)


class SelectionBias(nnx.Variable):
  """DeepSeek-V3's e_score_correction_bias [E]: shifts which experts are selected, not their
  weights. Frozen (not an nnx.Param: no gradient, no optimizer state), shared by the pretrained
  and the adapted router, outside the distillation target."""


class LinearRouter(nnx.Module):
  """The pretrained linear gate: logits = x @ W, W [d_model, n_experts] in float32.

  The router interface the MoE block uses: `route(x_td, token_mask_t, adapt) -> (logits
  [T, E], loss)`: the logits the family's routing function reads, and a scalar the router adds
  to the training loss (0 here; the ALR's distillation loss). `adapt`, the per-call DES-MoE
  inputs, is for routers that read it.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.weight = param(rngs, normal_init, (cfg.hidden_size, cfg.n_routed_experts),
                        jnp.float32, ("embed", None), group=ROUTER)
    self.lora = nnx.data(None)   # a lora.LoraPair once lora.attach adapts the router

  def logits(self, x_td):
    x_td = x_td.astype(jnp.float32)
    logits = jnp.dot(x_td, self.weight[...].astype(jnp.float32))
    return logits if self.lora is None else logits + self.lora(x_td)

  def route(self, x_td, token_mask_t=None, adapt=None):
    return self.logits(x_td), jnp.zeros((), jnp.float32)


def _group_mask(choice_te, cfg: ModelConfig, group_score):
  """[T, E] True for the experts of each token's `topk_group` best groups."""
  t, e = choice_te.shape
  grouped = choice_te.reshape(t, cfg.n_group, e // cfg.n_group)
  _, group_idx = jax.lax.top_k(group_score(grouped), cfg.topk_group)    # [T, topk_group]
  group_mask = jnp.zeros((t, cfg.n_group), jnp.float32).at[
      jnp.arange(t)[:, None], group_idx].set(1.0)
  return jnp.repeat(group_mask, e // cfg.n_group, axis=-1) > 0


def select_experts(logits_te, cfg: ModelConfig, selection_bias_e=None):
  """The family's routing function; returns (weights [T,K], ids [T,K], scores [T,E]).

  `scores` are what the balance loss reads: softmax (or sigmoid for noaux_tc) of the logits.
  """
  logits_te = logits_te.astype(jnp.float32)
  k = cfg.num_experts_per_tok
  if cfg.topk_method == "topk_softmax":
    top_logits, ids_tk = jax.lax.top_k(logits_te, k)
    return (jax.nn.softmax(top_logits, axis=-1), ids_tk.astype(jnp.int32),
            jax.nn.softmax(logits_te, axis=-1))
  if cfg.topk_method == "noaux_tc":
    scores_te = jax.nn.sigmoid(logits_te)
    choice = scores_te if selection_bias_e is None else scores_te + selection_bias_e
    in_groups = _group_mask(choice, cfg, lambda g: jax.lax.top_k(g, min(2, g.shape[-1]))[0]
                            .sum(-1))
    _, ids_tk = jax.lax.top_k(jnp.where(in_groups, choice, -jnp.inf), k)
    weights_tk = jnp.take_along_axis(scores_te, ids_tk, axis=-1)
    if cfg.norm_topk_prob:
      weights_tk = weights_tk / (weights_tk.sum(axis=-1, keepdims=True) + 1e-20)
    return weights_tk * cfg.routed_scaling_factor, ids_tk.astype(jnp.int32), scores_te
  scores_te = jax.nn.softmax(logits_te, axis=-1)
  choice = scores_te
  if cfg.topk_method == "group_limited_greedy":
    choice = jnp.where(_group_mask(scores_te, cfg, lambda g: g.max(axis=-1)), scores_te, 0.0)
  weights_tk, ids_tk = jax.lax.top_k(choice, k)
  if k > 1 and cfg.norm_topk_prob:
    # DeepSeek-V2's own modeling code and Qwen/OLMoE: normalise *instead of* scaling
    # (transformers 5's V2 ignores norm_topk_prob and always scales; for False both agree).
    weights_tk = weights_tk / (weights_tk.sum(axis=-1, keepdims=True) + 1e-20)
  else:
    weights_tk = weights_tk * cfg.routed_scaling_factor
  return weights_tk, ids_tk.astype(jnp.int32), scores_te


def balance_loss(scores_bse, ids_bsk, token_mask_bs, cfg: ModelConfig):
  """The family's expert balance loss (times aux_loss_alpha), over real tokens only.

  deepseek, seq_aux=True: per sequence, sum_e (load_e / uniform load) * mean score_e, averaged
    over the batch; seq_aux=False: the same over the whole batch (DeepSeek's formula).
  switch (Mixtral, Qwen, OLMoE): E * sum_e (fraction of assignments to e) * (mean prob of e),
    per layer (transformers averages the statistics over layers before the product).
  none (DeepSeek-V3: auxiliary-loss-free balancing by the selection bias): 0.
  """
  if cfg.balance_loss == "none":
    return jnp.zeros((), jnp.float32)
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  m = token_mask_bs.astype(jnp.float32)
  counts_bse = jnp.einsum("bske,bs->be", jax.nn.one_hot(ids_bsk, e, dtype=jnp.float32), m)
  mean_scores_be = jnp.einsum("bse,bs->be", scores_bse, m)
  if cfg.balance_loss == "switch":
    n = jnp.maximum(m.sum(), 1.0)
    loss = e * jnp.sum(counts_bse.sum(0) / n * mean_scores_be.sum(0) / n)
  elif cfg.seq_aux:
    n_b = jnp.maximum(m.sum(axis=1, keepdims=True), 1.0)
    ce_be = counts_bse / (n_b * k / e)
    loss = (ce_be * mean_scores_be / n_b).sum(axis=1).mean()
  else:
    n = jnp.maximum(m.sum(), 1.0)
    fi_e = counts_bse.sum(0) / (n * k) * e
    loss = (fi_e * mean_scores_be.sum(0) / n).sum()
  return loss * cfg.aux_loss_alpha
