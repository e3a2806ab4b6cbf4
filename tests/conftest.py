"""Shared fixtures: tiny random DeepSeek-V2 checkpoints written by transformers itself.

Every test process simulates 8 CPU devices (set before JAX starts) so that sharding tests can
build real meshes; single-device tests simply use device 0. Nothing touches the network.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# One persistent JAX compilation cache for the whole run: the xdist workers and every train.py /
# eval.py subprocess a test starts inherit it through the environment, so a program that many
# tests compile (the tiny preset's train step, its evaluation, the export fold) is compiled once
# per run instead of once per test. The controller process, which loads this file before the
# workers start, makes a fresh directory and removes it at the end; runs never share one.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="desmoe_jax_test_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)

# A small DeepSeek-V2 with every feature of V2-Lite: MLA without q_lora, YaRN, one dense layer,
# shared + routed experts, greedy top-k.
BASE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=None,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    max_position_embeddings=256,
    rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64,
                      beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
)

# Named variants covering the architecture's switches (see test_model.py).
VARIANTS = {
    "v2lite_like": {},
    "qlora_grouped": dict(q_lora_rank=12, rope_scaling=None, topk_method="group_limited_greedy",
                          n_group=4, topk_group=2, num_experts_per_tok=3,
                          routed_scaling_factor=2.5, first_k_dense_replace=2,
                          num_hidden_layers=4, n_shared_experts=2),
    "all_moe_yarn_mscale": dict(first_k_dense_replace=0, num_hidden_layers=2,
                                rope_scaling=dict(type="yarn", factor=8.0,
                                                  original_max_position_embeddings=32,
                                                  mscale=1.0, mscale_all_dim=0.5)),
    "bias_tied": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                      q_lora_rank=8, n_routed_experts=6, num_experts_per_tok=1),
}


def make_hf_model(path, seed=0, **overrides):
  """Writes a random transformers DeepseekV2ForCausalLM (float32) to `path`; returns the model."""
  import torch
  from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

  kwargs = dict(BASE)
  kwargs.update(overrides)
  torch.manual_seed(seed)
  model = DeepseekV2ForCausalLM(DeepseekV2Config(**kwargs)).eval()
  with torch.no_grad():  # norms start at 1: randomise them so a wrong mapping cannot hide
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
  """Factory: name of a VARIANTS entry -> (path, torch model); built once per session."""
  cache = {}

  def get(name="v2lite_like"):
    if name not in cache:
      path = tmp_path_factory.mktemp(f"hf_{name}")
      cache[name] = (str(path), make_hf_model(str(path), **VARIANTS[name]))
    return cache[name]

  return get


def make_family_model(family: str, path, seed=0, **overrides):
  """Writes a random transformers model of `family` (its file's TINY kwargs, float32) to `path`;
  returns the model. Norms, biases and DeepSeek-V3's selection bias are randomised so that a
  wrong mapping cannot hide behind ones and zeros."""
  import torch
  import transformers

  from desmoe_jax.families import get_family

  fam = get_family(family)
  torch.manual_seed(seed)
  config = getattr(transformers, fam.HF_CONFIG)(**dict(fam.TINY, **overrides))
  model = getattr(transformers, fam.HF_ARCHITECTURE)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.add_(0.1 * torch.randn_like(b))
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
  """Factory: family model_type -> (path, torch model); built once per session."""
  cache = {}

  def get(family):
    if family not in cache:
      path = tmp_path_factory.mktemp(f"family_{family}")
      cache[family] = (str(path), make_family_model(family, str(path)))
    return cache[family]

  return get
