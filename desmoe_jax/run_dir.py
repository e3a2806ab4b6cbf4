"""A run's work directory: opened and checked against the run it already holds (a resume must
agree on the config and the tokenizer), the code that ran (provenance, recorded in every
checkpoint), and another run's model state to start from (`train.init_from`)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from desmoe_jax import checkpoint as ckpt_lib
from desmoe_jax import data as data_lib
from desmoe_jax import resume as resume_lib
from desmoe_jax.errors import ConfigError

log = logging.getLogger("desmoe_jax")


def provenance() -> dict:
  """The code that ran: git commit of the checkout (if any) and the versions of the packages
  that decide the numbers, recorded in every checkpoint."""
  import importlib.metadata
  import platform
  import subprocess
  out: dict[str, Any] = {"python": platform.python_version(), "git_commit": None,
                         "git_dirty": None}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if os.path.exists(os.path.join(repo, ".git")):
    try:
      out["git_commit"] = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True,
                                         capture_output=True, text=True).stdout.strip()
      out["git_dirty"] = bool(subprocess.run(
          ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"], check=True,
          capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
      pass
  versions = {}
  for dist in ("desmoe-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
               "transformers", "numpy", "ml-dtypes"):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  out["versions"] = versions
  return out


def init_from(path: str, abstract_model_state):
  """Model state (parameters and DES-MoE state) of another run's newest checkpoint. `path`: a
  work directory, or its `checkpoints/` directory."""
  directory = os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    directory = path
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"config.train.init_from={path!r} does not exist")
  checkpoints = ckpt_lib.Checkpointer(directory)
  if checkpoints.latest_step() is None:
    raise FileNotFoundError(f"config.train.init_from={path!r}: no checkpoint in {directory}")
  try:
    state, _, meta = checkpoints.restore(abstract_model_state)
  except ValueError as e:
    raise ValueError(f"config.train.init_from={path!r}: {e}") from None
  return state, meta


def open_run(config, workdir: str, allow_config_change: bool, saved_config=None):
  """Work directory, checkpoints and tokenizer, checked against an existing run before any
  model is loaded. Returns (checkpointer, tokenizer, fingerprint, latest meta or None)."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir!r}: cannot create it ({e})") from e
  checkpoints = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      max_to_keep=config.train.keep_checkpoints,
                                      async_save=config.train.async_checkpoint)
  try:
    tokenizer, fingerprint, meta = check_resume(config, checkpoints, allow_config_change,
                                                 saved_config)
  except BaseException:
    checkpoints.close()
    raise
  return checkpoints, tokenizer, fingerprint, meta


def check_resume(config, checkpoints, allow_config_change: bool, saved_config=None):
  """`config` has local paths; `saved_config` (default `config`) is what the run records, with
  its hub ids, and what a resume is compared with."""
  tokenizer = data_lib.load_tokenizer(config.model.path)
  fingerprint = resume_lib.tokenizer_fingerprint(tokenizer)
  meta = None
  if checkpoints.latest_step() is not None:
    meta = checkpoints.read_meta()
    where = checkpoints.path(checkpoints.latest_step())
    if meta.get("method") != config.method and not allow_config_change:
      raise ConfigError(f"{where} holds a {meta.get('method')!r} run; config.method="
                        f"{config.method!r} (another --workdir starts a new run)")
    changes = resume_lib.config_changes(
        meta.get("config", {}), json.loads((saved_config or config).to_json_best_effort()))
    for line in resume_lib.describe(changes):
      log.info("config changed since %s: %s", where, line)
    altering = resume_lib.run_altering(changes)
    if altering and not allow_config_change:
      raise ConfigError(
          f"resuming {where} with a config that changes the run "
          f"({len(altering)} field{'s' if len(altering) > 1 else ''}); rerun with "
          "--allow_config_change to accept, or use another --workdir:\n"
          + "\n".join(resume_lib.describe(altering)))
    stored = meta.get("tokenizer")
    if stored is not None and stored != fingerprint:
      raise ConfigError(f"the tokenizer in model.path={config.model.path!r} is not the one "
                        f"{where} was trained with (fingerprint {fingerprint[:19]} vs "
                        f"{stored[:19]}: vocabulary, merges, special tokens or chat template "
                        "differ)")
  return tokenizer, fingerprint, meta
