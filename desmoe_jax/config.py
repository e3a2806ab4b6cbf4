"""Model configuration: the architecture (what a checkpoint computes) and the runtime options (how
this implementation computes it), as two dataclasses.

`ModelConfig` holds the architecture of every supported family under one set of names (HF's
DeepSeek names where a concept has several: `n_routed_experts`, `moe_intermediate_size`,
`first_k_dense_replace`...). It is built and written back by a family's strict
`from_hf` / `to_hf` (`desmoe_jax/families/`), never from a raw dict here, so that a field a
family cannot honour stops the load with a message naming it: a model that loads but computes
something else than the reference would poison every number measured on it.

`RuntimeConfig` holds the choices that are not part of a checkpoint (dtypes, kernels, layer
scan, rematerialisation); it is never written to config.json.
"""

from __future__ import annotations

import dataclasses
import json

from desmoe_jax.schema import BOOL, Int, OneOf, knob

ATTENTION_KINDS = ("mla", "gqa")
QK_NORMS = ("none", "head", "full")
SCORING = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc", "topk_softmax")
BALANCE_LOSSES = ("deepseek", "switch", "none")

# model.remat values (model.py maps them to jax.checkpoint policies of the scanned MoE layer):
#   none          keep every activation of every layer for the backward (most memory, no recompute)
#   full          keep only each layer's input; the backward recomputes the layer (least memory)
#   dots          keep the outputs of matmuls without batch dimensions (projections), recompute
#                 the rest (attention softmax, activations, the expert dispatch)
#   dots_offload  as dots, but those matmul outputs go to host memory (pinned_host) in the forward
#                 and come back for the backward: dots' recompute savings at full's device memory,
#                 paid in host<->device transfers
#   full_offload  as full, and each layer's saved input is offloaded to host memory as well (the
#                 scan's stacked [layers, batch, seq, d_model] residuals leave the device)
REMAT_POLICIES = ("none", "full", "dots", "dots_offload", "full_offload")
DTYPES = ("float32", "bfloat16", "float16")                  # model.dtype, model.param_dtype
MOE_IMPLS = ("auto", "dense", "ragged", "tokamax", "tiled")   # model.moe_impl (moe/block.py)
EXPERT_PARALLEL = ("compiler", "shard_map")                  # model.expert_parallel
ATTENTION_IMPLS = ("blocked", "blocked_xla", "einsum", "jax", "tokamax")    # model.attention_impl


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """How to compute (not what): set from `from_pretrained(..., **runtime)` or `config.model.*`."""
  dtype: str = knob("float32", OneOf(*DTYPES))  # activation / compute dtype
  # storage dtype of parameters (routers always float32)
  param_dtype: str = knob("float32", OneOf(*DTYPES))
  # "auto" | "dense" | "ragged" | "tokamax" | "tiled" (moe/block.py). "auto": "tiled" on CPU,
  # "ragged" on TPU/GPU. "tokamax" (Pallas kernels) is verified on TPU compile-only (Mosaic
  # kernels, no dense-fallback matmul) and numerically in Pallas' interpreter on CPU, not run on
  # an accelerator; on a multi-device mesh it needs expert_parallel="shard_map".
  moe_impl: str = knob("auto", OneOf(*MOE_IMPLS))
  moe_tile_size: int = 128                # rows per tile of the "tiled" grouped matmul
  # "compiler" | "shard_map": see moe/expert_parallel.py
  expert_parallel: str = knob("compiler", OneOf(*EXPERT_PARALLEL))
  # "blocked" (the einsum's numbers a block of causal queries at a time, scores recomputed in the
  # backward: nn/blocked_attention.py; in float32 on CPU a C++ kernel, nn/cpu_attention.py) |
  # "blocked_xla" (the same, never the kernel) | "einsum" (reference) |
  # "jax" (jax.nn.dot_product_attention: XLA's, V padded to 192) |
  # "tokamax" (splash on TPU, Mosaic GPU/Triton on GPU, V unpadded; see nn/attention_mla.py). Not in
  # any "auto": its TPU lowering is verified compile-only (Mosaic kernels, scripts/hlo_check.py)
  # and its CPU numerics through tokamax's XLA path, but no kernel has run on an accelerator here.
  # Its kernels are not wrapped in shard_map: one device (the compiler cannot partition them).
  attention_impl: str = knob("blocked", OneOf(*ATTENTION_IMPLS))
  scan_layers: bool = knob(True, BOOL)    # lax.scan over the stacked MoE layers (fast compile)
  # one of REMAT_POLICIES: what a MoE layer's backward recomputes
  remat: str = knob("none", OneOf(*REMAT_POLICIES))
  ce_chunk: int = knob(0, Int(0))         # >0: the train step's cross-entropy over sequence chunks
                                          # of this many positions, never the batch's [B, S, vocab]
                                          # logits; 0: the whole sequence as one chunk (losses.py)

  def __post_init__(self):
    problems = []
    if self.moe_impl not in MOE_IMPLS:
      problems.append(f"moe_impl={self.moe_impl!r} (one of {', '.join(map(repr, MOE_IMPLS))})")
    if self.expert_parallel not in EXPERT_PARALLEL:
      problems.append(f"expert_parallel={self.expert_parallel!r} (one of "
                      f"{', '.join(map(repr, EXPERT_PARALLEL))})")
    if self.attention_impl not in ATTENTION_IMPLS:
      problems.append(f"attention_impl={self.attention_impl!r} (one of "
                      f"{', '.join(map(repr, ATTENTION_IMPLS))})")
    if self.remat not in REMAT_POLICIES:
      problems.append(f"remat={self.remat!r} (one of {', '.join(map(repr, REMAT_POLICIES))})")
    if not isinstance(self.ce_chunk, int) or self.ce_chunk < 0:
      problems.append(f"ce_chunk={self.ce_chunk!r} (0 for the plain cross-entropy, or a positive "
                      f"number of positions per chunk dividing the sequence length)")
    if problems:
      raise ValueError("Unsupported runtime option: " + "; ".join(problems))


RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(RuntimeConfig))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only MoE causal LM (every supported family), plus `runtime`.

  Layers: the first `first_k_dense_replace` decoder layers have a dense MLP, the others a sparse
  MoE block (families whose dense layers are not a prefix are refused by their `from_hf`).
  Defaults are DeepSeek-V2-Lite's.
  """
  model_type: str = "deepseek_v2"         # the HF family; selects the family file on export
  vocab_size: int = 102400
  hidden_size: int = 2048
  intermediate_size: int = 10944          # dense layers' MLP width
  moe_intermediate_size: int = 1408       # width of one routed expert
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  # --- attention
  attention: str = "mla"                  # "mla" (DeepSeek) | "gqa" (grouped-query, RoPE on all dims)
  num_key_value_heads: int | None = None  # gqa: key/value heads
  head_dim: int | None = None             # gqa: per-head width (None: hidden_size / heads)
  q_lora_rank: int | None = None          # mla: None = one q projection (V2-Lite); int = low-rank q
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  qk_norm: str = "none"                   # gqa: "head" (Qwen3: per head) | "full" (OLMoE: per proj)
  clip_qkv: float | None = None           # gqa: clamp q, k, v to [-clip, clip] (OLMoE)
  sliding_window: int | None = None       # gqa: attend to the last `sliding_window` keys only
  rope_interleave: bool = True            # RoPE on interleaved pairs (DeepSeek) or on halves
  attention_bias: bool = False            # bias on q/k/v (and o for MLA / OLMoE) projections
  o_proj_bias: bool = False               # gqa: bias on the output projection
  # --- experts and routing
  n_routed_experts: int = 64
  n_shared_experts: int = 0               # DeepSeek: shared experts of moe_intermediate_size each
  shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one shared expert of this width
  shared_expert_gate: bool = False        # Qwen2-MoE: sigmoid gate on the shared expert
  num_experts_per_tok: int = 6
  first_k_dense_replace: int = 1
  scoring_func: str = "softmax"           # scores from logits: "softmax" | "sigmoid" (V3)
  topk_method: str = "greedy"             # see moe/routing.py: greedy | group_limited_greedy |
                                          # noaux_tc (V3) | topk_softmax (Mixtral)
  routed_scaling_factor: float = 1.0
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = False
  balance_loss: str = "deepseek"          # "deepseek" (seq/batch aux) | "switch" | "none" (V3)
  aux_loss_alpha: float = 0.001           # weight of the balance loss (returned, never added for you)
  seq_aux: bool = True                    # deepseek: sequence-level (True) or batch-level
  # --- the rest
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None        # None or {"type": "yarn", ...}
  max_position_embeddings: int = 163840
  tie_word_embeddings: bool = False
  mlp_bias: bool = False
  bos_token_id: int | None = 100000
  eos_token_id: int | list[int] | None = 100001
  pad_token_id: int | None = None

  runtime: RuntimeConfig = RuntimeConfig()
  # The config.json this was read from: export writes back what the user gave us, updated.
  hf_dict: dict | None = dataclasses.field(default=None, compare=False, repr=False)

  def __post_init__(self):
    problems = []
    if self.attention not in ATTENTION_KINDS:
      problems.append(f"attention={self.attention!r} (one of {ATTENTION_KINDS})")
    if self.qk_norm not in QK_NORMS:
      problems.append(f"qk_norm={self.qk_norm!r} (one of {QK_NORMS})")
    if self.scoring_func not in SCORING:
      problems.append(f"scoring_func={self.scoring_func!r} (supported: {SCORING})")
    if self.topk_method not in TOPK_METHODS:
      problems.append(f"topk_method={self.topk_method!r} (supported: {TOPK_METHODS})")
    if self.balance_loss not in BALANCE_LOSSES:
      problems.append(f"balance_loss={self.balance_loss!r} (one of {BALANCE_LOSSES})")
    if (self.topk_method == "noaux_tc") != (self.scoring_func == "sigmoid"):
      problems.append(f"topk_method={self.topk_method!r} with scoring_func="
                      f"{self.scoring_func!r} (sigmoid scoring goes with noaux_tc only)")
    if self.topk_method in ("group_limited_greedy", "noaux_tc"):
      if not self.n_group or self.n_routed_experts % self.n_group:
        problems.append(f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}")
      elif not 1 <= self.topk_group <= self.n_group:
        problems.append(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
      elif self.topk_group * self.n_routed_experts // self.n_group < self.num_experts_per_tok:
        problems.append("topk_group groups hold fewer experts than num_experts_per_tok")
    if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
      problems.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                      f"[1, n_routed_experts={self.n_routed_experts}]")
    if self.rope_scaling is not None:
      rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
      if rope_type not in ("default", "yarn"):
        problems.append(f"rope_scaling type {rope_type!r} (supported: 'default', 'yarn')")
    if self.attention == "mla" and self.qk_rope_head_dim % 2:
      problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
    if self.attention == "gqa":
      if not self.num_key_value_heads or self.num_attention_heads % self.num_key_value_heads:
        problems.append(f"num_key_value_heads={self.num_key_value_heads} must divide "
                        f"num_attention_heads={self.num_attention_heads}")
      if self.gqa_head_dim % 2:
        problems.append(f"head_dim={self.gqa_head_dim} must be even")
    if not isinstance(self.runtime, RuntimeConfig):
      problems.append(f"runtime={self.runtime!r} is not a RuntimeConfig")
    if problems:
      raise ValueError(f"Unsupported {self.model_type} config: " + "; ".join(problems))

  # ---------------------------------------------------------------- derived quantities
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def gqa_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def rope_dim(self) -> int:
    """Width RoPE rotates: MLA's decoupled rope dims, or a whole GQA head."""
    return self.qk_rope_head_dim if self.attention == "mla" else self.gqa_head_dim

  @property
  def num_moe_layers(self) -> int:
    return max(0, self.num_hidden_layers - self.first_k_dense_replace)

  @property
  def num_dense_layers(self) -> int:
    return self.num_hidden_layers - self.num_moe_layers

  @property
  def rope_type(self) -> str:
    if not self.rope_scaling:
      return "default"
    return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

  @property
  def softmax_scale(self) -> float:
    """1/sqrt(d_qk); for MLA times YaRN's mscale(factor, mscale_all_dim)^2 as DeepSeek does."""
    if self.attention == "gqa":
      return self.gqa_head_dim ** -0.5
    from desmoe_jax.nn.rope import yarn_get_mscale
    scale = self.qk_head_dim ** -0.5
    if self.rope_type != "default":
      mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
      if mscale_all_dim:
        m = yarn_get_mscale(self.rope_scaling["factor"], mscale_all_dim)
        scale = scale * m * m
    return scale

  def __hash__(self):  # rope_scaling is a dict; nnx needs static module fields to be hashable
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}
    return hash(json.dumps(fields, sort_keys=True, default=str))

  def replace(self, **changes) -> "ModelConfig":
    """Architecture fields by name; runtime fields (dtype, moe_impl, ...) go to `runtime`."""
    runtime = {k: changes.pop(k) for k in list(changes) if k in RUNTIME_FIELDS}
    if runtime:
      changes["runtime"] = dataclasses.replace(changes.get("runtime", self.runtime), **runtime)
    return dataclasses.replace(self, **changes)

  @classmethod
  def make(cls, **kwargs) -> "ModelConfig":
    """`ModelConfig(...)` that also takes runtime fields by name (tests, scripts, benches)."""
    runtime = {k: kwargs.pop(k) for k in list(kwargs) if k in RUNTIME_FIELDS}
    return cls(**kwargs, runtime=RuntimeConfig(**runtime))

  def architecture(self) -> dict:
    """The architecture fields (no runtime, no source dict), e.g. to compare two configs."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in ("runtime", "hf_dict")}

  # ---------------------------------------------------------------- HF interop (via families)
  @classmethod
  def from_hf_dict(cls, d: dict, *, strict: bool = True, source: str = "config.json",
                   **runtime) -> "ModelConfig":
    """The family of `d["model_type"]` reads it (families/); `runtime` sets RuntimeConfig."""
    return family_io("family_of")(d, source).from_hf(d, strict=strict, source=source,
                                                    runtime=RuntimeConfig(**runtime))

  @classmethod
  def from_pretrained(cls, path: str, **kwargs) -> "ModelConfig":
    return cls.from_hf_dict(family_io("read_config_json")(path), source=f"{path}/config.json",
                            **kwargs)

  def to_hf_dict(self, torch_dtype: str | None = None) -> dict:
    """The config.json to export, written by this config's family."""
    out = family_io("get_family")(self.model_type).to_hf(self)
    if torch_dtype is not None:
      out["torch_dtype"] = torch_dtype
      out.pop("dtype", None)
    return out


# Reading and writing config.json is each family's (desmoe_jax/families/). The families import
# this module (they build ModelConfigs), so it does not import them: desmoe_jax/families/
# registers its dispatch functions here when it is imported, which desmoe_jax/__init__.py does
# before any of the package's modules runs.
FAMILY_IO: dict = {}


def family_io(name: str):
  """The families' `family_of`, `read_config_json` or `get_family` (see FAMILY_IO)."""
  if name not in FAMILY_IO:
    raise RuntimeError("desmoe_jax.families has not registered its config.json readers: import "
                       "desmoe_jax (the package) rather than a module of it in isolation")
  return FAMILY_IO[name]
