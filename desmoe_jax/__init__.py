"""desmoe-jax: multi-domain adaptation of MoE language models with DES-MoE, in JAX/Flax NNX.

Families (dispatched on config.json's `model_type`, see desmoe_jax/families/): DeepSeek-V2,
DeepSeek-V3 (Moonlight), Qwen3-MoE, OLMoE, Mixtral, Qwen2-MoE.

Public API:
  desmoe_jax.from_pretrained(path, dtype=jnp.bfloat16, mesh=None, ...) -> MoECausalLM
  desmoe_jax.save_pretrained(model, path, ...)          # back to the family's HF layout
  model(input_ids).logits                               # [batch, seq, vocab]
  model.moe_blocks()                                    # the MoE layers DES-MoE plugs into
"""

from desmoe_jax.config import ModelConfig, RuntimeConfig
from desmoe_jax.convert import from_pretrained, save_pretrained
from desmoe_jax.families import FAMILIES
from desmoe_jax.model import DeepseekV2ForCausalLM, MoECausalLM, ModelOutput, init_model

__all__ = ["ModelConfig", "RuntimeConfig", "MoECausalLM", "DeepseekV2ForCausalLM", "ModelOutput",
           "FAMILIES", "from_pretrained", "save_pretrained", "init_model"]
