"""Mixtral (`MixtralForCausalLM`; Mixtral-8x7B): GQA, top-2 with softmax over the selected
logits, every layer MoE (experts `intermediate_size` wide, HF names w1/w3/w2 under
`block_sparse_moe`), no shared experts, sliding window if configured, Switch balance loss."""

from __future__ import annotations

from desmoe_jax.config import ModelConfig, RuntimeConfig
from desmoe_jax.families._hf import Reader, write
from desmoe_jax.families.qwen3_moe import read_gqa

MODEL_TYPE = "mixtral"
HF_ARCHITECTURE = "MixtralForCausalLM"
HF_CONFIG = "MixtralConfig"

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    sliding_window=5, max_position_embeddings=256)


def from_hf(d: dict, *, strict: bool = True, source: str = "config.json",
            runtime: RuntimeConfig = RuntimeConfig()) -> ModelConfig:
  r = Reader(d, MODEL_TYPE, source)
  read_gqa(r)
  r.require("router_jitter_noise", lambda v: v == 0,
            "0.0 only (training-time multiplicative noise on the router input is not implemented)")
  r.copy("intermediate_size", to="moe_intermediate_size")
  r.copy("intermediate_size", "num_experts_per_tok", "sliding_window")
  r.copy("num_local_experts", to="n_routed_experts")
  r.copy("router_aux_loss_coef", to="aux_loss_alpha")
  r.set(first_k_dense_replace=0, topk_method="topk_softmax", norm_topk_prob=True,
        balance_loss="switch")
  return r.build(strict=strict, runtime=runtime)


def to_hf(cfg: ModelConfig) -> dict:
  return write(cfg, dict(
      intermediate_size=cfg.moe_intermediate_size, num_key_value_heads=cfg.num_key_value_heads,
      head_dim=cfg.head_dim, num_local_experts=cfg.n_routed_experts,
      num_experts_per_tok=cfg.num_experts_per_tok, router_aux_loss_coef=cfg.aux_loss_alpha,
      sliding_window=cfg.sliding_window),
      {"architectures": [HF_ARCHITECTURE], "hidden_act": "silu", "attention_dropout": 0.0,
       "initializer_range": 0.02, "use_cache": True, "router_jitter_noise": 0.0})


_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def hf_name(name: str) -> str:
  if name.startswith("mlp."):
    name = "block_sparse_moe." + name[len("mlp."):]
    for ours, theirs in _EXPERT.items():
      name = name.replace(f".{ours}.weight", f".{theirs}.weight")
  return name
