"""The presets `--config` accepts by name (`--config=six_domains:tiny`): one module per preset
file, each with `get_config(arg)`. `configs/` at the repository root holds the same files under
their documented paths (`--config=configs/six_domains.py:tiny`)."""

import os

PRESETS = ("six_domains", "models")
DIR = os.path.dirname(os.path.abspath(__file__))


def preset_file(name: str) -> str:
  """The file of preset `name` (e.g. "six_domains")."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)} (or give a config "
                     "file path)")
  return os.path.join(DIR, f"{name}.py")
