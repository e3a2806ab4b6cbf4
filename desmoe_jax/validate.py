"""Checks a whole run config before anything expensive happens (no model load, no data read,
no device touched), so that a bad setting costs seconds, not a model load followed by a crash
deep in the step loop (`train.log_every=0` used to end in ZeroDivisionError after loading).

Every problem is one line naming the field, its value and what it may be:

    train.keep_checkpoints=0: must be >= 1
    model.moe_impl='fast': must be one of 'auto', 'dense', 'ragged', 'tokamax', 'tiled'

`validate(config)` raises one `ConfigError` listing every problem, one per line of its message
(so that a user fixes them in one go); `train.py` / `eval.py` print each as an `error:` line and
exit 2.

The allowed values live in one table, `FIELDS` ("group.field" -> rule), plus `DOMAIN_FIELDS`
for each entry of `data.domains`, and a few checks that relate two fields (`_cross_checks`).
A field that a library dataclass consumes (optim.*, alr.*, dges.*, schedule.*, esft.*, model.*
runtime fields, train.microbatches / precision) takes the rule that dataclass declares
(desmoe_jax/schema.py), so its choices and range are written once.
A field the config does not have is skipped, so the table may list fields that only some
configs define; `unchecked_fields(config)` names the fields the table does not cover (a test
keeps the shipped config fully covered). To allow a new value (say a new `model.moe_impl`),
extend its rule where it is declared (config.MOE_IMPLS).
"""

from __future__ import annotations

import numbers
import os

from desmoe_jax.config import RuntimeConfig
from desmoe_jax.data import FORMATS
from desmoe_jax.discover import check_request
from desmoe_jax.errors import ConfigError
from desmoe_jax.esft import EsftConfig
from desmoe_jax.lora import LoraConfig
from desmoe_jax.methods import METHODS
from desmoe_jax.metrics import METRIC_NAMES
from desmoe_jax.optim import ADAFACTOR_OFFLOAD, OptimConfig
from desmoe_jax.router import AlrConfig
from desmoe_jax.schedule import ScheduleConfig
from desmoe_jax.schema import (BOOL, MESH_AXIS, PATH, STR, Check, Float, Int, OneOf, Rule,
                               rules_of)
from desmoe_jax.specialization import DgesConfig
from desmoe_jax.train_step import StepConfig

# "group.field" -> Rule. The fields a library dataclass consumes take the rule it declares
# (desmoe_jax/schema.py: `knob`); the rest are listed here. The dataclasses' __post_init__
# re-check what they consume; this table is what runs first, on the whole config.
DECLARED: dict[str, Rule] = {
    **rules_of(StepConfig, "train"), **rules_of(RuntimeConfig, "model"),
    **rules_of(OptimConfig, "optim"), **rules_of(AlrConfig, "alr"),
    **rules_of(DgesConfig, "dges"), **rules_of(ScheduleConfig, "schedule"),
    **rules_of(EsftConfig, "esft"), **rules_of(LoraConfig, "lora")}


def _declared(section: str) -> dict[str, Rule]:
  return {k: r for k, r in DECLARED.items() if k.split(".")[0] == section}


FIELDS: dict[str, Rule] = {
    "method": OneOf(*METHODS),
    **_declared("seed"),

    "model.path": PATH,
    **_declared("model"),

    "data.general": PATH,
    "data.general_mc": PATH,
    "data.general_genres": PATH,
    "data.seq_len": Int(2),
    "data.batch_size": Int(1),
    "data.max_bad_fraction": Float(0, 1),
    "data.select": STR,                              # "math,code": names checked by sources.py
    "data.discover_domains": Check(check_request),   # 0, K >= 2 or "auto" (discover.py)

    "train.steps": Int(1),
    "train.log_every": Int(1),
    "train.eval_every": Int(0),          # 0: evaluate only at the end
    "train.checkpoint_every": Int(1),
    "train.keep_checkpoints": Int(1),
    "train.async_checkpoint": BOOL,
    "train.heatmap_layers": Int(1),
    "train.nan_check": BOOL,
    "train.init_from": PATH,                         # "" or another run's work directory
    **_declared("train"),        # microbatches, precision, skip_nonfinite_updates

    **_declared("optim"),
    **_declared("alr"),
    **_declared("dges"),
    **_declared("schedule"),
    **_declared("esft"),
    **_declared("lora"),

    "ablation.linear_router_trainable": BOOL,
    "ablation.balance_loss": BOOL,
    "ablation.freeze": STR,                          # groups: checked by methods.MethodConfig

    "mesh.data": MESH_AXIS,
    "mesh.fsdp": MESH_AXIS,
    "mesh.expert": MESH_AXIS,
    "mesh.tensor": MESH_AXIS,

    "eval.max_examples": Int(0),                      # 0: all rows
    "eval.max_new_tokens": Int(1),
    "eval.batch_size": Int(1),
    "eval.loss_batches": Int(1),
    "eval.general_batches": Int(0, special=((-1, "as many as eval.loss_batches"),)),
    "eval.genre_batches": Int(0),                     # 0: every row of each genre
    "eval.code_timeout": Float(0, lo_open=True),
    "eval.allow_code_execution": BOOL,
    "eval.allow_unisolated_code_execution": BOOL,
    "eval.lm_eval_tasks": STR,                       # "" or comma-separated lm-eval task names
    "eval.lm_eval_include": PATH,
    "eval.lm_eval_limit": Int(0),                    # 0: every example

    "logging.wandb.enabled": BOOL,
    "logging.wandb.project": STR,
    "logging.wandb.entity": STR,
    "logging.wandb.name": STR,
    "logging.wandb.mode": OneOf("", "online", "offline", "disabled"),

    "export.enabled": BOOL,
    "export.fold_tokens": Int(1),                    # held-out tokens the router fold uses
    "export.check_tokens": Int(1),                   # further tokens for its agreement check
    "export.hub_repo": STR,                          # "" or owner/name (sources.push)
}

# Fields of each entry of data.domains.
DOMAIN_FIELDS: dict[str, Rule] = {
    "name": Rule("str", nonempty=True),
    "train": Rule("str", nonempty=True),
    "eval": PATH,
    "format": OneOf(*FORMATS),
    "prompt_field": Rule("str", nonempty=True),
    "response_field": Rule("str", nonempty=True),
    "messages_field": Rule("str", nonempty=True),
    "split": Rule("str", nonempty=True),
    "eval_split": Rule("str", nonempty=True),
    "weight": Float(0, lo_open=True),
    "metric": OneOf(*METRIC_NAMES),
}


def _get(config, dotted: str):
  """(found, value) of a dotted field."""
  node = config
  for name in dotted.split("."):
    try:
      if name not in node:
        return False, None
      node = node[name]
    except TypeError:             # not a group
      return False, None
  return True, node


def _cross_checks(config, has) -> list[str]:
  out = []
  ok_t, t1 = has("schedule.t1")
  ok_t2, t2 = has("schedule.t2")
  if ok_t and ok_t2 and _is_num(t1) and _is_num(t2) and 0 <= t2 < t1 <= 1:  # each in [0, 1]
    out.append(f"schedule.t1={t1}, schedule.t2={t2}: need 0 <= t1 <= t2 <= 1 (phase "
               "boundaries as fractions of train.steps)")
  ok_w, warm = has("optim.warmup_steps")
  ok_s, steps = has("train.steps")
  if ok_w and ok_s and _is_num(warm) and _is_num(steps) and warm >= steps > 0:
    out.append(f"optim.warmup_steps={warm}: must be < train.steps={steps}")
  ok_mix, mix = has("alr.mix")
  ok_loss, loss = has("alr.loss")
  if ok_mix and ok_loss and mix == "update" and loss in ("additive",):
    out.append(f"alr.mix='update': mixes the convex loss's two router updates; alr.loss="
               f"{loss!r} has none (set alr.loss=convex or alr.mix=gradient)")
  ok_ho, offload = has("optim.host_offload")
  ok_pe, per_expert = has("optim.per_expert_bias_correction")
  ok_n, name = has("optim.name")
  if ok_ho and offload is True and ok_n and name == "adafactor":
    out.append(ADAFACTOR_OFFLOAD)
  ok_md, moments = has("optim.moments_dtype")
  if ok_pe and per_expert is True and ((ok_n and name == "adafactor")
                                       or (ok_md and moments == "int8")):
    out.append(f"optim.per_expert_bias_correction=True: counts AdamW's steps per expert; "
               f"optim.name={name!r} with optim.moments_dtype={moments!r} has no such count "
               "(needs adamw with float moments)")
  ok_ld, dropout = has("lora.dropout")
  ok_ep, expert_parallel = has("model.expert_parallel")
  ok_lm, lora_method = has("method")
  ok_lt, targets = has("lora.targets")
  if ok_ld and _is_num(dropout) and dropout > 0 and ok_ep and expert_parallel == "shard_map" \
      and ok_lm and lora_method == "lora" and ok_lt and "routed_experts" in str(targets):
    out.append(f"lora.dropout={dropout} with model.expert_parallel='shard_map': the routed "
               "experts' dropout masks do not travel with the exchanged token rows; use "
               "model.expert_parallel='compiler', lora.dropout=0, or drop routed_experts from "
               "lora.targets")
  ok_lw, with_desmoe = has("lora.with_desmoe")
  if ok_lw and with_desmoe is True and ok_lt and isinstance(targets, str) and \
      "router" in targets.split(","):
    out.append("lora.with_desmoe=True routes with DES-MoE's adaptive router, which trains as "
               f"in DES-MoE: remove 'router' from lora.targets={targets!r}")
  ok_dup, dup = has("dges.duplicate_shared_experts")
  ok_meth, method = has("method")
  if ok_lw and with_desmoe is True and ok_meth and method == "lora" and ok_dup and dup is True:
    out.append("lora.with_desmoe=True with dges.duplicate_shared_experts=True: the copy bank "
               "holds full expert weights, which LoRA does not train")
  ok_m, mesh = has("mesh")
  if ok_m:
    minus = [k for k in ("data", "fsdp", "expert", "tensor") if mesh.get(k) == -1]
    if len(minus) > 1:
      out.append(f"mesh.{'/'.join(minus)} are all -1: at most one mesh axis may be -1")
  ok_d, domains = has("data.domains")
  if ok_d:
    if not domains:
      out.append("data.domains is empty: give at least one domain")
    names = [d.get("name") for d in domains if hasattr(d, "get")]
    dup = sorted({n for n in names if names.count(n) > 1 and n})
    if dup:
      out.append(f"data.domains: names {dup} appear more than once (a name is a domain's id)")
    ok_e, esft_domain = has("esft.domain")
    if ok_e and _is_num(esft_domain) and esft_domain >= len(domains):
      out.append(f"esft.domain={esft_domain}: there are {len(domains)} domains "
                 f"(0..{len(domains) - 1}, or -1 for all)")
  ok_p, path = has("model.path")
  if ok_p and isinstance(path, str):
    if not path:
      out.append("model.path is empty: set --config.model.path=/path/to/DeepSeek-V2-Lite (a "
                 "Hugging Face directory with config.json, safetensors and tokenizer), or use "
                 "the embedded model with --config=configs/six_domains.py:tiny")
    elif not path.startswith("hf://") and not os.path.isdir(path):  # hub ids: sources.py
      out.append(f"model.path={path!r} is not a directory (a hub id needs the prefix hf://)")
  return out


def _is_num(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def problems(config) -> list[str]:
  """Every problem of `config`, one line each (empty: valid)."""
  out = []

  def has(dotted):
    return _get(config, dotted)

  for dotted, rule in FIELDS.items():
    found, value = has(dotted)
    if found:
      why = rule.problem(value)
      if why:
        out.append(f"{dotted}={value!r}: {why}")
  found, domains = has("data.domains")
  if found:
    if not isinstance(domains, (list, tuple)):
      out.append(f"data.domains must be a list of domain groups, not a {type(domains).__name__}")
      domains = []
    for i, d in enumerate(domains):
      label = f"data.domains[{i}]"
      if not hasattr(d, "get"):
        out.append(f"{label} must be a group of {', '.join(DOMAIN_FIELDS)}")
        continue
      label += f" ({d.get('name')!r})" if d.get("name") else ""
      for field, rule in DOMAIN_FIELDS.items():
        if field not in d:
          continue
        why = rule.problem(d[field])
        if why:
          extra = " (every domain needs training data)" if field == "train" else ""
          out.append(f"{label}.{field}={d[field]!r}: {why}{extra}")
  out += _cross_checks(config, has)
  return out


def validate(config) -> None:
  """Raises `ConfigError` listing every problem of `config`, one per line of its message."""
  found = problems(config)
  if found:
    raise ConfigError(found[0] if len(found) == 1 else
                      f"invalid config ({len(found)} problems):\n" + "\n".join(found))


def unchecked_fields(config) -> list[str]:
  """Fields of `config` (dotted) that no rule of this module covers."""
  out = []

  def walk(node, prefix):
    for key in node.keys():
      dotted = f"{prefix}{key}"
      value = node[key]
      if dotted == "data.domains":
        for d in value:
          out.extend(f"data.domains[].{k}" for k in d.keys() if k not in DOMAIN_FIELDS)
      elif hasattr(value, "keys") and dotted not in FIELDS:
        walk(value, dotted + ".")
      elif dotted not in FIELDS:
        out.append(dotted)

  walk(config, "")
  return sorted(set(out))
