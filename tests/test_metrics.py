"""Task metrics on hand examples."""

import json
import os

import pytest

from desmoe_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_exact_match_and_final_number():
  assert metrics.normalize_answer("  42。 ") == "42"
  assert metrics.exact_match(["42.", "x"], [["42"], ["y", "x "]]) == 1.0
  assert metrics.extract_final_number("3 * 4 = 12\n#### 1,200") == "1200"
  assert metrics.extract_final_number("so it is 7.0 apples, not 5") == "5"
  assert metrics.extract_final_number("The answer: 19.0") == "19"
  assert metrics.extract_final_number("no digits") is None
  with pytest.raises(ValueError, match="answers\\[0\\]"):
    metrics.exact_match(["1"], [[]])
  with pytest.raises(ValueError, match="2 items but answers has 1"):
    metrics.exact_match(["1", "2"], [["1"]])


def test_law_labels():
  assert metrics.law_label("判决如下：不准原告张三与被告李四离婚，案件受理费") == "divorce_denied"
  assert metrics.law_label("判决如下：准予原告刘芳与被告李泉离婚，驳回原告其他诉讼请求") == "divorce_granted"
  assert metrics.law_label("驳回原告田钰的诉讼请求，案件受理费300元") == "dismissed"
  assert metrics.law_label("经法院主持调解，双方自愿离婚") == "mediation"
  assert metrics.law_label("被告返还彩礼；驳回原告其他诉讼请求") == "property_returned"
  assert metrics.law_label("天气很好") == "other"
  assert metrics.law_accuracy(["不准予原告A与被告B离婚", "准予离婚"],
                              [["divorce_denied"], ["dismissed"]]) == 0.5


def test_intent_json_match():
  ref = ['{"intent": "FilmTele-Play", "slots": {"name": "速度与激情", "region": "美国"}}']
  same = '{"slots": {"region": "美国", "name": "速度与激情"}, "intent": "FilmTele-Play"}。'
  other_slot = '{"intent": "FilmTele-Play", "slots": {"name": "速度与激情", "region": "日本"}}'
  assert metrics.intent_json_match([same, other_slot, "not json {", ""], [ref] * 4) == 0.25
  assert metrics.first_json_object('x {"a": "}{"} y') == {"a": "}{"}


def test_bleu_and_rouge_l_hand_values():
  same = "Die Datei konnte nicht geöffnet werden ."
  assert metrics.bleu([same], [[same]]) == pytest.approx(100.0)
  # A 4-token hypothesis sharing 3 unigrams and 2 bigrams with a 4-token reference (no trigram):
  # sacrebleu's smoothed BLEU is well below 100 and above 0.
  partial = metrics.bleu(["the cat sat down"], [["the cat sat here"]])
  assert 0.0 < partial < 100.0
  # Chinese ROUGE-L by hand: ref 反映流量超出 (6 chars), pred 反映费用超出 (6 chars);
  # LCS = 反映超出 = 4 -> P = R = F = 4/6.
  assert metrics.rouge_l(["反映费用超出"], [["反映流量超出"]]) == pytest.approx(100 * 4 / 6)
  # Several references: the best one counts; English words are tokens.
  assert metrics.rouge_l(["open the file"], [["close it", "open the file"]]) == pytest.approx(100)


def test_pass_at_1_sandbox():
  with open(os.path.join(REPO, "data", "code", "eval.jsonl")) as f:  # bundled HumanEval
    problems = [json.loads(l) for l in f][:3]
  good = [p["answers"][0] for p in problems]
  out = metrics.pass_at_1(problems, good, timeout=10)
  assert out["pass@1"] == 1.0, out["results"]
  wrong = metrics.pass_at_1(problems[:1], ["    return None\n"], timeout=10)
  assert wrong["pass@1"] == 0.0 and wrong["results"][0]["reason"].startswith("failed")
  loop = metrics.pass_at_1(problems[:1], ["    while True:\n        pass\n"], timeout=1)
  assert loop["results"][0]["reason"] == "timeout"
  bomb = metrics.pass_at_1(problems[:1], ["    x = bytearray(8 << 30)\n"], timeout=10)
  assert bomb["results"][0]["reason"].startswith("failed") and "MemoryError" in \
      bomb["results"][0]["reason"]


def test_multiple_choice_accuracy_and_perplexity():
  items = [{"context": "a", "choices": ["x", "yy"], "label": 1},
           {"context": "b", "choices": ["x", "yy"], "label": 0}]
  # Fake model: log p = -1 per token; "yy" has 2 tokens -> total prefers "x", per-token ties.
  scores = {"x": (-1.0, 1), "yy": (-1.5, 2)}
  out = metrics.multiple_choice_accuracy(lambda pairs: [scores[c] for _, c in pairs], items)
  assert out["accuracy"] == 0.5 and out["accuracy_norm"] == 0.5 and out["items"] == 2
  assert metrics.perplexity(2.0, 2.0) == pytest.approx(2.718281828)
