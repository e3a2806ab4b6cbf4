"""DES-MoE part 2: Domain-Guided Expert Specialization (METHOD.md section 2).

Per MoE layer, a domain x expert correlation matrix A (how often each domain's tokens pick each
expert, smoothed with momentum) is model STATE: a `Correlation` Variable, stacked over layers
[L, D, E], saved in checkpoints, never seen by the optimizer. Every `update_every` steps it is
thresholded into a specialization mask M (`ExpertMask`, [L, D, E]); inside the MoE layer an
expert then receives gradient from a domain-d token only where M[d, e] = 1 (the forward pass is
unchanged; see `moe.MoE`).

Before the first refresh M is all ones (nothing is isolated yet); a domain never seen keeps its
row of ones until it is.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class DgesConfig:
  """METHOD.md section 2; every field is a config knob (`dges.*`)."""
  momentum: float = 0.9                  # weight of the OLD value in A <- m A + (1 - m) f
  phi: float = 0.6                       # mask threshold
  score: str = "relative"                # "relative": A / row max >= phi | "cumulative": top-p
  update_every: int = 10                 # T_update: steps between mask refreshes
  duplicate_shared_experts: bool = False  # expert duplication at the end of phase I
  max_copies: int = 8                    # per layer, capacity of the duplicate-expert bank

  def __post_init__(self):
    if self.score not in ("relative", "cumulative"):
      raise ValueError(f"dges.score={self.score!r}: expected 'relative' or 'cumulative'")
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"dges.momentum={self.momentum} must be in [0, 1)")
    if not 0.0 < self.phi <= 1.0:
      raise ValueError(f"dges.phi={self.phi} must be in (0, 1]")
    if self.update_every < 1:
      raise ValueError(f"dges.update_every={self.update_every} must be >= 1")


class Correlation(nnx.Variable):
  """Domain x expert routing frequency A, [L, D, E] float32: model state, not a parameter."""


class ExpertMask(nnx.Variable):
  """Which experts each domain may update, [L, D, E] float32 in {0, 1}: model state."""


def domain_expert_counts(ids_tk, domain_t, token_mask_t, num_domains: int, num_experts: int):
  """counts [D, E]: real tokens of domain d whose top-k contains e; tokens [D]: real tokens of d."""
  m = token_mask_t.astype(jnp.float32)
  dom_td = jax.nn.one_hot(domain_t, num_domains, dtype=jnp.float32) * m[:, None]
  chosen_te = jax.nn.one_hot(ids_tk, num_experts, dtype=jnp.float32).sum(axis=1)  # [T, E] 0/1
  return dom_td.T @ chosen_te, dom_td.sum(axis=0)


def update_correlation(a_lde, counts_lde, tokens_d, momentum: float):
  """A[d] <- m A[d] + (1 - m) f[d] for every domain present in the step (tokens_d > 0)."""
  present_d = tokens_d > 0
  freq_lde = counts_lde / jnp.maximum(tokens_d, 1.0)[None, :, None]
  new = momentum * a_lde + (1.0 - momentum) * freq_lde
  return jnp.where(present_d[None, :, None], new, a_lde)


def mask_from_correlation(a_lde, phi: float, score: str):
  """Thresholds A into M (float 0/1). Rows that are all zero (domain unseen) come back as ones."""
  if score == "relative":
    row_max = a_lde.max(axis=-1, keepdims=True)
    mask = a_lde >= phi * row_max  # A / max >= phi, without dividing by zero
  else:  # cumulative (ESFT's top-p): smallest set whose share of the row sum reaches phi
    mask = top_p_mask(a_lde, phi)
  seen = a_lde.max(axis=-1, keepdims=True) > 0
  return jnp.where(seen, mask, True).astype(jnp.float32)


def top_p_mask(scores, p: float):
  """Per row (last axis): the highest-scoring entries whose cumulative share first reaches p."""
  order = jnp.argsort(-scores, axis=-1, stable=True)
  sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
  total = jnp.maximum(sorted_scores.sum(axis=-1, keepdims=True), 1e-30)
  before = (jnp.cumsum(sorted_scores, axis=-1) - sorted_scores) / total   # share of higher ranks
  keep_sorted = before < p  # ESFT's loop: stop once the kept share has reached p
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(keep_sorted, inverse, axis=-1)


def mask_overlap(mask_lde):
  """Jaccard overlap of every pair of domains' masks, averaged over layers: [D, D]."""
  m = mask_lde.astype(jnp.float32)
  inter = jnp.einsum("lde,lfe->ldf", m, m)
  size = m.sum(-1)
  union = size[:, :, None] + size[:, None, :] - inter
  return jnp.mean(jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0), axis=0)


def attach(model, num_domains: int):
  """Adds zeroed A and all-ones M (stacked over MoE layers) to `model`'s MoE layers."""
  moe = model.moe_layers.mlp
  layers, e = moe.experts.gate_proj.shape[0], model.config.n_routed_experts
  axes = ("layers", "domains", None)
  moe.correlation = Correlation(jnp.zeros((layers, num_domains, e), jnp.float32),
                                logical_axes=axes)
  moe.expert_mask = ExpertMask(jnp.ones((layers, num_domains, e), jnp.float32),
                               logical_axes=axes)
  return model
