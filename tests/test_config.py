"""ModelConfig reads real DeepSeek config.json files and refuses what it cannot honour."""

import math

import pytest

from desmoe_jax.config import ModelConfig

# deepseek-ai/DeepSeek-V2-Lite/config.json, verbatim apart from auto_map.
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy",
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 102400, "auto_map": {},
}


def test_reads_deepseek_v2_lite_config():
  cfg = ModelConfig.from_hf_dict(V2_LITE)
  assert (cfg.num_moe_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == (26, 64, 6)
  assert cfg.rope_type == "yarn" and cfg.qk_head_dim == 192
  # DeepSeek's softmax scale: 192^-0.5 * (0.1 * 0.707 * ln 40 + 1)^2
  assert abs(cfg.softmax_scale - 192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2) < 1e-12
  out = cfg.to_hf_dict()
  assert out["rope_scaling"] == V2_LITE["rope_scaling"] and out["moe_layer_freq"] == 1


@pytest.mark.parametrize("field,value,needle", [
    ("scoring_func", "sigmoid", "scoring_func='sigmoid'"),
    ("topk_method", "noaux_tc", "topk_method='noaux_tc'"),
    ("moe_layer_freq", 2, "moe_layer_freq=2"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("num_key_value_heads", 4, "num_key_value_heads=4"),
    ("model_type", "llama", "llama"),
    ("quantization_config", {"quant_method": "fp8"}, "quantization_config"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "'dynamic'"),
    ("some_new_field", 1, "some_new_field"),
])
def test_rejects_what_it_cannot_honour(field, value, needle):
  bad = dict(V2_LITE, **{field: value})
  with pytest.raises(ValueError, match=needle.replace("(", r"\(")) as e:
    ModelConfig.from_hf_dict(bad, source="my/config.json")
  assert "my/config.json" in str(e.value)


def test_unknown_fields_can_be_ignored_explicitly():
  with pytest.warns(UserWarning, match="some_new_field"):
    ModelConfig.from_hf_dict(dict(V2_LITE, some_new_field=1), strict=False)


def test_transformers5_rope_parameters_style():
  d = dict(V2_LITE)
  d.pop("rope_scaling"), d.pop("rope_theta")
  d["rope_parameters"] = dict(V2_LITE["rope_scaling"], rope_type="yarn", rope_theta=10000.0)
  cfg = ModelConfig.from_hf_dict(d)
  assert cfg.rope_type == "yarn" and cfg.rope_theta == 10000.0
  assert ModelConfig.from_hf_dict(d).softmax_scale == ModelConfig.from_hf_dict(V2_LITE).softmax_scale


def _arch(name):
  import os

  from desmoe_jax.run_config import load_config
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return load_config(os.path.join(root, "configs", f"models.py:{name}")).to_dict()


@pytest.mark.parametrize("name,family,moe_layers,experts,k", [
    ("v2_lite", "deepseek_v2", 26, 64, 6), ("moonlight_16b_a3b", "deepseek_v3", 26, 64, 6),
    ("qwen3_30b_a3b", "qwen3_moe", 48, 128, 8), ("olmoe_1b_7b", "olmoe", 16, 64, 8),
    ("mixtral_8x7b", "mixtral", 32, 8, 2)])
def test_published_architectures_read_and_write_back(name, family, moe_layers, experts, k):
  """configs/models.py's real sizes go through their family's reader, and to_hf -> from_hf is
  the identity on the architecture."""
  cfg = ModelConfig.from_hf_dict(_arch(name), source=name)
  assert cfg.model_type == family
  assert (cfg.num_moe_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == \
      (moe_layers, experts, k)
  again = ModelConfig.from_hf_dict(cfg.to_hf_dict())
  assert again.architecture() == cfg.architecture()


@pytest.mark.parametrize("name,field,value,needle", [
    ("moonlight_16b_a3b", "scoring_func", "softmax", "scoring_func='softmax'"),
    ("moonlight_16b_a3b", "quantization_config", {"quant_method": "fp8"}, "quantization_config"),
    ("qwen3_30b_a3b", "mlp_only_layers", [3], "mlp_only_layers"),
    ("qwen3_30b_a3b", "hidden_act", "gelu", "hidden_act='gelu'"),
    ("olmoe_1b_7b", "some_new_field", 1, "some_new_field"),
    ("mixtral_8x7b", "router_jitter_noise", 0.1, "router_jitter_noise=0.1"),
    ("mixtral_8x7b", "rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"),
])
def test_families_refuse_what_they_cannot_honour(name, field, value, needle):
  with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("[", r"\[")) as e:
    ModelConfig.from_hf_dict(dict(_arch(name), **{field: value}), source="my/config.json")
  assert "my/config.json" in str(e.value)
