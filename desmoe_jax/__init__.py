"""desmoe-jax: multi-domain adaptation of DeepSeek MoE models with DES-MoE, in JAX/Flax NNX.

Public API:
  desmoe_jax.from_pretrained(path, dtype=jnp.bfloat16, mesh=None, ...) -> DeepseekV2ForCausalLM
  desmoe_jax.save_pretrained(model, path, ...)          # back to the HF safetensors layout
  model(input_ids).logits                               # [batch, seq, vocab]
"""

from desmoe_jax.config import ModelConfig
from desmoe_jax.convert import from_pretrained, save_pretrained
from desmoe_jax.model import DeepseekV2ForCausalLM, ModelOutput, init_model

__all__ = ["ModelConfig", "DeepseekV2ForCausalLM", "ModelOutput", "from_pretrained",
           "save_pretrained", "init_model"]
