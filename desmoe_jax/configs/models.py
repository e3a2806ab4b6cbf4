"""MoE architectures by name, as ml_collections ConfigDicts of HF config.json fields (each with
its `model_type`, which picks the family file that reads it: desmoe_jax/families/).

`get_config("tiny")` is the small random model used by the README demo and the tests; the others
are published architectures (for benchmarks, memory plans and abstract compilation; real
weights come from `--config.model.path`): DeepSeek-V2-Lite and V2, Moonlight-16B-A3B
(DeepSeek-V3 architecture), Qwen3-30B-A3B, OLMoE-1B-7B, Mixtral-8x7B.
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
        model_type="deepseek_v2",
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
        model_type="deepseek_v2",
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        routed_scaling_factor=16.0, topk_method="group_limited_greedy", n_group=8, topk_group=3,
        norm_topk_prob=False, aux_loss_alpha=0.003, seq_aux=True, max_position_embeddings=163840,
        bos_token_id=100000, eos_token_id=100001, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                          beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
    # moonshotai/Moonlight-16B-A3B config.json (architecture fields): DeepSeek-V3 architecture,
    # V2-Lite's size; sigmoid routing with a selection bias, no group limit (n_group=1).
    "moonlight_16b_a3b": dict(
        model_type="deepseek_v3", vocab_size=163840, hidden_size=2048, intermediate_size=11264,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
        routed_scaling_factor=2.446, scoring_func="sigmoid", topk_method="noaux_tc", n_group=1,
        topk_group=1, norm_topk_prob=True, aux_loss_alpha=0.001, seq_aux=True,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=50000.0, rope_scaling=None,
        bos_token_id=163584, eos_token_id=163585, tie_word_embeddings=False),
    # Qwen/Qwen3-30B-A3B config.json (architecture fields): 48 MoE layers, 128 experts, top-8.
    "qwen3_30b_a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        router_aux_loss_coef=0.001, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_scaling=None, use_sliding_window=False,
        sliding_window=None, bos_token_id=151643, eos_token_id=151645,
        tie_word_embeddings=False),
    # allenai/OLMoE-1B-7B-0924 config.json (architecture fields): 16 MoE layers, 64 experts, top-8.
    "olmoe_1b_7b": dict(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
        num_experts_per_tok=8, norm_topk_prob=False, clip_qkv=None, router_aux_loss_coef=0.01,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
        pad_token_id=1, eos_token_id=50279, tie_word_embeddings=False),
    # mistralai/Mixtral-8x7B-v0.1 config.json (architecture fields): 32 layers, 8 experts, top-2.
    "mixtral_8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
        sliding_window=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
}


def get_config(arch: str = "tiny") -> ml_collections.ConfigDict:
  if arch not in _ARCHS:
    raise ValueError(f"unknown architecture {arch!r}; known: {sorted(_ARCHS)}")
  return ml_collections.ConfigDict(_ARCHS[arch])
