"""Config files (`configs/*.py`) loaded from Python, as `train.py --config=...` loads them.

`load_config("configs/six_domains.py:tiny,fft", {"train.steps": 8})` is what
`--config=configs/six_domains.py:tiny,fft --config.train.steps=8` gives on the command line: the
file's `get_config(presets)`, then dotted overrides, then the config locked so that a misspelt
field fails instead of being silently added. Notebooks and scripts use it so that they run the
exact configs `train.py` runs, with no flag parsing of their own.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`spec` is "path/to/file.py" or "path/to/file.py:ARG" (ARG passed to `get_config`)."""
  path, sep, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} (from {spec!r}) does not exist")
  module_spec = importlib.util.spec_from_file_location(
      f"_desmoe_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise AttributeError(f"config file {path!r} defines no get_config()")
  config = module.get_config(arg) if sep else module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f"{path}: get_config() returned a {type(config).__name__}, not a ConfigDict")
  for key, value in (overrides or {}).items():
    set_field(config, key, value, source=path)
  config.lock()
  return config


def set_field(config: ml_collections.ConfigDict, key: str, value: Any, source: str = "config"):
  """config.<key> = value for a dotted `key` naming an existing field (e.g. "train.steps")."""
  *parents, leaf = key.split(".")
  node = config
  for i, name in enumerate(parents):
    node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict):
      raise KeyError(f"override {key!r}: {'.'.join(parents[:i + 1])!r} is not a config group "
                     f"of {source}")
  if leaf not in node:
    where = ".".join(parents) or "the top level"
    raise KeyError(f"override {key!r}: {source} has no field {leaf!r} in {where} "
                   f"(fields: {', '.join(sorted(node.keys()))})")
  try:
    node[leaf] = value
  except TypeError as e:  # ConfigDict's own type check (e.g. a string for an int field)
    raise TypeError(f"override {key!r}={value!r}: {e}") from None
