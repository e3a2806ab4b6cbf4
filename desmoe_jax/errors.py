"""The project's own errors: problems with what the user gave (a setting, a path, a run
directory) or with the run's environment (a full disk, a preemption), as opposed to bugs.

`train.py` and `eval.py` print a `UserError` as one line, `error: <message>`, and exit with its
`exit_code`; anything else keeps its traceback, because a traceback is what a bug report needs.
Exit codes, so that a job scheduler can tell outcomes apart (requeue a preempted run, never a
misconfigured one):

  0   finished
  2   ConfigError: a setting, flag, path or run directory is wrong; nothing was trained
      (DataError, DataFileMissing: a data file that cannot be used, likewise)
  3   TrainingDiverged: non-finite loss or state; the last finite checkpoint is intact
  4   SaveFailed: writing a checkpoint failed (disk full, read-only); the last good one is intact
  75  Preempted: SIGTERM/SIGINT (or the cluster's preemption notice) arrived; a checkpoint of the
      current step was written, and rerunning the same command resumes from it
      (75 is EX_TEMPFAIL of sysexits.h: "try again later")

Each class also derives from the builtin its callers used to catch (ValueError, RuntimeError,
OSError), so code written against the builtins keeps working.
"""

from __future__ import annotations


class UserError(Exception):
  """Something the user can fix; printed as one line, no traceback."""
  exit_code = 2


class ConfigError(UserError, ValueError):
  """A config field, command-line flag, path or run directory that cannot be used; the message
  names the field (e.g. `train.log_every=0: must be >= 1`)."""
  exit_code = 2


class DataError(UserError, ValueError):
  """A data file (or dataset) that cannot be used: missing, empty, undecodable, or with more
  bad rows than data.max_bad_fraction allows; the message names the file (and line)."""
  exit_code = 2


class DataFileMissing(UserError, FileNotFoundError):
  """A data path that names no file; the message names the domain and the path."""
  exit_code = 2


class TrainingDiverged(UserError, RuntimeError):
  """A non-finite loss, parameter, optimizer state or gradient norm; the message names the last
  checkpoint whose state is finite."""
  exit_code = 3


class SaveFailed(UserError, OSError):
  """A checkpoint could not be written; the message names the path, the cause and the last
  checkpoint that was committed."""
  exit_code = 4


class Preempted(UserError):
  """The run stopped on a preemption notice after committing a checkpoint of its current step."""
  exit_code = 75

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step

