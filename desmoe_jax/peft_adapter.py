"""LoRA's adapter-only export in PEFT's layout: `workdir/hf_adapter/` beside the merged
`workdir/hf/` (docs/METHOD.md section 4).

`adapter_config.json` + `adapter_model.safetensors`, which `peft.PeftModel.from_pretrained`
loads over the base model's transformers module (tests/test_lora.py holds its logits to our
adapted model's, 1e-5 in float32, with peft 0.21.2 and transformers 5). PEFT's names are the
transformers 5 module paths under `base_model.model.`; PEFT stores A as [r, in] and B as
[out, r] (ours: A [in, r], B [r, out], the kernels' [in, out] orientation).

* The attention projections (`attention`) are `target_modules`: `<module>.lora_A.weight`
  [r, in], `<module>.lora_B.weight` [out, r].
* The router (`router`) is an nn.Parameter in transformers 5 (`mlp.gate.weight` [E, d], not an
  nn.Linear): a `target_parameters` entry, PEFT's ParamWrapper, same names and shapes.
* The dense MLPs' and the shared experts' linears (`dense_mlp`, `shared_experts`) are
  `target_parameters` too (`<module>.weight`, a ParamWrapper on the nn.Linear's weight; same
  names and shapes as a Linear's pair): PEFT 0.21 converts adapter configs for transformers 5's
  MoE layout, and rewrites every `target_modules` entry named gate_proj / up_proj / down_proj
  of this family into the fused experts' parameters, so as target_modules these linears would
  silently get no adapter.
* The routed experts (`routed_experts`) are transformers 5's fused 3-D parameters
  `mlp.experts.gate_up_proj` [E, 2F, d] and `mlp.experts.down_proj` [E, d, F]: two
  `target_parameters` entries (PEFT >= 0.17's ParamWrapper; PEFT's LoRA has no form for them
  as target_modules, which is why common tools skip them). PEFT wraps both parameters of the
  one module, nested: gate_up_proj's pair is `experts.base_layer.lora_*`, down_proj's
  `experts.lora_*`. A ParamWrapper pair holds every expert's factors in one matrix:
  A [E * r, in], row e * r + j; B [out, r * E], column j * E + e. Our gate and up pairs (rank r
  each) become ONE gate_up pair of rank 2r, exactly: A_e = [A_gate,e^T; A_up,e^T],
  B_e = blockdiag(B_gate,e^T, B_up,e^T), with `rank_pattern` 2r and `alpha_pattern` 2 alpha for
  it so that PEFT's scale alpha / r stays ours.
`lora_dropout` is written as 0 when the adapter has `target_parameters`: PEFT's ParamWrapper
refuses any other value, and dropout acts in training only; the trained value is in
`desmoe_adapter.json`.

Written for the DeepSeek-V2 family (V2, V2-Lite; `FAMILIES`), whose transformers 5 module
paths are checked against PEFT by the test. Other families, DES-MoE's adaptive router
(lora.with_desmoe: the export folds it into a full router weight, which is no LoRA pair) and
expert copies get no adapter export; the report says why.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from desmoe_jax import distributed, lora, sources
from desmoe_jax.convert import write_safetensors, leaf_specs
from desmoe_jax.moe.block import RoutedExperts
from desmoe_jax.moe.routing import LinearRouter

FAMILIES = ("deepseek_v2",)   # model_type with a checked PEFT layout
PREFIX = "base_model.model."   # PeftModel's path to the transformers model
GATE_UP = r"mlp\.experts\.gate_up_proj"   # rank_pattern / alpha_pattern key of the fused pair
# lora.targets written as `target_parameters` (`<module>.weight`); the others (attention) are
# `target_modules`. See the module docstring for why the MLP linears are.
AS_PARAMETERS = ("router", "dense_mlp", "shared_experts")


def unsupported(model) -> str | None:
  """Why `model` gets no adapter export (None: it does)."""
  cfg = model.config
  if not lora.attached(model):
    return "no LoRA pairs"
  if cfg.model_type not in FAMILIES:
    return f"no checked PEFT layout for {cfg.model_type} (have: {', '.join(FAMILIES)})"
  moe = model.moe_blocks()
  if moe is not None and not isinstance(moe.gate, LinearRouter):
    return ("DES-MoE's adaptive router (lora.with_desmoe) is exported folded into a full "
            "router weight, which an adapter cannot hold")
  if moe is not None and moe.des is not None and moe.des.expert_copies is not None:
    return "duplicated experts are merged into full weights, which an adapter cannot hold"
  return None


def _module_of(hf_key: str, suffix: str) -> str:
  assert hf_key.endswith(suffix), (hf_key, suffix)
  return hf_key[:-len(suffix)]


def adapter_tensors(model):
  """([(key, array)], target_modules, target_parameters, rank, alpha) in PEFT's layout. Every
  factor is gathered to the host (a collective in a multi-process run: every process calls)."""
  specs = {s.path: s for s in leaf_specs(model)}
  tensors, modules, params = [], [], []
  rank = alpha = None

  def per_layer(path, leaf):
    """[(layer index or None, spec)] of a weight leaf (stacked MoE layers: one per layer)."""
    spec = specs[tuple(path) + (leaf,)]
    return [(j, spec) for j in range(spec.stack[0])] if spec.stack else [(None, spec)]

  def put(key, arr):
    tensors.append((PREFIX + key, np.ascontiguousarray(arr)))

  for path, module, target in lora.hosts(model):
    pair = getattr(module, "lora", None)
    if pair is None:
      continue
    if isinstance(module, RoutedExperts):
      g, u, d = (distributed.to_host((p.a[...], p.b[...]))
                 for p in (pair.gate_proj, pair.up_proj, pair.down_proj))
      r, scale = g[0].shape[-1], pair.gate_proj.scale
      for j, spec in per_layer(path, "gate_proj"):
        name = _module_of(spec.hf_key(j, 0), ".0.gate_proj.weight")   # ....mlp.experts
        (ag, bg), (au, bu), (ad, bd) = ((a[j], b[j]) for a, b in (g, u, d))
        e, dim, f = ag.shape[0], ag.shape[1], bg.shape[-1]
        a_gu = np.concatenate([ag.transpose(0, 2, 1), au.transpose(0, 2, 1)], axis=1)
        b_gu = np.zeros((e, 2 * f, 2 * r), bg.dtype)   # blockdiag(B_gate^T, B_up^T) per expert
        b_gu[:, :f, :r], b_gu[:, f:, r:] = bg.transpose(0, 2, 1), bu.transpose(0, 2, 1)
        put(f"{name}.base_layer.lora_A.weight", a_gu.reshape(e * 2 * r, dim))
        put(f"{name}.base_layer.lora_B.weight", b_gu.transpose(1, 2, 0).reshape(2 * f, 2 * r * e))
        put(f"{name}.lora_A.weight", ad.transpose(0, 2, 1).reshape(e * r, f))
        put(f"{name}.lora_B.weight", bd.transpose(2, 1, 0).reshape(dim, r * e))
        params += [f"{name}.gate_up_proj", f"{name}.down_proj"]
    else:
      a, b = distributed.to_host((pair.a[...], pair.b[...]))
      r, scale = a.shape[-1], pair.scale
      as_param = target in AS_PARAMETERS
      for j, spec in per_layer(path, "weight" if isinstance(module, LinearRouter) else "kernel"):
        key = spec.hf_key() if j is None else spec.hf_key(j)
        name = _module_of(key, ".weight")
        aj, bj = (a, b) if j is None else (a[j], b[j])
        put(f"{name}.lora_A.weight", aj.T)
        put(f"{name}.lora_B.weight", bj.T)
        (params if as_param else modules).append(key if as_param else name)
    if rank is not None and (r, scale) != (rank, alpha / rank):
      raise AssertionError(f"LoRA pairs of different rank or scale: {path}")
    rank, alpha = r, scale * r
  return tensors, modules, params, rank, alpha


def base_model_name(model_path: str | None) -> tuple[str | None, str | None]:
  """(base_model_name_or_path, revision) for adapter_config.json from config.model.path: a hub
  id `hf://owner/name@rev` is PEFT's `owner/name` at revision `rev`; a local path stays."""
  if model_path and model_path.startswith(sources.PREFIX):
    repo, revision, _ = sources.parse_hub_id(model_path, "model.path")
    return repo, revision
  return model_path or None, None


def save_adapter(model, path: str, *, base_model: str | None = None,
                 trained_dropout: float = 0.0) -> dict:
  """Writes `path` (adapter_config.json, adapter_model.safetensors, desmoe_adapter.json) for a
  model with LoRA pairs, before they are merged (`base_model`: config.model.path); returns the
  report, with `written` False and
  the reason where the model has no PEFT layout (`unsupported`). Every process calls it (the
  factors' gathers are collectives); process 0 writes."""
  why = unsupported(model)
  if why is not None:
    return {"written": False, "reason": why}
  tensors, modules, params, rank, alpha = adapter_tensors(model)
  expert_params = [p for p in params if p.endswith(("gate_up_proj", "down_proj"))]
  base_name, revision = base_model_name(base_model)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_name, "revision": revision,
      "r": int(rank), "lora_alpha": float(alpha),
      "lora_dropout": 0.0 if params else float(trained_dropout),
      "target_modules": sorted(modules), "target_parameters": sorted(params) or None,
      "rank_pattern": {GATE_UP: 2 * int(rank)} if expert_params else {},
      "alpha_pattern": {GATE_UP: 2 * float(alpha)} if expert_params else {},
      "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
      "use_dora": False, "modules_to_save": None, "inference_mode": True}
  report = {"written": True, "path": path, "format": "peft", "r": int(rank),
            "lora_alpha": float(alpha), "trained_lora_dropout": float(trained_dropout),
            "target_modules": len(modules), "target_parameters": len(params),
            "tensors": len(tensors)}
  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "adapter_model.safetensors"), tensors)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    with open(os.path.join(path, "desmoe_adapter.json"), "w") as f:
      json.dump(report, f, indent=2)
  return report
