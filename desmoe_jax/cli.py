"""The command lines: `desmoe-train` / `python train.py` and `desmoe-eval` / `python eval.py`, and
what they share about failing: the user's mistakes are one line each and a documented exit code
(errors.py), bugs keep their traceback.

* `train_main`, `eval_main`: `--config` takes a config file (`configs/six_domains.py:tiny`) or a
  preset name carried by the installed package (`six_domains:tiny`), so the installed commands
  work from any folder; `--config.<field>=<value>` overrides a field. `desmoe-eval --workdir=DIR`
  alone evaluates the run with the config it saved there; `--config` replaces that config, and
  overrides change it.

* `parse_flags` (app.run's `flags_parser`): a bad flag, config file, preset or override
  (`--config.train.stepz=3`, `--config.train.steps=abc`, `--config=...:tinyy`) is one
  `error:` line and exit 2, instead of absl's "FATAL Flags parsing error" with a traceback
  embedded in it (or, for a misspelt override, a raw AttributeError traceback).
* `run`: calls the entry point and turns a `UserError` into its lines and its exit code.
"""

from __future__ import annotations

import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from desmoe_jax import run_config
from desmoe_jax.errors import Preempted, UserError

log = logging.getLogger("desmoe_jax")


def _clean(text: str) -> str:
  """The useful last line of an exception text that may embed a traceback."""
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  for line in reversed(lines):
    m = re.match(r"^(?:[\w.]+(?:Error|Exception)): (.*)$", line)
    if m:
      return m.group(1)
  return " ".join(lines)


def parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = _clean(e)
  except (AttributeError, KeyError) as e:   # ml_collections: an override of a missing field
    while e.args and isinstance(e.args[0], BaseException):   # KeyError in AttributeError
      e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    field, _, hint = text.partition("\n")
    message = f"--config.*: no config field {field.strip(chr(39))!r}" + (
        f" ({hint.strip()})" if hint.strip() else "")
  except (TypeError, ValueError) as e:      # ml_collections: an override of the wrong type
    message = _clean(e)
  print(f"error: {message}", file=sys.stderr)
  print("(pass --helpfull to see every flag)", file=sys.stderr)
  sys.exit(2)


def report(error: UserError) -> int:
  """Prints `error` (first line prefixed with 'error:', the rest indented); returns its code."""
  lines = [l for l in str(error).splitlines() if l.strip()] or [type(error).__name__]
  prefix = "" if isinstance(error, Preempted) else "error: "
  print(prefix + lines[0], file=sys.stderr)
  for line in lines[1:]:
    print("  " + line.strip(), file=sys.stderr)
  return error.exit_code


def run(fn, *args, **kwargs):
  """fn(*args, **kwargs); a `UserError` becomes its message and `sys.exit(exit_code)`."""
  try:
    return fn(*args, **kwargs)
  except UserError as e:
    sys.stderr.flush()
    sys.exit(report(e))


# ------------------------------------------------------------------ the commands


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
  from desmoe_jax import checkpoint
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-file chatter
  logging.getLogger("desmoe_jax").setLevel(logging.INFO)
  checkpoint.quiet_orbax_tracebacks()


def _resolved_argv(argv):
  """argv with preset names resolved; an unknown preset is one `error:` line and exit 2."""
  try:
    return resolve_config_arg(sys.argv if argv is None else argv)
  except ValueError as e:
    print(f"error: --config: {e}", file=sys.stderr)
    sys.exit(2)


# ------------------------------------------------------------------ train


def train_main(argv: list[str] | None = None):
  """Train one pretrained MoE (any of the six families) on several labelled domains with
  DES-MoE (or a baseline).

  All outputs go to --workdir (see desmoe_jax/trainer.py); rerunning the same command resumes
  from the newest checkpoint there. Multi-process: every process runs the same command (see
  desmoe_jax/distributed.py).
  """
  from desmoe_jax import distributed
  argv = _resolved_argv(argv)
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
  allow_change = flags.DEFINE_bool(
      "allow_config_change", False, "Resume even though the config changes the run (steps, "
      "batch, learning rate, method, schedule, data, model); the differences are printed.")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(rest):
    if len(rest) > 1:
      raise app.UsageError(f"unexpected arguments: {rest[1:]}")
    import jax
    from desmoe_jax import trainer
    _quiet_logs()
    # Before anything touches a device.
    run(distributed.initialize, coordinator.value, num_processes.value, process_id.value,
        mode=mode.value)
    if jax.process_index() != 0:
      logging.getLogger("desmoe_jax").setLevel(logging.WARNING)  # process 0 tells the story
    summary = run(trainer.train, cfg.value, workdir.value,
                  allow_config_change=allow_change.value)
    logging.info("done: %s", summary)

  app.run(main, argv=argv, flags_parser=parse_flags)


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
  """Evaluate a training run (its orbax checkpoint) or any HF directory of a supported MoE
  family.

  Per domain: held-out loss / perplexity and the task metric; general abilities against the
  base model (config.model.path); with `--config.eval.lm_eval_tasks`, lm-evaluation-harness
  tasks on both. Prints a table and writes <workdir>/eval/<name>/results.json.
  """
  argv = _resolved_argv(argv)
  workdir_arg, config_arg = _flag_value(argv, "workdir"), _flag_value(argv, "config")
  saved = None
  if workdir_arg and (os.path.isfile(os.path.join(workdir_arg, "config.json"))
                      or os.path.isdir(os.path.join(workdir_arg, "checkpoints"))):
    try:
      saved = run_config.saved_config(workdir_arg)
    except (OSError, ValueError) as e:
      print(f"error: --workdir={workdir_arg}: saved config unreadable: {e}", file=sys.stderr)
      sys.exit(2)
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
      where = workdir.value if os.path.isdir(workdir.value) else f"{workdir.value!r} (absent)"
      print(f"error: --workdir={where} holds no saved config (config.json or checkpoints/): "
            "give --config", file=sys.stderr)
      sys.exit(2)
    from desmoe_jax import evaluate, metrics
    _quiet_logs()
    if config_arg is not None and saved is not None:
      mine, theirs = _flatten(cfg.value), _flatten(saved)
      changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
      if changed:
        log.info("--config differs from the config saved in %s in: %s", workdir.value,
                 ", ".join(changed))
    results, out_dir = run(
        evaluate.evaluate_run, cfg.value, workdir.value, step=step.value, hf_dir=hf.value,
        with_generation=not no_gen.value, with_base=not no_base.value)
    print(metrics.format_results(results))
    print(f"\nresults: {os.path.join(out_dir, 'results.json')}")

  app.run(main, argv=argv, flags_parser=parse_flags)
