"""The config schema: what each field may hold (`Rule`: type, choices, range), declared where the
field is consumed. The frozen dataclasses of the library (OptimConfig, AlrConfig, DgesConfig,
ScheduleConfig, EsftConfig, StepConfig, RuntimeConfig) give each field's rule in its metadata
(`knob(default, rule)`), and validate.FIELDS reads them from there (`rules_of`): a choice list
or a range is written once. Fields no dataclass holds (train.*, data.*, eval.*, ...) have their
rules in validate.py.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one field may hold. `kind`: "int", "float", "bool", "str". `choices`: the allowed
  values (str fields). `lo`/`hi`: inclusive bounds unless `lo_open`/`hi_open`. `special`:
  values allowed outside the bounds, with their meaning (e.g. {-1: "the paper's value"})."""
  kind: str
  choices: tuple = ()
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  special: tuple = ()          # ((value, meaning), ...)
  nonempty: bool = False
  listed: bool = False         # str: a comma-separated, non-empty list of `choices`

  def problem(self, value: Any) -> str | None:
    """None if `value` is allowed, else what is wrong with it (without the field name)."""
    if self.kind == "bool":
      if not isinstance(value, bool):
        return f"must be True or False, not a {type(value).__name__}"
      return None
    if self.kind == "str":
      if not isinstance(value, str):
        return f"must be a string, not a {type(value).__name__}"
      if self.listed:
        items = value.split(",")
        bad = [i for i in items if i not in self.choices]
        if bad or len(set(items)) != len(items):
          return ("must be a comma-separated list of distinct names from "
                  + ", ".join(repr(c) for c in self.choices)
                  + (f" (not {', '.join(repr(b) for b in bad)})" if bad else ""))
        return None
      if self.choices and value not in self.choices:
        return "must be one of " + ", ".join(repr(c) for c in self.choices)
      if self.nonempty and not value:
        return "must not be empty"
      return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      return f"must be a number, not a {type(value).__name__}"
    if self.kind == "int" and not float(value).is_integer():
      return "must be a whole number"
    if any(value == v for v, _ in self.special):
      return None
    if isinstance(value, float) and not math.isfinite(value):
      return "must be finite"
    bad = ((self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)))
           or (self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi))))
    if bad:
      return "must be " + self._range() + "".join(f", or {v!r} ({m})" for v, m in self.special)
    return None

  def _range(self) -> str:
    if self.lo is not None and self.hi is not None:
      return (f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
              f"{')' if self.hi_open else ']'}")
    if self.lo is not None:
      return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
    return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"


@dataclasses.dataclass(frozen=True)
class Check:
  """A rule given by a function (value -> what is wrong, or None): for a field that takes more
  than one type (e.g. data.discover_domains: a number or "auto")."""
  check: Callable[[Any], str | None]
  choices: tuple = ()          # none listed: the function decides

  def problem(self, value: Any) -> str | None:
    return self.check(value)


def _num(x):
  return int(x) if float(x).is_integer() else x


def Int(lo=None, hi=None, **kw) -> Rule:  # noqa: N802 (reads as a type in the table)
  return Rule("int", lo=lo, hi=hi, **kw)


def Float(lo=None, hi=None, **kw) -> Rule:  # noqa: N802
  return Rule("float", lo=lo, hi=hi, **kw)


def OneOf(*choices) -> Rule:  # noqa: N802
  return Rule("str", choices=tuple(choices))


def SubsetOf(*choices) -> Rule:  # noqa: N802
  """A comma-separated list of distinct `choices`, at least one ("a,b")."""
  return Rule("str", choices=tuple(choices), listed=True)


BOOL = Rule("bool")
STR = Rule("str")
PATH = Rule("str")            # may be empty where the field says so (e.g. no eval file)
MESH_AXIS = Int(1, special=((-1, "all remaining devices"),))


def knob(default, rule: Rule, *, key: str | None = None):
  """A dataclass field with its config rule; `key`: its config path when it is not
  "<section>.<name>" (e.g. StepConfig.seed is the top-level `seed`)."""
  metadata = {"rule": rule} if key is None else {"rule": rule, "key": key}
  return dataclasses.field(default=default, metadata=metadata)


def rules_of(cls, section: str) -> dict[str, Rule]:
  """{"section.field": Rule} of the fields of dataclass `cls` that declare one."""
  out = {}
  for f in dataclasses.fields(cls):
    if "rule" in f.metadata:
      out[f.metadata.get("key") or f"{section}.{f.name}"] = f.metadata["rule"]
  return out
