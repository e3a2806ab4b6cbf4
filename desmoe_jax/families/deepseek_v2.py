"""DeepSeek-V2 (`DeepseekV2ForCausalLM`; V2-Lite is where the paper ran): MLA with YaRN, softmax
top-k routing (greedy or group-limited), shared experts, dense first layers."""

from __future__ import annotations

from desmoe_jax.config import ModelConfig, RuntimeConfig
from desmoe_jax.families._hf import Reader, write

MODEL_TYPE = "deepseek_v2"
HF_ARCHITECTURE = "DeepseekV2ForCausalLM"
HF_CONFIG = "DeepseekV2Config"

MLA_FIELDS = ("intermediate_size", "moe_intermediate_size", "q_lora_rank", "kv_lora_rank",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
              "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace",
              "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob")

# Small random models transformers builds offline: every switch of the family (tests).
TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=None,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    max_position_embeddings=256,
    rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64,
                      beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707))


def read_mla(r: Reader):
  """The MLA + DeepSeek-MoE fields V2 and V3 share."""
  r.copy(*MLA_FIELDS)
  r.copy("attention_bias", "mlp_bias", cast=bool)
  r.require("moe_layer_freq", lambda v: v == 1,
            "1 only: every layer after first_k_dense_replace is MoE")
  nkv = r.get("num_key_value_heads")
  if nkv is not None and nkv != r.d.get("num_attention_heads"):
    r.refuse(f"num_key_value_heads={nkv} must equal num_attention_heads (MLA expands kv_b_proj "
             "to every head)")
  head_dim = r.get("head_dim")
  if head_dim not in (None, r.d.get("qk_rope_head_dim", ModelConfig.qk_rope_head_dim)):
    r.refuse(f"head_dim={head_dim} must equal qk_rope_head_dim")
  r.ignore("qk_head_dim", "num_experts")
  if r.d.get("n_routed_experts") is None and r.d.get("num_experts") is not None:
    r.set(n_routed_experts=r.d["num_experts"])
  r.set(attention="mla", n_shared_experts=r.get("n_shared_experts", 0),
        n_group=r.get("n_group", 1), topk_group=r.get("topk_group", 1),
        norm_topk_prob=bool(r.get("norm_topk_prob", False)))


def from_hf(d: dict, *, strict: bool = True, source: str = "config.json",
            runtime: RuntimeConfig = RuntimeConfig()) -> ModelConfig:
  r = Reader(d, MODEL_TYPE, source)
  read_mla(r)
  r.require("scoring_func", lambda v: v == "softmax", "'softmax' only")
  r.require("topk_method", lambda v: v in ("greedy", "group_limited_greedy"),
            "'greedy', 'group_limited_greedy'")
  r.require("rope_interleave", lambda v: v is True, "True only (DeepSeek's complex-pair RoPE)")
  r.copy("topk_method", "aux_loss_alpha", "seq_aux")
  r.set(balance_loss="deepseek")
  return r.build(strict=strict, runtime=runtime)


def mla_fields(cfg: ModelConfig) -> dict:
  out = {k: getattr(cfg, k) for k in MLA_FIELDS}
  out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
             num_key_value_heads=cfg.num_attention_heads)
  return out


def to_hf(cfg: ModelConfig) -> dict:
  fields = mla_fields(cfg)
  fields.update(topk_method=cfg.topk_method, aux_loss_alpha=cfg.aux_loss_alpha,
                seq_aux=cfg.seq_aux)
  return write(cfg, fields, {
      "architectures": [HF_ARCHITECTURE], "hidden_act": "silu", "scoring_func": "softmax",
      "moe_layer_freq": 1, "attention_dropout": 0.0, "initializer_range": 0.02,
      "use_cache": True})


def hf_name(name: str) -> str:
  """Our parameter name (HF-style, dotted, inside one layer) -> the HF tensor name."""
  return name
