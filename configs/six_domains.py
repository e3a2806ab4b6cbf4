r"""DES-MoE on six domains: the paper's setting, and presets (docs/METHOD.md).

  python train.py --config=configs/six_domains.py --config.model.path=/path/to/DeepSeek-V2-Lite
  python train.py --config=configs/six_domains.py:tiny            # embedded tiny model, CPU
  python train.py --config=configs/six_domains.py:tiny,fft        # any method as a preset

The fields, each with its comment, are in desmoe_jax/configs/six_domains.py: the installed
package carries them, so that `desmoe-train --config=six_domains:tiny` works from any folder.
This file is the same preset under its documented path.
"""

from desmoe_jax.configs.six_domains import DOMAINS, METRICS, get_config  # noqa: F401
