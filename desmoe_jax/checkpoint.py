"""Orbax checkpoints of a whole training run: model state (parameters AND DES-MoE state:
correlation matrices, masks, router teachers, copy tables), optimizer state, and a JSON record
(step, phase, data-iterator position, RNG, config, shapes).

Saves are asynchronous, keep the newest `max_to_keep`, and are atomic (orbax writes to a
temporary directory and renames it on commit): a run killed mid-save leaves the previous
checkpoint as the latest one. Restoring takes abstract targets carrying the *current* mesh's
shardings, so a checkpoint written on one mesh restores onto another. Before any array is read,
the stored shapes are compared with what the current config builds, and a mismatch names every
offending key with both shapes instead of failing deep inside orbax.

A failed save (disk full, read-only or vanished directory) is raised as `errors.SaveFailed`, one
message naming the checkpoint path, the cause and the last committed checkpoint, as soon as it is
known: at the call for the synchronous part of a save, and for the background part at the next
`poll()` (the trainer polls after every step) or `wait()`. orbax itself only logs a background
failure (with a traceback per worker thread) and would let training run on. `all_finite` is the
one reduction the trainer runs before each save, so that a non-finite state is never saved.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from desmoe_jax.errors import ConfigError, SaveFailed

MODEL, OPT, META = "model", "opt_state", "meta"


def signature(tree) -> dict[str, list]:
  """{"path/to/leaf": [shape, dtype]} of a pytree of arrays or ShapeDtypeStructs."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
    key = key[:-len("/value")] if key.endswith("/value") else key  # nnx.Variable's own node
    out[key] = [list(leaf.shape), str(leaf.dtype)]
  return out


def diff_signatures(stored: dict, current: dict, what: str) -> list[str]:
  problems = []
  for key in sorted(set(stored) | set(current)):
    if key not in current:
      problems.append(f"{what} '{key}' {stored[key][0]} is in the checkpoint but not in the "
                      "model the config builds")
    elif key not in stored:
      problems.append(f"{what} '{key}' {current[key][0]} is built by the config but missing "
                      "from the checkpoint")
    elif stored[key] != current[key]:
      problems.append(f"{what} '{key}': checkpoint has shape {stored[key][0]} {stored[key][1]}, "
                      f"the config builds {current[key][0]} {current[key][1]}")
  return problems


class Checkpointer:
  """Thin, explicit wrapper of `ocp.CheckpointManager` for (model_state, opt_state, meta).

  `read_only=True` (evaluation): nothing is created, deleted or written, and a directory that
  does not exist is a `ConfigError` (a mistyped --workdir), not an empty run.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only and not os.path.isdir(self.directory):
      raise ConfigError(f"no checkpoints: {self.directory} does not exist (is --workdir the "
                        "run's work directory?)")
    if not read_only and os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise ConfigError(f"{self.directory} is a file; the checkpoint directory must be a "
                        "directory")
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             enable_async_checkpointing=False,
                                             cleanup_tmp_directories=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=(MODEL, OPT, META))
    except OSError as e:
      raise SaveFailed(f"cannot use checkpoint directory {self.directory}: {e}") from e
    self._pending: int | None = None          # step of the save started last, not yet checked
    self._last_committed = self.latest_step()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  @property
  def last_committed(self) -> int | None:
    """The newest step known to be fully written (a save still running does not count)."""
    return self._last_committed

  def describe_last_good(self) -> str:
    """'checkpoint 4 in DIR' / 'no checkpoint yet in DIR', for error messages."""
    if self._last_committed is None:
      return f"no checkpoint has been committed yet in {self.directory}"
    return f"the last good checkpoint is {self.path(self._last_committed)}"

  def save(self, step: int, model_state, opt_state, meta: dict[str, Any]) -> bool:
    """Starts an (async) save; the JSON record gets the trees' signatures for later checks.
    A previous save still running is finished (and checked) first."""
    self.wait()
    meta = dict(meta, step=int(step), signature={MODEL: signature(model_state),
                                                  OPT: signature(opt_state)})
    try:
      started = self._manager.save(int(step), args=ocp.args.Composite(**{
          MODEL: ocp.args.StandardSave(model_state),
          OPT: ocp.args.StandardSave(opt_state),
          META: ocp.args.JsonSave(meta)}), force=True)
    except Exception as e:  # noqa: BLE001 (any failure to write is reported the same way)
      raise self._failed(step, e) from e
    if started:
      self._pending = int(step)
    return started

  def poll(self):
    """Raises `SaveFailed` if the save started last has failed; cheap, call it every step."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._finish_pending()

  def _finish_pending(self):
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      _join_orbax_threads()
      raise self._failed(step, e) from e
    # orbax's finalize thread logs some failures instead of raising them: the step must exist.
    if step not in self._manager.all_steps():
      raise self._failed(step, "it was not committed (see the orbax errors above)")
    self._last_committed = step

  def _failed(self, step: int, cause) -> SaveFailed:
    cause = _reason(cause) if isinstance(cause, BaseException) else cause
    return SaveFailed(f"saving checkpoint {self.path(step)} failed ({cause}); "
                      f"{self.describe_last_good()}. Free space or fix the directory's "
                      "permissions, then rerun the same command to resume from it.")

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

  def restore(self, abstract_model_state, abstract_opt_state=None, step: int | None = None):
    """(model_state, opt_state or None, meta) at `step` (default: latest), laid out like the
    abstract targets (ShapeDtypeStructs with shardings: `abstract_like(tree, shardings)`)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise ConfigError(f"no checkpoint of step {step} in {self.directory} (there are: "
                        f"{', '.join(map(str, self.all_steps())) or 'none'})")
    meta = self.read_meta(step)
    stored = meta.get("signature", {})
    problems = diff_signatures(stored.get(MODEL, {}), signature(abstract_model_state), "model")
    if abstract_opt_state is not None:
      problems += diff_signatures(stored.get(OPT, {}), signature(abstract_opt_state),
                                  "optimizer state")
    if problems:
      raise ValueError(f"checkpoint {self.directory}/{step} does not match the current config:\n"
                       "  - " + "\n  - ".join(problems[:20])
                       + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    items = {MODEL: ocp.args.StandardRestore(abstract_model_state)}
    if abstract_opt_state is not None:
      items[OPT] = ocp.args.StandardRestore(abstract_opt_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[MODEL], restored.get(OPT) if abstract_opt_state is not None else None, meta

  def reached_preemption(self, step: int) -> bool:
    """orbax's multi-process preemption sync point (see preemption.py)."""
    return self._manager.reached_preemption(step)

  def wait(self):
    """Blocks until the pending async save is committed; `SaveFailed` if it was not."""
    if self._pending is not None:
      self._finish_pending()
    else:
      self._manager.wait_until_finished()

  def close(self):
    """Waits for the pending save (raising `SaveFailed` if it failed) and releases orbax's
    threads; the manager is closed even when the save failed."""
    try:
      self.wait()
    finally:
      self._manager.close()


def _join_orbax_threads(timeout: float = 120.0):
  """After a failed save, orbax's other worker threads of that save are still running; left
  alone they fail again at interpreter shutdown ("cannot schedule new futures", "Event loop is
  closed" tracebacks). Wait for them so that the run ends on the one-line error."""
  try:
    from orbax.checkpoint._src.futures.future import _SignalingThread
  except ImportError:   # another orbax layout: nothing to wait for by name
    return
  deadline = time.monotonic() + timeout
  for thread in threading.enumerate():
    if isinstance(thread, _SignalingThread) and thread is not threading.current_thread():
      try:
        thread.join(max(0.0, deadline - time.monotonic()))
      except Exception:  # noqa: BLE001 (orbax re-raises the thread's error: already reported)
        pass


def _reason(error: BaseException) -> str:
  """The cause of a failed write, short: the innermost OSError of the chain, else the OS
  error's text inside the message (tensorstore reports a full disk as a ValueError whose
  message ends in it, after several long paths), else the message's start."""
  seen, e = [], error
  while e is not None and e not in seen:
    seen.append(e)
    if isinstance(e, OSError) and e.strerror:
      return f"OSError: [Errno {e.errno}] {e.strerror}"
    e = e.__cause__ or e.__context__
  text = " ".join(str(error).split())
  for code in sorted(errno.errorcode):
    reason = os.strerror(code)
    if reason and reason in text:
      return f"{type(error).__name__}: {reason} ({text[:200]}{'...' if len(text) > 200 else ''})"
  return f"{type(error).__name__}: {text[:400]}{'...' if len(text) > 400 else ''}"


def all_finite(tree) -> jax.Array:
  """One boolean scalar: every floating leaf of `tree` is free of NaN and inf. Jit it (with a
  replicated output sharding on a multi-process mesh) to reduce everything in one program."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def nonfinite_leaves(tree) -> dict[str, jax.Array]:
  """{"path/to/leaf": finite?} for every floating leaf: the slow path that names the culprits."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact):
      key = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p))))
                     for p in path)
      out[key[:-len("/value")] if key.endswith("/value") else key] = jnp.all(jnp.isfinite(x))
  return out


class _NoOrbaxTracebacks(logging.Filter):
  """orbax logs a background save failure once per worker thread, each with a traceback (a
  full disk gave 1,469 lines). Keep each record's one-line message; `SaveFailed` carries the
  cause."""

  def filter(self, record):
    if record.exc_info and ("orbax" in (record.pathname or "") or _raised_in_orbax(record)):
      record.exc_info, record.exc_text = None, None
    return True


def _raised_in_orbax(record) -> bool:
  """asyncio's "Task exception was never retrieved" for a task of orbax's background save (the
  same failure, logged again by the event loop, with its traceback)."""
  tb = record.exc_info[2] if record.exc_info else None
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _closed_loop_callback(unraisable) -> bool:
  """tensorstore completing a write of a failed save after orbax closed that save's event loop:
  'Event loop is closed' from asyncio's call_soon_threadsafe, reported as an unraisable
  exception, dozens of times per failed save (one per pending chunk). Nothing is lost."""
  tb = unraisable.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
          and tb is not None and "asyncio" in tb.tb_frame.f_code.co_filename)


def quiet_orbax_tracebacks():
  """For entry points (train.py, eval.py): orbax's background-failure records lose their
  tracebacks (filter above), and the closed-event-loop leftovers of a failed save are dropped;
  every other unraisable exception still goes to the previous hook. Idempotent."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _NoOrbaxTracebacks) for f in logger.filters):
      logger.addFilter(_NoOrbaxTracebacks())
  previous = sys.unraisablehook
  if getattr(previous, "_desmoe_quiet", False):
    return

  def hook(unraisable):
    if not _closed_loop_callback(unraisable):
      previous(unraisable)

  hook._desmoe_quiet = True
  sys.unraisablehook = hook


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs of `tree` (arrays or structs), with `shardings` (same structure) if given."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
