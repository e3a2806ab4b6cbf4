"""ESFT baselines (DeepSeek, "Let the Expert Stick to His Last", 2024).

Per domain, experts are scored on a sample of that domain's tokens, by average gate score
(ESFT-Gate) or by token selection ratio (ESFT-Token), each normalised per layer to sum to 1;
per layer the smallest set of experts whose cumulative score reaches `top_p` is selected
(ESFT's `generate_expert_config.py` loop), and only those experts are fine-tuned.
Multi-domain ESFT trains the union of the domains' selections.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from desmoe_jax.distributed import to_host
from desmoe_jax.schema import BOOL, Float, Int, knob
# ESFT's expert selection lives beside DGES's masks (specialization.py reports it too).
from desmoe_jax.specialization import esft_select as select  # noqa: F401 (esft.select)
from desmoe_jax.specialization import normalise_per_layer

DEFAULT_TOP_P = {"gate": 0.1, "token": 0.2}   # the paper's (and ESFT's) values


@dataclasses.dataclass(frozen=True)
class EsftConfig:
  """Every field is a config knob (`esft.*`)."""
  # None: 0.1 for esft_gate, 0.2 for esft_token (the config's -1)
  top_p: float | None = knob(None, Float(0, 1, lo_open=True, special=((-1, "the paper's value"),)))
  # tokens of each domain used to score experts (ESFT's value)
  sample_tokens: int = knob(8192, Int(1))
  # -1: union over all domains; d >= 0: single-domain ESFT
  domain: int = knob(-1, Int(0, special=((-1, "all domains"),)))
  train_shared_experts: bool = knob(False, BOOL)  # ESFT's --train_shared_experts
  train_non_expert_modules: bool = knob(False, BOOL)  # ESFT's --train_non_expert_modules

  def threshold(self, score: str) -> float:
    return DEFAULT_TOP_P[score] if self.top_p is None else self.top_p


def score_sums(topk_ids_ltk, topk_weights_ltk, token_mask_t, num_experts: int):
  """Raw per-layer sums over real tokens: gate weights [L, E] and selections / K [L, E]."""
  m = token_mask_t.astype(jnp.float32)[None, :, None, None]
  onehot = jax.nn.one_hot(topk_ids_ltk, num_experts, dtype=jnp.float32) * m  # [L, T, K, E]
  k = topk_ids_ltk.shape[-1]
  gate = jnp.einsum("ltke,ltk->le", onehot, topk_weights_ltk.astype(jnp.float32))
  token = onehot.sum(axis=(1, 2)) / k
  return gate, token


@functools.partial(jax.jit, static_argnums=(0, 5))
def _routed_sums(graphdef, state, tokens, segment_ids, positions, num_experts):
  out = nnx.merge(graphdef, state)(tokens, segment_ids_bs=segment_ids, positions_bs=positions,
                                   return_routing=True)
  mask = (segment_ids != 0).reshape(-1)
  return score_sums(out.routing.topk_ids, out.routing.topk_weights, mask, num_experts)


def domain_scores(model, batches: Iterable[dict], sample_tokens: int, num_experts: int,
                  place=jnp.asarray):
  """Scores one domain from batches {"tokens", "segment_ids"?, "positions"?} until
  `sample_tokens` real tokens were seen. Returns normalised {"gate": [L,E], "token": [L,E]}.
  `place` puts a host array on devices (e.g. `distributed.global_array` over a mesh)."""
  graphdef, state = nnx.split(model)
  gate = token = None
  seen = 0
  for batch in batches:
    tokens = np.asarray(batch["tokens"])
    segment_ids = np.asarray(batch.get("segment_ids", np.ones(tokens.shape, np.int32)))
    positions = np.asarray(batch.get("positions", np.broadcast_to(
        np.arange(tokens.shape[1]), tokens.shape)))
    g, t = _routed_sums(graphdef, state, place(tokens), place(segment_ids), place(positions),
                        num_experts)
    gate = g if gate is None else gate + g
    token = t if token is None else token + t
    seen += int((segment_ids != 0).sum())
    if seen >= sample_tokens:
      break
  if gate is None:
    raise ValueError("ESFT expert scoring got no batches for a domain")
  gate, token = to_host((gate, token))   # [L, E] each; may span processes
  return {"gate": normalise_per_layer(gate), "token": normalise_per_layer(token), "tokens": seen}


def esft_masks(model, batches_by_domain: dict, score: str, cfg: EsftConfig,
               num_domains: int, place=jnp.asarray) -> np.ndarray:
  """ExpertMask [L, D, E] for an ESFT run: single-domain (`cfg.domain` = d: row d = d's
  selection, other rows 0) or multi-domain (every row = the union of the domains' selections).

  `batches_by_domain`: {domain: iterable of batches}; only the domains needed are read.
  """
  domains = [cfg.domain] if cfg.domain >= 0 else list(range(num_domains))
  missing = [d for d in domains if d not in batches_by_domain]
  if missing:
    raise ValueError(f"ESFT expert scoring needs data for domain(s) {missing}")
  e = model.config.n_routed_experts
  selections = {d: np.asarray(select(domain_scores(model, batches_by_domain[d],
                                                   cfg.sample_tokens, e, place)[score],
                                     cfg.threshold(score)))
                for d in domains}
  layers = next(iter(selections.values())).shape[0]
  masks = np.zeros((layers, num_domains, e), np.float32)
  if cfg.domain >= 0:
    masks[:, cfg.domain] = selections[cfg.domain]
  else:
    masks[:] = np.max(np.stack(list(selections.values())), axis=0)[:, None, :]
  return masks
