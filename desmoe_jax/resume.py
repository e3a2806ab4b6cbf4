"""What a resumed run must agree on with the checkpoint it continues: the config, and the
tokenizer.

Rerunning `train.py` in a work directory with checkpoints continues the run. If the config
changed in between (more steps, another batch size or learning rate, another method or
schedule, other training data, another model), the continuation would silently be a different
run than the one its first half belongs to: every later number would mix two experiments.
`config_changes` lists the differences; `run_altering` keeps those that change what is computed
(everything except the fields in `FREE_TO_CHANGE`: logging / evaluation / checkpoint cadence,
evaluation and export settings, the mesh, and how, not what, the model computes). The trainer
refuses those unless `--allow_config_change` is given, and always prints all differences.

The tokenizer decides what every token id means, so a different one (vocabulary, merges,
special tokens, chat template) under the same vocabulary size is a silent corruption.
`tokenizer_fingerprint` hashes what decides tokenization and is stored in each checkpoint's
record, compared on resume and by evaluation.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

# Fields (exact dotted names, or prefixes ending in ".") a resumed run may change freely.
FREE_TO_CHANGE = (
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.async_checkpoint", "train.heatmap_layers", "train.nan_check",
    "eval.", "export.", "mesh.",
    # The model's directory may move; its arrays' shapes and its tokenizer are still checked.
    "model.path",
    # How the model is computed, not what: same math, other kernels or memory trade-offs.
    "model.moe_impl", "model.attention_impl", "model.remat", "model.expert_parallel",
    "model.ce_chunk", "train.microbatches", "optim.host_offload",
    # Evaluation-only data.
    "data.general", "data.general_mc", "data.domains[].eval", "data.domains[].metric",
)
# Not free, deliberately: alr.mix, alr.alpha, optim.decay_exclude and
# optim.per_expert_bias_correction change the updates (alr.mix=update and the per-expert count
# also change the optimizer state's structure, which a checkpoint restores into).


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"train.steps": 8, "data.domains[0].train": "...", ...} of a JSON-like config."""
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}{k}."))
  elif isinstance(tree, (list, tuple)) and tree and all(isinstance(v, dict) for v in tree):
    for i, v in enumerate(tree):
      out.update(flatten(v, f"{prefix[:-1]}[{i}]."))
  else:
    out[prefix[:-1]] = list(tree) if isinstance(tree, tuple) else tree
  return out


def config_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """[(field, saved value, current value)] for every field whose value differs. A field only
  one side has (a config written by another version) is not a change."""
  a, b = flatten(saved), flatten(current)
  return [(k, a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def is_free(field: str) -> bool:
  generic = re.sub(r"\[\d+\]", "[]", field)
  return any(generic == f or (f.endswith(".") and generic.startswith(f)) for f in FREE_TO_CHANGE)


def run_altering(changes):
  return [c for c in changes if not is_free(c[0])]


def describe(changes) -> list[str]:
  return [f"{field}: {old!r} -> {new!r}" for field, old, new in changes]


# ------------------------------------------------------------------ tokenizer

# Runtime state of a fast tokenizer's backend, set by calls such as tokenizer(..., truncation=)
_RUNTIME_KEYS = ("truncation", "padding")


def tokenizer_fingerprint(tokenizer) -> str:
  """sha256 of what decides the token ids: the backend tokenizer's whole definition (vocab,
  merges, normalizer, pre-tokenizer, added tokens) for a fast tokenizer, else the vocabulary;
  plus the special tokens and the chat template."""
  h = hashlib.sha256()
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    definition = json.loads(backend.to_str())
    for key in _RUNTIME_KEYS:
      definition.pop(key, None)
  else:
    definition = sorted(tokenizer.get_vocab().items())
  h.update(json.dumps(definition, sort_keys=True, ensure_ascii=False).encode())
  extra = {
      "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
      "added_tokens": sorted((int(i), str(t)) for i, t in
                             getattr(tokenizer, "added_tokens_decoder", {}).items()),
      "chat_template": getattr(tokenizer, "chat_template", None),
      "bos_eos_pad": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
  }
  h.update(json.dumps(extra, sort_keys=True, default=str, ensure_ascii=False).encode())
  return "sha256:" + h.hexdigest()
