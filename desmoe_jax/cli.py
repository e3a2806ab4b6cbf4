"""What `train.py` and `eval.py` share about failing: the user's mistakes are one line each and a
documented exit code (errors.py), bugs keep their traceback.

* `parse_flags` (app.run's `flags_parser`): a bad flag, config file, preset or override
  (`--config.train.stepz=3`, `--config.train.steps=abc`, `--config=...:tinyy`) is one
  `error:` line and exit 2, instead of absl's "FATAL Flags parsing error" with a traceback
  embedded in it (or, for a misspelt override, a raw AttributeError traceback).
* `run`: calls the entry point and turns a `UserError` into its lines and its exit code.
"""

from __future__ import annotations

import re
import sys

from absl import flags

from desmoe_jax.errors import Preempted, UserError


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
