"""MoE architectures by name (tiny, v2_lite, v2, moonlight_16b_a3b, qwen3_30b_a3b, olmoe_1b_7b,
mixtral_8x7b): see desmoe_jax/configs/models.py, which the installed package carries
(`--config=models:v2_lite`). This file is the same preset under its documented path."""

from desmoe_jax.configs.models import get_config  # noqa: F401
