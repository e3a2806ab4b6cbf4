"""Config files (`configs/*.py`) and presets loaded from Python, as `train.py --config=...` loads them,
and a run's own saved config.

`load_config("configs/six_domains.py:tiny,fft", {"train.steps": 8})` (or the preset name
`"six_domains:tiny,fft"`) is what
`--config=configs/six_domains.py:tiny,fft --config.train.steps=8` gives on the command line: the
file's `get_config(presets)`, then dotted overrides, then the config locked so that a misspelt
field fails instead of being silently added. Notebooks and scripts use it so that they run the
exact configs `train.py` runs, with no flag parsing of their own.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from typing import Any

import ml_collections

log = logging.getLogger("desmoe_jax")


def resolve_spec(spec: str) -> str:
  """A preset name ("six_domains:tiny") -> its file in the installed package
  ("<package>/configs/six_domains.py:tiny"); a file path is returned unchanged."""
  path, sep, arg = spec.partition(":")
  if os.path.isfile(path) or path.endswith(".py") or "/" in path or os.sep in path:
    return spec
  from desmoe_jax.configs import preset_file
  return preset_file(path) + sep + arg


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`spec` is "path/to/file.py[:ARG]" or a preset name "six_domains[:ARG]" (ARG passed to
  `get_config`)."""
  path, sep, arg = resolve_spec(spec).partition(":")
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
  """config.<key> = value for a dotted `key` naming an existing field (e.g. "train.steps", or
  "data.domains[1].prompt_field" for an entry of a list of groups, as on the command line)."""
  *parents, leaf = key.split(".")
  node = config
  for i, name in enumerate(parents):
    name, index = _split_index(name, key)
    node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
    if index is not None:
      if not isinstance(node, (list, tuple)) or not -len(node) <= index < len(node):
        raise KeyError(f"override {key!r}: {'.'.join(parents[:i + 1])!r} is not an entry of a "
                       f"list of {source}")
      node = node[index]
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


def _split_index(name: str, key: str) -> tuple[str, int | None]:
  """"domains[1]" -> ("domains", 1); "train" -> ("train", None)."""
  if not name.endswith("]"):
    return name, None
  base, _, index = name[:-1].partition("[")
  try:
    return base, int(index)
  except ValueError:
    raise KeyError(f"override {key!r}: {name!r} needs an integer index") from None


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir` (`config.json`, else the newest checkpoint's
  record), as a ConfigDict. Fields this version has and the run's config lacks (a run from an
  older version) take the preset's defaults, and are named in the log."""
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  else:
    from desmoe_jax.checkpoint import Checkpointer
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
      raise FileNotFoundError(f"--workdir={workdir}: no config.json and no checkpoints/ there, "
                              "so no saved config to read; give --config")
    data = Checkpointer(ckpt_dir).read_meta().get("config")
    if not isinstance(data, dict):
      raise FileNotFoundError(f"--workdir={workdir}: no config.json, and the newest checkpoint "
                              "records no config; give --config")
    path = ckpt_dir
  config = _to_config(data)
  from desmoe_jax.configs.six_domains import domain_defaults, get_config
  added = _fill(config, get_config(""), domain_defaults())
  if added:
    log.info("%s lacks field(s) %s: preset defaults used", path, ", ".join(added))
  return config


def _to_config(value):
  if isinstance(value, dict):
    return ml_collections.ConfigDict({k: _to_config(v) for k, v in value.items()})
  if isinstance(value, list):
    return [_to_config(v) for v in value]
  return value


def _fill(config, template, domain_template, prefix="") -> list[str]:
  added = []
  for key, default in template.items():
    if key not in config:
      config[key] = default
      added.append(prefix + key)
    elif isinstance(default, ml_collections.ConfigDict) and \
        isinstance(config[key], ml_collections.ConfigDict):
      added += _fill(config[key], default, domain_template, f"{prefix}{key}.")
    elif prefix == "data." and key == "domains" and isinstance(config[key], list):
      for i, domain in enumerate(config[key]):
        if isinstance(domain, ml_collections.ConfigDict):
          added += _fill(domain, domain_template, domain_template, f"data.domains[{i}].")
  return added
