"""Where the bundled data (`data/`) and models (`assets/`) are, and the `hf://` rule for paths.

`data/` and `assets/` live in the source tree, next to the `desmoe_jax` package. They are not
copied into a wheel: the presets find them in a checkout (`pip install -e .` from a clone, the
supported install) from any working directory. Set `DESMOE_JAX_HOME` to a checkout to use another
copy.
"""

from __future__ import annotations

import os

PACKAGE = os.path.dirname(os.path.abspath(__file__))


def home() -> str:
  """The checkout holding `data/` and `assets/` (DESMOE_JAX_HOME, else the package's parent)."""
  return os.environ.get("DESMOE_JAX_HOME") or os.path.dirname(PACKAGE)


def bundled(*parts: str) -> str:
  """Absolute path of a bundled file, e.g. bundled("data", "math", "train.jsonl")."""
  return os.path.join(home(), *parts)


def missing_bundle_hint(path: str) -> str:
  """Extra words for a missing path that should have been bundled."""
  if not os.path.abspath(path).startswith(home() + os.sep) or os.path.isdir(bundled("data")):
    return ""
  return (f" (the bundled data/ and assets/ are not in {home()}: they ship with the source "
          "tree, so install from a clone with `pip install -e .`, or set DESMOE_JAX_HOME to a "
          "checkout)")
