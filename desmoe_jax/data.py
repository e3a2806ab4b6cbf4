"""Multi-domain training data: labelled examples -> packed, domain-tagged, resumable batches.

A domain is a file (JSONL / JSON / parquet) or a dataset directory (e.g. a hub dataset fetched
by `sources.py` from `hf://owner/name`; its `split` is read) of chat messages or prompt/response
rows; the column names are the spec's `messages_field`, `prompt_field`, `response_field`. Examples are rendered with the tokenizer's chat template
(loss only on assistant tokens), then packed into rows of `seq_len` tokens:

  tokens      [B, S] int32  packed examples, padding 0
  loss_mask   [B, S] int32  1 where tokens[t] is a TARGET (predicted from tokens[:t]): response
                            tokens only, never the first token of an example, never padding
  domain_id   [B, S] int32  the domain of the example each token belongs to (padding 0)
  segment_ids [B, S] int32  1, 2, 3... per example in the row, 0 = padding
  positions   [B, S] int32  restart at 0 in every example

so attention (causal & same segment) and the loss never cross examples. Which domain the next
example comes from is drawn with probability proportional to the domains' weights; each domain
is reshuffled every epoch. Everything is a function of the seed, and `state()` / `restore()`
capture the exact position, so a resumed run sees exactly the batches an uninterrupted one would.

Bad rows (a line that is not UTF-8, invalid JSON, missing or mistyped fields, empty response,
longer than seq_len) are counted and named by file and line in one warning per file, and kept in
`report`. Files are decoded line by line, so one bad byte costs its line, not the file. A domain
with more broken rows (over-long ones aside) than `max_bad_fraction` (config
`data.max_bad_fraction`, default 0.1) of those read is an error before training starts: a file
that is mostly broken is the wrong file or a broken export, and training on its few good rows
at the domain's full weight would skew the mixture silently. Held-out (eval) rows are
validated one by one too, and by default none may be bad: they define the score, and a dropped
row changes its denominator.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import warnings

import numpy as np

from desmoe_jax.errors import DataError, DataFileMissing

FORMATS = ("auto", "messages", "prompt_response")


@dataclasses.dataclass(frozen=True)
class DomainSpec:
  name: str
  path: str
  format: str = "auto"            # "messages" | "prompt_response" | "auto" (detect per row)
  weight: float = 1.0             # mixing weight (probability proportional to it)
  prompt_field: str = "prompt"
  response_field: str = "response"
  messages_field: str = "messages"
  split: str = "train"            # for a dataset directory (e.g. a fetched hub dataset)
  max_examples: int = 0           # 0: all rows
  max_bad_fraction: float = 0.1   # more bad rows than this fraction of those read: an error

  def __post_init__(self):
    if self.format not in FORMATS:
      raise DataError(f"domain {self.name!r}: format={self.format!r}, expected one of {FORMATS}")
    if not self.weight > 0:
      raise DataError(f"domain {self.name!r}: weight={self.weight} must be > 0")
    if isinstance(self.max_bad_fraction, bool) or \
        not isinstance(self.max_bad_fraction, (int, float)) or not 0 <= self.max_bad_fraction <= 1:
      raise DataError(f"domain {self.name!r}: max_bad_fraction={self.max_bad_fraction!r} must "
                      "be a number in [0, 1]")


class BadRow(ValueError):
  """A row that cannot become a training example (the reason is the message)."""


# ------------------------------------------------------------------ reading rows


def read_rows(spec: DomainSpec) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
  """([(line, row)], [(line, reason)]) for a local file, or (row number, row) of a dataset
  directory's `spec.split`. Hub ids are fetched before this (`sources.resolve`)."""
  path = spec.path
  if not path:
    raise DataError(f"domain {spec.name!r}: no data path given")
  if not os.path.exists(path):
    raise DataFileMissing(f"domain {spec.name!r}: data file {path} does not exist (a hub "
                          "dataset needs the prefix hf://)")
  if os.path.isdir(path):
    return _directory_rows(spec), []
  if os.path.getsize(path) == 0:
    raise DataError(f"domain {spec.name!r}: data file {path} is empty")
  if path.endswith(".parquet"):
    import datasets
    ds = datasets.load_dataset("parquet", data_files=path, split="train")
    return [(i + 1, r) for i, r in enumerate(ds)], []
  rows, bad = [], []
  with open(path, "rb") as f:
    if path.endswith(".json") and f.read(1) == b"[":
      f.seek(0)
      text = decode_text(f.read(), path)
      try:
        return [(i + 1, r) for i, r in enumerate(json.loads(text))], []
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); a JSON array file is one "
                        "document, so it cannot be read around the error") from None
    f.seek(0)
    for line_no, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        bad.append((line_no, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))
        continue
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        bad.append((line_no, f"invalid JSON ({e.msg})"))
        continue
      if not isinstance(row, dict):
        bad.append((line_no, f"a JSON {type(row).__name__}, not an object"))
        continue
      rows.append((line_no, row))
  return rows, bad


def decode_text(raw: bytes, path: str) -> str:
  """`raw` as UTF-8, or a ValueError naming file:line:column of the first byte that is not (a
  bare UnicodeDecodeError names neither)."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    raise DataError(f"{path}:{line}:{col}: byte 0x{raw[e.start]:02x} is not UTF-8 "
                    f"({e.reason}); re-encode the file as UTF-8") from None


def _directory_rows(spec):
  import datasets
  try:
    ds = datasets.load_dataset(spec.path, split=spec.split)
  except ValueError as e:  # e.g. an unknown split: name it
    raise DataError(f"domain {spec.name!r}: dataset {spec.path}, split {spec.split!r}: {e}") \
        from None
  return [(i + 1, dict(r)) for i, r in enumerate(ds)]


def to_messages(row: dict, spec: DomainSpec) -> list[dict]:
  """The row as chat messages; raises BadRow naming the problem."""
  fmt = spec.format
  if fmt == "auto":
    fmt = "messages" if spec.messages_field in row else "prompt_response"
  if fmt == "messages":
    key = spec.messages_field
    msgs = row.get(key)
    if msgs is None:
      raise BadRow(f"missing field {key!r}")
    if not isinstance(msgs, list) or not msgs:
      raise BadRow(f"field {key!r} is not a non-empty list")
    for i, m in enumerate(msgs):
      if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
          not isinstance(m.get("content"), str):
        raise BadRow(f"messages[{i}] needs string 'role' and 'content'")
      if m["role"] not in ("system", "user", "assistant"):
        raise BadRow(f"messages[{i}] has role {m['role']!r}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
      raise BadRow("no non-empty assistant message (empty response)")
    return msgs
  for field in (spec.prompt_field, spec.response_field):
    if field not in row:
      raise BadRow(f"missing field {field!r}")
    if not isinstance(row[field], str):
      raise BadRow(f"field {field!r} is a {type(row[field]).__name__}, not a string")
  if not row[spec.response_field].strip():
    raise BadRow(f"empty response (field {spec.response_field!r})")
  return [{"role": "user", "content": row[spec.prompt_field]},
          {"role": "assistant", "content": row[spec.response_field]}]


# ------------------------------------------------------------------ rendering and tokenising


# tokenizer_config.json classes that ARE transformers' PreTrainedTokenizerFast (in transformers 5,
# `TokenizersBackend`): loaded as that class directly, which is what AutoTokenizer returns for
# them. AutoTokenizer's module imports transformers' model registry, and with it torch when torch
# is installed (2-3 s of every train.py / eval.py start on CPU, for a tokenizer that needs none).
_PLAIN_FAST_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str):
  """The tokenizer of an HF model directory: as `AutoTokenizer.from_pretrained(path)`, without
  importing torch where the directory's tokenizer is a plain fast (tokenizer.json) one."""
  config_file = os.path.join(path, "tokenizer_config.json")
  tokenizer_class = None
  if os.path.isfile(config_file) and os.path.isfile(os.path.join(path, "tokenizer.json")):
    with open(config_file, encoding="utf-8") as f:
      tokenizer_class = json.load(f).get("tokenizer_class")
  if tokenizer_class in _PLAIN_FAST_TOKENIZERS:
    from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
    return PreTrainedTokenizerFast.from_pretrained(path)
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  return AutoTokenizer.from_pretrained(path)


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
  if tokenizer.chat_template:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
  # No template: DeepSeek-V2's plain chat format.
  text = tokenizer.bos_token or ""
  for m in messages:
    if m["role"] == "assistant":
      text += f"Assistant: {m['content']}{tokenizer.eos_token or ''}"
    elif m["role"] == "user":
      text += f"User: {m['content']}\n\n"
    else:
      text += m["content"] + "\n\n"
  return text + ("Assistant: " if add_generation_prompt else "")


def render_segments(tokenizer, messages) -> list[tuple[str, bool]]:
  """The conversation as consecutive (text, is_target) pieces: assistant turns are targets."""
  pieces, done = [], ""
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
    full = _render(tokenizer, messages[:i + 1])
    if not (prefix.startswith(done) and full.startswith(prefix)):
      raise BadRow("the chat template does not render turns as prefixes of each other")
    pieces += [(prefix[len(done):], False), (full[len(prefix):], True)]
    done = full
  return [(t, target) for t, target in pieces if t]


def tokenize_messages(tokenizer, messages, seq_len: int):
  """(ids int32 [n], targets int8 [n]); raises BadRow if the example is longer than seq_len."""
  segments = render_segments(tokenizer, messages)
  return _example([(tokenizer(text, add_special_tokens=False)["input_ids"], is_target)
                   for text, is_target in segments], seq_len)


def tokenize_rows(tokenizer, rows, to_msgs, seq_len: int, chunk: int = 256):
  """(row, tokenize_messages(tokenizer, to_msgs(row), seq_len) or the BadRow it raises) for each
  row, in order. The tokenizer runs once per `chunk` rows on all their text pieces: its per-call
  overhead was most of a domain's load time (2.4 s of a tiny train.py run's 2.7 s for two
  domains). A fast tokenizer encodes a batch exactly as it encodes each text alone."""
  it = iter(rows)
  while block := list(itertools.islice(it, chunk)):
    rendered = []
    for row in block:
      try:
        rendered.append(render_segments(tokenizer, to_msgs(row)))
      except BadRow as e:
        rendered.append(e)
    texts = [text for r in rendered if not isinstance(r, BadRow) for text, _ in r]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else ())
    for row, r in zip(block, rendered):
      if not isinstance(r, BadRow):
        pieces = [(next(encoded), is_target) for _, is_target in r]
        try:
          r = _example(pieces, seq_len)
        except BadRow as e:
          r = e
      yield row, r


def _example(pieces, seq_len: int):
  """(ids, targets) of an example from its encoded (ids, is_target) pieces."""
  ids, targets = [], []
  for piece, is_target in pieces:
    ids += piece
    targets += [int(is_target)] * len(piece)
  if len(ids) > seq_len:
    raise BadRow(f"over-long: {len(ids)} tokens > seq_len={seq_len}")
  if len(ids) < 2 or not any(targets[1:]):
    raise BadRow("no response token to learn from")
  targets[0] = 0  # the first token of an example is never predicted from this example
  return np.asarray(ids, np.int32), np.asarray(targets, np.int8)


@dataclasses.dataclass
class DomainReport:
  name: str
  path: str
  rows: int = 0
  examples: int = 0
  bad: dict = dataclasses.field(default_factory=dict)   # reason -> [line numbers]

  @property
  def bad_count(self) -> int:
    return sum(len(v) for v in self.bad.values())

  def summary(self, max_lines: int = 10) -> str:
    parts = [f"{reason}: {len(lines)} (lines {', '.join(map(str, lines[:max_lines]))}"
             f"{', ...' if len(lines) > max_lines else ''})" for reason, lines in self.bad.items()]
    return (f"{self.path}: {self.bad_count} of {self.rows} rows skipped for domain "
            f"{self.name!r}: " + "; ".join(parts))


def load_domain(spec: DomainSpec, tokenizer, seq_len: int):
  """Tokenised examples of one domain and its report; raises if none is usable."""
  rows, bad = read_rows(spec)
  grouped = collections.defaultdict(list)
  examples, last = [], None
  chunk = min(256, spec.max_examples or 256)
  for (line, _), result in tokenize_rows(tokenizer, rows, lambda r: to_messages(r[1], spec),
                                         seq_len, chunk):
    if spec.max_examples and len(examples) >= spec.max_examples:
      last = line  # rows from here on are not read: neither counted nor judged
      break
    if isinstance(result, BadRow):
      reason = str(result)
      key = "over-long" if reason.startswith("over-long") else reason
      grouped[key].append(line)
    else:
      examples.append(result)
  bad = [(line, reason) for line, reason in bad if last is None or line < last]
  for line, reason in sorted(bad):
    key = reason.split(" (")[0] if reason.startswith(("invalid JSON", "not UTF-8")) else reason
    grouped[key].append(line)
  read = len(examples) + sum(len(v) for v in grouped.values())
  report = DomainReport(spec.name, spec.path, rows=read, bad=dict(grouped),
                        examples=len(examples))
  if report.bad:
    warnings.warn(report.summary(), stacklevel=2)
  if not examples:
    raise DataError(f"domain {spec.name!r}: no usable example in {spec.path} "
                    f"({report.bad_count} bad rows: {report.summary()})")
  check_bad_fraction(report, spec.max_bad_fraction)
  return examples, report


def check_bad_fraction(report: "DomainReport", max_bad_fraction: float):
  """Raises if more than `max_bad_fraction` of the rows read were broken (module docstring).
  Over-long rows are reported but not counted: they are the choice of seq_len, not a fault of
  the file (a long-document domain at a short seq_len loses most rows by design)."""
  broken = report.bad_count - len(report.bad.get("over-long", ()))
  if broken > max_bad_fraction * report.rows:
    raise DataError(
       f"domain {report.name!r}: {broken} of {report.rows} rows of {report.path} are "
       f"bad ({broken / report.rows:.0%}, more than data.max_bad_fraction="
       f"{max_bad_fraction:g}); fix the file or raise data.max_bad_fraction. "
        + report.summary())


# ------------------------------------------------------------------ packing

BATCH_KEYS = ("tokens", "loss_mask", "domain_id", "segment_ids", "positions")


def _empty_batch(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  return {k: np.zeros((batch_size, seq_len), np.int32) for k in BATCH_KEYS}


def _place(out, row: int, start: int, segment: int, ids, targets, domain: int):
  sl = slice(start, start + len(ids))
  out["tokens"][row, sl] = ids
  out["loss_mask"][row, sl] = targets
  out["domain_id"][row, sl] = domain
  out["segment_ids"][row, sl] = segment
  out["positions"][row, sl] = np.arange(len(ids))


def pack_once(examples, seq_len: int, batch_size: int, max_batches: int,
              domain: int = 0) -> list[dict]:
  """One pass over `examples` in order, packed greedily into at most `max_batches` batches."""
  batches, it = [], iter(examples)
  pending = next(it, None)
  while pending is not None and len(batches) < max_batches:
    out = _empty_batch(batch_size, seq_len)
    for row in range(batch_size):
      used, segment = 0, 0
      while pending is not None and used + len(pending[0]) <= seq_len:
        segment += 1
        _place(out, row, used, segment, pending[0], pending[1], domain)
        used += len(pending[0])
        pending = next(it, None)
    batches.append(out)
  return batches


class MixtureIterator:
  """Endless packed batches mixing `specs` by weight (see the module docstring)."""

  def __init__(self, specs: list[DomainSpec], tokenizer, *, seq_len: int, batch_size: int,
               seed: int = 0, domain_ids: list[int] | None = None):
    if not specs:
      raise ValueError("MixtureIterator needs at least one domain")
    self.specs, self.seq_len, self.batch_size, self.seed = list(specs), seq_len, batch_size, seed
    self.domain_ids = list(range(len(specs))) if domain_ids is None else list(domain_ids)
    # Per source, the domain id of each example (discovered domains, desmoe_jax/discover.py);
    # None: every example of source d is domain domain_ids[d]. Sources are still drawn by
    # their weights, so the batches are the same either way; only the ids differ.
    self.example_domains: list[np.ndarray] | None = None
    loaded = [load_domain(s, tokenizer, seq_len) for s in specs]
    self.examples = [ex for ex, _ in loaded]
    self.report = [rep for _, rep in loaded]
    w = np.asarray([s.weight for s in specs], np.float64)
    self.probs = w / w.sum()
    self._rng = np.random.default_rng(seed)
    self._epoch = [0] * len(specs)
    self._pos = [0] * len(specs)
    self._orders = [self._order(d, 0) for d in range(len(specs))]
    self._carry = None  # (domain, example index) that did not fit in the previous row

  def _order(self, d: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, d, epoch]).permutation(len(self.examples[d]))

  def _next_example(self):
    if self._carry is not None:
      d, i = self._carry
      self._carry = None
      return d, i
    d = int(self._rng.choice(len(self.specs), p=self.probs))
    if self._pos[d] == len(self.examples[d]):
      self._epoch[d] += 1
      self._pos[d] = 0
      self._orders[d] = self._order(d, self._epoch[d])
    i = int(self._orders[d][self._pos[d]])
    self._pos[d] += 1
    return d, i

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = _empty_batch(self.batch_size, self.seq_len)
    for row in range(self.batch_size):
      used, segment = 0, 0
      while used < self.seq_len:
        d, i = self._next_example()
        ids, targets = self.examples[d][i]
        if used + len(ids) > self.seq_len:
          self._carry = (d, i)  # every example fits an empty row (over-long ones were dropped)
          break
        segment += 1
        domain = (self.domain_ids[d] if self.example_domains is None
                  else int(self.example_domains[d][i]))
        _place(out, row, used, segment, ids, targets, domain)
        used += len(ids)
    return out

  def set_example_domains(self, example_domains: list):
    """Gives every example its own domain id: `example_domains[d][i]` for example i of source
    d (in the order `examples` holds them)."""
    sizes = [len(e) for e in self.examples]
    got = [len(x) for x in example_domains]
    if got != sizes:
      raise DataError(f"per-example domain ids for {got} examples, the sources have {sizes}")
    self.example_domains = [np.asarray(x, np.int32) for x in example_domains]

  def state(self) -> dict:
    """JSON-serialisable position (see `restore`)."""
    return {"rng": self._rng.bit_generator.state, "epoch": list(self._epoch),
            "pos": list(self._pos), "carry": list(self._carry) if self._carry else None,
            "sizes": [len(e) for e in self.examples]}

  def restore(self, state: dict):
    sizes = [len(e) for e in self.examples]
    if state["sizes"] != sizes:
      raise DataError(f"data position was saved for domains of {state['sizes']} examples, the "
                      f"data now has {sizes}: the data files changed since the checkpoint")
    self._rng.bit_generator.state = state["rng"]
    self._epoch, self._pos = list(state["epoch"]), list(state["pos"])
    self._orders = [self._order(d, e) for d, e in enumerate(self._epoch)]
    self._carry = tuple(state["carry"]) if state["carry"] else None


# ------------------------------------------------------------------ evaluation data


# Fields a held-out row needs beyond prompt and answers, by task metric (configs' `d.metric`).
EVAL_FIELDS = {"pass_at_1": ("test", "entry_point")}


def _eval_row_problem(row: dict, required: tuple, prompt: str = "prompt",
                      messages: str = "messages") -> str | None:
  """Why this held-out row cannot be used, or None (`prompt`, `messages`: the column names)."""
  answers = row.get("answers")
  if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
    return "'answers' must be a non-empty list of strings"
  if not isinstance(row.get(prompt), str):
    msgs = row.get(messages)
    if not (isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and
        isinstance(m.get("content"), str) for m in msgs)):
      return f"needs a string {prompt!r} (or {messages!r} with string 'role' and 'content')"
    if not any(m["role"] != "assistant" for m in msgs):
      return f"{messages!r} has no message before the answer"
  for field in required:
    if field not in row:
      return f"missing field {field!r}"
    if not isinstance(row[field], str) or not row[field].strip():
      return f"field {field!r} must be a non-empty string"
  if "entry_point" in required and not row["entry_point"].isidentifier():
    return f"'entry_point' is not an identifier: {row['entry_point'][:40]!r}"
  if "test" in required and "def check(" not in row["test"]:
    return "'test' does not define check(candidate)"
  return None


def load_eval_examples(spec: DomainSpec, tokenizer, *, max_examples: int = 0,
                       required: tuple = (), max_bad_fraction: float = 0.0) -> list[dict]:
  """Held-out examples for generation: {"prompt_text", "prompt_ids" (chat-formatted, ending
  with the assistant prefix), "answers": [str], "source": "file:line", plus the row's other
  fields (e.g. HumanEval's "test" / "entry_point", law's "reference")}. Rows need a prompt
  (`spec.prompt_field`, or `spec.messages_field` whose last non-assistant message is it), "answers" (a list of strings) and
  the `required` fields (`EVAL_FIELDS` of the domain's metric).

  Each row is validated on its own; bad rows are named by file:line. More than
  `max_bad_fraction` of the rows read (default: any) is an error: held-out rows define the
  score, and a silently dropped one changes it."""
  rows, bad = read_rows(spec)
  out, problems, read = [], sorted(bad), len(bad)
  for line, row in rows:
    if max_examples and len(out) >= max_examples:
      problems = [(l, r) for l, r in problems if l < line]
      read = len(problems) + len(out)
      break
    read += 1
    why = _eval_row_problem(row, tuple(required), spec.prompt_field, spec.messages_field)
    if why:
      problems.append((line, why))
      continue
    if isinstance(row.get(spec.prompt_field), str):
      messages = [{"role": "user", "content": row[spec.prompt_field]}]
    else:
      messages = [m for m in row[spec.messages_field] if m["role"] != "assistant"]
    ids = tokenizer(_render(tokenizer, messages, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    extra = {k: v for k, v in row.items()
             if k not in (spec.prompt_field, spec.messages_field, "answers")}
    out.append({"prompt_text": messages[-1]["content"], "prompt_ids": ids,
                "answers": row["answers"], **extra, "source": f"{spec.path}:{line}"})
  problems.sort()
  listed = "; ".join(f"{spec.path}:{line}: {why}" for line, why in problems[:10]) + (
      f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
  if problems and len(problems) > max_bad_fraction * read:
    raise DataError(f"domain {spec.name!r}: {len(problems)} of {read} held-out rows of "
                    f"{spec.path} are bad: {listed}")
  if problems:
    warnings.warn(f"{spec.path}: {len(problems)} eval rows skipped for domain {spec.name!r}: "
                  + listed, stacklevel=2)
  if not out:
    raise DataError(f"domain {spec.name!r}: no usable evaluation example in {spec.path}")
  return out


def eval_loss_batches(spec: DomainSpec, tokenizer, *, seq_len: int, batch_size: int,
                      max_batches: int) -> list[dict]:
  """Packed held-out batches of (prompt, reference answer) pairs: the loss on answers given
  prompts. The response is the row's "reference" if it has one, else its first answer."""
  return pack_once(eval_loss_examples(spec, tokenizer, seq_len=seq_len), seq_len, batch_size,
                   max_batches)


def eval_loss_examples(spec: DomainSpec, tokenizer, *, seq_len: int) -> list[tuple]:
  """The tokenised (ids, targets) held-out examples `eval_loss_batches` packs, in file order
  (those longer than seq_len left out)."""
  examples = load_eval_examples(spec, tokenizer)
  rows = [{"prompt": ex["prompt_text"], "response": ex.get("reference", ex["answers"][0])}
          for ex in examples]
  as_pr = DomainSpec(spec.name, spec.path, "prompt_response")
  # Over-long held-out examples do not fit the model's context: not scored.
  tokenized = [r for _, r in tokenize_rows(tokenizer, rows, lambda r: to_messages(r, as_pr),
                                           seq_len) if not isinstance(r, BadRow)]
  if not tokenized:
    raise DataError(f"domain {spec.name!r}: no held-out example of {spec.path} fits "
                    f"seq_len={seq_len}")
  return tokenized


def text_loss_batches(path: str, tokenizer, *, seq_len: int, batch_size: int,
                      max_batches: int) -> list[dict]:
  """Plain text (e.g. held-out general text) cut into full rows: bos + seq_len - 1 tokens,
  every token but the first a target; at most `max_batches` batches (0: the whole text)."""
  if not os.path.exists(path):
    raise DataFileMissing(f"general text file {path} does not exist")
  with open(path, "rb") as f:
    text = decode_text(f.read(), path)
  if not text.strip():
    raise DataError(f"general text file {path} is empty")
  return _text_batches(text, path, tokenizer, seq_len=seq_len, batch_size=batch_size,
                       max_batches=max_batches)


def _text_batches(text: str, where: str, tokenizer, *, seq_len: int, batch_size: int,
                  max_batches: int) -> list[dict]:
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
  n = seq_len - len(bos)
  rows = [bos + ids[i:i + n] for i in range(0, len(ids) - n + 1, n)]
  if max_batches:
    rows = rows[:max_batches * batch_size]
  if not rows:
    raise DataError(f"{where} has fewer than {seq_len} tokens")
  batches = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    b = len(chunk)
    tokens = np.zeros((batch_size, seq_len), np.int32)
    tokens[:b] = np.asarray(chunk, np.int32)
    seg = np.zeros_like(tokens)
    seg[:b] = 1
    loss = seg.copy()
    loss[:, 0] = 0
    batches.append({"tokens": tokens, "loss_mask": loss, "domain_id": np.zeros_like(tokens),
                    "segment_ids": seg,
                    "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                                 tokens.shape).copy()})
  return batches


def read_genre_documents(path: str) -> dict[str, list[str]]:
  """genre -> its documents' texts, in file order, from a JSONL file (optionally .gz) of
  {"genre": ..., "text": ...} rows (scripts/make_corpus.py writes data/corpus/heldout.jsonl.gz
  so). Every row must be good: these documents define the per-genre scores."""
  import gzip
  if not os.path.exists(path):
    raise DataFileMissing(f"genre document file {path} (data.general_genres) does not exist")
  opener = gzip.open if path.endswith(".gz") else open
  out: dict[str, list[str]] = {}
  with opener(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        row = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise DataError(f"{path}:{line_no}: byte {e.start + 1} of the line is not UTF-8 "
                        f"({e.reason})") from None
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: not JSON ({e})") from None
      if (not isinstance(row, dict) or not isinstance(row.get("genre"), str)
          or not isinstance(row.get("text"), str) or not row["genre"] or not row["text"].strip()):
        raise DataError(f"{path}:{line_no}: a row needs a non-empty string 'genre' and 'text'")
      out.setdefault(row["genre"], []).append(row["text"])
  if not out:
    raise DataError(f"genre document file {path} (data.general_genres) has no rows")
  return out


def genre_loss_batches(path: str, tokenizer, *, seq_len: int, batch_size: int,
                       max_batches: int) -> dict[str, list[dict]]:
  """genre -> held-out batches of that genre's documents (joined by blank lines, cut as
  `text_loss_batches` cuts), at most `max_batches` each (0: all): the general-ability loss per
  genre, so a reader sees what each method forgets."""
  return {genre: _text_batches("\n\n".join(texts), f"{path} (genre {genre!r})", tokenizer,
                               seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)
          for genre, texts in sorted(read_genre_documents(path).items())}


def load_multiple_choice(path: str) -> list[dict]:
  """{"context", "choices": [str], "label": int} items, validated."""
  spec = DomainSpec("general_mc", path)
  rows, bad = read_rows(spec)
  items, problems = [], [f"line {line}: {reason}" for line, reason in bad]
  for line, row in rows:
    choices, label = row.get("choices"), row.get("label")
    if not isinstance(row.get("context"), str) or not isinstance(choices, list) or \
        len(choices) < 2 or not all(isinstance(c, str) for c in choices) or \
        not isinstance(label, int) or not 0 <= label < len(choices):
      problems.append(f"line {line}: needs 'context' (str), 'choices' (>= 2 str), 'label' (index)")
      continue
    items.append(row)
  if problems:
    warnings.warn(f"{path}: {len(problems)} rows skipped: " + "; ".join(problems[:10]),
                  stacklevel=2)
  return items
