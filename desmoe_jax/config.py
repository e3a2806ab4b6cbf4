"""DeepSeek-V2 architecture config, read from (and written back to) a Hugging Face `config.json`.

The config is strict on purpose: a field this implementation cannot honour (a sigmoid router, a
quantised checkpoint, a RoPE type we do not implement...) must stop the load with a message that
names it, never be silently ignored, because a model that loads but computes something else than
the reference would poison every number measured on it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

# HF fields that carry no meaning for the computation (bookkeeping, serving hints, parallel layout).
_IGNORED_HF_FIELDS = frozenset({
    "architectures", "auto_map", "transformers_version", "use_cache", "initializer_range",
    "output_router_logits", "ep_size", "torch_dtype", "dtype", "_name_or_path", "return_dict",
    "output_hidden_states", "output_attentions", "_attn_implementation_autoset", "tokenizer_class",
    "model_type", "qk_head_dim", "head_dim", "rope_interleave", "pretraining_tp", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "is_encoder_decoder", "add_cross_attention",
    "tie_encoder_decoder", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "sep_token_id", "decoder_start_token_id", "num_experts",
})

# Runtime (non-architecture) fields: how to compute, not what. Never written to config.json.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "moe_impl", "moe_tile_size", "expert_parallel",
                   "attention_impl", "scan_layers", "remat", "ce_chunk")


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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a DeepSeek-V2 causal LM plus the runtime choices of this implementation.

  Field names follow the HF config so that a reader can map them one to one.
  """
  vocab_size: int = 102400
  hidden_size: int = 2048
  intermediate_size: int = 10944          # dense (first_k_dense_replace) layers' MLP width
  moe_intermediate_size: int = 1408       # width of one routed (and one shared) expert
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  q_lora_rank: int | None = None          # None: q is one projection (V2-Lite); int: low-rank q (V2)
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  n_routed_experts: int = 64
  n_shared_experts: int = 2
  num_experts_per_tok: int = 6
  first_k_dense_replace: int = 1
  routed_scaling_factor: float = 1.0
  topk_method: str = "greedy"             # "greedy" | "group_limited_greedy"
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = False            # DeepSeek's own code: normalise top-k weights instead of scaling
  aux_loss_alpha: float = 0.001           # weight of the balance loss (returned, never added for you)
  seq_aux: bool = True                    # sequence-level (True) or batch-level balance loss
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None        # None or {"type": "yarn", ...} as in V2-Lite's config.json
  max_position_embeddings: int = 163840
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: int | None = 100000
  eos_token_id: int | list[int] | None = 100001
  pad_token_id: int | None = None

  # --- runtime choices (not part of the checkpoint) ---
  dtype: str = "float32"                  # activation / compute dtype
  param_dtype: str = "float32"            # storage dtype of parameters (routers always float32)
  # "auto" | "dense" | "ragged" | "tokamax" | "tiled" (see moe.py). "auto": "tiled" on CPU;
  # "tokamax" on TPU (verified compile-only: Mosaic kernels, no dense-fallback dot, CPU numerics
  # of its TPU kernel in interpret mode); "ragged" on GPU until bench/accel.py has run there.
  moe_impl: str = "auto"
  moe_tile_size: int = 128                # rows per tile of the "tiled" grouped matmul
  expert_parallel: str = "compiler"       # "compiler" | "shard_map": see expert_parallel.py
  # "einsum" (reference) | "jax" (jax.nn.dot_product_attention: XLA's, V padded to 192) |
  # "tokamax" (splash on TPU, Mosaic GPU/Triton on GPU, V unpadded; see attention.py). Not in
  # any "auto": its TPU lowering is verified compile-only (Mosaic kernels, scripts/hlo_check.py)
  # and its CPU numerics through tokamax's XLA path, but no kernel has run on an accelerator here.
  attention_impl: str = "einsum"
  scan_layers: bool = True                # lax.scan over the stacked MoE layers (fast compile)
  remat: str = "none"                     # one of REMAT_POLICIES: what a MoE layer's backward recomputes
  ce_chunk: int = 0                       # >0: cross-entropy over sequence chunks of this many
                                          # positions, never the batch's [B, S, vocab] logits (losses.py)

  # The config.json this was read from, kept so that export writes back what the user gave us.
  hf_dict: dict | None = dataclasses.field(default=None, compare=False, repr=False)

  def __post_init__(self):
    problems = []
    if self.topk_method not in ("greedy", "group_limited_greedy"):
      problems.append(f"topk_method={self.topk_method!r} (supported: 'greedy', 'group_limited_greedy')")
    if self.topk_method == "group_limited_greedy":
      if not self.n_group or self.n_routed_experts % self.n_group:
        problems.append(f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}")
      elif not 1 <= self.topk_group <= self.n_group:
        problems.append(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
      elif self.topk_group * self.n_routed_experts // self.n_group < self.num_experts_per_tok:
        problems.append("topk_group groups hold fewer experts than num_experts_per_tok")
    if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
      problems.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                      f"[1, n_routed_experts={self.n_routed_experts}]")
    if self.moe_impl not in ("auto", "dense", "ragged", "tokamax", "tiled"):
      problems.append(f"moe_impl={self.moe_impl!r} (one of 'auto', 'dense', 'ragged', 'tokamax', "
                      "'tiled')")
    if self.expert_parallel not in ("compiler", "shard_map"):
      problems.append(f"expert_parallel={self.expert_parallel!r} (one of 'compiler', 'shard_map')")
    if self.attention_impl not in ("einsum", "jax", "tokamax"):
      problems.append(f"attention_impl={self.attention_impl!r} (one of 'einsum', 'jax', "
                      "'tokamax')")
    if self.remat not in REMAT_POLICIES:
      problems.append(f"remat={self.remat!r} (one of {', '.join(map(repr, REMAT_POLICIES))})")
    if not isinstance(self.ce_chunk, int) or self.ce_chunk < 0:
      problems.append(f"ce_chunk={self.ce_chunk!r} (0 for the plain cross-entropy, or a positive "
                      f"number of positions per chunk dividing the sequence length)")
    if self.rope_scaling is not None:
      rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
      if rope_type not in ("default", "yarn"):
        problems.append(f"rope_scaling type {rope_type!r} (supported: 'default', 'yarn')")
    if self.qk_rope_head_dim % 2:
      problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
    if problems:
      raise ValueError("Unsupported DeepSeek-V2 config: " + "; ".join(problems))

  # ---------------------------------------------------------------- derived quantities
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

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
    """1/sqrt(d_qk), times YaRN's mscale(factor, mscale_all_dim)^2 as DeepSeek applies it."""
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
    return dataclasses.replace(self, **changes)

  # ---------------------------------------------------------------- HF interop
  @classmethod
  def from_hf_dict(cls, d: dict, *, strict: bool = True, source: str = "config.json",
                   **runtime) -> "ModelConfig":
    """Builds a config from an HF DeepSeek-V2 `config.json` dict.

    `strict=False` turns unknown fields into a warning (they are still never used).
    `runtime` sets the non-architecture fields (dtype, moe_impl, ...).
    """
    d = dict(d)
    problems = []
    model_type = d.get("model_type", "deepseek_v2")
    if model_type != "deepseek_v2":
      problems.append(f"model_type={model_type!r}: only 'deepseek_v2' is implemented")

    def require(key, ok, allowed):
      if key in d and d[key] is not None and not ok(d[key]):
        problems.append(f"{key}={d[key]!r} (this implementation supports {allowed})")

    require("scoring_func", lambda v: v == "softmax", "'softmax' only")
    require("hidden_act", lambda v: v == "silu", "'silu' only")
    require("moe_layer_freq", lambda v: v == 1, "1 only: every layer after first_k_dense_replace is MoE")
    require("attention_dropout", lambda v: v == 0, "0.0 only")
    require("pretraining_tp", lambda v: v == 1, "1 only")
    require("rope_interleave", lambda v: v is True, "True only (DeepSeek's complex-pair RoPE)")
    if "quantization_config" in d:
      problems.append("quantization_config present: quantised checkpoints are not supported, "
                      "give a bf16/fp32 checkpoint")
    nkv = d.get("num_key_value_heads")
    if nkv is not None and nkv != d.get("num_attention_heads"):
      problems.append(f"num_key_value_heads={nkv} must equal num_attention_heads "
                      f"(MLA expands kv_b_proj to every head)")
    if d.get("head_dim") not in (None, d.get("qk_rope_head_dim", cls.qk_rope_head_dim)):
      problems.append(f"head_dim={d['head_dim']} must equal qk_rope_head_dim")
    if problems:
      raise ValueError(f"{source}: cannot honour " + "; ".join(problems))

    # transformers 5 writes `rope_parameters` (with rope_theta inside); DeepSeek's own files write
    # `rope_scaling` + `rope_theta`. Accept both.
    rope_theta = d.get("rope_theta")
    rope_scaling = d.get("rope_scaling")
    rope_parameters = d.get("rope_parameters")
    if rope_parameters:
      rope_parameters = dict(rope_parameters)
      rope_theta = rope_parameters.pop("rope_theta", rope_theta)
      rope_parameters.pop("partial_rotary_factor", None)
      if rope_parameters.get("rope_type", rope_parameters.get("type", "default")) != "default":
        rope_scaling = rope_parameters
    if rope_scaling is not None:
      rope_scaling = dict(rope_scaling)
      if rope_scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")

    fields = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS) - {"hf_dict"}
    kwargs: dict[str, Any] = {}
    unknown = []
    constraint_keys = {"scoring_func", "hidden_act", "moe_layer_freq", "attention_dropout",
                       "num_key_value_heads", "rope_theta", "rope_scaling", "rope_parameters",
                       "mlp_bias", "attention_bias"}
    for key, value in d.items():
      if key in fields:
        kwargs[key] = value
      elif key not in _IGNORED_HF_FIELDS and key not in constraint_keys:
        unknown.append(key)
    for key in ("mlp_bias", "attention_bias"):
      if key in d:
        kwargs[key] = bool(d[key])
    if "n_routed_experts" not in d and d.get("num_experts") is not None:
      kwargs["n_routed_experts"] = d["num_experts"]
    if unknown:
      msg = (f"{source}: unknown DeepSeek-V2 config field(s) {sorted(unknown)}; this implementation "
             f"does not know what they change")
      if strict:
        raise ValueError(msg + " (pass strict=False to ignore them)")
      warnings.warn(msg + "; ignored")
    # Nulls in HF files mean "not used".
    for key in ("n_group", "topk_group"):
      if kwargs.get(key) is None:
        kwargs[key] = 1
    if kwargs.get("topk_method") is None:
      kwargs["topk_method"] = "greedy"
    if kwargs.get("norm_topk_prob") is None:
      kwargs["norm_topk_prob"] = False
    if rope_theta is not None:
      kwargs["rope_theta"] = float(rope_theta)
    kwargs["rope_scaling"] = rope_scaling
    try:
      return cls(**kwargs, hf_dict=d, **runtime)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: {e}") from e

  @classmethod
  def from_pretrained(cls, path: str, **kwargs) -> "ModelConfig":
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
      raise FileNotFoundError(f"{file} not found: expected a Hugging Face DeepSeek-V2 directory")
    with open(file) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    return cls.from_hf_dict(d, source=file, **kwargs)

  def to_hf_dict(self, torch_dtype: str | None = None) -> dict:
    """The config.json to export: the original dict where we have one, updated to our values."""
    arch = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in _RUNTIME_FIELDS and f.name != "hf_dict"}
    out = dict(self.hf_dict) if self.hf_dict else {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "hidden_act": "silu", "scoring_func": "softmax", "moe_layer_freq": 1,
        "num_key_value_heads": self.num_attention_heads, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True}
    rope_scaling = arch.pop("rope_scaling")
    rope_theta = arch.pop("rope_theta")
    if "rope_parameters" in out:  # transformers-5 style file: keep that style
      params = dict(rope_scaling or {"rope_type": "default"})
      params["rope_theta"] = rope_theta
      out["rope_parameters"] = params
    else:
      out["rope_scaling"] = rope_scaling
      out["rope_theta"] = rope_theta
    out.update(arch)
    out["num_key_value_heads"] = self.num_attention_heads
    if torch_dtype is not None:
      out["torch_dtype"] = torch_dtype
      out.pop("dtype", None)
    return out


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0
