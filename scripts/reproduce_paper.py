r"""The paper's claims in miniature: DES-MoE against FFT, ESFT and its own ablations, as the
number of domains grows, on the embedded tiny model pretrained by scripts/pretrain_tiny.py.

  python scripts/reproduce_paper.py --quick       # 1 seed, short runs: < 30 min on 2 CPU cores
  python scripts/reproduce_paper.py               # 3 seeds: the numbers of docs/RESULTS.md
  python scripts/reproduce_paper.py --sweep       # the learning-rate sweep behind LR below
  python scripts/reproduce_paper.py --report      # only rebuild the report from results.jsonl
  python scripts/reproduce_paper.py --premise     # general vs domain routing on the base model
  python scripts/reproduce_paper.py --premise --config=tiny_v2   # on the :tiny_v2 base, beside :tiny's
  python scripts/reproduce_paper.py --frontier    # matched-quality frontier + ablations, 3 seeds
  python scripts/reproduce_paper.py --frontier --quick   # seed 0 of FFT and DES-MoE (< 30 min)

What runs: every run is `desmoe_jax.trainer.train` on a `configs/six_domains.py:tiny` config,
exactly what `train.py` does, followed by `desmoe_jax.evaluate.evaluate_model`, what `eval.py`
does.
* For D = 2, 4, 6 (the first D of math, code, law, intent, summary, translation): FFT,
  ESFT-Token and ESFT-Gate on the union of the domains' expert selections, DES-MoE under both
  readings of its warm-up (`schedule.warmup_trains` = router+backbone, the default, and
  router+experts), DES-MoE with each option of docs/METHOD.md section 7 that is off by default
  (`alr.mix=update`, `alr.alpha=router`, `optim.per_expert_bias_correction`), and the
  ablations without ALR, without DGES, without the schedule.
* Single-domain ESFT-Token and ESFT-Gate, one run per domain: the paper's "one ESFT model per
  domain" reference.
* Equal token budgets: every run gets `steps_per_domain` optimizer steps per domain of the same
  batch shape. Each run for each seed (the seed sets the data order and the ALR's initial
  weights; the pretrained model is the same).

What is measured per run: (a) general-ability retention: held-out general-text loss (plays never
seen in pretraining) minus the base model's, and the multiple-choice score against the base
model's; (b) per-domain held-out loss (reference answers given prompts) and, in the full run, the
task metric; (c) the training curve (per-step loss and wall time) and periodic held-out losses,
for steps-to-target; (d) expert overlap between domains: Jaccard of the final DGES masks.

Results are appended to `<workdir>/results.jsonl` as runs finish; a rerun skips finished runs, so
an interrupted reproduction continues where it stopped. The report is written between the
GENERATED markers of `--report_file` (docs/RESULTS.md for the whole full or --frontier run;
<workdir>/RESULTS.md for --quick, --sweep and any part of a run: --only, --seeds,
--steps_per_domain), with its PNG plots beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The experiment grid (DOMAINS, MULTI, FRONTIER, LABELS, LR, ...) lives in scripts/paper_common.py,
# shared with the two reports; scripts/ is on sys.path when this script runs.
from paper_common import (ABLATIONS, DOMAINS, FREEZES, FRONTIER, FRONTIER_D,  # noqa: E402,F401
                          FRONTIER_LRS, FRONTIER_TARGETS, LABELS, LR, MULTI, SINGLE, SWEEP_LRS,
                          SWEEP_METHODS, TESTBEDS, VARIANT_FIELDS, read_jsonl, variant_fields)

log = logging.getLogger("reproduce")

# Sized for 2 CPU cores (about 0.7 s per step of 2 x 1024 tokens on the tiny model, and ~20 s
# per run of loading, compiling and evaluating). `--quick` is the full run's seed 0 at D = 2 and
# 6, run for run, so a full run given the same --workdir continues from it.
_RUN = dict(steps_per_domain=10, num_domains=(2, 4, 6), evals=1, gen_examples=8, batch_size=2,
            loss_batches=4, general_batches=24)
# The premise: routing statistics of the base model from this many real tokens per text.
PREMISE_TOKENS = 32768
PREMISE_BATCHES = 16      # of general text (2 x 1024 tokens each): the first 32 k tokens

SETTINGS = {
    "full": dict(_RUN, seeds=(0, 1, 2)),
    "quick": dict(_RUN, seeds=(0,), num_domains=(2, 6)),
    "sweep": dict(_RUN, seeds=(0,), num_domains=(2,), gen_examples=0),
    # No generation: every task metric is ~0 at this scale (docs/RESULTS.md); losses only.
    "frontier": dict(_RUN, seeds=(0, 1, 2), num_domains=(FRONTIER_D,), gen_examples=0),
    # Seed 0 of FFT and DES-MoE, run for run the full frontier's (10 runs on 2 idle cores: 13.1
    # min on :tiny, 12.3 min on :tiny_v2 with its premise cached; a full --frontier given the
    # same --workdir continues from it), no ablations.
    "frontier_quick": dict(_RUN, seeds=(0,), num_domains=(FRONTIER_D,), gen_examples=0,
                           ablations=False, methods=(("fft", ""), ("desmoe", "router+backbone"))),
}


def family(method: str) -> str:
  return "esft" if method.startswith("esft") else "fft" if method == "fft" else "desmoe"


@dataclasses.dataclass(frozen=True)
class Run:
  method: str
  variant: str              # "" | "union" | "single" | a VARIANT_FIELDS key | "lr=<lr>"
  domains: tuple[str, ...]
  seed: int
  steps: int
  lr: float
  frontier: bool = False    # a frontier or ablation run: the learning rate is in its name

  @property
  def key(self) -> tuple:
    return (self.method, self.variant, len(self.domains),
            self.domains[0] if self.variant == "single" else "")

  @property
  def name(self) -> str:
    parts = [self.method,
             self.variant.replace("+", "_").replace("=", "").replace(",", "_"),
             f"D{len(self.domains)}", self.domains[0] if self.variant == "single" else "",
             f"lr{self.lr:g}" if self.frontier else "", f"s{self.seed}"]
    return "-".join(p for p in parts if p)


def plan(s: dict, sweep: bool = False) -> list[Run]:
  """Every run of a reproduction, in execution order."""
  spd = s["steps_per_domain"]
  if sweep:
    return [Run(m, f"lr={lr:g}", DOMAINS[:2], 0, spd * 2, lr)
            for m in SWEEP_METHODS for lr in SWEEP_LRS]
  runs = []
  for seed in s["seeds"]:
    for method in SINGLE:
      runs += [Run(method, "single", (d,), seed, spd, LR["esft"]) for d in DOMAINS]
    for num in s["num_domains"]:
      runs += [Run(m, v, DOMAINS[:num], seed, spd * num, LR[family(m)]) for m, v in MULTI]
  return runs


def plan_frontier(s: dict, seeds) -> list[Run]:
  """The frontier runs of `seeds`: every FRONTIER method (or the setting's `methods`) at each
  of its FRONTIER_LRS."""
  steps = s["steps_per_domain"] * FRONTIER_D
  return [Run(m, v, DOMAINS[:FRONTIER_D], seed, steps, lr, frontier=True)
          for seed in seeds for m, v in s.get("methods", FRONTIER)
          for lr in FRONTIER_LRS[(m, v)]]


def plan_ablations(s: dict, seeds, records: list[dict], base: dict) -> list[Run]:
  """The ablation runs of `seeds`, placed by the seed-0 frontier in `records`: under the
  DES-MoE reading whose general-loss increase is the smallest fraction of FFT's at the middle
  target, at the two of its rates that bracket that target. [] until the seed-0 frontier of
  FFT and the DES-MoE readings is complete."""
  import frontier_report  # scripts/ is on sys.path when this script runs
  choice = frontier_report.ablation_setting(records, base, s.get("preset", "tiny"))
  if choice is None:
    return []
  reading, lrs = choice
  steps = s["steps_per_domain"] * FRONTIER_D
  runs = []
  for seed in seeds:
    for m, suffix in ABLATIONS:
      variant = ",".join(v for v in ("" if m == "desmoe_no_schedule" else reading, suffix) if v)
      runs += [Run(m, variant, DOMAINS[:FRONTIER_D], seed, steps, lr, frontier=True)
               for lr in lrs]
  return runs


def plan_extras(s: dict, seeds, records: list[dict], base: dict) -> list[Run]:
  """A testbed's extra runs (TESTBEDS[...]["extras"]), placed by its seed-0 frontier in
  `records` ([] until that is complete):
  * one ESFT-Token and one ESFT-Gate model per domain, each `steps_per_domain` steps on its
    domain alone (the multi-domain runs' per-domain token budget), at the rate of the ESFT-Token
    frontier with the lowest seed-0 mean in-domain loss;
  * DES-MoE at its best setting (the reading and rate with the least seed-0 forgetting as a
    fraction of FFT's at the same in-domain loss) with each of FREEZES never trained."""
  import frontier_report  # scripts/ is on sys.path when this script runs
  runs = []
  lr = frontier_report.best_in_domain_rate(records, ("esft_token", "union"))
  if lr is not None:
    runs += [Run(m, "single", (d,), seed, s["steps_per_domain"], lr, frontier=True)
             for seed in seeds for m in SINGLE for d in DOMAINS[:FRONTIER_D]]
  best = frontier_report.best_desmoe_setting(records, base, s.get("preset", "tiny"))
  if best is not None:
    reading, lr = best
    steps = s["steps_per_domain"] * FRONTIER_D
    runs += [Run("desmoe", f"{reading},freeze={g}", DOMAINS[:FRONTIER_D], seed, steps, lr,
                 frontier=True) for seed in seeds for g in FREEZES]
  return runs


def run_config(run: Run, s: dict, model_path: str | None):
  """The trainer config of one run: the `:tiny` preset (or `s["preset"]`, e.g. tiny_v2) with
  the experiment's settings."""
  from desmoe_jax.run_config import load_config
  config = load_config(os.path.join(REPO, "configs",
                                    f"six_domains.py:{s.get('preset', 'tiny')},{run.method}"))
  if model_path:
    config.model.path = model_path
  config.seed = run.seed
  config.data.domains = [d for d in config.data.domains if d.name in run.domains]
  config.data.batch_size = s["batch_size"]
  config.train.steps = run.steps
  config.train.log_every = 1
  config.train.eval_every = max(1, run.steps // s["evals"])
  config.train.checkpoint_every = run.steps       # one checkpoint: the final model
  config.train.keep_checkpoints = 1
  config.train.heatmap_layers = 3
  config.optim.learning_rate = run.lr
  config.eval.loss_batches = s["loss_batches"]
  config.eval.general_batches = s["general_batches"]  # forgetting: 24 x 2 x 1024 general tokens
  # Task metrics (generation) where the report's main table reads them: the single-domain runs
  # and the multi-domain runs at the largest D.
  with_tasks = run.variant == "single" or len(run.domains) == max(s["num_domains"])
  config.eval.max_examples = s["gen_examples"] if with_tasks else 0
  # Code pass@1 executes the model's programs: only with --allow_code_execution (isolated).
  config.eval.allow_code_execution = bool(s.get("allow_code_execution", False))
  config.export.enabled = False
  for key in run.variant.split(","):
    for field, value in variant_fields(key, s.get("preset", "tiny")).items():
      group, name = field.split(".")
      config[group][name] = value
  return config


def base_config(s: dict, model_path: str | None):
  """A config over all six domains, for evaluating the base model."""
  return run_config(Run("fft", "", DOMAINS, 0, 1, 0.0), s, model_path)


# ------------------------------------------------------------------ running


def machine() -> dict:
  import jax
  cpu = platform.processor()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f
                  if line.startswith("model name")), cpu)
  return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "python": platform.python_version()}


def curves(workdir: str, tokens_per_step: int) -> dict:
  """The run's training curves, from its metrics.jsonl."""
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  steps = [r for r in records if "event" not in r and "loss" in r]
  evals = [r for r in records if r.get("event") == "eval"]
  return {
      "loss": [r["loss"] for r in steps],
      "domain_loss": [r["domain_loss"] for r in steps],
      "domain_tokens": [r["domain_tokens"] for r in steps],
      "step_s": [tokens_per_step / r["tokens_per_s"] for r in steps],   # log_every = 1
      "phase": [r["phase_name"] for r in steps],
      "heldout": [[r["step"], {k.split("/", 1)[1]: v for k, v in r.items()
                               if k.startswith("heldout_loss/")}] for r in evals],
      "overlap": steps[-1]["overlap_matrix"] if steps else None,
      "mask_density": steps[-1]["mask_density"] if steps else None,
  }


def evaluate_run(config, workdir: str, tokenizer, with_generation: bool) -> dict:
  from desmoe_jax import evaluate
  model, _ = evaluate.load_run_model(config, workdir)
  return evaluate.evaluate_model(model, tokenizer, config, with_generation=with_generation,
                                 out_dir=os.path.join(workdir, "eval"))


def execute(run: Run, s: dict, workdir: str, tokenizer, model_path) -> dict:
  import jax
  from desmoe_jax import trainer
  config = run_config(run, s, model_path)
  run_dir = os.path.join(workdir, "runs", run.name)
  if os.path.exists(run_dir):   # an interrupted run: start it again (its timings must be clean)
    shutil.rmtree(run_dir)
  # Forgetting is measured once, after training (`general_batches`); the trainer's own
  # end-of-run held-out pass reads only a slice of the general text.
  train_config = config.copy_and_resolve_references()
  train_config.eval.general_batches = 2
  t0 = time.perf_counter()
  trainer.train(train_config, run_dir)
  train_s = time.perf_counter() - t0
  results = evaluate_run(config, run_dir, tokenizer,
                         with_generation=config.eval.max_examples > 0)
  record = {"name": run.name, **dataclasses.asdict(run), "D": len(run.domains),
            "train_wall_s": train_s, "eval": results,
            "curves": curves(run_dir, s["batch_size"] * config.data.seq_len)}
  shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # disk: keep logs only
  jax.clear_caches()
  return record


def prepare(args, s: dict):
  """The work directory, its compilation cache, setup.json and base.json (the base model's
  evaluation); returns (tokenizer, base eval)."""
  import jax
  from desmoe_jax.data import load_tokenizer
  from desmoe_jax import evaluate
  os.makedirs(args.workdir, exist_ok=True)
  # The same programs come back for every seed: compile each once.
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  header_path = os.path.join(args.workdir, "setup.json")
  if not os.path.exists(header_path):
    with open(header_path, "w") as f:
      json.dump({"machine": machine(), "settings": s, "lr": LR,
                 "command": " ".join(sys.argv)}, f, indent=2)
  model_path = args.model or base_config(s, None).model.path
  tokenizer = load_tokenizer(model_path)

  base_path = os.path.join(args.workdir, "base.json")
  if not os.path.exists(base_path):
    config = base_config(s, args.model)
    t0 = time.perf_counter()
    base = evaluate.evaluate_model(evaluate.load_model(config.model.path, config), tokenizer,
                                   config, with_generation=s["gen_examples"] > 0)
    with open(base_path, "w") as f:
      json.dump({"eval": base, "wall_s": time.perf_counter() - t0}, f, indent=2)
    log.info("base model: %s", base)
  with open(base_path) as f:
    return tokenizer, json.load(f)["eval"]


def reproduce(args, s: dict, runs: list[Run], tokenizer) -> str:
  """Runs what of `runs` is not yet in <workdir>/results.jsonl, appending each as it ends."""
  results_path = os.path.join(args.workdir, "results.jsonl")
  done = {r["name"] for r in read_jsonl(results_path)}
  todo = [r for r in runs if r.name not in done]
  log.info("%d runs planned, %d done, %d to go", len(runs), len(runs) - len(todo), len(todo))
  for i, run in enumerate(todo):
    t0 = time.perf_counter()
    record = execute(run, s, args.workdir, tokenizer, args.model)
    with open(results_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    log.info("[%d/%d] %s: %.0f s (train %.0f s)", i + 1, len(todo), run.name,
             time.perf_counter() - t0, record["train_wall_s"])
  return results_path


def frontier(args, s: dict, tokenizer, base: dict):
  """The frontier in the order that gives a complete picture soonest: the premise, seed 0 of
  every frontier point, seed 0's ablations (placed by that frontier), then the other seeds."""
  premise_path = os.path.join(args.workdir, "premise.json")
  if not os.path.exists(premise_path):
    premise(args, s, premise_path)
  results = os.path.join(args.workdir, "results.jsonl")
  first, rest = s["seeds"][:1], s["seeds"][1:]
  for seeds in (first, rest):
    if not seeds:
      continue
    reproduce(args, s, _only(args, plan_frontier(s, seeds)), tokenizer)
    if s.get("ablations", True):
      runs = plan_ablations(s, seeds, read_jsonl(results), base)
      if not runs:
        log.warning("ablations not placed: the seed-0 frontier of FFT and DES-MoE is "
                    "incomplete in %s", results)
      reproduce(args, s, _only(args, runs), tokenizer)
    if s.get("ablations", True) and TESTBEDS[s.get("preset", "tiny")]["extras"]:
      runs = plan_extras(s, seeds, read_jsonl(results), base)
      if not runs:
        log.warning("extra runs not placed: the seed-0 frontier is incomplete in %s", results)
      reproduce(args, s, _only(args, runs), tokenizer)


def premise(args, s: dict, out_path: str, model_path: str | None = "") -> dict:
  """Routing of general text against each domain's on the base model (--premise): per MoE
  layer, the overlap of their expert-slot shares, the share of general text's top-k slots
  on the experts each domain's DGES mask would select, and how concentrated each domain's
  routing is (ESFT's statistics among them; specialization.routing_premise)."""
  from desmoe_jax.data import load_tokenizer
  from desmoe_jax import data as data_lib
  from desmoe_jax import esft, evaluate, specialization, trainer
  config = base_config(s, args.model if model_path == "" else model_path)
  tokenizer = load_tokenizer(config.model.path)
  model = evaluate.load_model(config.model.path, config)
  e = model.config.n_routed_experts
  t0 = time.perf_counter()
  general_batches = data_lib.text_loss_batches(
      config.data.general, tokenizer, seq_len=config.data.seq_len,
      batch_size=config.data.batch_size, max_batches=PREMISE_BATCHES)
  general = esft.domain_scores(model, general_batches, PREMISE_TOKENS, e)
  shares, gates, tokens = {}, {}, {"general": general["tokens"]}
  for d in config.data.domains:
    batches = data_lib.MixtureIterator([trainer.domain_spec(d, "train")], tokenizer,
                                       seq_len=config.data.seq_len,
                                       batch_size=config.data.batch_size, seed=0)
    scores = esft.domain_scores(model, batches, PREMISE_TOKENS, e)
    shares[d.name], gates[d.name], tokens[d.name] = (scores["token"], scores["gate"],
                                                     scores["tokens"])
  # ESFT's own thresholds (ESFT-Token p = 0.2, ESFT-Gate p = 0.1), as the paper selects.
  esft_p = {"token": esft.DEFAULT_TOP_P["token"], "gate": esft.DEFAULT_TOP_P["gate"]}
  result = specialization.routing_premise(general["token"], shares, phi=config.dges.phi,
                                          domain_gates=gates, esft_top_p=esft_p)
  # A general set of several genres (the :tiny_v2 preset's data/corpus/heldout.txt, beside its
  # documents): the same statistics with each genre's held-out text as "general".
  docs_path = os.path.join(os.path.dirname(config.data.general), "heldout.jsonl.gz")
  if os.path.exists(docs_path):
    import tempfile
    import make_corpus  # scripts/ is on sys.path when this script runs
    by_genre: dict = {}
    for doc in make_corpus.read_docs(docs_path):
      by_genre.setdefault(doc["genre"], []).append(doc["text"])
    result_genres = {}
    with tempfile.TemporaryDirectory() as tmp:
      for genre, texts in sorted(by_genre.items()):
        path = os.path.join(tmp, f"{genre}.txt")
        with open(path, "w", encoding="utf-8") as f:
          f.write("\n\n".join(texts))
        batches = data_lib.text_loss_batches(path, tokenizer, seq_len=config.data.seq_len,
                                             batch_size=config.data.batch_size,
                                             max_batches=PREMISE_BATCHES)
        g = esft.domain_scores(model, batches, PREMISE_TOKENS, e)
        r = specialization.routing_premise(g["token"], shares, phi=config.dges.phi)
        result_genres[genre] = {"tokens": g["tokens"], "overlap_mean": r["overlap_mean"],
                                "general_on_mask_mean": r["general_on_mask_mean"],
                                "general_on_mask_over_mask": r["general_on_mask_over_mask"],
                                "per_domain": {d: {k: v[k] for k in ("overlap",
                                                                      "general_on_mask")}
                                               for d, v in r["per_domain"].items()}}
  result = dict(result, general_per_genre=result_genres) if os.path.exists(docs_path) else result
  result.update(tokens=tokens, phi=config.dges.phi, wall_s=time.perf_counter() - t0,
                model=config.model.path, general=config.data.general, experts=e,
                general_share=[[float(x) for x in row] for row in general["token"]])
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=2)
  log.info("premise (%.0f s): overlap %.3f, general slots on domain masks %.3f, over the mask "
           "fraction %.2f", result["wall_s"], result["overlap_mean"],
           result["general_on_mask_mean"], result["general_on_mask_over_mask"])
  return result


def premise_beside_tiny(args, s: dict) -> str:
  """--premise --config=<not tiny>: the premise of that base and of the :tiny base (measured
  once into <workdir>/premise_tiny.json), side by side (frontier_report.premise_comparison)."""
  import frontier_report  # scripts/ is on sys.path when this script runs
  new = premise(args, s, os.path.join(args.workdir, "premise.json"))
  old_path = os.path.join(args.workdir, "premise_tiny.json")
  if os.path.exists(old_path):
    with open(old_path) as f:
      old = json.load(f)
  else:
    old = premise(args, dict(s, preset="tiny"), old_path, model_path=None)
  text = "\n".join(frontier_report.premise_comparison({"tiny": old, s["preset"]: new}))
  with open(os.path.join(args.workdir, "premise.md"), "w") as f:
    f.write(text + "\n")
  return text


def _only(args, runs: list[Run]) -> list[Run]:
  return [r for r in runs if args.only in r.name] if args.only else runs


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="1 seed, short runs (< 30 min)")
  p.add_argument("--sweep", action="store_true", help="the learning-rate sweep at D = 2")
  p.add_argument("--frontier", action="store_true",
                 help="the matched-quality frontier at D = 6 and its ablations")
  p.add_argument("--premise", action="store_true",
                 help="only measure general vs domain routing on the base model")
  p.add_argument("--skip_ablations", action="store_true",
                 help="--frontier: only the frontier points")
  p.add_argument("--report", action="store_true", help="only rebuild the report")
  p.add_argument("--workdir", default=None,
                 help="runs and results.jsonl (default /tmp/desmoe_repro_<mode>)")
  p.add_argument("--report_file", default=None,
                 help="markdown file to write the report into (default: docs/RESULTS.md for "
                      "the whole full or --frontier run, <workdir>/RESULTS.md otherwise)")
  p.add_argument("--model", default=None, help="HF DeepSeek-V2 directory (default: the "
                 "embedded tiny model of the --config preset)")
  p.add_argument("--config", default="tiny",
                 help="size preset of configs/six_domains.py the runs start from: tiny (the "
                      "default; docs/RESULTS.md's numbers) or tiny_v2 (docs/RESULTS.md, "
                      "'Testbeds'); 'configs/six_domains.py:tiny_v2' is accepted too")
  p.add_argument("--allow_code_execution", action="store_true",
                 help="run the generated programs for code pass@1 (each isolated, see "
                      "desmoe_jax/sandbox.py); without it code pass@1 is reported as not run")
  p.add_argument("--steps_per_domain", type=int, default=None)
  p.add_argument("--seeds", default=None, help="comma-separated, e.g. 0,1,2")
  p.add_argument("--only", default=None,
                 help="run only the runs whose name contains this string (e.g. D2, fft-)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
  logging.getLogger("desmoe_jax").setLevel(logging.WARNING)
  logging.getLogger("absl").setLevel(logging.WARNING)

  mode = ("sweep" if args.sweep else "frontier_quick" if args.frontier and args.quick else
          "frontier" if args.frontier else "quick" if args.quick else "full")
  s = dict(SETTINGS[mode])
  s["allow_code_execution"] = args.allow_code_execution
  s["preset"] = args.config.rsplit(":", 1)[-1]
  from desmoe_jax.configs.six_domains import TINY
  if s["preset"] not in TINY:
    raise SystemExit(f"--config={args.config}: expected one of {', '.join(TINY)}")
  if args.steps_per_domain:
    s["steps_per_domain"] = args.steps_per_domain
  if args.seeds:
    s["seeds"] = tuple(int(x) for x in args.seeds.split(","))
  if args.skip_ablations:
    s["ablations"] = False
  args.workdir = args.workdir or (f"/tmp/desmoe_repro_{mode}" if s["preset"] == "tiny" else
                                  f"/tmp/desmoe_repro_{mode}_{s['preset']}")
  if args.premise:
    if s["preset"] == "tiny":
      premise(args, s, os.path.join(args.workdir, "premise.json"))
    else:
      print(premise_beside_tiny(args, s))
    return
  report_file = args.report_file or default_report_file(args, mode)
  if not args.report:
    t0 = time.perf_counter()
    tokenizer, base = prepare(args, s)
    if args.frontier:
      frontier(args, s, tokenizer, base)
    else:
      reproduce(args, s, _only(args, plan(s, sweep=args.sweep)), tokenizer)
    log.info("all runs done in %.1f min", (time.perf_counter() - t0) / 60)
  import paper_report  # scripts/ is on sys.path when this script runs
  paper_report.write(args.workdir, report_file, sweep=args.sweep, frontier=args.frontier)
  log.info("report: %s", report_file)


def default_report_file(args, mode: str) -> str:
  """docs/RESULTS.md for the whole full or --frontier run only. A part of one (--only, --seeds,
  --steps_per_domain) reports into its workdir, so that a check of one run cannot replace the
  published tables with its own."""
  whole = mode in ("full", "frontier") and not (args.only or args.seeds or args.steps_per_domain)
  return (os.path.join(REPO, "docs", "RESULTS.md") if whole
          else os.path.join(args.workdir, "RESULTS.md"))


if __name__ == "__main__":
  main()
