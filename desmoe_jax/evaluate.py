"""Evaluation behind `eval.py`: per-domain held-out loss and task metric, and general-ability
retention against the base model.

What is scored:
* every domain: held-out loss and perplexity (answers given prompts, teacher-forced), and a task
  metric from greedy generation with the KV cache: math final-number exact match, intent JSON
  match, code pass@1, law label accuracy, summary ROUGE-L, translation BLEU (see `metrics.py`).
  pass@1 executes model-written code, so it runs only with `eval.allow_code_execution=True`,
  each program isolated (`sandbox.py`); otherwise the code domain reports `"pass@1": null` and
  says why in `"pass@1_not_run"` (a 0 would read as a measured score);
* general abilities: held-out general-text loss and a multiple-choice log-likelihood score, for
  the adapted model AND the base model, so that forgetting is a measured difference.

The adapted model comes from an orbax checkpoint of a run (exactly what was trained: adaptive
router included; duplicated experts merged, since evaluation has no domain ids) or from any HF
directory of a supported family (desmoe_jax/families/; e.g. a run's `hf/` export).
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
from flax import nnx

from desmoe_jax import build
from desmoe_jax import checkpoint as ckpt_lib
from desmoe_jax import data as data_lib
from desmoe_jax import discover
from desmoe_jax import heldout
from desmoe_jax import metrics as metrics_lib
from desmoe_jax import sandbox
from desmoe_jax import resume as resume_lib
from desmoe_jax import sharding as sharding_lib
from desmoe_jax import sources
from desmoe_jax import train_config
from desmoe_jax import validate as validate_lib
from desmoe_jax.errors import ConfigError
from desmoe_jax.generate import greedy_generate
from desmoe_jax.scoring import ContinuationScorer
from desmoe_jax.specialization import merge_copies
from desmoe_jax.train_state import build_train_state

log = logging.getLogger("desmoe_jax")


def open_checkpoints(workdir: str) -> ckpt_lib.Checkpointer:
  """The run's checkpoints, read-only: nothing is created in `workdir`, and a directory with no
  checkpoint is a one-line `ConfigError` (a mistyped --workdir), found before any model load."""
  checkpoints = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  if checkpoints.latest_step() is None:
    checkpoints.close()
    raise ConfigError(f"no checkpoint in {checkpoints.directory} (is --workdir the run's work "
                      "directory, and has it saved one yet?)")
  return checkpoints


def load_run_model(config, workdir: str, step: int | None = None, mesh=None, tokenizer=None):
  """The model of a training run at `step` (default latest), rebuilt from its config; with
  `mesh`, sharded over it as in training (a model that does not fit on one device). With
  `tokenizer`, it must be the one the checkpoint was trained with (`ConfigError` otherwise)."""
  checkpoints = open_checkpoints(workdir)
  try:
    if step is not None and step not in checkpoints.all_steps():
      raise ConfigError(f"--step={step}: no checkpoint of that step in {checkpoints.directory} "
                        f"(there are: {', '.join(map(str, checkpoints.all_steps()))})")
    meta = checkpoints.read_meta(step)
    stored = meta.get("tokenizer")
    if tokenizer is not None and stored is not None:
      current = resume_lib.tokenizer_fingerprint(tokenizer)
      if current != stored:
        raise ConfigError(f"the tokenizer used for evaluation is not the one "
                          f"{checkpoints.path(meta['step'])} was trained with (fingerprint "
                          f"{current[:19]} vs {stored[:19]}); evaluate with the run's "
                          "model.path")
    # Sharded over `mesh` as in training, the parts methods.prepare_model added included.
    assignment = run_assignment(config, workdir)
    built = build_train_state(config, lambda: load_model(config.model.path, config, mesh), mesh,
                              optimizer=False,
                              domains=assignment.k if assignment is not None else None)
    graphdef, state = built.graphdef, built.state
    restored, _, meta = checkpoints.restore(ckpt_lib.abstract_like(state), None,
                                            step=meta["step"])  # onto each array's sharding
  finally:
    checkpoints.close()   # orbax's threads end here, not in the interpreter's shutdown
  model = nnx.merge(graphdef, restored)
  merge_copies(model)
  return model, meta


def run_assignment(config, workdir: str) -> discover.Assignment | None:
  """The discovered domains a data.discover_domains run saved in `workdir` (None for a run on
  labelled domains); such a run without its domains.json is a ConfigError."""
  if not discover.enabled(config):
    return None
  path = os.path.join(workdir, discover.FILE)
  if not os.path.exists(path):
    raise ConfigError(f"data.discover_domains={discover.requested(config)!r}: {path} does not "
                      "exist (the run's domain assignment, written when it started)")
  return discover.Assignment.load(path)


def load_model(path: str, config, mesh=None):
  """The HF model at `path` as the run builds it (`build.load_model`: every runtime field)."""
  return build.load_model(config, path, mesh)


def mc_scorer(model, tokenizer, seq_len: int, batch_size: int = 8) -> ContinuationScorer:
  """The multiple-choice metric's score_fn: (context, continuation) pairs -> (sum log
  p(continuation | context), tokens scored), by the scorer lm-eval's adapter uses
  (desmoe_jax/scoring.py: lm-eval's encoding of a pair)."""
  return ContinuationScorer(model, tokenizer, max_length=seq_len, batch_size=batch_size)


CODE_NOT_RUN = ("not run: eval.allow_code_execution=False (set it to True to execute the "
                "model's programs, each isolated; see desmoe_jax/sandbox.py)")


def code_execution(config) -> tuple[bool, bool]:
  """(allowed, allow_unisolated) from `config.eval` (configs saved before the flags: off)."""
  ev = config.eval
  return bool(ev.get("allow_code_execution", False)), \
      bool(ev.get("allow_unisolated_code_execution", False))


def task_metric(name: str, metric: str, examples: list[dict], generations: list[str],
                code_timeout: float, allow_unisolated: bool = False) -> dict:
  """{metric name: value} for one domain from its generations (pass@1 only when code execution
  is allowed: the caller checks `code_execution` first)."""
  answers = [ex["answers"] for ex in examples]
  if metric == "number_match":
    return {"exact_match": metrics_lib.number_match(generations, answers)}
  if metric == "law_label":
    return {"label_accuracy": metrics_lib.law_accuracy(generations, answers)}
  if metric == "json_match":
    return {"json_exact_match": metrics_lib.intent_json_match(generations, answers)}
  if metric == "pass_at_1":
    problems = [{"prompt": ex["prompt_text"], "test": ex["test"], "entry_point": ex["entry_point"]}
                for ex in examples]
    out = metrics_lib.pass_at_1(problems, generations, timeout=code_timeout,
                                allow_unisolated=allow_unisolated,
                                sources=[ex.get("source") for ex in examples])
    return {"pass@1": out["pass@1"], "pass@1_isolated": out["isolated"]}
  if metric == "rouge_l":
    return {"rouge_l": metrics_lib.rouge_l(generations, answers)}
  if metric == "bleu":
    return {"bleu": metrics_lib.bleu(generations, answers)}
  raise ValueError(f"domain {name!r}: unknown metric {metric!r}")


def evaluate_model(model, tokenizer, config, *, base_model=None, with_generation: bool = True,
                   out_dir: str | None = None,
                   assignment: discover.Assignment | None = None) -> dict:
  """All scores of `model` (and general-ability scores of `base_model`); writes JSON + table.
  With `assignment` (a data.discover_domains run), also the held-out loss of each discovered
  cluster (rows "cluster<c>"), beside the labelled domains."""
  results: dict[str, dict] = {}
  allow_code, allow_unisolated = code_execution(config)
  if allow_code and with_generation and any(d.metric == "pass_at_1" and d.eval
                                            for d in config.data.domains):
    try:  # refuse now, not after the generations; a setting decides it, so exit 2 on one line
      sandbox.require_isolation(allow_unisolated)
    except sandbox.SandboxUnavailable as e:
      raise ConfigError(str(e)) from None
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
  loss_sets = heldout.eval_loss_batches(config, tokenizer)
  if assignment is not None:
    examples = heldout.heldout_examples_of(config, tokenizer)
    for name, ex in examples.items():
      if name not in assignment.heldout or \
          assignment.heldout[name]["sha256"] != discover.digest([ids for ids, _ in ex]):
        raise ConfigError(f"the held-out examples of {name!r} are not those the run's "
                          f"{discover.FILE} assigned to clusters (the eval file changed)")
    loss_sets.update(heldout.cluster_loss_batches(config, assignment, examples))
  graphdef, state = nnx.split(model)
  losses = heldout.heldout_losses(graphdef, state, loss_sets)
  eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [-1]
  for d in config.data.domains:
    row = results.setdefault(d.name, {})
    if d.name in losses:
      row["loss"] = losses[d.name]
      row["perplexity"] = (metrics_lib.perplexity(losses[d.name], 1.0)
                           if np.isfinite(losses[d.name]) else float("nan"))
    if not with_generation or not d.eval:
      continue
    if d.metric == "pass_at_1" and not allow_code:
      row.update({"pass@1": None, "pass@1_not_run": CODE_NOT_RUN})
      continue  # no generations either: nothing would score them
    spec = train_config.domain_spec(d, "eval")
    examples = data_lib.load_eval_examples(
        spec, tokenizer, max_examples=config.eval.max_examples,
        required=data_lib.EVAL_FIELDS.get(d.metric, ()))
    t0 = time.perf_counter()
    outputs = greedy_generate(model, [ex["prompt_ids"] for ex in examples],
                              max_new_tokens=config.eval.max_new_tokens, eos_ids=eos,
                              batch_size=config.eval.batch_size)
    generations = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    row.update(task_metric(d.name, d.metric, examples, generations, config.eval.code_timeout,
                           allow_unisolated))
    row["generated"] = len(examples)
    row["generation_s"] = time.perf_counter() - t0
    if out_dir:
      with open(os.path.join(out_dir, f"generations_{d.name}.jsonl"), "w") as f:
        for ex, g in zip(examples, generations):
          f.write(json.dumps({"prompt": ex.get("prompt_text", ""), "answers": ex["answers"],
                              "generation": g}, ensure_ascii=False) + "\n")

  for c, name in enumerate(discover.cluster_names(assignment.k) if assignment else ()):
    if name in losses:   # held-out examples in the cluster: at most eval.loss_batches scored
      assigned = sum(cl == c for h in assignment.heldout.values() for cl in h["cluster"])
      results[name] = {"loss": losses[name], "heldout_examples": assigned,
                       "perplexity": metrics_lib.perplexity(losses[name], 1.0)
                       if np.isfinite(losses[name]) else float("nan")}

  general = results.setdefault("general", {})
  if "general" in losses:
    general["loss"] = losses["general"]
  genre_sets = heldout.genre_loss_batches(config, tokenizer)
  if genre_sets:
    general["loss_per_genre"] = heldout.heldout_losses(graphdef, state, genre_sets)
  mc_items = data_lib.load_multiple_choice(config.data.general_mc) if config.data.general_mc else []
  if mc_items:
    general.update({f"mc_{k}": v for k, v in metrics_lib.multiple_choice_accuracy(
        mc_scorer(model, tokenizer, config.data.seq_len), mc_items).items()})
  if base_model is not None:
    bg, bs = nnx.split(base_model)
    base_losses = heldout.heldout_losses(bg, bs, {"general": loss_sets["general"]}) \
        if "general" in loss_sets else {}
    if base_losses:
      general["base_loss"] = base_losses["general"]
    if genre_sets:
      general["base_loss_per_genre"] = heldout.heldout_losses(bg, bs, genre_sets)
    if mc_items:
      base_mc = metrics_lib.multiple_choice_accuracy(
          mc_scorer(base_model, tokenizer, config.data.seq_len), mc_items)
      general.update({f"base_mc_{k}": v for k, v in base_mc.items()})
  if out_dir:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results


def evaluate_run(config, workdir: str, *, step: int | None = None, hf_dir: str | None = None,
                 with_generation: bool = True, with_base: bool = True,
                 mesh=None) -> tuple[dict, str]:
  """What `eval.py` does: scores a run's checkpoint at `step` (default latest), or the HF
  directory `hf_dir` instead (e.g. `<workdir>/hf`), against the base model `config.model.path`.
  Models are sharded over `mesh` (default: the run's `config.mesh`, so what trained fits).

  Returns (results, out_dir): results as `evaluate_model` gives them ({row: {metric: value}};
  `metrics.format_results` prints them as a table), written to `<out_dir>/results.json`.
  """
  validate_lib.validate(config)
  if hf_dir:
    if not os.path.isdir(hf_dir):
      raise ConfigError(f"--hf={hf_dir!r} is not a directory")
  elif not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir!r} does not exist")
  else:
    open_checkpoints(workdir).close()      # fail fast, before any model is loaded
  config = sources.resolve(config)  # data.select applied, hub ids fetched
  tokenizer = data_lib.load_tokenizer(hf_dir or config.model.path)
  mesh = sharding_lib.make_mesh(dict(config.mesh)) if mesh is None else mesh
  if hf_dir:
    model, name = load_model(hf_dir, config, mesh), "hf"
  else:
    model, meta = load_run_model(config, workdir, step, mesh, tokenizer=tokenizer)
    name = f"step{meta['step']}"
  base = load_model(config.model.path, config, mesh) if with_base else None
  out_dir = os.path.join(workdir, "eval", name)
  results = evaluate_model(model, tokenizer, config, base_model=base,
                           with_generation=with_generation, out_dir=out_dir,
                           assignment=run_assignment(config, workdir))
  if config.eval.get("lm_eval_tasks"):
    results["lm_eval"] = lm_eval_scores(model, tokenizer, config, base_model=base)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results, out_dir


def lm_eval_scores(model, tokenizer, config, *, base_model=None) -> dict:
  """lm-evaluation-harness tasks `eval.lm_eval_tasks` (comma-separated names; YAML tasks under
  `eval.lm_eval_include` too) on the model and the base model: {task: {metric: value,
  "base_" + metric: base value}}."""
  from desmoe_jax import lm_eval_adapter
  tasks = [t.strip() for t in config.eval.lm_eval_tasks.split(",") if t.strip()]
  kw = dict(include_path=config.eval.get("lm_eval_include", ""),
            limit=config.eval.get("lm_eval_limit", 0), max_length=config.data.seq_len,
            batch_size=config.eval.batch_size, max_gen_toks=config.eval.max_new_tokens)
  scores = lm_eval_adapter.run_tasks(model, tokenizer, tasks, **kw)
  if base_model is not None:
    for task, metrics in lm_eval_adapter.run_tasks(base_model, tokenizer, tasks, **kw).items():
      scores.setdefault(task, {}).update({f"base_{k}": v for k, v in metrics.items()})
  return scores
