"""OLMoE (`OlmoeForCausalLM`; OLMoE-1B-7B, the open research MoE): GQA with q/k RMSNorm over the
whole projection (before the heads are split), optional q/k/v clamp (`clip_qkv`), every layer
MoE (experts `intermediate_size` wide), softmax top-k, no shared experts, Switch balance loss."""

from __future__ import annotations

from desmoe_jax.config import ModelConfig, RuntimeConfig
from desmoe_jax.families._hf import Reader, write
from desmoe_jax.families.qwen3_moe import read_gqa

MODEL_TYPE = "olmoe"
HF_ARCHITECTURE = "OlmoeForCausalLM"
HF_CONFIG = "OlmoeConfig"

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
    clip_qkv=0.5, max_position_embeddings=256, pad_token_id=1, eos_token_id=2)


def from_hf(d: dict, *, strict: bool = True, source: str = "config.json",
            runtime: RuntimeConfig = RuntimeConfig()) -> ModelConfig:
  r = Reader(d, MODEL_TYPE, source)
  read_gqa(r)
  r.ignore("head_dim")
  r.set(head_dim=None)   # OLMoE's heads are hidden_size / num_attention_heads wide
  r.copy("intermediate_size", to="moe_intermediate_size")
  r.copy("intermediate_size", "num_experts_per_tok", "clip_qkv")
  r.copy("num_experts", to="n_routed_experts")
  r.copy("router_aux_loss_coef", to="aux_loss_alpha")
  bias = bool(r.get("attention_bias", False))
  r.set(qk_norm="full", attention_bias=bias, o_proj_bias=bias, first_k_dense_replace=0,
        norm_topk_prob=bool(r.get("norm_topk_prob", False)), topk_method="greedy",
        balance_loss="switch")
  return r.build(strict=strict, runtime=runtime)


def to_hf(cfg: ModelConfig) -> dict:
  return write(cfg, dict(
      intermediate_size=cfg.moe_intermediate_size, num_key_value_heads=cfg.num_key_value_heads,
      num_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
      norm_topk_prob=cfg.norm_topk_prob, router_aux_loss_coef=cfg.aux_loss_alpha,
      attention_bias=cfg.attention_bias, clip_qkv=cfg.clip_qkv),
      {"architectures": [HF_ARCHITECTURE], "hidden_act": "silu", "attention_dropout": 0.0,
       "initializer_range": 0.02, "use_cache": True})


def hf_name(name: str) -> str:
  return name
