"""Task metrics against hand-computed values; the code sandbox against bad programs."""

import json
import math
import os

import pytest

from desmoe_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jsonl(path):
  with open(os.path.join(REPO, path)) as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------ exact match and numbers


def test_exact_match_normalisation():
  assert metrics.normalize_answer("  42。 ") == "42"
  assert metrics.normalize_answer("divorce \n granted.") == "divorce granted"
  assert metrics.normalize_answer("Yes!") == "Yes"  # case is kept
  # Row 0 matches after normalisation, row 1 matches its second answer, row 2 does not match.
  assert metrics.exact_match(["42.", "x", "Yes"], [["42"], ["y", "x "], "yes"]) == \
      pytest.approx(2 / 3)


def test_exact_match_validates_inputs():
  with pytest.raises(ValueError, match=r"answers\[0\]"):
    metrics.exact_match(["1"], [[]])
  with pytest.raises(ValueError, match="preds has 2 items but answers has 1"):
    metrics.exact_match(["1", "2"], [["1"]])
  with pytest.raises(TypeError, match=r"preds\[1\] is a int"):
    metrics.exact_match(["1", 2], ["1", "2"])
  with pytest.raises(TypeError, match="preds must be a list"):
    metrics.exact_match("12", ["1", "2"])
  with pytest.raises(ValueError, match="empty"):
    metrics.exact_match([], [])


def test_extract_final_number():
  assert metrics.extract_final_number("3 * 4 = 12\n#### 1,200") == "1200"
  assert metrics.extract_final_number("The answer is 42. Check: 6 * 7 = 42, plus 1 is 43") == "42"
  assert metrics.extract_final_number("所以答案是 3.50 元") == "3.5"
  assert metrics.extract_final_number(r"so $x = \boxed{-7}$ and 8") == "-7"
  assert metrics.extract_final_number("so it is 7.0 apples, not 5") == "5"
  assert metrics.extract_final_number("The total: 19.0") == "19"
  assert metrics.extract_final_number("counts 1,2,3") == "3"  # not the number 123
  assert metrics.extract_final_number("no digits") is None
  assert metrics.number_match(["... #### 1200", "The answer is 5", "none"],
                              [["1,200"], "6", "7"]) == pytest.approx(1 / 3)


def test_law_labels():
  assert metrics.law_label("判决如下：不准原告张三与被告李四离婚，案件受理费") == "divorce_denied"
  assert metrics.law_label("判决如下：准予原告刘芳与被告李泉离婚，驳回原告其他诉讼请求") == "divorce_granted"
  assert metrics.law_label("驳回原告田钰的诉讼请求，案件受理费300元") == "dismissed"
  assert metrics.law_label("经法院主持调解，双方自愿离婚") == "mediation"
  assert metrics.law_label("被告返还彩礼；驳回原告其他诉讼请求") == "property_returned"
  assert metrics.law_label("天气很好") == "other"
  assert metrics.law_accuracy(["不准予原告A与被告B离婚", "准予离婚"],
                              [["divorce_denied"], ["dismissed"]]) == 0.5


# ------------------------------------------------------------------ intent JSON


def test_intent_json_match():
  ref = ['{"intent": "FilmTele-Play", "slots": {"name": "速度与激情", "region": "美国"}}']
  reordered = '{"slots": {"region": "美国", "name": "速度与激情"}, "intent": "FilmTele-Play"}。\n\n请分析'
  other_slot = '{"intent": "FilmTele-Play", "slots": {"name": "速度与激情", "region": "日本"}}。'
  truncated = '{"intent": "FilmTele-Play", "slots": {"name": "速度与激情"'
  preds = [reordered, other_slot, truncated, "not json {", ""]
  assert metrics.intent_json_match(preds, [ref] * 5) == pytest.approx(1 / 5)
  # Lists inside slots keep their order.
  assert metrics.intent_json_match(['{"d": ["18号", "17号"]}'], ['{"d": ["17号", "18号"]}']) == 0.0
  assert metrics.first_json_object('x {"a": "}{\\"}"} y') == {"a": '}{"}'}
  with pytest.raises(ValueError, match=r"answers\[0\]\[0\] holds no JSON"):
    metrics.intent_json_match(["{}"], [["intent: x"]])


def test_intent_answers_in_their_real_format_match_themselves():
  answers = [r["answers"] for r in _jsonl("data/intent/eval.jsonl")]
  generations = [a[0] + "。" for a in answers]  # the ESFT answer format ends with "。"
  assert metrics.intent_json_match(generations, answers) == 1.0


# ------------------------------------------------------------------ code pass@1 (sandboxed)


# Skipped only where the machine cannot isolate; an error where it can but the sandbox does not
# (conftest.py's `isolation`).
needs_isolation = pytest.mark.usefixtures("isolation")


@pytest.fixture(scope="module")
def problems():
  return _jsonl("data/code/eval.jsonl")[:3]  # HumanEval/0-2, `answers` = canonical solution


@needs_isolation
def test_pass_at_1_canonical_wrong_and_bad_programs(problems, monkeypatch):
  monkeypatch.setenv("HF_TOKEN", "secret")
  monkeypatch.setenv("https_proxy", "http://proxy")
  p0 = problems[0]
  canonical = [p["answers"][0] for p in problems]
  leak_check = "    import os\n    assert 'HF_TOKEN' not in os.environ and not any(\n" \
               "        'proxy' in k.lower() for k in os.environ)\n" + canonical[0]
  cases = [
      (p0, "    return None\n"),  # wrong answer -> failed assertion
      (p0, "    x = bytearray(8 << 30)\n    return x\n"),  # memory bomb -> MemoryError
      (p0, "    x = []\n    while True:\n        x.append(' ' * 10**6)\n"),  # slow memory bomb
      (p0, "    import sys\n    sys.exit(0)\n"),  # exiting early is no pass
      (p0, "    return 1 +\n"),  # syntax error
      # Top-level junk after the body is cut at the stop sequence "\ndef".
      (p0, canonical[0] + "\ndef main():\n    raise SystemExit(1)\nmain()\n"),
      (p0, leak_check),  # no tokens or proxies in the sandbox environment
  ]
  out = metrics.pass_at_1(problems + [p for p, _ in cases], canonical + [c for _, c in cases],
                          timeout=10)
  reasons = [(r["reason"], r["detail"]) for r in out["results"]]
  assert [r["passed"] for r in out["results"]] == [True] * 3 + [False] * 5 + [True] * 2, reasons
  assert out["passed"] == 5 and out["total"] == 10 and out["pass@1"] == 0.5
  assert out["results"][0]["task_id"] == "HumanEval/0"
  assert reasons[3][0] == "failed" and "AssertionError" in reasons[3][1]
  assert reasons[4] == ("error", "MemoryError")
  assert reasons[5] == ("error", "MemoryError")
  assert reasons[6] == ("error", "SystemExit: 0")
  assert reasons[7][0] == "error" and "SyntaxError" in reasons[7][1]
  json.dumps(out)  # results go straight into results.json


@needs_isolation
def test_pass_at_1_infinite_loop_times_out(problems):
  out = metrics.pass_at_1(problems[:1], ["    while True:\n        pass\n"], timeout=1)
  r = out["results"][0]
  assert (r["passed"], r["reason"]) == (False, "timeout") and 0.9 < r["seconds"] < 5


def test_pass_at_1_validates_problems(problems):
  with pytest.raises(ValueError, match="problems has 1 items but completions has 2"):
    metrics.pass_at_1(problems[:1], ["", ""])
  with pytest.raises(ValueError, match=r"problems\[0\]\['entry_point'\] is not an identifier"):
    metrics.pass_at_1([dict(problems[0], entry_point="f); import os; (")], [""])
  with pytest.raises(ValueError, match=r"problems\[0\] needs a string 'test'"):
    metrics.pass_at_1([{"prompt": "", "entry_point": "f"}], [""])
  with pytest.raises(TypeError, match=r"completions\[0\] is a NoneType"):
    metrics.pass_at_1(problems[:1], [None])


# ------------------------------------------------------------------ BLEU and ROUGE-L


def test_bleu_hand_values():
  same = "Die Datei konnte nicht geöffnet werden ."
  assert metrics.bleu([same], [[same]]) == pytest.approx(100.0)
  # "the cat sat on the mat" vs "the cat sat on a mat" (13a tokens = words): n-gram precisions
  # 5/6, 3/5, 2/4, 1/3, equal lengths (BP = 1):
  # BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 12 ** -0.25.
  assert metrics.bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == \
      pytest.approx(100 * 12 ** -0.25, abs=1e-6)
  # Chinese: "auto" picks sacrebleu's "zh" tokenizer (one token per character). 4 of the
  # reference's 7 characters, all n-grams correct: BLEU = BP = exp(1 - 7/4). Under 13a the whole
  # sentence is one token and nothing matches.
  assert metrics.bleu_tokenizer([["我爱北京天安门"]]) == "zh"
  assert metrics.bleu(["我爱北京"], [["我爱北京天安门"]]) == \
      pytest.approx(100 * math.exp(-0.75), abs=1e-6)
  assert metrics.bleu(["我爱北京"], [["我爱北京天安门"]], tokenize="13a") == 0.0
  # Rows with fewer references are padded, not misaligned.
  assert metrics.bleu(["a b c d", "e f g h"], [["a b c d"], ["x y", "e f g h"]]) == \
      pytest.approx(100)
  assert metrics.sentence_bleu([same, "x y z w"], [same, "a b c d"]) == [pytest.approx(100.0), 0.0]
  with pytest.raises(ValueError, match="tokenize='nope'"):
    metrics.bleu(["a"], ["a"], tokenize="nope")


def test_rouge_l_chinese_hand_values():
  assert metrics.cjk_tokenize("客户WiFi密码，２０２３年！") == ["客", "户", "wifi", "密", "码", "2023", "年"]
  # ref 反映流量超出 (6 chars), pred 反映费用超出 (6 chars): LCS 反映超出 = 4, P = R = F = 4/6.
  assert metrics.rouge_l(["反映费用超出"], [["反映流量超出"]]) == pytest.approx(100 * 4 / 6)
  # pred 客户反映流量 (6) vs ref 客户来电反映流量问题 (10): LCS = 6, P = 1, R = 0.6, F = 0.75.
  assert metrics.rouge_l_scores(["客户反映流量。"], [["客户来电反映流量问题"]]) == \
      [pytest.approx(0.75)]
  # Mean over examples (0.75 and 0), best reference per example; English words are tokens.
  preds = ["客户反映流量", "open the file"]
  refs = [["客户来电反映流量问题"], ["close it", "open the file"]]
  assert metrics.rouge_l(preds, refs) == pytest.approx(100 * (0.75 + 1.0) / 2)
  assert metrics.rouge_l(["", "完全不同"], ["反映", "反映"]) == 0.0


# ------------------------------------------------------------------ general abilities and tables


def test_multiple_choice_accuracy_raw_and_per_token():
  items = [{"context": c, "choices": ["x", "yy"], "label": label}
           for c, label in (("a", 0), ("b", 0), ("c", 1))]
  # Fake model: "x" = 1 token, log p -1.0; "yy" = 2 tokens, log p -1.6 (-0.8 per token). Raw sums
  # always pick "x" (2 of 3 labels), the per-token score always picks "yy" (1 of 3).
  calls = []

  def score_fn(pairs):
    calls.append(list(pairs))
    return [{"x": (-1.0, 1), "yy": (-1.6, 2)}[c] for _, c in pairs]

  out = metrics.multiple_choice_accuracy(score_fn, items)
  assert out == {"accuracy": pytest.approx(2 / 3), "accuracy_norm": pytest.approx(1 / 3),
                 "items": 3}
  assert len(calls) == 1 and calls[0][:2] == [("a", "x"), ("a", "yy")]  # one batched call
  json.dumps(out)
  with pytest.raises(ValueError, match=r"items\[0\]\['label'\] must be an int in \[0, 2\)"):
    metrics.multiple_choice_accuracy(score_fn, [dict(items[0], label=2)])
  with pytest.raises(ValueError, match="score_fn returned 1 scores for 6 pairs"):
    metrics.multiple_choice_accuracy(lambda pairs: [(0.0, 1)], items)
  with pytest.raises(ValueError, match="score_fn result 0 needs a token count"):
    metrics.multiple_choice_accuracy(lambda pairs: [(0.0, 0)] * len(pairs), items)


def test_perplexity():
  assert metrics.perplexity(2.0, 2) == pytest.approx(math.e)
  assert metrics.perplexity(3 * math.log(8), 3) == pytest.approx(8.0)
  assert metrics.perplexity(1e6, 1) == pytest.approx(math.exp(50))  # capped, still finite
  with pytest.raises(ValueError, match="total_tokens must be > 0"):
    metrics.perplexity(1.0, 0)
  with pytest.raises(ValueError, match="total_nll must be a finite number"):
    metrics.perplexity(float("nan"), 3)


def test_format_table():
  rows = {"math": {"exact_match": 0.5, "loss": 1.23456}, "code": {"pass@1": 1.0, "loss": 123.456},
          "law": {"n": 41}}
  assert metrics.format_table(rows) == "\n".join([
      "domain  exact_match    loss  pass@1   n",
      "math         0.5000  1.2346       -   -",
      "code              -  123.46  1.0000   -",
      "law               -       -       -  41",
  ])
  with pytest.raises(TypeError, match=r"rows\['law'\] is a list"):
    metrics.format_table({"law": [1]})


def test_format_results_general_block_is_aligned():
  text = metrics.format_results({"general": {
      "loss": 6.3237, "base_loss": 4.648, "mc_accuracy": 0.255, "base_mc_accuracy": 0.285,
      "mc_accuracy_norm": 0.265, "base_mc_accuracy_norm": 0.29}})
  block = text[text.index("general abilities"):].splitlines()
  assert block[1].split() == ["held-out", "text", "loss", "6.3237", "4.6480", "+1.6757"]
  assert block[3].startswith("multiple choice acc/token") and block[3].endswith("-0.0250")
  assert len({len(line) for line in block[:4]}) == 1      # the columns line up
  assert block[4] == metrics.GENERAL_VS_FFT and "docs/RESULTS.md" in block[4]


def test_format_results_lists_the_general_loss_per_genre_under_the_loss():
  text = metrics.format_results({"general": {
      "loss": 5.0, "base_loss": 4.5, "loss_per_genre": {"code": 4.0, "math": 6.25},
      "base_loss_per_genre": {"code": 3.5, "math": 6.0}}})
  block = text[text.index("general abilities"):].splitlines()
  assert block[2].split() == ["code", "4.0000", "3.5000", "+0.5000"]
  assert block[3].split() == ["math", "6.2500", "6.0000", "+0.2500"]
  assert len({len(line) for line in block[:4]}) == 1


def test_format_results_names_a_metric_that_was_not_run():
  text = metrics.format_results({"code": {"loss": 1.5, "pass@1": None,
                                          "pass@1_not_run": "not run: eval.allow_code_execution="
                                                            "False (set it to True ...)"},
                                 "math": {"loss": 1.0, "exact_match": 0.0}})
  assert "pass@1 not run (eval.allow_code_execution=False)" in text
  assert "exact_match 0" in text  # a measured zero is still a number
