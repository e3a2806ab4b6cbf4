"""DeepSeek-V2 architectures by name (tiny, v2_lite, v2): see desmoe_jax/configs/models.py, which
the installed package carries (`--config=models:v2_lite`). This file is the same preset under its
documented path."""

from desmoe_jax.configs.models import get_config  # noqa: F401
