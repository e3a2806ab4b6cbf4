"""Routers: the pretrained DeepSeek-V2 top-k gate, expert selection and the balance loss.

The router always runs in float32 (HF keeps `gate.weight` in float32 even in a bf16 model),
because a rounding difference in the logits changes which experts a token goes to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from desmoe_jax.config import ModelConfig
from desmoe_jax.layers import normal_init, param


@struct.dataclass
class Routing:
  """What one MoE layer decided, per token (tokens flattened: T = batch * seq)."""
  logits: jax.Array        # [T, E] float32 router logits
  topk_ids: jax.Array      # [T, K] int32 expert ids
  topk_weights: jax.Array  # [T, K] gate weights applied to the expert outputs

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
