"""Qwen3-MoE (`Qwen3MoeForCausalLM`; Qwen3-30B-A3B, Qwen3-235B-A22B): GQA with per-head q/k
RMSNorm, softmax top-k (normalised when norm_topk_prob), no shared experts, Switch balance loss
(`router_aux_loss_coef`), dense layers by `decoder_sparse_step` / `mlp_only_layers`."""

from __future__ import annotations

from desmoe_jax.config import ModelConfig, RuntimeConfig
from desmoe_jax.families._hf import Reader, dense_prefix, write

MODEL_TYPE = "qwen3_moe"
HF_ARCHITECTURE = "Qwen3MoeForCausalLM"
HF_CONFIG = "Qwen3MoeConfig"

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
    max_position_embeddings=256)


def read_gqa(r: Reader):
  """The GQA fields the Qwen/OLMoE/Mixtral families share."""
  r.copy("num_key_value_heads", "head_dim")
  r.set(attention="gqa", rope_interleave=False, n_shared_experts=0)
  if r.d.get("num_key_value_heads") is None:
    r.set(num_key_value_heads=r.d.get("num_attention_heads"))


def read_sparse_layers(r: Reader):
  """Qwen's layer pattern -> first_k_dense_replace (refused unless dense layers come first)."""
  k = dense_prefix(r, r.d.get("num_hidden_layers", 0), r.get("decoder_sparse_step", 1),
                   list(r.get("mlp_only_layers", [])))
  r.set(first_k_dense_replace=k)


def from_hf(d: dict, *, strict: bool = True, source: str = "config.json",
            runtime: RuntimeConfig = RuntimeConfig()) -> ModelConfig:
  r = Reader(d, MODEL_TYPE, source)
  read_gqa(r)
  read_sparse_layers(r)
  r.copy("intermediate_size", "moe_intermediate_size", "num_experts_per_tok")
  r.copy("num_experts", "num_local_experts", to="n_routed_experts")
  r.copy("router_aux_loss_coef", to="aux_loss_alpha")
  bias = bool(r.get("attention_bias", False))
  # transformers: the window applies only with use_sliding_window (Qwen3MoeConfig.__post_init__)
  window = r.get("sliding_window")
  window = window if r.get("use_sliding_window", False) else None
  r.ignore("max_window_layers", "layer_types")
  r.set(qk_norm="head", attention_bias=bias, o_proj_bias=bias, sliding_window=window,
        norm_topk_prob=bool(r.get("norm_topk_prob", False)), topk_method="greedy",
        balance_loss="switch")
  return r.build(strict=strict, runtime=runtime)


def to_hf(cfg: ModelConfig) -> dict:
  fields = dict(
      intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
      num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.gqa_head_dim,
      num_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
      norm_topk_prob=cfg.norm_topk_prob, router_aux_loss_coef=cfg.aux_loss_alpha,
      attention_bias=cfg.attention_bias, decoder_sparse_step=1,
      mlp_only_layers=list(range(cfg.first_k_dense_replace)),
      use_sliding_window=cfg.sliding_window is not None)
  if cfg.sliding_window is not None:
    fields["sliding_window"] = cfg.sliding_window
  out = write(cfg, fields, {"architectures": [HF_ARCHITECTURE], "hidden_act": "silu",
                            "attention_dropout": 0.0, "initializer_range": 0.02,
                            "use_cache": True})
  out.pop("num_local_experts", None)
  return out


def hf_name(name: str) -> str:
  return name
