"""desmoe-jax: multi-domain adaptation of DeepSeek MoE models with DES-MoE, in JAX/Flax NNX."""
