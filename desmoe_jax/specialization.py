"""DES-MoE part 2: Domain-Guided Expert Specialization (docs/METHOD.md section 2).

Per MoE layer, a domain x expert correlation matrix A (how often each domain's tokens pick each
expert, smoothed with momentum) is model STATE: a `Correlation` Variable, stacked over layers
[L, D, E], saved in checkpoints, never seen by the optimizer. Every `update_every` steps it is
thresholded into a specialization mask M (`ExpertMask`, [L, D, E]); inside the MoE layer an
expert then receives gradient from a domain-d token only where M[d, e] = 1 (the forward pass is
unchanged). All of it lives in ONE submodule of the MoE block, `DesState`, which plugs into the
block's expert hook (`moe/block.py`): the block calls `dispatch`, `isolate` and `statistics`
and knows nothing else of DES-MoE.

Before the first refresh M is all ones (nothing is isolated yet); a domain never seen keeps its
row of ones until it is.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from desmoe_jax.distributed import to_host
from desmoe_jax.schema import BOOL, Float, Int, OneOf, knob


SCORES = ("relative", "cumulative")   # dges.score


@dataclasses.dataclass(frozen=True)
class DgesConfig:
  """docs/METHOD.md section 2; every field is a config knob (`dges.*`)."""
  # weight of the OLD value in A <- m A + (1 - m) f
  momentum: float = knob(0.9, Float(0, 1, hi_open=True))
  phi: float = knob(0.6, Float(0, 1, lo_open=True))      # mask threshold
  # "relative": A / row max >= phi | "cumulative": top-p
  score: str = knob("relative", OneOf(*SCORES))
  update_every: int = knob(10, Int(1))   # T_update: steps between mask refreshes
  duplicate_shared_experts: bool = knob(False, BOOL)  # expert duplication at the end of phase I
  max_copies: int = knob(8, Int(1))      # per layer, capacity of the duplicate-expert bank
  # Oracle control of the premise: per layer, the N experts the base model routes general text
  # to most never join a mask (so never train); 0 = off. See `exclude_experts`.
  exclude_general_top: int = knob(0, Int(0))

  def __post_init__(self):
    if self.score not in SCORES:
      raise ValueError(f"dges.score={self.score!r}: expected 'relative' or 'cumulative'")
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"dges.momentum={self.momentum} must be in [0, 1)")
    if not 0.0 < self.phi <= 1.0:
      raise ValueError(f"dges.phi={self.phi} must be in (0, 1]")
    if self.update_every < 1:
      raise ValueError(f"dges.update_every={self.update_every} must be >= 1")
    if self.exclude_general_top < 0:
      raise ValueError(f"dges.exclude_general_top={self.exclude_general_top} must be >= 0")


class Correlation(nnx.Variable):
  """Domain x expert routing frequency A, [L, D, E] float32: model state, not a parameter."""


class ExpertMask(nnx.Variable):
  """Which experts each domain may update, [L, D, E] float32 in {0, 1}: model state."""


class ExcludedExperts(nnx.Variable):
  """Experts no domain's mask may include, [L, E] float32 in {0, 1} (1 = excluded): model
  state, fixed for the run (`dges.exclude_general_top`)."""


class DesState(nnx.Module):
  """The DES-MoE state of the MoE blocks (stacked over layers on axis 0): correlation A and
  mask M [L, D, E], and the optional bank of duplicated experts. The block's expert hook."""

  def __init__(self, layers: int, num_domains: int, num_experts: int):
    axes = ("layers", "domains", None)
    self.correlation = Correlation(jnp.zeros((layers, num_domains, num_experts), jnp.float32),
                                   logical_axes=axes)
    self.expert_mask = ExpertMask(jnp.ones((layers, num_domains, num_experts), jnp.float32),
                                  logical_axes=axes)
    self.expert_copies = nnx.data(None)   # ExpertCopies once attach_copies ran
    self.excluded = nnx.data(None)        # ExcludedExperts once exclude_experts ran

  def allowed(self, mask_lde):
    """`mask_lde` without the excluded experts (unchanged when none are)."""
    if self.excluded is None:
      return mask_lde
    return mask_lde * (1.0 - self.excluded[...])[:, None, :]

  # ---- the expert hook (called inside one layer: no leading layer axis here)
  def dispatch(self, gate, up, down, ids_tk, adapt):
    """Expert weights extended by the copy bank, ids of duplicated experts remapped."""
    if self.expert_copies is None or adapt.domain_bs is None:
      return gate, up, down, ids_tk
    return self.expert_copies.dispatch(gate, up, down, ids_tk, adapt.domain_bs.reshape(-1))

  def isolate(self, y_tkd, ids_tk, adapt):
    """An expert learns only from tokens of domains that own it; the forward is unchanged."""
    if adapt.domain_bs is None:
      raise ValueError("gradient isolation needs the tokens' domain ids (Adaptation.domain_bs)")
    domain_t = adapt.domain_bs.reshape(-1)
    allowed_tk = self.expert_mask[...][domain_t[:, None], ids_tk] > 0
    return jnp.where(allowed_tk[..., None], y_tkd, jax.lax.stop_gradient(y_tkd))

  def statistics(self, ids_tk, token_mask_t, adapt) -> dict:
    """{domain_counts [D, E], domain_tokens [D]} of this layer, if the domains are known."""
    if adapt.domain_bs is None:
      return {}
    num_domains, num_experts = self.correlation.shape
    counts, tokens = domain_expert_counts(ids_tk, adapt.domain_bs.reshape(-1), token_mask_t,
                                          num_domains, num_experts)
    return {"domain_counts": counts, "domain_tokens": tokens}


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


def normalise_per_layer(sums_le):
  return sums_le / jnp.maximum(sums_le.sum(axis=-1, keepdims=True), 1e-30)


def esft_select(scores_le, top_p: float):
  """[L, E] 0/1: per layer, ESFT's top-p set of experts (esft.select)."""
  return top_p_mask(normalise_per_layer(jnp.asarray(scores_le)), top_p).astype(jnp.float32)


def mask_overlap(mask_lde):
  """Jaccard overlap of every pair of domains' masks, averaged over layers: [D, D]."""
  m = mask_lde.astype(jnp.float32)
  inter = jnp.einsum("lde,lfe->ldf", m, m)
  size = m.sum(-1)
  union = size[:, :, None] + size[:, None, :] - inter
  return jnp.mean(jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0), axis=0)


def routing_overlap(p_e, q_e):
  """sum_e min(p_e, q_e) over the last axis: the mass two expert-share distributions (each
  summing to 1) have in common; 1 = the same routing, 0 = disjoint experts."""
  return np.minimum(np.asarray(p_e, np.float64), np.asarray(q_e, np.float64)).sum(axis=-1)


def top_share_experts(share_le, n: int):
  """[L, E] bool: per layer, the `n` experts with the largest share (ties: lower index)."""
  share_le = np.asarray(share_le)
  order = np.argsort(-share_le, axis=-1, kind="stable")[:, :n]
  out = np.zeros(share_le.shape, bool)
  np.put_along_axis(out, order, True, axis=-1)
  return out


def top_fraction_share(share_le, fraction: float = 0.1):
  """[L]: per layer, the share on the top `fraction` of the experts (at least one): how
  concentrated a text's routing is (uniform routing gives `fraction`)."""
  share_le = np.asarray(share_le, np.float64)
  n = max(1, int(round(fraction * share_le.shape[-1])))
  return (share_le * top_share_experts(share_le, n)).sum(-1)


def routing_premise(general_le, domain_shares: dict, phi: float,
                    domain_gates: dict | None = None, esft_top_p: dict | None = None) -> dict:
  """The premise of DGES (docs/RESULTS.md): does general text use other experts than the
  domains? Inputs are per-layer expert-slot shares [L, E] (each row sums to 1: the fraction of
  top-k slots landing on each expert, esft.domain_scores' "token") of general text and of each
  domain. Per layer and domain:
    overlap          sum_e min(p_general(e), p_domain(e))
    mask_fraction    fraction of experts in the domain's DGES mask (relative score at `phi`:
                     share >= phi * the row's max, as mask_from_correlation)
    general_on_mask  fraction of general text's top-k slots on those experts
    domain_on_mask   the same for the domain's own slots
    concentration    share of the domain's own slots on its top 10% of experts
  and, for the union of all domains' masks, mask_fraction and general_on_mask. If the premise
  held, general_on_mask would be well below mask_fraction (general text elsewhere).
  `domain_gates` (optional, each domain's gate-weight shares [L, E]) adds ESFT's statistics:
    gate_top_share   share of the domain's gate weight on its top 10% of experts
    esft_experts     {"token", "gate"}: experts ESFT selects per layer (top-p of the token or
                     gate shares at `esft_top_p`, esft.select; ESFT reports 2-15 of 64)"""
  general = np.asarray(general_le, np.float64)
  per_domain, union = {}, np.zeros(general.shape, bool)
  for name, share in domain_shares.items():
    share = np.asarray(share, np.float64)
    mask = np.asarray(mask_from_correlation(jnp.asarray(share)[:, None, :], phi,
                                            "relative"))[:, 0] > 0
    union |= mask
    per_domain[name] = {"overlap": routing_overlap(general, share).tolist(),
                        "mask_fraction": mask.mean(-1).tolist(),
                        "general_on_mask": (general * mask).sum(-1).tolist(),
                        "domain_on_mask": (share * mask).sum(-1).tolist(),
                        "concentration": top_fraction_share(share).tolist()}
    if domain_gates is not None:
      gate = np.asarray(domain_gates[name], np.float64)
      p = esft_top_p or {"token": 0.2, "gate": 0.1}
      per_domain[name]["gate_top_share"] = top_fraction_share(gate).tolist()
      per_domain[name]["esft_experts"] = {
          k: np.asarray(esft_select(v, p[k])).sum(-1).tolist()
          for k, v in (("token", share), ("gate", gate))}
  mean = lambda key: float(np.mean([v[key] for v in per_domain.values()]))
  ratios = [g / m for v in per_domain.values()
            for g, m in zip(v["general_on_mask"], v["mask_fraction"]) if m > 0]
  return {"per_domain": per_domain,
          "union": {"mask_fraction": union.mean(-1).tolist(),
                    "general_on_mask": (general * union).sum(-1).tolist()},
          "general_top_share": {n: (general * top_share_experts(general, n)).sum(-1).tolist()
                                for n in (4, 8, 16)},
          "overlap_mean": mean("overlap"), "mask_fraction_mean": mean("mask_fraction"),
          "general_on_mask_mean": mean("general_on_mask"),
          "domain_on_mask_mean": mean("domain_on_mask"),
          # The premise target's ratio (docs/RESULTS.md, "Testbeds"): of the means, and the mean
          # over domains and layers of each ratio.
          "general_on_mask_over_mask": mean("general_on_mask") / mean("mask_fraction"),
          "general_on_mask_over_mask_each": float(np.mean(ratios)),
          "concentration_mean": mean("concentration"),
          **({"gate_top_share_mean": mean("gate_top_share"),
              "esft_experts_mean": {k: float(np.mean([v["esft_experts"][k]
                                                      for v in per_domain.values()]))
                                    for k in ("token", "gate")}}
             if domain_gates is not None else {})}


def attach(model, num_domains: int):
  """Plugs the DES-MoE state (zeroed A, all-ones M, stacked over MoE layers) into the model's
  MoE blocks."""
  moe = model.moe_blocks()
  layers, e = moe.experts.gate_proj.shape[0], model.config.n_routed_experts
  moe.des = DesState(layers, num_domains, e)
  return model


def attach_exclusion(model):
  """Plugs an empty exclusion (no expert excluded, [L, E] zeros) into the DES-MoE state: the
  structure of a `dges.exclude_general_top` run, which `exclude_experts` (training) or a
  checkpoint (evaluation, resume) fills."""
  des = des_state(model)
  layers, _, e = des.expert_mask.shape
  des.excluded = ExcludedExperts(jnp.zeros((layers, e), jnp.float32),
                                 logical_axes=("layers", None))
  return model


def exclude_experts(model, excluded_le):
  """Removes the experts of `excluded_le` ([L, E] bool) from every domain's mask, now and at
  every refresh: they receive no gradient and no update (weight decay included), so they end
  the run bit-identical. The oracle DGES control (`dges.exclude_general_top`)."""
  des = des_state(model)
  if des.excluded is None:
    attach_exclusion(model)
  excluded = jnp.asarray(np.asarray(excluded_le, bool), jnp.float32)
  if excluded.shape != des.excluded.shape:
    raise ValueError(f"excluded experts of shape {excluded.shape}, expected [layers, experts] = "
                     f"{des.excluded.shape}")
  des.excluded[...] = excluded
  des.expert_mask[...] = des.allowed(des.expert_mask[...])
  return model


def des_state(model) -> DesState:
  """The model's DES-MoE state (stacked over MoE layers); an error if none is attached."""
  moe = model.moe_blocks()
  if moe is None or moe.des is None:
    raise ValueError("the model has no DES-MoE state: run methods.prepare_model (or "
                     "specialization.attach) first")
  return moe.des


def expert_update_mask(mask_lde, domain_tokens_d):
  """[L, E] 1 where some domain present in the batch owns the expert (it may be updated)."""
  present_d = (domain_tokens_d > 0).astype(mask_lde.dtype)
  return (jnp.einsum("lde,d->le", mask_lde, present_d) > 0).astype(jnp.float32)


# ------------------------------------------------------------------ expert duplication


class CopyTable(nnx.Variable):
  """Integer bookkeeping of duplicated experts (model state, not a parameter)."""


class ExpertCopies(nnx.Module):
  """A bank of C duplicated experts per layer, for `dges.duplicate_shared_experts`.

  At the end of phase I (`duplicate`), an expert owned by k > 1 domains gets k - 1 copies; the
  first owner keeps the original, every other owner d is given a copy and its tokens are
  dispatched to it (`table[d, e]` = slot). Copies train like experts. For inference the copies
  are merged back (`merge_copies`): the expert becomes the average of its versions, i.e. the
  pretrained weight plus the average of the domains' deltas, so the served model keeps the
  original architecture and needs no domain id. Stacked over layers: [L, C, ...].
  """

  def __init__(self, layers: int, capacity: int, num_domains: int, num_experts: int,
               d_model: int, d_ff: int, dtype):
    def bank(shape, axes):  # trains as a routed expert; optim.py masks it per copy
      return nnx.Param(jnp.zeros((layers, capacity) + shape, dtype), logical_axes=axes,
                       group="routed_experts", expert_bank="expert_copies")

    self.gate_proj = bank((d_model, d_ff), ("layers", None, "embed", "expert_mlp"))
    self.up_proj = bank((d_model, d_ff), ("layers", None, "embed", "expert_mlp"))
    self.down_proj = bank((d_ff, d_model), ("layers", None, "expert_mlp", "embed"))
    self.table = CopyTable(jnp.full((layers, num_domains, num_experts), -1, jnp.int32),
                           logical_axes=("layers", "domains", None))
    self.origin = CopyTable(jnp.full((layers, capacity), -1, jnp.int32),
                            logical_axes=("layers", None))
    self.owner = CopyTable(jnp.full((layers, capacity), -1, jnp.int32),
                           logical_axes=("layers", None))

  def dispatch(self, gate, up, down, ids_tk, domain_t):
    """Inside one layer: expert weights extended by the bank, and ids remapped to copies."""
    e = gate.shape[0]
    slot_tk = self.table[...][domain_t[:, None], ids_tk]
    ids = jnp.where(slot_tk >= 0, e + slot_tk, ids_tk)
    cat = lambda base, copies: jnp.concatenate([base, copies.astype(base.dtype)], axis=0)
    return (cat(gate, self.gate_proj[...]), cat(up, self.up_proj[...]),
            cat(down, self.down_proj[...]), ids)



def copies_update_mask(owner_lc, origin_lc, mask_lde, domain_tokens_d):
  """[L, C] 1 where a used copy's owner is in the batch and still owns the original expert."""
  present_d = domain_tokens_d > 0
  d, e = jnp.maximum(owner_lc, 0), jnp.maximum(origin_lc, 0)
  owns = mask_lde[jnp.arange(mask_lde.shape[0])[:, None], d, e] > 0
  return ((owner_lc >= 0) & present_d[d] & owns).astype(jnp.float32)


def attach_copies(model, num_domains: int, capacity: int):
  moe = model.moe_blocks()
  layers, e, d, f = moe.experts.gate_proj.shape
  moe.des.expert_copies = ExpertCopies(layers, capacity, num_domains, model.config.n_routed_experts,
                                   d, f, moe.experts.gate_proj.dtype)
  return model


def duplicate(model) -> dict:
  """Fills the copy bank from the current masks (end of phase I); returns a summary.

  Host-side and deterministic: owners in domain order, experts in index order, until the
  bank of a layer is full (what did not fit is reported, and those domains keep sharing).
  In a multi-process run every process calls it (it gathers the expert banks).
  """
  moe = model.moe_blocks()
  copies = moe.des.expert_copies
  mask = to_host(moe.des.expert_mask[...]) > 0                         # [L, D, E]
  layers, num_domains, num_experts = mask.shape
  capacity = copies.origin.shape[1]
  table = np.full((layers, num_domains, num_experts), -1, np.int32)
  origin = np.full((layers, capacity), -1, np.int32)
  owner = np.full((layers, capacity), -1, np.int32)
  names = ("gate_proj", "up_proj", "down_proj")
  banks = {n: np.array(to_host(getattr(copies, n)[...])) for n in names}  # writable copies
  experts = {n: to_host(getattr(moe.experts, n)[...]) for n in banks}
  made, dropped = 0, 0
  for l in range(layers):
    slot = 0
    for e in range(num_experts):
      owners = np.flatnonzero(mask[l, :, e])
      for d in owners[1:]:
        if slot == capacity:
          dropped += 1
          continue
        table[l, d, e], origin[l, slot], owner[l, slot] = slot, e, d
        for n in banks:
          banks[n][l, slot] = experts[n][l, e]
        slot += 1
        made += 1
  for n, v in banks.items():
    getattr(copies, n)[...] = jnp.asarray(v)
  copies.table[...] = jnp.asarray(table)
  copies.origin[...] = jnp.asarray(origin)
  copies.owner[...] = jnp.asarray(owner)
  return {"copies": made, "not_copied_bank_full": dropped}


def merge_copies(model):
  """Folds duplicated experts back (average of the original and its copies); removes the bank."""
  moe = model.moe_blocks()
  copies = None if moe.des is None else moe.des.expert_copies
  if copies is None:
    return model
  origin = copies.origin[...]                                         # [L, C]
  layers, capacity = origin.shape
  num_experts = moe.experts.gate_proj.shape[1]
  onehot = jax.nn.one_hot(jnp.where(origin >= 0, origin, num_experts), num_experts + 1)[..., :-1]
  counts = 1.0 + onehot.sum(axis=1)                                   # [L, E] versions per expert
  for n in ("gate_proj", "up_proj", "down_proj"):
    base = getattr(moe.experts, n)
    summed = base[...].astype(jnp.float32) + jnp.einsum(
        "lce,lc...->le...", onehot, getattr(copies, n)[...].astype(jnp.float32))
    ndim = base[...].ndim
    # set_value, not base[...] =: after jax.device_get the old value is a read-only numpy array.
    base.set_value((summed / counts.reshape(counts.shape + (1,) * (ndim - 2))).astype(base.dtype))
  moe.des.expert_copies = None
  return model
