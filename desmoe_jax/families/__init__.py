"""Model families: one file each, chosen by the `model_type` of a checkpoint's config.json.

A family file holds what makes a family itself and nothing the model code shares:
  MODEL_TYPE, HF_ARCHITECTURE, HF_CONFIG  its names in transformers;
  from_hf(d, strict, source, runtime)     its strict config.json reader (architecture only:
                                          runtime options are a separate RuntimeConfig);
  to_hf(cfg)                              the config.json it exports;
  hf_name(name)                           our parameter name inside a layer -> HF's;
  TINY                                    kwargs of a tiny random transformers model (tests).
Everything else (attention, MoE block, routing functions, the decoder) is shared: nn/, moe/,
model.py. Adding a family is one file here plus its entry in FAMILIES.
"""

from __future__ import annotations

import json
import os
from types import ModuleType

from desmoe_jax.config import FAMILY_IO
from desmoe_jax.families import deepseek_v2, deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe

FAMILIES: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (
    deepseek_v2, deepseek_v3, qwen3_moe, olmoe, mixtral, qwen2_moe)}


def get_family(model_type: str) -> ModuleType:
  if model_type not in FAMILIES:
    raise ValueError(f"model_type={model_type!r} is not supported; supported: {sorted(FAMILIES)}")
  return FAMILIES[model_type]


def family_of(d: dict, source: str = "config.json") -> ModuleType:
  """The family of a config.json dict, from its `model_type` (DeepSeek-V2 files written before
  model_type was required have none)."""
  model_type = d.get("model_type", "deepseek_v2")
  if model_type not in FAMILIES:
    raise ValueError(f"{source}: model_type={model_type!r} is not supported; supported: "
                     f"{sorted(FAMILIES)}")
  return FAMILIES[model_type]


def read_config_json(path: str) -> dict:
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file} not found: expected a Hugging Face model directory")
  with open(file) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{file}: not valid JSON ({e})") from e


# ModelConfig's HF interop (from_hf_dict, from_pretrained, to_hf_dict) dispatches through these.
FAMILY_IO.update(family_of=family_of, read_config_json=read_config_json, get_family=get_family)
