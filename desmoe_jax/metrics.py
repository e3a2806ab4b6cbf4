"""Task metrics for the six domains and general-ability scores. Pure Python/numpy over
predictions and references; the model side lives in `evaluate.py`.

| domain      | metric                                                                  |
|-------------|-------------------------------------------------------------------------|
| math        | exact match of the final number (`number_match`)                        |
| intent      | exact match of the parsed JSON, key order irrelevant (`intent_json_match`) |
| code        | pass@1: HumanEval tests run isolated (`pass_at_1`, `sandbox.py`), opt-in |
| law         | accuracy of the judgment's outcome label (`law_accuracy`, keyword rules) |
| summary     | ROUGE-L F x100 (rouge-score; CJK characters are tokens of their own)    |
| translation | corpus BLEU (sacrebleu; "zh" tokenizer for Chinese references, else 13a) |
| general     | held-out text perplexity; multiple-choice log-likelihood accuracy      |

Per-row `answers` are a list of acceptable references (a plain string counts as a list of one);
a prediction scores against its best reference. Every function returns plain Python numbers,
lists and dicts, so results go straight into `json.dump`.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
import unicodedata
from collections.abc import Callable, Sequence

import numpy as np

from desmoe_jax import sandbox
from desmoe_jax.sandbox import SandboxUnavailable, run_program  # noqa: F401  (re-exported)


def _check_pairs(preds, answers, preds_name="preds", answers_name="answers"):
  """Validated (preds, answers-as-lists): a wrong type or length is a bug in the caller, and a
  silently misaligned metric is worse than a crash."""
  for name, value in ((preds_name, preds), (answers_name, answers)):
    if not isinstance(value, (list, tuple)):
      raise TypeError(f"{name} must be a list, got {type(value).__name__}")
  if len(preds) != len(answers):
    raise ValueError(f"{preds_name} has {len(preds)} items but {answers_name} has {len(answers)}")
  if not preds:
    raise ValueError(f"{preds_name} is empty: nothing to score")
  for i, p in enumerate(preds):
    if not isinstance(p, str):
      raise TypeError(f"{preds_name}[{i}] is a {type(p).__name__}, not a string")
  refs = []
  for i, a in enumerate(answers):
    a = [a] if isinstance(a, str) else a
    if not isinstance(a, (list, tuple)) or not a or not all(isinstance(x, str) for x in a):
      raise ValueError(f"{answers_name}[{i}] must be a string or a non-empty list of strings")
    refs.append(list(a))
  return list(preds), refs


# ------------------------------------------------------------------ exact match family

_TRAILING = "。．.!！?？;；,，、:： \n\t"


def normalize_answer(text: str) -> str:
  """Outer whitespace stripped, inner runs collapsed to one space, trailing punctuation (ASCII and
  CJK, e.g. "。" and ".") removed. Case is kept: labels and numbers do not need folding."""
  if not isinstance(text, str):
    raise TypeError(f"text is a {type(text).__name__}, not a string")
  return re.sub(r"\s+", " ", text.strip()).rstrip(_TRAILING).strip()


def exact_match(preds: Sequence[str], answers: Sequence) -> float:
  """Fraction of predictions equal (after `normalize_answer`) to one of their answers."""
  preds, refs = _check_pairs(preds, answers)
  return float(np.mean([normalize_answer(p) in {normalize_answer(a) for a in ans}
                        for p, ans in zip(preds, refs)]))


# Thousands groups only where they are well formed, so "1,2,3" is three numbers, not 123.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ANSWER_MARKERS = (  # tried in order; the number right after the LAST occurrence is the answer
    re.compile(r"####"),
    re.compile(r"\\boxed\{"),
    re.compile(r"answer\s*(?:is|:)|答案\s*(?:是|为|：|:)", re.IGNORECASE),
)


def canonical_number(text: str) -> str:
  """"1,200.50" -> "1200.5", "7.0" -> "7", "-0" -> "0": equal values compare equal as text."""
  n = text.replace(",", "")
  if "." in n:
    n = n.rstrip("0").rstrip(".")
  return "0" if n in ("-0", "") else n


def extract_final_number(text: str) -> str | None:
  """The final numeric answer of a worked solution, canonicalised, or None. The first number after
  the last "####" (GSM8K), else after the last "\\boxed{", else after the last "The answer is" /
  "answer:" / "答案是", else the last number anywhere. Fractions and words are not numbers here."""
  if not isinstance(text, str):
    raise TypeError(f"text is a {type(text).__name__}, not a string")
  for marker in _ANSWER_MARKERS:
    hits = list(marker.finditer(text))
    if hits:
      found = _NUMBER.search(text, hits[-1].end())
      if found:
        return canonical_number(found.group())
  found = _NUMBER.findall(text)
  return canonical_number(found[-1]) if found else None


def number_match(generations: Sequence[str], answers: Sequence) -> float:
  """Math accuracy: the final number of each generation equals the number in one of its answers
  ("1,200" and "1200.0" both match 1200). An answer without a number is compared as text."""
  generations, refs = _check_pairs(generations, answers, "generations", "answers")
  hits = []
  for g, ans in zip(generations, refs):
    got = extract_final_number(g)
    want = {extract_final_number(a) or normalize_answer(a) for a in ans}
    hits.append(got is not None and got in want)
  return float(np.mean(hits))


# ------------------------------------------------------------------ law outcome labels

_X = "[^，。；,;]{0,30}"  # up to 30 characters (names) within one clause
LAW_RULES = (  # tried in order: the first rule whose pattern matches gives the label
    ("mediation", r"调解|和解|自愿达成"),
    ("withdrawn", r"撤诉|撤回"),
    ("divorce_denied", rf"不准(予|许)?{_X}离婚|驳回{_X}离婚|离婚[^。；]{{0,12}}不予支持|不予离婚"),
    ("marriage_void", r"婚姻无效"),
    ("divorce_granted", rf"(准予|准许){_X}离婚|判决离婚|解除婚姻|自愿离婚"),
    ("dismissed", r"驳回(?!.{0,12}其他)[^，。；]{0,20}(诉讼请求|起诉|上诉)"),
    ("property_returned", r"返还|退还|支付|赔偿"),
)
LAW_LABELS = tuple(label for label, _ in LAW_RULES) + ("other",)


def law_label(judgment: str) -> str:
  """Outcome class of a Chinese civil judgment (ESFT's law task), by documented keyword rules.
  ESFT scored law with GPT-4; offline, the same rules label references and generations."""
  for label, pattern in LAW_RULES:
    if re.search(pattern, judgment):
      return label
  return "other"


def law_accuracy(generations: Sequence[str], labels: Sequence) -> float:
  """Fraction of generations whose `law_label` is one of the row's labels."""
  generations, refs = _check_pairs(generations, labels, "generations", "labels")
  return float(np.mean([law_label(g) in ans for g, ans in zip(generations, refs)]))


# ------------------------------------------------------------------ intent JSON

_DECODER = json.JSONDecoder()


def first_json_object(text: str):
  """The first JSON object ({...}) in `text`, or None. ESFT answers look like
  `{"intent": ..., "slots": {...}}。` and generations may run on after the object, so the object
  is decoded from its opening brace and whatever follows it is ignored."""
  start = text.find("{")
  while start >= 0:
    try:
      obj, _ = _DECODER.raw_decode(text, start)
      if isinstance(obj, dict):
        return obj
    except json.JSONDecodeError:
      pass
    start = text.find("{", start + 1)
  return None


def intent_json_match(preds: Sequence[str], answers: Sequence) -> float:
  """Fraction of predictions whose first JSON object equals one of the answers' (dict key order
  irrelevant, list order and value types significant; no JSON object in a prediction = wrong)."""
  preds, refs = _check_pairs(preds, answers)
  hits = []
  for i, (p, ans) in enumerate(zip(preds, refs)):
    wanted = []
    for j, a in enumerate(ans):
      obj = first_json_object(a)
      if obj is None:
        raise ValueError(f"answers[{i}][{j}] holds no JSON object: {a[:80]!r}")
      wanted.append(obj)
    got = first_json_object(p)
    hits.append(got is not None and got in wanted)
  return float(np.mean(hits))


# ------------------------------------------------------------------ code pass@1 (sandboxed)

# Stop sequences of the Codex paper (plus a markdown fence): a completion is the function body,
# and whatever the model writes after it (new top-level code) is cut before it can break the run.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")


def truncate_completion(completion: str, stop: Sequence[str] = HUMANEVAL_STOP) -> str:
  """`completion` up to the first stop sequence (the end of the function body)."""
  cut = len(completion)
  for s in stop:
    i = completion.find(s)
    if i >= 0:
      cut = min(cut, i)
  return completion[:cut]


def pass_at_1(problems: Sequence[dict], completions: Sequence[str], *, timeout: float = 5.0,
              workers: int = 2, memory_bytes: int = 1 << 30,
              stop: Sequence[str] | None = HUMANEVAL_STOP, allow_unisolated: bool = False,
              sources: Sequence[str] | None = None) -> dict:
  """HumanEval-style pass@1, one completion per problem ({"prompt", "test", "entry_point"}; the
  test defines `check(candidate)`). The program run is prompt + completion (cut at `stop`; None
  keeps it whole) + test + `check(entry_point)`, each in `sandbox.run_program` (isolated in its
  own namespaces; refused with `SandboxUnavailable` before any program runs where the machine
  cannot isolate, unless `allow_unisolated`), `workers` at a time (threads that each wait on one
  sandbox process; forking the JAX process would be unsafe). `sources`: where each problem came
  from ("file:line"), named in the errors about it.

  Returns {"pass@1": float, "passed": int, "total": int, "isolated": bool, "results":
  [{"task_id", "passed", "reason", "detail", "seconds", "isolated"}, ...]} in problem order."""
  if not isinstance(problems, (list, tuple)) or not isinstance(completions, (list, tuple)):
    raise TypeError("problems and completions must be lists")
  if len(problems) != len(completions):
    raise ValueError(f"problems has {len(problems)} items but completions has {len(completions)}")
  if not problems:
    raise ValueError("problems is empty: nothing to run")
  if not (isinstance(workers, int) and workers >= 1):
    raise ValueError(f"workers must be a positive int, got {workers!r}")
  if sources is not None and len(sources) != len(problems):
    raise ValueError(f"sources has {len(sources)} items but problems has {len(problems)}")
  programs = []
  for i, (p, c) in enumerate(zip(problems, completions)):
    where = f"problems[{i}]" + (f" ({sources[i]})" if sources is not None else "")
    if not isinstance(p, dict):
      raise TypeError(f"{where} is a {type(p).__name__}, not a dict")
    for key in ("prompt", "test", "entry_point"):
      if not isinstance(p.get(key), str):
        raise ValueError(f"{where} needs a string {key!r}" +
                         (" (missing)" if key not in p else f", got {type(p[key]).__name__}"))
    if not p["entry_point"].isidentifier():  # it is pasted into code: only a plain name
      raise ValueError(f"{where}['entry_point'] is not an identifier: {p['entry_point']!r}")
    if "def check(" not in p["test"]:
      raise ValueError(f"{where}['test'] does not define check(candidate)")
    if not isinstance(c, str):
      raise TypeError(f"completions[{i}] is a {type(c).__name__}, not a string")
    body = truncate_completion(c, stop) if stop else c
    programs.append(p["prompt"] + body + "\n\n" + p["test"] + f"\n\ncheck({p['entry_point']})\n")
  isolated = sandbox.require_isolation(allow_unisolated)  # refuse before running anything
  run = lambda src: run_program(src, timeout=timeout, memory_bytes=memory_bytes,
                                allow_unisolated=allow_unisolated)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    results = list(pool.map(run, programs))
  for p, r in zip(problems, results):
    r["task_id"] = p.get("task_id")
  passed = sum(r["passed"] for r in results)
  return {"pass@1": passed / len(results), "passed": passed, "total": len(results),
          "isolated": isolated, "results": results}


# ------------------------------------------------------------------ BLEU and ROUGE-L

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_HAS_CJK = re.compile(f"[{_CJK}]")


def bleu_tokenizer(answers: Sequence) -> str:
  """sacrebleu's "zh" if any reference has CJK characters (Chinese has no spaces: "13a" would
  make whole sentences single tokens), else "13a", the WMT standard for English, German, etc."""
  return "zh" if any(_HAS_CJK.search(a) for ans in answers
                     for a in ([ans] if isinstance(ans, str) else ans)) else "13a"


def _bleu_setup(preds, answers, tokenize):
  import sacrebleu
  preds, refs = _check_pairs(preds, answers)
  if tokenize == "auto":
    tokenize = bleu_tokenizer(refs)
  if tokenize not in sacrebleu.metrics.bleu.BLEU.TOKENIZERS:
    raise ValueError(f"tokenize={tokenize!r} is not one of 'auto', "
                     f"{sorted(sacrebleu.metrics.bleu.BLEU.TOKENIZERS)}")
  return sacrebleu, preds, refs, tokenize


def bleu(preds: Sequence[str], answers: Sequence, tokenize: str = "auto") -> float:
  """Corpus BLEU (0-100) with sacrebleu's defaults (exp smoothing, closest reference length).
  `tokenize`: "auto" (see `bleu_tokenizer`) or any sacrebleu tokenizer name. Rows with fewer
  references than others are padded with None, which sacrebleu skips."""
  sacrebleu, preds, refs, tokenize = _bleu_setup(preds, answers, tokenize)
  n_refs = max(len(a) for a in refs)
  streams = [[a[i] if i < len(a) else None for a in refs] for i in range(n_refs)]
  return float(sacrebleu.corpus_bleu(preds, streams, tokenize=tokenize).score)


def sentence_bleu(preds: Sequence[str], answers: Sequence, tokenize: str = "auto") -> list[float]:
  """Per-example BLEU (0-100, sacrebleu's sentence_bleu with exp smoothing), for inspecting
  individual generations; the reported score is the corpus `bleu`, not the mean of these."""
  sacrebleu, preds, refs, tokenize = _bleu_setup(preds, answers, tokenize)
  return [float(sacrebleu.sentence_bleu(p, a, tokenize=tokenize).score)
          for p, a in zip(preds, refs)]


_TOKEN = re.compile(f"[{_CJK}]|[0-9a-z\u00c0-\u024f]+")


def cjk_tokenize(text: str) -> list[str]:
  """ROUGE tokens: each CJK character (Chinese, kana, Hangul) is one token; Latin text is split into
  lowercase alphanumeric words; punctuation and spaces are dropped. NFKC first, so full-width
  digits and letters ("２０２３", "ＷｉＦｉ") match their ASCII forms. rouge-score's own tokenizer
  drops every non-ASCII character, which would score any two Chinese summaries as empty."""
  return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


class _CjkTokenizer:
  """The object rouge-score wants (anything with .tokenize)."""

  def tokenize(self, text):
    return cjk_tokenize(text)


def rouge_l_scores(preds: Sequence[str], answers: Sequence) -> list[float]:
  """Per-example ROUGE-L F-measure (0-1), best over the row's references."""
  from rouge_score import rouge_scorer
  preds, refs = _check_pairs(preds, answers)
  scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CjkTokenizer())
  return [max(float(scorer.score(a, p)["rougeL"].fmeasure) for a in ans)
          for p, ans in zip(preds, refs)]


def rouge_l(preds: Sequence[str], answers: Sequence) -> float:
  """Mean over examples of ROUGE-L F (x100, the scale of BLEU), tokens from `cjk_tokenize`."""
  return 100.0 * float(np.mean(rouge_l_scores(preds, answers)))


# ------------------------------------------------------------------ general abilities


def multiple_choice_accuracy(score_fn: Callable, items: Sequence[dict]) -> dict:
  """Log-likelihood multiple choice. `score_fn([(context, continuation), ...])` returns one
  (sum of log-probabilities, number of tokens) per pair; a model's answer is the choice with the
  highest total ("accuracy", favours short choices) or per-token ("accuracy_norm", favours none
  by length) log-likelihood; ties go to the first choice. All pairs go to one score_fn call so it
  can batch them. Returns {"accuracy", "accuracy_norm", "items"}."""
  if not callable(score_fn):
    raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
  if not isinstance(items, (list, tuple)) or not items:
    raise ValueError("items must be a non-empty list of multiple-choice items")
  pairs, owners = [], []
  for i, item in enumerate(items):
    if not isinstance(item, dict):
      raise TypeError(f"items[{i}] is a {type(item).__name__}, not a dict")
    if not isinstance(item.get("context"), str):
      raise ValueError(f"items[{i}] needs a string 'context'")
    choices = item.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or \
        not all(isinstance(c, str) for c in choices):
      raise ValueError(f"items[{i}]['choices'] must be a list of at least 2 strings")
    label = item.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
      raise ValueError(f"items[{i}]['label'] must be an int in [0, {len(choices)}), got {label!r}")
    for c in choices:
      pairs.append((item["context"], c))
      owners.append(i)
  scores = list(score_fn(pairs))
  if len(scores) != len(pairs):
    raise ValueError(f"score_fn returned {len(scores)} scores for {len(pairs)} pairs")
  raw, norm = [[] for _ in items], [[] for _ in items]
  for k, (i, s) in enumerate(zip(owners, scores)):
    try:
      logp, n = float(s[0]), s[1]
    except (TypeError, IndexError, ValueError):
      raise ValueError(f"score_fn result {k} is not (sum logprob, n tokens): {s!r}") from None
    if isinstance(n, bool) or not isinstance(n, (int, float, np.number)) or not n >= 1 \
        or math.isnan(logp):
      raise ValueError(f"score_fn result {k} needs a token count >= 1 and a number: {s!r}")
    raw[i].append(logp)
    norm[i].append(logp / float(n))
  labels = [item["label"] for item in items]
  return {"accuracy": float(np.mean([int(np.argmax(r)) == l for r, l in zip(raw, labels)])),
          "accuracy_norm": float(np.mean([int(np.argmax(r)) == l for r, l in zip(norm, labels)])),
          "items": len(items)}


def perplexity(total_nll: float, total_tokens: float) -> float:
  """exp(mean NLL in nats). The exponent is capped at 50 (perplexity ~5e21, far worse than a
  uniform guess over any real vocabulary) so a diverged model still gives a finite JSON number."""
  for name, v in (("total_nll", total_nll), ("total_tokens", total_tokens)):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v):
      raise ValueError(f"{name} must be a finite number, got {v!r}")
  if total_tokens <= 0:
    raise ValueError(f"total_tokens must be > 0, got {total_tokens}")
  return float(math.exp(min(float(total_nll) / float(total_tokens), 50.0)))


# ------------------------------------------------------------------ result tables


def _cell(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, (bool, int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    return f"{v:.2f}" if abs(v) >= 100 else f"{v:.4f}"
  return str(v)


def format_table(rows: dict, index_name: str = "domain") -> str:
  """A plain-text table for stdout: one line per row key (domain), one column per metric name
  (in first-seen order across rows), "-" where a row lacks that metric."""
  if not isinstance(rows, dict):
    raise TypeError(f"rows must be a dict of dicts, got {type(rows).__name__}")
  columns = []
  for name, row in rows.items():
    if not isinstance(row, dict):
      raise TypeError(f"rows[{name!r}] is a {type(row).__name__}, not a dict")
    columns += [c for c in row if c not in columns]
  table = [[index_name] + [str(c) for c in columns]]
  table += [[str(name)] + [_cell(row.get(c)) for c in columns] for name, row in rows.items()]
  widths = [max(len(r[j]) for r in table) for j in range(len(table[0]))]
  return "\n".join("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w)
                             for j, (cell, w) in enumerate(zip(r, widths))).rstrip()
                   for r in table)


TASK_KEYS = ("exact_match", "pass@1", "label_accuracy", "json_exact_match", "rouge_l", "bleu")
# The task metric a domain names (data.domains[i].metric; evaluate.task_metric computes each).
METRIC_NAMES = ("number_match", "pass_at_1", "law_label", "json_match", "rouge_l", "bleu")


def _task_cell(row: dict, key: str) -> str:
  """"pass@1 0.5", or for a metric that was not run (None), why: "pass@1 not run
  (eval.allow_code_execution=False)", never a number that would read as a score."""
  if row[key] is not None:
    return f"{key} {row[key]:.4g}"
  why = row.get(key + "_not_run", "")
  why = why.removeprefix("not run: ").split(" (")[0]
  return f"{key} not run" + (f" ({why})" if why else "")


# Under the general block: what the change means. A forgetting number alone says nothing of
# whether another method would forget less for the same in-domain gain; docs/RESULTS.md measures
# that on the tiny model, along each method's learning-rate frontier.
GENERAL_VS_FFT = ("vs full fine-tuning: compare at the same in-domain loss, not the same "
                  "learning rate; on the tiny model DES-MoE forgets as much as FFT or more "
                  "there, less only at the lightest adaptation (docs/RESULTS.md)")


def format_results(results: dict[str, dict]) -> str:
  """The evaluation table: one line per domain (loss, perplexity, task metric) and the general
  abilities against the base model."""
  lines = [f"{'domain':<12} {'loss':>8} {'ppl':>9}  task metric"]
  for name, r in results.items():
    if name in ("general", "lm_eval"):
      continue
    task = ", ".join(_task_cell(r, k) for k in TASK_KEYS if k in r)
    loss = f"{r['loss']:8.4f}" if "loss" in r else f"{'-':>8}"
    ppl = f"{r['perplexity']:9.2f}" if "perplexity" in r else f"{'-':>9}"
    lines.append(f"{name:<12} {loss} {ppl}  {task}")
  g = results.get("general", {})
  if g:
    lines.append("")
    lines.append(f"{'general abilities':<25} {'model':>8} {'base':>8} {'change':>8}")
    for label, key in (("held-out text loss", "loss"), ("multiple choice acc", "mc_accuracy"),
                       ("multiple choice acc/token", "mc_accuracy_norm")):
      if key in g:
        base = g.get("base_" + key)
        change = "" if base is None else f"{g[key] - base:+8.4f}"
        base_s = "" if base is None else f"{base:8.4f}"
        lines.append(f"{label:<25} {g[key]:8.4f} {base_s:>8} {change:>8}")
      if key == "loss":   # then per genre of data.general_genres, where it is set
        base_genres = g.get("base_loss_per_genre", {})
        for genre, loss in g.get("loss_per_genre", {}).items():
          base = base_genres.get(genre)
          change = "" if base is None else f"{loss - base:+8.4f}"
          base_s = "" if base is None else f"{base:8.4f}"
          lines.append(f"{'  ' + genre:<25} {loss:8.4f} {base_s:>8} {change:>8}")
    if "base_loss" in g:
      lines.append(GENERAL_VS_FFT)
  lm = results.get("lm_eval", {})
  if lm:
    lines.append("")
    lines.append(f"{'lm-evaluation-harness':<40} {'model':>9} {'base':>9} {'change':>9}")
    for task, scores in lm.items():
      for key, value in scores.items():
        if key.startswith("base_"):
          continue
        base = scores.get("base_" + key)
        base_s = "" if base is None else f"{base:9.4f}"
        change = "" if base is None else f"{value - base:+9.4f}"
        lines.append(f"{task + ' ' + key:<40} {value:9.4f} {base_s:>9} {change:>9}")
  return "\n".join(lines)
