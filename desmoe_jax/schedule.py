"""DES-MoE part 3: the three-phase schedule (docs/METHOD.md section 3).

Phase I (warm-up, step < t1 * T): correlation and masks are estimated; by default the router and
the backbone train while routed experts stay frozen (Eq. 11).
Phase II (stabilization, t1 * T <= step < t2 * T): router + domain-relevant experts train,
masks keep refreshing, the backbone is frozen.
Phase III (consolidation, step >= t2 * T): masks and router frozen; only the experts that
domains own keep training.

Parameter groups ("labels") are what the phases switch on and off; `optim/` turns a phase's
trainable set into an optax transform, and the train step is compiled once per phase.
"""

from __future__ import annotations

import dataclasses
import math

from desmoe_jax.schema import Float, OneOf, knob

WARMUP, STABILIZATION, CONSOLIDATION = 0, 1, 2
PHASE_NAMES = ("warmup", "stabilization", "consolidation")

# Parameter groups. "backbone": embeddings, attention, norms, dense layers, lm head.
BASE_LABELS = ("backbone", "shared_experts", "router", "routed_experts")
# LoRA's factors (desmoe_jax/lora.py): "lora_" + the group of the weight they adapt.
LORA_LABELS = tuple("lora_" + g for g in BASE_LABELS)
LABELS = BASE_LABELS + LORA_LABELS
ALL = frozenset(BASE_LABELS)   # every weight of the model (full fine-tuning)
# schedule.warmup_trains: the groups phase I trains
WARMUP_GROUPS = {
    "router+backbone": frozenset({"router", "backbone", "shared_experts"}),
    "router+experts": frozenset({"router", "routed_experts"}),
    "all": ALL,
}


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Every field is a config knob (`schedule.*`)."""
  t1: float = knob(0.2, Float(0, 1))      # end of phase I, as a fraction of total steps
  t2: float = knob(0.7, Float(0, 1))      # end of phase II
  # "router+backbone" (Eq. 11) | "router+experts" | "all"
  warmup_trains: str = knob("router+backbone", OneOf(*WARMUP_GROUPS))

  def __post_init__(self):
    if not 0.0 <= self.t1 <= self.t2 <= 1.0:
      raise ValueError(f"schedule.t1={self.t1}, schedule.t2={self.t2}: need 0 <= t1 <= t2 <= 1")
    if self.warmup_trains not in WARMUP_GROUPS:
      raise ValueError(f"schedule.warmup_trains={self.warmup_trains!r}: expected one of "
                       f"{sorted(WARMUP_GROUPS)}")


def phase_at(step: int, total_steps: int, cfg: ScheduleConfig) -> int:
  """Phase of 0-indexed `step` (host-side int: the phase selects the compiled step)."""
  if step < cfg.t1 * total_steps:
    return WARMUP
  if step < cfg.t2 * total_steps:
    return STABILIZATION
  return CONSOLIDATION


def desmoe_trainable(phase: int, cfg: ScheduleConfig) -> frozenset:
  """Parameter groups DES-MoE trains in `phase` (shared experts belong to the backbone)."""
  if phase == WARMUP:
    return WARMUP_GROUPS[cfg.warmup_trains]
  if phase == STABILIZATION:
    return frozenset({"router", "routed_experts"})
  return frozenset({"routed_experts"})


def phase_boundaries(total_steps: int, cfg: ScheduleConfig) -> list[tuple[int, int, int]]:
  """[(phase, first_step, end_step)] for the phases that have at least one step."""
  out, start = [], 0
  for phase, frac in ((WARMUP, cfg.t1), (STABILIZATION, cfg.t2), (CONSOLIDATION, 1.0)):
    end = min(total_steps, math.ceil(frac * total_steps)) if phase != CONSOLIDATION else total_steps
    if end > start:
      out.append((phase, start, end))
    start = max(start, end)
  return out
