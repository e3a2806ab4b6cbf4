"""The lm-evaluation-harness adapter (desmoe_jax/lm_eval_adapter.py) on the pretrained tiny model,
offline: its numbers against direct, unpadded forward passes, and three local lm-eval tasks (YAML
plus a small JSONL each: multiple choice, rolling log-likelihood, greedy generation) run through
lm_eval itself, whose scores are recomputed here from those numbers."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")

from desmoe_jax import build, evaluate  # noqa: E402
from desmoe_jax.generate import greedy_generate  # noqa: E402
from desmoe_jax.lm_eval_adapter import DesmoeLM, run_tasks  # noqa: E402
from desmoe_jax.run_config import load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 4  # items per local task


def write_tasks(folder) -> str:
  """Local lm-eval tasks `desmoe_mc`, `desmoe_text`, `desmoe_math` in `folder` (YAML + JSONL,
  taken from the bundled held-out data); returns the folder (lm-eval's include path)."""
  folder = str(folder)
  os.makedirs(folder, exist_ok=True)
  mc = [json.loads(line) for line in open(os.path.join(REPO, "data", "general", "mc.jsonl"))][:N]
  text = open(os.path.join(REPO, "data", "general", "heldout.txt")).read()
  paragraphs = [p for p in text.split("\n\n") if 200 < len(p) < 600][:N]
  math = [json.loads(line) for line in open(os.path.join(REPO, "data", "math", "eval.jsonl"))][:N]
  for name, rows in (("mc", mc), ("text", [{"text": p} for p in paragraphs]), ("math", math)):
    with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  common = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                         f"    test: {os.path.join(folder, name + '.jsonl')}\ntest_split: test\n")
  specs = {
      "desmoe_mc": common("mc") + (
          "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: choices\n"
          "doc_to_target: label\nmetric_list:\n  - metric: acc\n"),
      "desmoe_text": common("text") + (
          "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
          "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
      "desmoe_math": common("math") + (
          "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\n"
          "doc_to_target: \"{{answers[0]}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
          "  max_gen_toks: 12\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"),
  }
  for task, body in specs.items():
    with open(os.path.join(folder, f"{task}.yaml"), "w") as f:
      f.write(f"task: {task}\n{body}")
  return folder


class Req:
  def __init__(self, *args):
    self.args = args


@pytest.fixture(scope="module")
def tiny():
  from transformers import AutoTokenizer
  config = load_config("six_domains:tiny")
  return build.load_model(config), AutoTokenizer.from_pretrained(config.model.path)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids).logits.astype(jnp.float32)


def _direct(model, ids, n_scored):
  """Sum of log p of the last `n_scored` tokens of `ids` and whether each is the argmax: one
  unpadded forward pass (no segment ids, no positions), nothing shared with the adapter."""
  logits = _logits(*nnx.split(model), jnp.asarray([ids], jnp.int32))[0]
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  targets = np.asarray(ids[1:])
  picked = logp[:-1][np.arange(len(targets)), targets][-n_scored:]
  greedy = np.asarray(jnp.argmax(logits[:-1], axis=-1))[-n_scored:] == targets[-n_scored:]
  return float(picked.sum()), bool(greedy.all())


def test_loglikelihood_matches_a_direct_forward_pass(tiny):
  model, tokenizer = tiny
  lm = DesmoeLM(model, tokenizer, max_length=256, batch_size=4)
  item = json.loads(open(os.path.join(REPO, "data", "general", "mc.jsonl")).readline())
  requests = [Req(item["context"], " " + c) for c in item["choices"][:2]]
  requests += [Req("To be, or not ", "to be"), Req("", "The")]   # trailing space, empty context
  got = lm.loglikelihood(requests)
  for req, (logp, greedy) in zip(requests, got):
    ctx, cont = lm.encode_pair(*req.args)
    assert ctx[0] == tokenizer.bos_token_id and len(cont) >= 1
    assert ctx[1:] + cont == tokenizer(req.args[0] + req.args[1],
                                       add_special_tokens=False)["input_ids"]
    want_logp, want_greedy = _direct(model, ctx + cont, len(cont))
    assert logp == pytest.approx(want_logp, abs=1e-4, rel=1e-5)
    assert greedy == want_greedy
  assert lm.encode_pair("To be, or not ", "to be")[1] == lm.encode_pair("To be, or not",
                                                                          " to be")[1]
  # One batch of 4 at the widest bucket, one of 2 at a smaller one: compiled per width bucket.
  assert lm.compiled_widths <= {32, 64, 128, 256}
  # A sequence longer than max_length keeps its last max_length + 1 tokens.
  short = DesmoeLM(model, tokenizer, max_length=16, batch_size=2)
  ctx, cont = short.encode_pair(item["context"], " " + item["choices"][0])
  seq = (ctx + cont)[-17:]
  assert short.loglikelihood([Req(item["context"], " " + item["choices"][0])])[0][0] == \
      pytest.approx(_direct(model, seq, len(cont))[0], abs=1e-4, rel=1e-5)


def test_builtin_multiple_choice_and_lm_eval_give_the_same_log_likelihoods(tiny):
  """evaluate.py's multiple-choice metric (data.general_mc) and lm-eval's loglikelihood score
  the same pairs alike: lm-eval's encoding (BOS, the context's trailing newline moved into the
  continuation), the same sums, and each one a direct forward pass's."""
  model, tokenizer = tiny
  items = [json.loads(line) for line in open(os.path.join(REPO, "data", "general", "mc.jsonl"))]
  pairs = [(item["context"], c) for item in items[:3] for c in item["choices"]]
  builtin = evaluate.mc_scorer(model, tokenizer, seq_len=256)(pairs)
  lm = DesmoeLM(model, tokenizer, max_length=256, batch_size=8)
  via_lm_eval = lm.loglikelihood([Req(context, c) for context, c in pairs])
  assert [logp for logp, _ in builtin] == [logp for logp, _ in via_lm_eval]
  for (context, c), (logp, n) in zip(pairs, builtin):
    ctx, cont = lm.encode_pair(context, c)
    assert context.endswith("\n") and ctx[0] == tokenizer.bos_token_id and n == len(cont)
    assert tokenizer.decode(cont).startswith("\n")
    assert logp == pytest.approx(_direct(model, ctx + cont, len(cont))[0], abs=1e-4, rel=1e-5)


def test_rolling_loglikelihood_is_the_sum_over_windows(tiny):
  model, tokenizer = tiny
  text = open(os.path.join(REPO, "data", "general", "heldout.txt")).read()[:300]
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  whole = DesmoeLM(model, tokenizer, max_length=256).loglikelihood_rolling([Req(text)])[0]
  assert len(ids) < 256
  assert whole == pytest.approx(_direct(model, [tokenizer.bos_token_id] + ids, len(ids))[0],
                                abs=1e-3, rel=1e-5)
  w = 48
  windows = DesmoeLM(model, tokenizer, max_length=w).loglikelihood_rolling([Req(text)])[0]
  want = _direct(model, [tokenizer.bos_token_id] + ids[:w], w)[0]     # first window: all w
  for start in range(w, len(ids), w):         # then up to w new tokens, given the w + 1 before
    end = min(start + w, len(ids))
    want += _direct(model, ids[end - w - 1:end], end - start)[0]
  assert windows == pytest.approx(want, abs=1e-3, rel=1e-5)


def test_local_tasks_through_lm_eval(tiny, tmp_path):
  model, tokenizer = tiny
  folder = write_tasks(tmp_path / "tasks")
  scores = run_tasks(model, tokenizer, ["desmoe_mc", "desmoe_text", "desmoe_math"],
                     include_path=folder, max_length=256, batch_size=4, max_gen_toks=32)
  lm = DesmoeLM(model, tokenizer, max_length=256, batch_size=4)

  mc = [json.loads(line) for line in open(os.path.join(folder, "mc.jsonl"))]
  correct = [int(np.argmax([lp for lp, _ in lm.loglikelihood(
      [Req(it["context"], " " + c) for c in it["choices"]])]) == it["label"]) for it in mc]
  assert scores["desmoe_mc"]["acc"] == pytest.approx(np.mean(correct))

  texts = [json.loads(line)["text"] for line in open(os.path.join(folder, "text.jsonl"))]
  logps = lm.loglikelihood_rolling([Req(t) for t in texts])
  words = sum(len(t.split()) for t in texts)
  assert scores["desmoe_text"]["word_perplexity"] == pytest.approx(
      np.exp(-sum(logps) / words), rel=1e-4)

  math = [json.loads(line) for line in open(os.path.join(folder, "math.jsonl"))]
  prompts = [[tokenizer.bos_token_id] + tokenizer(m["prompt"], add_special_tokens=False)[
      "input_ids"] for m in math]
  outs = greedy_generate(model, prompts, max_new_tokens=12, eos_ids=[tokenizer.eos_token_id])
  texts = [tokenizer.decode(o, skip_special_tokens=True).split("\n")[0] for o in outs]
  assert lm.generate_until([Req(m["prompt"], {"until": ["\n"], "max_gen_toks": 12})
                            for m in math]) == texts
  assert scores["desmoe_math"]["exact_match"] == pytest.approx(
      np.mean([t == m["answers"][0] for t, m in zip(texts, math)]))
  with pytest.raises(ValueError, match="asks for sampling"):
    lm.generate_until([Req("x", {"until": ["\n"], "do_sample": True})])
