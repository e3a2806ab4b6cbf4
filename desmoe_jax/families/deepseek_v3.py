"""DeepSeek-V3 (`DeepseekV3ForCausalLM`; Moonlight-16B-A3B, Kimi, DeepSeek-V3/R1): DeepSeek-V2's
MLA and shared experts with sigmoid scoring, a frozen selection bias (`e_score_correction_bias`,
noaux_tc), group-limited top-k by the sum of each group's two best biased scores, normalised
weights times `routed_scaling_factor`, dense first layers. No auxiliary balance loss (the bias
balances; transformers computes none either).

Multi-token-prediction layers (`num_nextn_predict_layers`) are not part of the causal LM:
their tensors (layers past num_hidden_layers) are skipped on load, as transformers does.
"""

from __future__ import annotations

from desmoe_jax.config import ModelConfig, RuntimeConfig
from desmoe_jax.families._hf import Reader, write
from desmoe_jax.families.deepseek_v2 import mla_fields, read_mla

MODEL_TYPE = "deepseek_v3"
HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
HF_CONFIG = "DeepseekV3Config"

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
    q_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1, n_group=4,
    topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=256)


def from_hf(d: dict, *, strict: bool = True, source: str = "config.json",
            runtime: RuntimeConfig = RuntimeConfig()) -> ModelConfig:
  r = Reader(d, MODEL_TYPE, source)
  read_mla(r)
  r.require("scoring_func", lambda v: v == "sigmoid", "'sigmoid' only")
  r.require("topk_method", lambda v: v == "noaux_tc", "'noaux_tc' only")
  r.copy("rope_interleave", cast=bool)
  # DeepSeek's training-time balance settings; transformers' V3 computes no auxiliary loss.
  r.ignore("aux_loss_alpha", "seq_aux", "num_nextn_predict_layers")
  r.set(scoring_func="sigmoid", topk_method="noaux_tc", balance_loss="none",
        norm_topk_prob=bool(r.get("norm_topk_prob", True)))
  return r.build(strict=strict, runtime=runtime)


def to_hf(cfg: ModelConfig) -> dict:
  fields = mla_fields(cfg)
  fields.update(rope_interleave=cfg.rope_interleave)
  return write(cfg, fields, {
      "architectures": [HF_ARCHITECTURE], "hidden_act": "silu", "scoring_func": "sigmoid",
      "topk_method": "noaux_tc", "moe_layer_freq": 1, "attention_dropout": 0.0,
      "initializer_range": 0.02, "use_cache": True})


def hf_name(name: str) -> str:
  # The selection bias lives on our MoE block (the ALR may replace the router), HF's on the gate.
  return name.replace("mlp.e_score_correction_bias", "mlp.gate.e_score_correction_bias")
