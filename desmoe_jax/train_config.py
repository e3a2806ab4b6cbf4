"""The run's config (a ConfigDict: configs/six_domains.py documents every field) turned into the
library's frozen config objects, and the checks that relate fields to each other before
anything heavy happens."""

from __future__ import annotations

import math
import os

from desmoe_jax import data as data_lib
from desmoe_jax import sources
from desmoe_jax import train_step as ts
from desmoe_jax import validate as validate_lib
from desmoe_jax.errors import ConfigError
from desmoe_jax.esft import EsftConfig
from desmoe_jax.lora import LoraConfig
from desmoe_jax.methods import DEFAULT_PAPER_LR, PAPER_LR, MethodConfig
from desmoe_jax.optim import OptimConfig
from desmoe_jax.router import AlrConfig
from desmoe_jax.schedule import ScheduleConfig
from desmoe_jax.specialization import DgesConfig


def num_domains(config) -> int:
  """D: the data.domains entries, or data.discover_domains=K clusters (an "auto" run's K is
  known once it has clustered: desmoe_jax/discover.py, passed explicitly)."""
  k = config.data.get("discover_domains", 0)
  if k == "auto":
    raise ConfigError("data.discover_domains='auto': the number of domains is known once the "
                      "run has clustered (read it from the run's domains.json)")
  return int(k) if k else len(config.data.domains)


def method_config(config, domains: int | None = None) -> MethodConfig:
  """`domains`: D when it is not `num_domains(config)` (discovered by an "auto" run)."""
  return MethodConfig(
      method=config.method, num_domains=num_domains(config) if domains is None else domains,
      total_steps=config.train.steps,
      alr=AlrConfig(**config.alr.to_dict()), dges=DgesConfig(**config.dges.to_dict()),
      schedule=ScheduleConfig(**config.schedule.to_dict()),
      esft=EsftConfig(**dict(config.esft.to_dict(),
                             top_p=None if config.esft.top_p < 0 else config.esft.top_p)),
      lora=LoraConfig(**config.lora.to_dict()) if "lora" in config else LoraConfig(),
      linear_router_trainable=config.ablation.linear_router_trainable,
      balance_loss=config.ablation.balance_loss,
      freeze=frozenset(g.strip() for g in config.ablation.get("freeze", "").split(",")
                       if g.strip()))


def optim_config(config) -> OptimConfig:
  kw = config.optim.to_dict()
  if kw["learning_rate"] < 0:
    kw["learning_rate"] = PAPER_LR.get(config.method, DEFAULT_PAPER_LR)
  kw["master_weights"] = config.train.precision == "bf16_master"  # a float32 copy in the state
  kw["skip_nonfinite_updates"] = int(config.train.get("skip_nonfinite_updates", 0))
  return OptimConfig(**kw)


def step_config(config) -> ts.StepConfig:
  """train.microbatches / train.precision, checked against model.param_dtype."""
  step_cfg = ts.StepConfig(microbatches=config.train.microbatches,
                           precision=config.train.precision, seed=config.seed)
  want = {"fp32_master": "float32", "bf16_sr": "bfloat16",
          "bf16_master": "bfloat16"}[step_cfg.precision]
  if config.model.param_dtype != want:
    raise ConfigError(f"train.precision={step_cfg.precision!r} stores the weights in {want}, "
                      f"model.param_dtype={config.model.param_dtype!r}: set "
                      f"--config.model.param_dtype={want}, or pick another train.precision "
                      f"({', '.join(p for p in ts.PRECISIONS if p != step_cfg.precision)})")
  if config.data.batch_size % step_cfg.microbatches:
    raise ConfigError(f"train.microbatches={step_cfg.microbatches} does not divide "
                      f"data.batch_size={config.data.batch_size}")
  return step_cfg


def check_microbatch_split(step_cfg: ts.StepConfig, batch_size: int, batch_sharding):
  """Each microbatch must split evenly over the data-parallel devices, or every device would
  compute the whole microbatch. (That microbatches divide the batch is `step_config`'s check,
  made once, before this one.)"""
  spec = batch_sharding.spec[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  devices = math.prod(batch_sharding.mesh.shape[a] for a in axes)
  rows = batch_size // step_cfg.microbatches
  if rows % devices:
    raise ValueError(f"data.batch_size={batch_size} / train.microbatches="
                     f"{step_cfg.microbatches} = {rows} rows per microbatch, not a multiple of "
                     f"the {devices} data-parallel devices: lower train.microbatches or raise "
                     "data.batch_size")


def check_config(config):
  """Fails before anything heavy happens with a `ConfigError` naming every bad field
  (validate.py), then checks what relates fields to the train step (`step_config`)."""
  validate_lib.validate(config)
  step_config(config)
  if config.model.path and not config.model.path.startswith(sources.PREFIX) and \
      os.path.isfile(config.model.path):
    raise ConfigError(f"config.model.path={config.model.path!r} is a file, not a directory")
  init = config.train.get("init_from", "")
  if init and not os.path.isdir(init):
    raise ConfigError(f"config.train.init_from={init!r} does not exist (a run's work "
                      "directory)")
  if config.dges.get("exclude_general_top") and not config.data.general:
    raise ConfigError("config.dges.exclude_general_top ranks experts on general text, but "
                      "config.data.general is empty")
  if config.dges.get("exclude_general_top") and init:
    raise ConfigError("config.dges.exclude_general_top ranks experts on the pretrained model; "
                      f"config.train.init_from={init!r} starts from a trained one")
  if config.data.get("discover_domains", 0) and config.method.startswith("esft"):
    raise ConfigError(f"config.data.discover_domains={config.data.discover_domains!r} with "
                      f"method={config.method!r}: ESFT scores experts per labelled domain file; "
                      "discovered domains are for the DES-MoE family and FFT")
  if config.export.get("hub_repo") and not config.export.enabled:
    raise ConfigError(f"config.export.hub_repo={config.export.hub_repo!r} pushes the export, "
                      "but config.export.enabled=False")


def domain_spec(d, split: str = "train",
                max_bad_fraction: float = 0.1) -> data_lib.DomainSpec:
  """The data of one `data.domains` entry; fields a custom config omits take their defaults."""
  return data_lib.DomainSpec(
      name=d.name, path=d[split], format=d.format, weight=d.get("weight", 1.0),
      prompt_field=d.get("prompt_field", "prompt"),
      response_field=d.get("response_field", "response"),
      messages_field=d.get("messages_field", "messages"),
      split=d.get("split", "train") if split == "train" else d.get("eval_split", "test"),
      max_bad_fraction=max_bad_fraction)


def domain_specs(config, split: str = "train") -> list:
  return [domain_spec(d, split, config.data.get("max_bad_fraction", 0.1))
          for d in config.data.domains]
