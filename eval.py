r"""Evaluate a training run (its orbax checkpoint) or any HF DeepSeek-V2 directory.

  python eval.py --config=configs/six_domains.py:tiny --workdir=/tmp/desmoe_tiny
  python eval.py --config=configs/six_domains.py:tiny --workdir=/tmp/desmoe_tiny --hf=/tmp/desmoe_tiny/hf

Per domain: held-out loss / perplexity and the task metric (greedy generation with the KV
cache); general abilities: held-out text loss and a multiple-choice score, each against the base
model (config.model.path). Prints a table and writes <workdir>/eval/<name>/results.json.
"""

import json
import logging
import os

import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from desmoe_jax import evaluate, metrics

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's work directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_HF = flags.DEFINE_string("hf", None, "Evaluate this HF directory instead of the checkpoint.")
_NO_GEN = flags.DEFINE_bool("no_generation", False, "Only losses and general scores.")
_NO_BASE = flags.DEFINE_bool("no_base", False, "Skip the base-model comparison.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("desmoe_jax").setLevel(logging.INFO)
  config = _CONFIG.value
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(_HF.value or config.model.path)
  if _HF.value:
    model, name = evaluate.load_model(_HF.value, config), "hf"
  else:
    model, meta = evaluate.load_run_model(config, _WORKDIR.value, _STEP.value)
    name = f"step{meta['step']}"
  base = None if _NO_BASE.value else evaluate.load_model(config.model.path, config)
  out_dir = os.path.join(_WORKDIR.value, "eval", name)
  os.makedirs(out_dir, exist_ok=True)
  results = evaluate.evaluate_model(model, tokenizer, config, base_model=base,
                                    with_generation=not _NO_GEN.value, out_dir=out_dir)
  print(metrics.format_results(results))
  print(f"\nresults: {os.path.join(out_dir, 'results.json')}")


if __name__ == "__main__":
  app.run(main)
