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

`lora.dropout` (PEFT's lora_dropout): s B(A(drop(x))) on the branch only, in the train step
only (`set_dropout`, keys from (seed, step)); on the routed experts one mask per (token, slot)
and weight (`ExpertLora.branch`), the branch then explicit in the dispatch (moe/block.py).

Export (`merge`): W <- W + s A B in float32, then the pair is dropped, so `workdir/hf` is the
family's plain HF layout; `workdir/hf_adapter` holds the pairs alone in PEFT's layout
(peft_adapter.py).
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
  # Dropout on the low-rank branch's input (PEFT's lora_dropout): s B(A(drop(x))), the base
  # path sees x; in training only, masks from (seed, step) (`set_dropout`).
  dropout: float = knob(0.0, Float(0, 1, hi_open=True))
  targets: str = knob(",".join(TARGETS), SubsetOf(*TARGETS))  # comma-separated, see TARGETS
  with_desmoe: bool = knob(False, BOOL)  # DES-MoE's ALR, masks and phases on the factors

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank={self.rank} must be >= 1")
    if not self.alpha > 0:
      raise ValueError(f"lora.alpha={self.alpha} must be > 0")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1) (the probability that "
                       "an input element of the low-rank branch is zeroed)")
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


def dropout(x, key, rate: float):
  """torch's (so PEFT's) inverted dropout: every element of x kept with probability 1 - rate and
  scaled by 1 / (1 - rate), else 0. `key`: raw key data (`jax.random.key_data`)."""
  keep = jax.random.bernoulli(jax.random.wrap_key_data(key), 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class LoraPair(nnx.Module):
  """A [.., d_in, r] and B [.., r, d_out] (leading dims: stacked layers, experts); the update of
  the weight is scale * A @ B, batched over the leading dims. `rate`: lora.dropout, applied
  while `dropout_key` is set (the train step's `set_dropout`; None everywhere else)."""

  def __init__(self, a, b, axes_a, axes_b, group: str, scale: float, rate: float = 0.0):
    self.a = nnx.Param(a, logical_axes=tuple(axes_a), group=group)
    self.b = nnx.Param(b, logical_axes=tuple(axes_b), group=group)
    self.scale = scale
    self.rate = rate
    self.dropout_key = nnx.data(None)

  def __call__(self, x):
    """s (drop(x) A) B for activations x [..., d_in] (a 2-D target), in x's dtype."""
    dt = x.dtype
    if self.dropout_key is not None:
      x = dropout(x, self.dropout_key, self.rate)
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


def _pair_for(var: nnx.Variable, rank: int, scale: float, key, group: str,
              rate: float = 0.0) -> LoraPair:
  """A new pair for the weight `var` [.., d_in, d_out]: A Kaiming-uniform (PEFT's bound
  1/sqrt(d_in)), B = 0, in the weight's dtype, laid out along the weight's logical axes."""
  shape, dtype = var.shape, var.dtype
  *lead, d_in, d_out = shape
  axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
  bound = 1.0 / math.sqrt(d_in)
  a = jax.random.uniform(key, (*lead, d_in, rank), jnp.float32, -bound, bound).astype(dtype)
  b = jnp.zeros((*lead, rank, d_out), dtype)
  return LoraPair(a, b, (*axes[:-1], None), (*axes[:-2], None, axes[-1]), LORA + group, scale,
                  rate)


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
                                for n in EXPERT_WEIGHTS}, cfg.dropout)
    else:
      var = module.weight if isinstance(module, LinearRouter) else module.kernel
      module.lora = _pair_for(var, cfg.rank, cfg.scale, rngs.params(), _group(var), cfg.dropout)
  return model


class ExpertLora(nnx.Module):
  """The routed experts' pairs, one per weight: gate/up A [E, d, r], B [E, r, F]; down
  A [E, F, r], B [E, r, d]. `rate` and `dropout_key` as in LoraPair: one key per layer, from
  which `branch` draws the three weights' masks."""

  def __init__(self, pairs: dict, rate: float = 0.0):
    self.gate_proj = pairs["gate_proj"]
    self.up_proj = pairs["up_proj"]
    self.down_proj = pairs["down_proj"]
    self.rate = rate
    self.dropout_key = nnx.data(None)

  def branch(self, n_slots: int, dtype):
    """The low-rank branch with dropout for `moe.block.expert_outputs` (training with
    lora.dropout > 0; None otherwise: the pairs are merged into the weights).

    PEFT's semantics: PEFT's LoRA on an MoE whose experts are nn.Linear modules (the per-expert
    layout of transformers 4's DeepSeek-V2, Mixtral, Qwen2-MoE) applies each expert Linear's
    own nn.Dropout to the rows that expert receives, so a token's input to an expert gets one
    mask per (token, slot) and per linear: gate_proj and up_proj draw independent masks of the
    same x, down_proj a mask of that slot's hidden h. (PEFT's ParamWrapper for fused [E, ...]
    expert parameters refuses lora_dropout != 0; this is the semantics it would have.) So the
    masks are [T*K, d] (gate, up) and [T*K, F] (down), slot t*K + k, inverted-dropout scaled:
    multiplying a row by its mask is `dropout` of it."""
    if self.dropout_key is None:
      return None
    pairs = (self.gate_proj, self.up_proj, self.down_proj)
    masks = tuple(
        dropout(jnp.ones((n_slots, p.a.shape[-2]), dtype), jax.random.key_data(k), self.rate)
        for p, k in zip(pairs, jax.random.split(jax.random.wrap_key_data(self.dropout_key), 3)))
    factors = tuple((p.a[...].astype(dtype), p.b[...].astype(dtype)) for p in pairs)
    return factors, self.gate_proj.scale, masks


def set_dropout(model, key):
  """Turns lora.dropout on for one forward pass (in place, on the model the train step merges
  for its loss): every pair with a rate > 0 gets its own key, drawn in a fixed order from the
  NNX stream `nnx.Rngs(dropout=key)`; pairs of the stacked MoE layers get one key per layer
  ([L] keys, which the layer scan slices). `key` is `dropout_key(seed, step, microbatch)`, so
  the masks are a function of the seed and the step only and a resumed run repeats them.
  Models never given keys (eval, export, generation) run without dropout."""
  rngs = nnx.Rngs(dropout=key)
  layers = model.config.num_moe_layers
  for path, module, _ in hosts(model):
    pair = getattr(module, "lora", None)
    if pair is None or not pair.rate:
      continue
    k = rngs.dropout()
    stacked = str(path[0]) == "moe_layers"
    pair.dropout_key = jax.random.key_data(jax.random.split(k, layers) if stacked else k)
  return model


def dropout_key(seed: int, step, microbatch=0):
  """LoRA dropout's key of one microbatch of `step`: a stream of its own (fold_in 1) beside the
  stochastic rounding's `train_step.rounding_key(seed, step)`."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), 1)
  return jax.random.fold_in(key, microbatch)


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
