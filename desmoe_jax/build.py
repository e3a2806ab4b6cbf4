"""The one way to build the model a config describes: every `config.model` field but `path` is
a field of `RuntimeConfig` (dtype, param_dtype, moe_impl, attention_impl, remat, ce_chunk,
scan_layers, expert_parallel). The trainer, `eval.py`, the export and the scripts build through
here, so an evaluation runs the model the run trained (a field added to `config.model` reaches
all of them)."""

from __future__ import annotations

from desmoe_jax.config import ModelConfig
from desmoe_jax.convert import from_pretrained


def runtime_fields(config) -> dict:
  """`config.model` minus `path`: RuntimeConfig fields, keyword arguments of from_pretrained."""
  return {k: v for k, v in config.model.items() if k != "path"}


def load_model(config, path: str | None = None, mesh=None):
  """The pretrained model at `path` (default `config.model.path`, a local directory) with the
  config's runtime fields, laid out over `mesh` if given."""
  return from_pretrained(path or config.model.path, mesh=mesh, **runtime_fields(config))


def model_config(config, path: str | None = None) -> ModelConfig:
  """The ModelConfig `load_model` would build, without loading weights."""
  return ModelConfig.from_pretrained(path or config.model.path, **runtime_fields(config))
