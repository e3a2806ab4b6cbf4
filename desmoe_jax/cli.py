r"""The command lines: `desmoe-train` / `python train.py` and `desmoe-eval` / `python eval.py`.

`--config` takes a config file (`configs/six_domains.py:tiny`) or a preset name carried by the
installed package (`six_domains:tiny`), so the installed commands work from any folder;
`--config.<field>=<value>` overrides a field. `desmoe-eval --workdir=DIR` alone evaluates the run
with the config it saved there; `--config` replaces that config, and overrides change it.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from desmoe_jax import run_config

log = logging.getLogger("desmoe_jax")


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of `--name=V` / `--name V` in argv (last one wins), without parsing the rest."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def resolve_config_arg(argv: list[str]) -> list[str]:
  """argv with a preset name after --config (`six_domains:tiny`) replaced by its file."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + run_config.resolve_spec(arg.split("=", 1)[1])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = run_config.resolve_spec(out[i + 1])
  return out


def _quiet_logs():
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-file chatter
  logging.getLogger("desmoe_jax").setLevel(logging.INFO)


# ------------------------------------------------------------------ train


def train_main(argv: list[str] | None = None):
  """Train one DeepSeek-V2 MoE on several labelled domains with DES-MoE (or a baseline).

  All outputs go to --workdir (see desmoe_jax/trainer.py); rerunning the same command resumes
  from the newest checkpoint there. Multi-process: every process runs the same command (see
  desmoe_jax/distributed.py).
  """
  from desmoe_jax import distributed
  argv = resolve_config_arg(sys.argv if argv is None else argv)
  cfg = config_flags.DEFINE_config_file(
      "config", None, "Config file or preset, e.g. configs/six_domains.py:tiny or "
      "six_domains:tiny", lock_config=True, sys_argv=argv)
  workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
  mode = flags.DEFINE_enum(
      "distributed", "auto", distributed.MODES,
      "Start JAX's distributed runtime: auto (with the flags below, or in a Slurm / Open MPI / "
      "GKE TPU job), on (always, JAX detects the cluster: Cloud TPU pod slices), off.")
  coordinator = flags.DEFINE_string(
      "coordinator_address", None, "HOST:PORT of process 0, for a multi-process run JAX cannot "
      "detect (with --num_processes and --process_id).")
  num_processes = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
  process_id = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(rest):
    if len(rest) > 1:
      raise app.UsageError(f"unexpected arguments: {rest[1:]}")
    import jax
    from desmoe_jax import trainer
    _quiet_logs()
    # Before anything touches a device.
    distributed.initialize(coordinator.value, num_processes.value, process_id.value,
                           mode=mode.value)
    if jax.process_index() != 0:
      logging.getLogger("desmoe_jax").setLevel(logging.WARNING)  # process 0 tells the story
    summary = trainer.train(cfg.value, workdir.value)
    logging.info("done: %s", summary)

  app.run(main, argv=argv)


# ------------------------------------------------------------------ eval


def _flatten(config, prefix=""):
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def eval_main(argv: list[str] | None = None):
  """Evaluate a training run (its orbax checkpoint) or any HF DeepSeek-V2 directory.

  Per domain: held-out loss / perplexity and the task metric; general abilities against the
  base model (config.model.path); with `--config.eval.lm_eval_tasks`, lm-evaluation-harness
  tasks on both. Prints a table and writes <workdir>/eval/<name>/results.json.
  """
  argv = resolve_config_arg(sys.argv if argv is None else argv)
  workdir_arg, config_arg = _flag_value(argv, "workdir"), _flag_value(argv, "config")
  saved = None
  if workdir_arg and (os.path.isfile(os.path.join(workdir_arg, "config.json"))
                      or os.path.isdir(os.path.join(workdir_arg, "checkpoints"))):
    saved = run_config.saved_config(workdir_arg)
  if config_arg is None and saved is not None:
    cfg = config_flags.DEFINE_config_dict("config", saved, "The run's config (default: the one "
                                          "it saved in --workdir).", lock_config=True,
                                          sys_argv=argv)
  else:
    cfg = config_flags.DEFINE_config_file(
        "config", None, "Config file or preset (default: the config the run saved in "
        "--workdir).", lock_config=True, sys_argv=argv)
  workdir = flags.DEFINE_string("workdir", None, "The run's work directory.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  hf = flags.DEFINE_string("hf", None, "Evaluate this HF directory instead of the checkpoint.")
  no_gen = flags.DEFINE_bool("no_generation", False, "Only losses and general scores.")
  no_base = flags.DEFINE_bool("no_base", False, "Skip the base-model comparison.")
  flags.mark_flags_as_required(["workdir"])

  def main(rest):
    if len(rest) > 1:
      raise app.UsageError(f"unexpected arguments: {rest[1:]}")
    if cfg.value is None:
      raise app.UsageError(f"--workdir={workdir.value} holds no saved config (config.json or "
                           "a checkpoint): give --config")
    from desmoe_jax import evaluate, metrics
    _quiet_logs()
    if config_arg is not None and saved is not None:
      mine, theirs = _flatten(cfg.value), _flatten(saved)
      changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
      if changed:
        log.info("--config differs from the config saved in %s in: %s", workdir.value,
                 ", ".join(changed))
    results, out_dir = evaluate.evaluate_run(
        cfg.value, workdir.value, step=step.value, hf_dir=hf.value,
        with_generation=not no_gen.value, with_base=not no_base.value)
    print(metrics.format_results(results))
    print(f"\nresults: {os.path.join(out_dir, 'results.json')}")

  app.run(main, argv=argv)
