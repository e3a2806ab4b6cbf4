"""lm-evaluation-harness over desmoe_jax: general benchmarks (MMLU, GSM8K, HellaSwag, ...) for the
base and the adapted model, the forgetting measure the paper uses at scale.

`DesmoeLM(model, tokenizer)` is an `lm_eval.api.model.LM`:
* `loglikelihood`: sum of log p(continuation | context) and whether greedy decoding would produce
  the continuation, from the one continuation scorer (desmoe_jax/scoring.py: lm-eval's HF
  encoding, length-sorted batches padded to power-of-two widths), which evaluate.py's
  multiple-choice metric uses too.
* `loglikelihood_rolling`: the text's log-likelihood in disjoint windows of `max_length` tokens
  (lm-eval's own windowing), scored by the same function.
* `generate_until`: greedy generation with the KV cache (`generate.greedy_generate`, bucketed
  the same way), cut at the first stop string. Only greedy decoding is offered: a task asking
  for sampling is refused by name.

`run_tasks(model, tokenizer, tasks, ...)` runs tasks (names, or YAML tasks found under
`include_path`) and returns {task: {metric: value}}. `eval.py --config.eval.lm_eval_tasks=...`
calls it for the base and the adapted model (desmoe_jax/evaluate.py).
Needs `pip install 'desmoe-jax[lm_eval]'`.
"""

from __future__ import annotations

from desmoe_jax import scoring
from desmoe_jax.generate import greedy_generate
from desmoe_jax.scoring import ContinuationScorer

try:
  import lm_eval
  from lm_eval.api.model import LM
  from lm_eval.tasks import TaskManager
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the optional extra
  raise ImportError("config.eval.lm_eval_tasks needs lm-evaluation-harness: pip install "
                    "'desmoe-jax[lm_eval]' (or lm_eval)") from e


class DesmoeLM(LM):
  """An lm-eval model over a `MoECausalLM` (any family) and its tokenizer (see module docstring).
  Log-likelihoods come from scoring.ContinuationScorer, the scorer evaluate.py uses too."""

  def __init__(self, model, tokenizer, *, max_length: int = 1024, batch_size: int = 8,
               max_gen_toks: int = 256):
    super().__init__()
    self.tokenizer = tokenizer
    self.max_length, self.batch_size, self.max_gen_toks = max_length, batch_size, max_gen_toks
    self._model = model
    self.scorer = ContinuationScorer(model, tokenizer, max_length=max_length,
                                     batch_size=batch_size)
    self.compiled_widths = self.scorer.compiled_widths   # the shapes it ran with (for tests)

  # ---------------------------------------------------------------- tokens

  @property
  def prefix_token_id(self) -> int:
    """What an empty context conditions on: BOS if the tokenizer has one, else EOS."""
    return scoring.prefix_token_id(self.tokenizer)

  def tok_encode(self, text: str) -> list[int]:
    return scoring.encode(self.tokenizer, text)

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with the prefix token, continuation ids), as lm-eval's HF model encodes."""
    return scoring.encode_pair(self.tokenizer, context, continuation)

  # ---------------------------------------------------------------- scoring

  def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum log p(cont | ctx), cont is the greedy continuation) per (ctx ids, cont ids) pair;
    the sequence is cut to its last `max_length` + 1 tokens."""
    return [(logp, greedy) for logp, greedy, _ in self.scorer.score_ids(pairs)]

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    return self.score_pairs([self.encode_pair(*req.args) for req in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    windows, owner = [], []
    for i, req in enumerate(requests):
      for w in get_rolling_token_windows(self.tok_encode(req.args[0]), self.prefix_token_id,
                                         self.max_length, context_len=1):
        windows.append(make_disjoint_window(w))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, self.score_pairs(windows)):
      totals[i] += logp
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False):
    groups: dict[int, list[int]] = {}
    stops = []
    for i, req in enumerate(requests):
      context, kwargs = req.args
      kwargs = dict(kwargs or {})
      if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0.0:
        raise ValueError(f"generate_until: {kwargs} asks for sampling; DesmoeLM decodes greedily")
      until = kwargs.get("until") or []
      stops.append([until] if isinstance(until, str) else list(until))
      groups.setdefault(int(kwargs.get("max_gen_toks", self.max_gen_toks)), []).append(i)
    eos = [t for t in (self.tokenizer.eos_token_id,) if t is not None] or [-1]
    out: list[str | None] = [None] * len(requests)
    for max_new, idx in groups.items():
      keep = max(1, self.max_length - max_new)
      prompts = [([self.prefix_token_id] + self.tok_encode(requests[i].args[0]))[-keep:]
                 for i in idx]
      generated = greedy_generate(self._model, prompts, max_new_tokens=max_new, eos_ids=eos,
                                  batch_size=self.batch_size)
      for i, ids in zip(idx, generated):
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [text.index(s) for s in stops[i] if s and s in text]
        out[i] = text[:min(cuts)] if cuts else text
    return out


def run_tasks(model, tokenizer, tasks: list[str], *, include_path: str = "", limit: int = 0,
              max_length: int = 1024, batch_size: int = 8, max_gen_toks: int = 256) -> dict:
  """{task: {metric: value}} of lm-eval `tasks` on `model` (metrics only: no stderr, no counts)."""
  manager = TaskManager(include_path=include_path or None)
  lm = DesmoeLM(model, tokenizer, max_length=max_length, batch_size=batch_size,
                max_gen_toks=max_gen_toks)
  out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                limit=limit or None, log_samples=False, bootstrap_iters=0)
  results = {}
  for task, metrics in out["results"].items():
    # Metrics are "name,filter" keys ("acc,none"); "sample_len", "alias" and stderrs are not.
    results[task] = {k.replace(",none", ""): float(v) for k, v in metrics.items()
                     if "," in k and "stderr" not in k and isinstance(v, (int, float))
                     and not isinstance(v, bool)}
  return results
