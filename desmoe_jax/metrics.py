"""Task metrics for the six domains and general-ability scores. Pure Python/numpy over
predictions and references; the model side lives in `evaluate.py`.

| domain      | metric                                                                  |
|-------------|-------------------------------------------------------------------------|
| math        | exact match of the final number (after "####", else the last number)   |
| intent      | exact match of the parsed JSON (key order irrelevant)                   |
| code        | pass@1: HumanEval tests run in a sandboxed subprocess with a timeout    |
| law         | accuracy of the judgment's outcome label (`law_label`, keyword rules)   |
| summary     | ROUGE-L F (rouge-score; CJK characters are tokens of their own)         |
| translation | corpus BLEU (sacrebleu, its 13a tokenizer)                              |
| general     | held-out text perplexity; multiple-choice log-likelihood accuracy      |
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence

import numpy as np


def _check_pairs(preds, answers):
  if not isinstance(preds, (list, tuple)) or not isinstance(answers, (list, tuple)):
    raise TypeError("preds and answers must be lists")
  if len(preds) != len(answers):
    raise ValueError(f"preds has {len(preds)} items but answers has {len(answers)}")
  for i, a in enumerate(answers):
    if not isinstance(a, (list, tuple)) or not a or not all(isinstance(x, str) for x in a):
      raise ValueError(f"answers[{i}] must be a non-empty list of strings")
  for i, p in enumerate(preds):
    if not isinstance(p, str):
      raise ValueError(f"preds[{i}] is a {type(p).__name__}, not a string")
  if not preds:
    raise ValueError("no predictions to score")


# ------------------------------------------------------------------ exact match family

_TRAILING = "。．.!！?？;；,，、 \n\t"


def normalize_answer(text: str) -> str:
  """Whitespace collapsed and trailing punctuation (incl. CJK) removed."""
  return re.sub(r"\s+", " ", text.strip()).rstrip(_TRAILING).strip()


def exact_match(preds: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
  """Fraction of predictions equal (after `normalize_answer`) to one of their answers."""
  _check_pairs(preds, answers)
  return float(np.mean([normalize_answer(p) in {normalize_answer(a) for a in ans}
                        for p, ans in zip(preds, answers)]))


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def extract_final_number(text: str) -> str | None:
  """The final numeric answer of a worked solution: after "####" if present, else the last
  number in the text; thousands separators and a trailing ".0" are removed."""
  if "####" in text:
    found = re.findall(_NUMBER, text.split("####")[-1])[:1]
  else:
    found = re.findall(_NUMBER, text)[-1:]
  if not found:
    return None
  n = found[0].replace(",", "")
  return n[:-2] if n.endswith(".0") else n


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


def law_accuracy(generations: Sequence[str], labels: Sequence[Sequence[str]]) -> float:
  _check_pairs(generations, labels)
  return float(np.mean([law_label(g) in ans for g, ans in zip(generations, labels)]))


# ------------------------------------------------------------------ intent JSON


def first_json_object(text: str):
  """The first balanced {...} in `text` parsed as JSON, or None."""
  start = text.find("{")
  while start >= 0:
    depth, in_str, escape = 0, False, False
    for i in range(start, len(text)):
      ch = text[i]
      if in_str:
        escape = ch == "\\" and not escape
        if ch == '"' and not escape:
          in_str = False
        continue
      if ch == '"':
        in_str = True
      elif ch == "{":
        depth += 1
      elif ch == "}":
        depth -= 1
        if depth == 0:
          try:
            return json.loads(text[start:i + 1])
          except json.JSONDecodeError:
            break
    start = text.find("{", start + 1)
  return None


def intent_json_match(preds: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
  """Fraction of predictions whose JSON equals one of the answers' JSON (unparsable = wrong)."""
  _check_pairs(preds, answers)
  hits = []
  for p, ans in zip(preds, answers):
    got = first_json_object(p)
    hits.append(got is not None and any(got == first_json_object(a) for a in ans))
  return float(np.mean(hits))


# ------------------------------------------------------------------ code pass@1 (sandboxed)


# Runs inside the child interpreter: limits first, then the untrusted program. (A preexec_fn
# would fork the multithreaded JAX process, which can deadlock.)
_LAUNCHER = """import resource, runpy, sys
mem, cpu = int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (10 << 20, 10 << 20))
resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def run_program(source: str, timeout: float, memory_bytes: int = 1 << 30) -> tuple[bool, str]:
  """Runs `source` in an isolated `python3 -I` subprocess (own session, fresh temp dir,
  memory/CPU/file/process limits, no inherited environment); returns (passed, reason)."""
  env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8", "HOME": "/nonexistent"}
  with tempfile.TemporaryDirectory() as tmp:
    for name, text in (("program.py", source), ("launcher.py", _LAUNCHER)):
      with open(os.path.join(tmp, name), "w") as f:
        f.write(text)
    cmd = [sys.executable, "-I", "launcher.py", "program.py", str(memory_bytes),
           str(int(math.ceil(timeout)) + 1)]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
      _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)  # the whole session: program and its children
      proc.communicate()
      return False, "timeout"
  if proc.returncode == 0:
    return True, "passed"
  last = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
  return False, "failed: " + last[0][:200]


def pass_at_1(problems: Sequence[dict], completions: Sequence[str], *, timeout: float = 5.0,
              workers: int = 2) -> dict:
  """HumanEval-style pass@1 with one completion per problem ({"prompt", "test",
  "entry_point"}): the program is prompt + completion + test + `check(entry_point)`."""
  if len(problems) != len(completions):
    raise ValueError(f"problems has {len(problems)} items but completions has {len(completions)}")
  for i, p in enumerate(problems):
    for key in ("prompt", "test", "entry_point"):
      if not isinstance(p.get(key), str):
        raise ValueError(f"problems[{i}] needs a string {key!r}")
  programs = [p["prompt"] + c + "\n\n" + p["test"] + f"\n\ncheck({p['entry_point']})\n"
              for p, c in zip(problems, completions)]
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    results = list(pool.map(lambda src: run_program(src, timeout), programs))
  return {"pass@1": float(np.mean([ok for ok, _ in results])) if results else 0.0,
          "results": [{"passed": ok, "reason": why} for ok, why in results]}


# ------------------------------------------------------------------ BLEU and ROUGE-L


def bleu(preds: Sequence[str], answers: Sequence[Sequence[str]], tokenize: str = "13a") -> float:
  """Corpus BLEU (sacrebleu). Rows with fewer references repeat their first one."""
  import sacrebleu
  _check_pairs(preds, answers)
  n_refs = max(len(a) for a in answers)
  streams = [[a[i] if i < len(a) else a[0] for a in answers] for i in range(n_refs)]
  return float(sacrebleu.corpus_bleu(list(preds), streams, tokenize=tokenize).score)


class _CjkTokenizer:
  """rouge-score tokenizer keeping CJK: each CJK character is a token, other text splits into
  lowercase alphanumeric words (rouge-score's default drops every non-ASCII character)."""

  _TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]|"
                      r"[0-9A-Za-z\u00c0-\u024f]+")

  def tokenize(self, text):
    return [t.lower() for t in self._TOKEN.findall(text)]


def rouge_l(preds: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
  """Mean ROUGE-L F-measure (x100), best over each row's references."""
  from rouge_score import rouge_scorer
  _check_pairs(preds, answers)
  scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CjkTokenizer())
  return 100.0 * float(np.mean([max(scorer.score(a, p)["rougeL"].fmeasure for a in ans)
                                for p, ans in zip(preds, answers)]))


# ------------------------------------------------------------------ general abilities


def multiple_choice_accuracy(score_fn: Callable, items: Sequence[dict]) -> dict:
  """Log-likelihood multiple choice. `score_fn([(context, continuation), ...])` returns
  [(sum of log-probabilities, number of tokens)]; the choice with the highest total
  ("accuracy") or per-token ("accuracy_norm") log-likelihood is the model's answer."""
  if not items:
    raise ValueError("no multiple-choice items")
  pairs, owners = [], []
  for i, item in enumerate(items):
    if not isinstance(item.get("choices"), list) or not isinstance(item.get("label"), int):
      raise ValueError(f"items[{i}] needs 'choices' (list) and 'label' (int)")
    for c in item["choices"]:
      pairs.append((item["context"], c))
      owners.append(i)
  scores = score_fn(pairs)
  if len(scores) != len(pairs):
    raise ValueError(f"score_fn returned {len(scores)} scores for {len(pairs)} pairs")
  raw, norm = [[] for _ in items], [[] for _ in items]
  for i, (logp, n) in zip(owners, scores):
    raw[i].append(logp)
    norm[i].append(logp / max(n, 1))
  labels = [item["label"] for item in items]
  return {"accuracy": float(np.mean([int(np.argmax(r)) == l for r, l in zip(raw, labels)])),
          "accuracy_norm": float(np.mean([int(np.argmax(r)) == l for r, l in zip(norm, labels)])),
          "items": len(items)}


def perplexity(total_nll: float, total_tokens: float) -> float:
  if total_tokens <= 0:
    raise ValueError("perplexity of zero tokens")
  return float(math.exp(min(total_nll / total_tokens, 50.0)))


def format_results(results: dict[str, dict]) -> str:
  """The evaluation table: one line per domain (loss, perplexity, task metric) and the general
  abilities against the base model."""
  lines = [f"{'domain':<12} {'loss':>8} {'ppl':>9}  task metric"]
  for name, r in results.items():
    if name == "general":
      continue
    task = ", ".join(f"{k} {r[k]:.4g}" for k in TASK_KEYS if k in r)
    loss = f"{r['loss']:8.4f}" if "loss" in r else f"{'-':>8}"
    ppl = f"{r['perplexity']:9.2f}" if "perplexity" in r else f"{'-':>9}"
    lines.append(f"{name:<12} {loss} {ppl}  {task}")
  g = results.get("general", {})
  if g:
    lines.append("")
    lines.append("general abilities        model     base   change")
    for label, key in (("held-out text loss", "loss"), ("multiple choice acc", "mc_accuracy"),
                       ("multiple choice acc/token", "mc_accuracy_norm")):
      if key in g:
        base = g.get("base_" + key)
        change = "" if base is None else f"{g[key] - base:+8.4f}"
        base_s = "" if base is None else f"{base:8.4f}"
        lines.append(f"{label:<24} {g[key]:8.4f} {base_s:>8} {change:>8}")
  return "\n".join(lines)


TASK_KEYS = ("exact_match", "pass@1", "label_accuracy", "json_exact_match", "rouge_l", "bleu")
