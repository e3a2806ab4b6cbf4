"""The methods one trainer runs: DES-MoE, its ablations, and the baselines it is compared with.

| method               | router                  | masks (DGES)            | schedule | trains                  |
|----------------------|-------------------------|-------------------------|----------|-------------------------|
| desmoe               | ALR + KD                | applied, refreshed      | 3 phases | per phase               |
| desmoe_no_alr        | pretrained linear       | applied, refreshed      | 3 phases | per phase               |
| desmoe_no_dges       | ALR + KD                | tracked only            | 3 phases | per phase               |
| desmoe_no_schedule   | ALR + KD                | applied, refreshed      | none     | everything, all run     |
| fft                  | pretrained linear       | tracked only            | none     | everything              |
| esft_gate/esft_token | pretrained linear, frozen | ESFT selection, fixed | none     | selected routed experts |
| lora                 | pretrained linear       | tracked only            | none     | LoRA factors of lora.targets |
| lora, with_desmoe    | ALR + KD                | applied, refreshed      | 3 phases | LoRA factors per phase, ALR |

Masks are always computed from the routing statistics ("tracked only" = refreshed but never
applied), so expert overlap between domains can be compared across methods.
"""

from __future__ import annotations

import dataclasses

from desmoe_jax import lora as lora_lib
from desmoe_jax.esft import EsftConfig
from desmoe_jax.lora import LoraConfig
from desmoe_jax.router import AlrConfig, attach_alr, kd_lambda
from desmoe_jax.schedule import (ALL, CONSOLIDATION, WARMUP, ScheduleConfig, desmoe_trainable,
                                 phase_at, phase_boundaries)
from desmoe_jax.specialization import DgesConfig, attach, attach_copies, attach_exclusion

METHODS = ("desmoe", "fft", "esft_token", "esft_gate", "desmoe_no_alr", "desmoe_no_dges",
           "desmoe_no_schedule", "lora")
# The paper's learning rates (docs/METHOD.md section 4): 1e-4 for the DES-MoE family, 3e-5 for
# FFT, 1e-5 for ESFT. `optim.learning_rate = -1` selects them. The paper gives none for LoRA,
# which gets DES-MoE's.
PAPER_LR = {"fft": 3e-5, "esft_token": 1e-5, "esft_gate": 1e-5}
DEFAULT_PAPER_LR = 1e-4
UNSCHEDULED = -1  # the single "phase" of methods without the three-phase schedule
FREEZABLE = frozenset(ALL) - {"routed_experts"}   # ablation.freeze


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  method: str = "desmoe"
  num_domains: int = 6
  total_steps: int = 500
  alr: AlrConfig = AlrConfig()
  dges: DgesConfig = DgesConfig()
  schedule: ScheduleConfig = ScheduleConfig()
  esft: EsftConfig = EsftConfig()
  lora: LoraConfig = LoraConfig()
  linear_router_trainable: bool = True  # desmoe_no_alr / fft: train the pretrained linear router
  balance_loss: bool = True             # add DeepSeek's balance loss (aux_loss_alpha), as its
                                        # and ESFT's training code do
  # Groups (schedule.LABELS) never trained, whatever the phase: a diagnosis of where forgetting
  # comes from (the shared experts, the backbone trained in warm-up, the router).
  freeze: frozenset = frozenset()

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
    if self.num_domains < 1 or self.total_steps < 1:
      raise ValueError(f"num_domains={self.num_domains} and total_steps={self.total_steps} "
                       "must be >= 1")
    if self.esft.domain >= self.num_domains:
      raise ValueError(f"esft.domain={self.esft.domain} but num_domains={self.num_domains}")
    if not set(self.freeze) <= FREEZABLE:
      raise ValueError(f"ablation.freeze={','.join(sorted(self.freeze))!r}: expected groups "
                       f"among {', '.join(sorted(FREEZABLE))} (comma-separated; routed experts "
                       "are what every method adapts)")
    empty = [p for p, _, _ in self.phases() if not self.trainable(p)]
    if empty:
      raise ValueError(f"ablation.freeze={','.join(sorted(self.freeze))!r} leaves nothing to "
                       f"train in phase {empty[0]} of method={self.method!r}")
    if self.dges.exclude_general_top and (not self.apply_masks or self.is_esft):
      raise ValueError(f"dges.exclude_general_top={self.dges.exclude_general_top} removes "
                       f"experts from DGES masks, which method={self.method!r} does not apply; "
                       "use desmoe, desmoe_no_alr or desmoe_no_schedule, or set it to 0")
    if self.lora_with_desmoe and self.dges.duplicate_shared_experts:
      raise ValueError("lora.with_desmoe=True with dges.duplicate_shared_experts=True: the copy "
                       "bank holds full expert weights, which LoRA does not train; set "
                       "dges.duplicate_shared_experts=False")

  @property
  def is_lora(self) -> bool:
    return self.method == "lora"

  @property
  def lora_with_desmoe(self) -> bool:
    """LoRA's factors trained under DES-MoE's ALR, masks and schedule (lora.with_desmoe)."""
    return self.is_lora and self.lora.with_desmoe

  # ---------------------------------------------------------------- what the method does
  @property
  def use_alr(self) -> bool:
    return self.method in ("desmoe", "desmoe_no_dges", "desmoe_no_schedule") or \
        self.lora_with_desmoe

  @property
  def apply_masks(self) -> bool:
    """Gradient isolation and per-expert update masks from ExpertMask."""
    return self.method in ("desmoe", "desmoe_no_alr", "desmoe_no_schedule", "esft_gate",
                           "esft_token") or self.lora_with_desmoe

  @property
  def is_esft(self) -> bool:
    return self.method.startswith("esft")

  @property
  def esft_score(self) -> str | None:
    return {"esft_gate": "gate", "esft_token": "token"}.get(self.method)

  @property
  def use_schedule(self) -> bool:
    return self.method in ("desmoe", "desmoe_no_alr", "desmoe_no_dges") or self.lora_with_desmoe

  @property
  def duplicate_experts(self) -> bool:
    return self.dges.duplicate_shared_experts and self.apply_masks and not self.is_esft

  def phase(self, step: int) -> int:
    return phase_at(step, self.total_steps, self.schedule) if self.use_schedule else UNSCHEDULED

  def phases(self) -> list[tuple[int, int, int]]:
    """[(phase, first_step, end_step)] of the run."""
    if self.use_schedule:
      return phase_boundaries(self.total_steps, self.schedule)
    return [(UNSCHEDULED, 0, self.total_steps)]

  def trainable(self, phase: int) -> frozenset:
    """Parameter groups (schedule.LABELS) trained in `phase`."""
    if self.is_esft:
      groups = {"routed_experts"}
      if self.esft.train_shared_experts:
        groups.add("shared_experts")
      if self.esft.train_non_expert_modules:
        groups |= {"backbone", "router"}
      return frozenset(groups)
    groups = set(ALL if phase == UNSCHEDULED else desmoe_trainable(phase, self.schedule))
    if self.is_lora:
      # The factors of the weights the phase would train; under with_desmoe the ALR (DES-MoE's
      # router, not a LoRA target) trains where DES-MoE trains the router. ablation.freeze
      # names the weights' groups: their factors never train.
      groups -= self.freeze
      if not self.lora_with_desmoe:
        return frozenset(lora_lib.LORA + g for g in groups)
      return frozenset(lora_lib.LORA + g if g != "router" else g for g in groups)
    if not self.use_alr and not self.linear_router_trainable:
      groups.discard("router")
    return frozenset(groups) - self.freeze

  def trainable_ever(self) -> frozenset:
    return frozenset().union(*(self.trainable(p) for p, _, _ in self.phases()))

  def refresh_masks(self, phase: int) -> bool:
    """Masks follow the correlation matrix until consolidation; ESFT's masks are fixed."""
    return not self.is_esft and phase != CONSOLIDATION

  def warmup_end(self) -> int | None:
    """The first step after phase I (warm-up), or None for a run without one. The masks are
    always refreshed by the last warm-up step, whatever `dges.update_every` is, so that phase II
    starts isolated: before the first refresh the masks are all ones and every expert trains."""
    ends = [end for phase, _, end in self.phases() if phase == WARMUP]
    return ends[0] if ends else None

  def router_steps(self) -> int:
    """Steps in which the router trains: up to the end of the last phase that trains it (the
    end of phase II, T2, under the three-phase schedule; T without it)."""
    ends = [end for phase, _, end in self.phases() if "router" in self.trainable(phase)]
    return max(ends, default=self.total_steps)

  def kd_clock_steps(self) -> int:
    """lambda's clock (`alr.alpha`): alpha = step / this. "run": T; "router": the steps in
    which the router trains, so lambda reaches 0 where the router freezes, not at T."""
    return self.total_steps if self.alr.alpha == "run" else self.router_steps()

  def kd_lambda(self, step):
    """lambda(alpha) = max(0, 1 - alpha) at `step` (a scalar array; the run's global step)."""
    return kd_lambda(step, self.kd_clock_steps())


def prepare_model(model, cfg: MethodConfig, seed: int = 0):
  """Turns a pretrained model (any family) into the trainable model of `cfg.method` (in place):
  adaptive routers for the ALR methods, DGES state for all, a copy bank if duplication is on,
  LoRA's pairs (B = 0) for `lora`."""
  if model.moe_blocks() is None:
    raise ValueError("the model has no MoE layer (first_k_dense_replace >= num_hidden_layers)")
  if cfg.use_alr:
    attach_alr(model, cfg.alr, seed=seed)
  attach(model, cfg.num_domains)
  if cfg.dges.exclude_general_top:
    attach_exclusion(model)          # filled by train_state.exclude_general_experts or a checkpoint
  if cfg.duplicate_experts:
    attach_copies(model, cfg.num_domains, cfg.dges.max_copies)
  if cfg.is_lora:
    lora_lib.attach(model, cfg.lora, seed=seed)
  return model
