"""DeepSeek-V2 architectures by name, as ml_collections ConfigDicts of HF config.json fields.

`get_config("tiny")` is the small random model used by the README demo and the tests;
`v2_lite` and `v2` are the published architectures (for benchmarks, memory plans and
abstract compilation; real weights come from `--config.model.path`).
Usage: `python bench/moe_layer.py --arch=v2_lite`, or `models.get_config("tiny")`.
"""

import ml_collections

_ARCHS = {
    # A DeepSeek-V2 in miniature: MLA with YaRN, one dense layer, shared + fine-grained experts.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=1024,
                          beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
    # deepseek-ai/DeepSeek-V2-Lite config.json (architecture fields).
    "v2_lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
        norm_topk_prob=False, aux_loss_alpha=0.001, seq_aux=True, max_position_embeddings=163840,
        bos_token_id=100000, eos_token_id=100001, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                          beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
    # deepseek-ai/DeepSeek-V2 (236B) config.json (architecture fields).
    "v2": dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        routed_scaling_factor=16.0, topk_method="group_limited_greedy", n_group=8, topk_group=3,
        norm_topk_prob=False, aux_loss_alpha=0.003, seq_aux=True, max_position_embeddings=163840,
        bos_token_id=100000, eos_token_id=100001, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                          beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
}


def get_config(arch: str = "tiny") -> ml_collections.ConfigDict:
  if arch not in _ARCHS:
    raise ValueError(f"unknown architecture {arch!r}; known: {sorted(_ARCHS)}")
  return ml_collections.ConfigDict(_ARCHS[arch])
