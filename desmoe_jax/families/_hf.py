"""The strict config.json reader every family file uses.

A family declares which HF fields it reads into which `ModelConfig` field (`fields`), which it
checks against the one value it supports (`require`), which carry no meaning for the computation
(`ignored`); everything else in the file is an unknown field and stops the load (or, with
strict=False, is warned about), because a field we do not know may change what the checkpoint
computes.
"""

from __future__ import annotations

import warnings
from typing import Any

from desmoe_jax.config import ModelConfig, RuntimeConfig

# HF fields that carry no meaning for the computation (bookkeeping, serving hints, training-only
# switches we do not use, generation defaults).
BOOKKEEPING = frozenset({
    "architectures", "auto_map", "transformers_version", "use_cache", "initializer_range",
    "output_router_logits", "torch_dtype", "dtype", "_name_or_path", "return_dict",
    "output_hidden_states", "output_attentions", "_attn_implementation_autoset", "tokenizer_class",
    "model_type", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
    "is_encoder_decoder", "add_cross_attention", "tie_encoder_decoder", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "sep_token_id", "decoder_start_token_id",
    "ep_size", "attention_dropout", "hidden_act", "quantization_config", "rope_theta",
    "rope_scaling", "rope_parameters", "pretraining_tp",
})

# Shared by every family: copied to the ModelConfig field of the same name.
COMMON_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                 "bos_token_id", "eos_token_id", "pad_token_id")


class Reader:
  """Collects problems while a family reads one config.json dict."""

  def __init__(self, d: dict, family: str, source: str):
    self.d, self.family, self.source = dict(d), family, source
    self.problems: list[str] = []
    self.used: set[str] = set()
    self.kwargs: dict[str, Any] = {"model_type": family}
    model_type = self.d.get("model_type", family)
    if model_type != family:
      self.problems.append(f"model_type={model_type!r}: this reader is for {family!r}")
    if "quantization_config" in self.d:
      self.problems.append("quantization_config present: quantised checkpoints are not "
                           "supported, give a bf16/fp32 checkpoint")
    self.require("hidden_act", lambda v: v == "silu", "'silu' only")
    self.require("attention_dropout", lambda v: v == 0, "0.0 only")
    self.require("pretraining_tp", lambda v: v == 1, "1 only")
    self.copy(*COMMON_FIELDS)
    self._rope()

  def get(self, key, default=None):
    self.used.add(key)
    value = self.d.get(key)
    return default if value is None else value

  def copy(self, *keys, to: str | None = None, cast=None):
    """HF `key` -> ModelConfig field of the same name (or `to`), where present and not null."""
    for key in keys:
      self.used.add(key)
      if self.d.get(key) is not None:
        value = self.d[key]
        self.kwargs[to or key] = cast(value) if cast else value

  def set(self, **fields):
    self.kwargs.update(fields)

  def require(self, key, ok, allowed):
    self.used.add(key)
    if key in self.d and self.d[key] is not None and not ok(self.d[key]):
      self.problems.append(f"{key}={self.d[key]!r} (this implementation supports {allowed})")

  def refuse(self, message):
    self.problems.append(message)

  def ignore(self, *keys):
    self.used.update(keys)

  def _rope(self):
    """transformers 5 writes `rope_parameters` (rope_theta inside); original files write
    `rope_scaling` + `rope_theta`. Both are accepted."""
    d = self.d
    rope_theta, rope_scaling = d.get("rope_theta"), d.get("rope_scaling")
    params = d.get("rope_parameters")
    if params:
      params = dict(params)
      rope_theta = params.pop("rope_theta", rope_theta)
      if params.pop("partial_rotary_factor", 1.0) != 1.0:
        self.refuse("rope_parameters.partial_rotary_factor != 1 is not supported")
      if params.get("rope_type", params.get("type", "default")) != "default":
        rope_scaling = params
    if rope_scaling is not None:
      rope_scaling = dict(rope_scaling)
      if rope_scaling.get("partial_rotary_factor", 1.0) != 1.0:
        self.refuse("rope_scaling.partial_rotary_factor != 1 is not supported")
      if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) == "default":
        rope_scaling = None
    if rope_theta is not None:
      self.kwargs["rope_theta"] = float(rope_theta)
    self.kwargs["rope_scaling"] = rope_scaling

  def build(self, *, strict: bool, runtime: RuntimeConfig, ignored=()) -> ModelConfig:
    unknown = sorted(set(self.d) - self.used - BOOKKEEPING - set(ignored))
    if unknown:
      msg = (f"{self.source}: unknown {self.family} config field(s) {unknown}; this "
             "implementation does not know what they change")
      if strict:
        self.problems.append(msg.split(": ", 1)[1] + " (pass strict=False to ignore them)")
      else:
        warnings.warn(msg + "; ignored")
    if self.problems:
      raise ValueError(f"{self.source}: cannot honour " + "; ".join(self.problems))
    try:
      return ModelConfig(**self.kwargs, runtime=runtime, hf_dict=self.d)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{self.source}: {e}") from e


def write(cfg: ModelConfig, fields: dict[str, Any], defaults: dict[str, Any]) -> dict:
  """config.json: the source dict where we have one (unknown-to-us bookkeeping kept), updated
  with `fields` (HF name -> value from cfg), rope written in the file's own style."""
  out = dict(cfg.hf_dict) if cfg.hf_dict else dict(defaults)
  out["model_type"] = cfg.model_type
  for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
              "eos_token_id", "pad_token_id"):
    out[key] = getattr(cfg, key)
  out.update(fields)
  if "rope_parameters" in out or not cfg.hf_dict:  # transformers-5 style file: keep that style
    params = dict(cfg.rope_scaling or {"rope_type": "default"})
    params["rope_theta"] = cfg.rope_theta
    out["rope_parameters"] = params
    out.pop("rope_scaling", None)
    out.pop("rope_theta", None)
  else:
    out["rope_scaling"] = cfg.rope_scaling
    out["rope_theta"] = cfg.rope_theta
  return out


def dense_prefix(reader: Reader, num_layers: int, sparse_step: int, mlp_only: list) -> int:
  """Qwen-style layer pattern -> number of leading dense layers; refused unless the dense
  layers form a prefix (the MoE layers are one stacked module, see model.py)."""
  moe = [i not in mlp_only and (i + 1) % sparse_step == 0 for i in range(num_layers)]
  k = moe.index(True) if any(moe) else num_layers
  if not all(moe[k:]):
    reader.refuse(f"decoder_sparse_step={sparse_step} / mlp_only_layers={mlp_only}: the dense "
                  "layers must come first (MoE layers are stacked for lax.scan)")
  return k
