"""LoRA (Hu et al. 2021) as a method, reaching the routed experts (docs/METHOD.md section 4).

A target weight W [.., d_in, d_out] gets a low-rank pair A [.., d_in, r], B [.., r, d_out]; the
layer computes with W + (alpha / r) A B, W frozen. B starts at 0, so the model at step 0 is the
base model bit for bit (`tests/test_lora.py`). A starts as PEFT's does (Kaiming-uniform,
bound 1/sqrt(d_in)).

Targets (`lora.targets`): `attention` (every projection of MLA / GQA), `shared_experts`,
`routed_experts`, `router` (the linear gate), `dense_mlp` (the dense layers' MLPs). The 2-D
linears add the low-rank path on the activations, y = x W + s (x A) B. The routed experts are
stacked [E, d, F]: each expert gets its own pair, stored batched with the experts
(A [E, d, r], B [E, r, F]; [L, E, ...] over the stacked layers), and the layer merges them into
its expert weights, W_e + s A_e B_e, one batched matmul over the experts, before the dispatch.
So every `model.moe_impl` (dense, ragged, tiled, tokamax) and `model.expert_parallel` runs the
same kernels on plain weights, and the factors' gradients come from the weight gradient the
dispatch computes anyway (what FFT computes too). The cost is one transient [E, d, F] per
weight of one layer (remat frees it per layer), not a per-expert loop.

The factors are parameters of their own groups, `lora_<group of W>` (schedule.LORA_LABELS):
`lora_backbone` (attention, dense MLPs), `lora_shared_experts`, `lora_router`,
`lora_routed_experts`. The base weights' groups never train under `method="lora"`, so the
optimizer holds no state for them (`optax.set_to_zero`, optim/transforms.py).

`lora.with_desmoe`: DES-MoE's parts act on the factors: the ALR routes (and trains, it is the
method's router), the three phases switch the factor groups where DES-MoE switches the weights'
groups, and the expert masks (gradient isolation, per-expert update masks) apply to the
routed experts' factors, which are stacked [L, E, ...] like the experts.

Export (`merge`): W <- W + s A B in float32, then the pair is dropped, so `workdir/hf` is the
family's plain HF layout. (No adapter-only export yet: PEFT's layout would hold the 2-D
targets' factors only, its LoRA has no form for the fused [E, d, F] expert weights.)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from desmoe_jax.moe.block import RoutedExperts
from desmoe_jax.moe.routing import LinearRouter
from desmoe_jax.nn.layers import Linear
from desmoe_jax.schema import BOOL, Float, Int, SubsetOf, knob

TARGETS = ("attention", "shared_experts", "routed_experts", "router", "dense_mlp")
LORA = "lora_"   # prefix of a factor's parameter group: "lora_" + its base weight's group


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Every field is a config knob (`lora.*`)."""
  rank: int = knob(8, Int(1))                       # r: the factors' inner width
  alpha: float = knob(16.0, Float(0, lo_open=True))  # the update is (alpha / r) A B
  # Dropout on the low-rank path's input (PEFT's lora_dropout). Only 0 is implemented: the
  # train step has no dropout randomness to give the layers (a field so that configs can say
  # it; any other value is refused, naming it).
  dropout: float = knob(0.0, Float(0, 1, hi_open=True))
  targets: str = knob(",".join(TARGETS), SubsetOf(*TARGETS))  # comma-separated, see TARGETS
  with_desmoe: bool = knob(False, BOOL)  # DES-MoE's ALR, masks and phases on the factors

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank={self.rank} must be >= 1")
    if not self.alpha > 0:
      raise ValueError(f"lora.alpha={self.alpha} must be > 0")
    if self.dropout != 0:
      raise ValueError(f"lora.dropout={self.dropout}: only 0 is implemented (the train step "
                       "gives the layers no dropout randomness)")
    bad = [t for t in self.target_set_raw() if t not in TARGETS]
    if bad or not self.targets:
      raise ValueError(f"lora.targets={self.targets!r}: expected a comma-separated list of "
                       f"{', '.join(TARGETS)}")
    if self.with_desmoe and "router" in self.target_set_raw():
      raise ValueError("lora.with_desmoe=True routes with DES-MoE's adaptive router, which "
                       "trains as in DES-MoE: remove 'router' from lora.targets")

  def target_set_raw(self) -> list[str]:
    return self.targets.split(",")

  @property
  def target_set(self) -> frozenset:
    return frozenset(self.target_set_raw())

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class LoraPair(nnx.Module):
  """A [.., d_in, r] and B [.., r, d_out] (leading dims: stacked layers, experts); the update of
  the weight is scale * A @ B, batched over the leading dims."""

  def __init__(self, a, b, axes_a, axes_b, group: str, scale: float):
    self.a = nnx.Param(a, logical_axes=tuple(axes_a), group=group)
    self.b = nnx.Param(b, logical_axes=tuple(axes_b), group=group)
    self.scale = scale

  def __call__(self, x):
    """s (x A) B for activations x [..., d_in] (a 2-D target), in x's dtype."""
    dt = x.dtype
    return jnp.dot(jnp.dot(x, self.a[...].astype(dt)), self.b[...].astype(dt)) * \
        jnp.asarray(self.scale, dt)

  def delta(self):
    """s A B [.., d_in, d_out] in float32."""
    return _delta(self.a[...], self.b[...], self.scale)

  def merge_into(self, w, dtype=None):
    """W + s A B (a float32 sum) in `dtype` (default W's)."""
    return _merge(w, self.a[...], self.b[...], self.scale, dtype)


def _delta(a, b, scale):
  return scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))


def _merge(w, a, b, scale, dtype=None):
  return (w.astype(jnp.float32) + _delta(a, b, scale)).astype(dtype or w.dtype)


def _pair_for(var: nnx.Variable, rank: int, scale: float, key, group: str) -> LoraPair:
  """A new pair for the weight `var` [.., d_in, d_out]: A Kaiming-uniform (PEFT's bound
  1/sqrt(d_in)), B = 0, in the weight's dtype, laid out along the weight's logical axes."""
  shape, dtype = var.shape, var.dtype
  *lead, d_in, d_out = shape
  axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
  bound = 1.0 / math.sqrt(d_in)
  a = jax.random.uniform(key, (*lead, d_in, rank), jnp.float32, -bound, bound).astype(dtype)
  b = jnp.zeros((*lead, rank, d_out), dtype)
  return LoraPair(a, b, (*axes[:-1], None), (*axes[:-2], None, axes[-1]), LORA + group, scale)


def _group(var) -> str:
  return var.get_metadata().get("group") or "backbone"


def target_of(path) -> str | None:
  """The `lora.targets` name of a module at `path` in the model (None: not a target)."""
  names = [str(p) for p in path]
  if "self_attn" in names:
    return "attention"
  if any(n in names for n in ("shared_experts", "shared_expert", "shared_expert_gate")):
    return "shared_experts"
  if names[:1] == ["dense_layers"] and "mlp" in names:
    return "dense_mlp"
  if names[-1:] == ["gate"] and "mlp" in names:
    return "router"
  if names[-1:] == ["experts"] and "mlp" in names:
    return "routed_experts"
  return None


def hosts(model):
  """[(path, module, target)] of every module LoRA can adapt: the Linears (`kernel`), the
  linear router (`weight`) and the routed experts (`gate_proj`, `up_proj`, `down_proj`)."""
  out = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (Linear, LinearRouter, RoutedExperts)):
      target = target_of(path)
      if target is not None:
        out.append((tuple(path), node, target))
  return out


EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def attach(model, cfg: LoraConfig, seed: int = 0):
  """Adds B = 0 pairs to every module of `cfg.targets` (in place); the model computes as
  before. A target this family lacks (`dense_mlp` or `shared_experts` in Mixtral) adapts
  nothing, so the default targets serve every family; naming only absent targets fails,
  naming the field."""
  found = hosts(model)
  rngs = nnx.Rngs(seed)
  wanted = cfg.target_set
  if not wanted & {t for _, _, t in found}:
    raise ValueError(f"lora.targets={cfg.targets!r}: this model ({model.config.model_type}) "
                     f"has none of them; it has {', '.join(sorted({t for _, _, t in found}))}")
  for _, module, target in found:
    if target not in wanted:
      continue
    if isinstance(module, RoutedExperts):
      module.lora = ExpertLora({n: _pair_for(getattr(module, n), cfg.rank, cfg.scale,
                                             rngs.params(), _group(getattr(module, n)))
                                for n in EXPERT_WEIGHTS})
    else:
      var = module.weight if isinstance(module, LinearRouter) else module.kernel
      module.lora = _pair_for(var, cfg.rank, cfg.scale, rngs.params(), _group(var))
  return model


class ExpertLora(nnx.Module):
  """The routed experts' pairs, one per weight: gate/up A [E, d, r], B [E, r, F]; down
  A [E, F, r], B [E, r, d]."""

  def __init__(self, pairs: dict):
    self.gate_proj = pairs["gate_proj"]
    self.up_proj = pairs["up_proj"]
    self.down_proj = pairs["down_proj"]


def attached(model) -> bool:
  return any(getattr(m, "lora", None) is not None for _, m, _ in hosts(model))


def merge(model):
  """Folds every pair into its weight (W <- W + s A B, in float32, stored in W's dtype and
  layout) and removes it (in place): the model is its family's plain architecture again."""
  for _, module, _ in hosts(model):
    if getattr(module, "lora", None) is None:
      continue
    if isinstance(module, RoutedExperts):
      for n in EXPERT_WEIGHTS:
        var = getattr(module, n)
        var.set_value(_fold(var[...], getattr(module.lora, n)))
    else:
      var = module.weight if isinstance(module, LinearRouter) else module.kernel
      var.set_value(_fold(var[...], module.lora))
    module.lora = None
  return model


def _fold(w, pair: LoraPair):
  """W + s A B, jitted with W's layout (a sharded weight stays sharded, never gathered)."""
  sharding = getattr(w, "sharding", None)
  fold = jax.jit(_merge, static_argnums=(3,), out_shardings=sharding)
  return fold(w, pair.a[...], pair.b[...], pair.scale)
