"""Small shared builders for the DES-MoE tests (a tiny model, batches)."""

import jax.numpy as jnp
import numpy as np

from desmoe_jax.config import ModelConfig
from desmoe_jax.model import init_model

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, first_k_dense_replace=1, aux_loss_alpha=0.001)


def tiny_model(seed=0, **kw):
  """moe_impl defaults to `dense`: it compiles fastest and gives the same numbers as the CPU
  default `tiled` (tests/test_moe.py and tests/test_gmm.py compare the impls); a test about the
  dispatch passes its own."""
  return init_model(ModelConfig.make(**dict(TINY, **{"moe_impl": "dense", **kw})), seed=seed)


def batch(seed, domains, seq=12, vocab=64):
  """One sequence per entry of `domains` (each a single domain), every token a target."""
  rng = np.random.RandomState(seed)
  b = len(domains)
  dom = np.repeat(np.asarray(domains)[:, None], seq, axis=1)
  # Domain-flavoured tokens so that domains route differently.
  tokens = (rng.randint(0, vocab // 4, (b, seq)) + (vocab // 4) * (dom % 4)) % vocab
  return {"tokens": jnp.asarray(tokens, jnp.int32), "loss_mask": jnp.ones((b, seq), jnp.float32),
          "domain_id": jnp.asarray(dom, jnp.int32)}
