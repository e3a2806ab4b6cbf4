r"""Evaluate a training run (its orbax checkpoint) or any HF directory of a supported MoE family.

  python eval.py --workdir=/tmp/desmoe_tiny                 # the config the run saved there
  python eval.py --workdir=/tmp/desmoe_tiny --hf=/tmp/desmoe_tiny/hf
  python eval.py --workdir=/tmp/desmoe_tiny --config.eval.max_examples=8   # changes one field
  python eval.py --config=configs/six_domains.py:tiny --workdir=/tmp/desmoe_tiny  # another config

Per domain: held-out loss / perplexity and the task metric (greedy generation with the KV
cache); general abilities: held-out text loss and a multiple-choice score, each against the base
model (config.model.path); with --config.eval.lm_eval_tasks, lm-evaluation-harness tasks for
both. Prints a table and writes <workdir>/eval/<name>/results.json. The installed command
`desmoe-eval` is the same program.

A mistyped --workdir, a missing checkpoint or --hf directory, an invalid config or a tokenizer
that is not the run's is one `error:` line and exit 2, before any model is loaded; nothing is
created in a work directory that holds no run.
"""

from desmoe_jax.cli import eval_main

if __name__ == "__main__":
  eval_main()
