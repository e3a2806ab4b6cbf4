"""The optimizer's settings (`optim.*`) and the choices each field takes."""

from __future__ import annotations

import dataclasses

from desmoe_jax.schema import BOOL, Float, Int, OneOf, knob

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("linear", "cosine", "constant")  # optim.schedule
MOMENT_DTYPES = ("auto", "float32", "bfloat16", "int8")
# optim.decay_exclude: which parameter kinds (`kind` metadata, nn/layers.py) get no weight decay
DECAY_EXCLUDE = {"norms,biases": frozenset({"norm", "bias"}), "norms": frozenset({"norm"}),
                 "biases": frozenset({"bias"}), "none": frozenset()}


ADAFACTOR_OFFLOAD = (
    "optim.name='adafactor' with optim.host_offload=True: not supported. The offloaded state is "
    "streamed through the device one layer at a time, and Adafactor's update clip reads the "
    "RMS of a whole stacked parameter (every layer). Its state is factored (rows + columns per "
    "matrix, a few MB): keep it on the device, optim.host_offload=False")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Every field is a config knob (`optim.*`), with its rule (desmoe_jax/schema.py). Defaults:
  ESFT's AdamW settings (configs/six_domains.py's learning_rate -1 means the paper's rate)."""
  learning_rate: float = knob(1e-4, Float(0, lo_open=True, special=((-1, "the paper's value"),)))
  # "linear" decay to 0 (HF Trainer's default) | "cosine" | "constant"
  schedule: str = knob("linear", OneOf(*SCHEDULES))
  warmup_steps: int = knob(0, Int(0))
  weight_decay: float = knob(0.1, Float(0))
  b1: float = knob(0.9, Float(0, 1, hi_open=True))
  b2: float = knob(0.95, Float(0, 1, hi_open=True))
  eps: float = knob(1e-8, Float(0, lo_open=True))
  grad_clip: float = knob(1.0, Float(0))  # global-norm clip over trainable gradients; 0 disables
  # "adamw" (the paper's) | "adafactor" (factored 2nd moment, no 1st)
  name: str = knob("adamw", OneOf(*OPTIMIZERS))
  # "auto" (the parameter's dtype) | "float32" | "bfloat16" | "int8"
  moments_dtype: str = knob("auto", OneOf(*MOMENT_DTYPES))
  host_offload: bool = knob(False, BOOL)  # optimizer state in host memory (memory kind pinned_host)
  master_weights: bool = False  # a float32 master copy in the state (train.precision=bf16_master)
  # train.skip_nonfinite_updates: 0 off; N > 0 skips a step whose gradients hold NaN/inf (no
  # update, optimizer state kept; optax.apply_if_finite), up to N in a row (then it is applied,
  # and the trainer's finiteness checks stop the run).
  skip_nonfinite_updates: int = knob(0, Int(0), key="train.skip_nonfinite_updates")
  # no weight decay for these kinds (DECAY_EXCLUDE); "none"
  decay_exclude: str = knob("norms,biases", OneOf(*DECAY_EXCLUDE))
  # one Adam step count per routed expert, advanced only when the expert is updated
  per_expert_bias_correction: bool = knob(False, BOOL)

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optim.schedule={self.schedule!r}: expected linear, cosine or constant")
    if self.name not in OPTIMIZERS:
      raise ValueError(f"optim.name={self.name!r}: expected one of {OPTIMIZERS}")
    if self.moments_dtype not in MOMENT_DTYPES:
      raise ValueError(f"optim.moments_dtype={self.moments_dtype!r}: expected one of "
                       f"{MOMENT_DTYPES}")
    if self.decay_exclude not in DECAY_EXCLUDE:
      raise ValueError(f"optim.decay_exclude={self.decay_exclude!r}: expected one of "
                       f"{tuple(DECAY_EXCLUDE)}")
    if self.per_expert_bias_correction and (self.name != "adamw" or self.moments_dtype == "int8"):
      raise ValueError(f"optim.per_expert_bias_correction counts AdamW's steps per expert: it "
                       f"needs optim.name='adamw' (not {self.name!r}) with float moments "
                       f"(optim.moments_dtype={self.moments_dtype!r})")
    if self.host_offload and self.name == "adafactor":
      raise ValueError(ADAFACTOR_OFFLOAD)
    if self.moments_dtype == "int8" and self.name != "adamw":
      raise ValueError(f"optim.moments_dtype='int8' quantises AdamW's two moments; "
                       f"optim.name={self.name!r} has none (use auto, float32 or bfloat16)")
