r"""Evaluate a training run (its orbax checkpoint) or any HF DeepSeek-V2 directory.

  python eval.py --config=configs/six_domains.py:tiny --workdir=/tmp/desmoe_tiny
  python eval.py --config=configs/six_domains.py:tiny --workdir=/tmp/desmoe_tiny --hf=/tmp/desmoe_tiny/hf

Per domain: held-out loss / perplexity and the task metric (greedy generation with the KV
cache); general abilities: held-out text loss and a multiple-choice score, each against the base
model (config.model.path). Prints a table and writes <workdir>/eval/<name>/results.json.

A mistyped --workdir, a missing checkpoint or --hf directory, an invalid config or a tokenizer
that is not the run's is one `error:` line and exit 2, before any model is loaded; nothing is
created in a work directory that holds no run.
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from desmoe_jax import checkpoint, cli, evaluate, metrics

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
  checkpoint.quiet_orbax_tracebacks()
  results, out_dir = cli.run(
      evaluate.evaluate_run, _CONFIG.value, _WORKDIR.value, step=_STEP.value, hf_dir=_HF.value,
      with_generation=not _NO_GEN.value, with_base=not _NO_BASE.value)
  print(metrics.format_results(results))
  print(f"\nresults: {os.path.join(out_dir, 'results.json')}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
