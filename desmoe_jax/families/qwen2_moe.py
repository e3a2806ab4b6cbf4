"""Qwen2-MoE (`Qwen2MoeForCausalLM`; Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): GQA with q/k/v biases,
softmax top-k, one shared expert behind a sigmoid gate (both in the shared_experts parameter
group, docs/METHOD.md section 6), Switch balance loss, dense layers by `decoder_sparse_step` /
`mlp_only_layers`. Sliding-window attention (`use_sliding_window`) is refused."""

from __future__ import annotations

from desmoe_jax.config import ModelConfig, RuntimeConfig
from desmoe_jax.families._hf import Reader, write
from desmoe_jax.families.qwen3_moe import read_gqa, read_sparse_layers

MODEL_TYPE = "qwen2_moe"
HF_ARCHITECTURE = "Qwen2MoeForCausalLM"
HF_CONFIG = "Qwen2MoeConfig"

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=256)


def from_hf(d: dict, *, strict: bool = True, source: str = "config.json",
            runtime: RuntimeConfig = RuntimeConfig()) -> ModelConfig:
  r = Reader(d, MODEL_TYPE, source)
  read_gqa(r)
  r.ignore("head_dim")
  r.set(head_dim=None)
  read_sparse_layers(r)
  r.require("use_sliding_window", lambda v: v is False, "False only")
  r.ignore("sliding_window", "max_window_layers", "layer_types")
  r.copy("intermediate_size", "moe_intermediate_size", "num_experts_per_tok",
         "shared_expert_intermediate_size")
  r.copy("num_experts", to="n_routed_experts")
  r.copy("router_aux_loss_coef", to="aux_loss_alpha")
  r.copy("qkv_bias", to="attention_bias", cast=bool)
  if r.d.get("qkv_bias") is None:
    r.set(attention_bias=True)     # Qwen2MoeConfig's default
  r.set(shared_expert_gate=True, norm_topk_prob=bool(r.get("norm_topk_prob", False)),
        topk_method="greedy", balance_loss="switch")
  return r.build(strict=strict, runtime=runtime)


def to_hf(cfg: ModelConfig) -> dict:
  return write(cfg, dict(
      intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
      shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
      num_key_value_heads=cfg.num_key_value_heads, num_experts=cfg.n_routed_experts,
      num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
      router_aux_loss_coef=cfg.aux_loss_alpha, qkv_bias=cfg.attention_bias,
      decoder_sparse_step=1, mlp_only_layers=list(range(cfg.first_k_dense_replace)),
      use_sliding_window=False),
      {"architectures": [HF_ARCHITECTURE], "hidden_act": "silu", "attention_dropout": 0.0,
       "initializer_range": 0.02, "use_cache": True})


def hf_name(name: str) -> str:
  return name
