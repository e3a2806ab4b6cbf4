r"""Domains discovered from the base model's routing, with the six bundled domains' labels
hidden (data.discover_domains, desmoe_jax/discover.py; docs/RESULTS.md "Discovered domains").

  python scripts/discover_report.py                      # :tiny base: ARI, confusion, heatmaps
  python scripts/discover_report.py --preset=tiny_v2     # the :tiny_v2 base
  python scripts/discover_report.py --train              # + DES-MoE on discovered vs true labels

The data and the batch shape are the frontier protocol's (scripts/reproduce_paper.py
SETTINGS["frontier"]: D = 6, 2 x 1024-token batches). Every training example of the six
domains is pooled and routed once by the base model; its signature is clustered into K = 6
and into the "auto" K. The true domains are used only to score the clusters: the adjusted
Rand index, a confusion table (rows: true domains, columns: clusters), and the base model's
domain x expert correlation (the DGES statistic f of docs/METHOD.md section 2, per cluster and
per true domain, token-weighted) drawn as heatmaps with the masks phi would give.

--train then runs DES-MoE (router+backbone, seed 0, 60 steps) with the true labels, with the
K = 6 clusters and with the auto clusters, at each --lrs rate (default: the two rates of the
frontier report's ablation setting, 3e-4 and 1e-3), reusing the assignments computed here
(each run's domains.json), and evaluates each as the frontier does: held-out loss per true
domain, per cluster, and the general-text loss against the base model's.

Writes <workdir>/report.md (and report.json, heatmaps, runs/); prints the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

import reproduce_paper as rp  # noqa: E402
from paper_common import DOMAINS, read_jsonl  # noqa: E402

log = logging.getLogger("discover_report")
REQUESTS = (6, "auto")


def frontier_config(preset: str, lr: float, discover_domains=0):
  """The frontier's DES-MoE [router+backbone] seed-0 run at `lr` (reproduce_paper.run_config)."""
  s = dict(rp.SETTINGS["frontier"], preset=preset)
  run = rp.Run("desmoe", "router+backbone", DOMAINS, 0, s["steps_per_domain"] * len(DOMAINS),
               lr, frontier=True)
  config = rp.run_config(run, s, None)
  config.data.discover_domains = discover_domains
  return config, s, run


def correlation(signatures, lengths, groups, k: int, top_k: int, layers: int):
  """[L, G, E]: per group, the fraction of its tokens whose top-k set holds each expert (DGES's
  f), from per-example slot shares weighted by the examples' token counts."""
  w = np.asarray(lengths, np.float64)[:, None]
  out = []
  for g in range(k):
    sel = np.asarray(groups) == g
    out.append((signatures[sel] * w[sel]).sum(0) / w[sel].sum() * top_k)
  return np.stack(out).reshape(k, layers, -1).transpose(1, 0, 2)


def confusion_markdown(table, clusters: list[str]) -> str:
  lines = ["| true domain | " + " | ".join(clusters) + " | examples |",
           "|---|" + "---|" * (len(clusters) + 1)]
  for name, row in zip(DOMAINS, table):
    lines.append(f"| {name} | " + " | ".join(str(int(x)) for x in row) + f" | {int(row.sum())} |")
  lines.append("| cluster size | " + " | ".join(str(int(x)) for x in table.sum(0)) +
               f" | {int(table.sum())} |")
  return "\n".join(lines)


def discover_all(args) -> dict:
  """Routes every training example once, clusters it for each request, scores the clusters."""
  import jax
  from desmoe_jax.data import load_tokenizer
  from desmoe_jax import data as data_lib
  from desmoe_jax import discover, evaluate, heldout, specialization, train_config
  from desmoe_jax.heatmaps import save_heatmaps
  config, _, _ = frontier_config(args.preset, 3e-4, 6)
  tokenizer = load_tokenizer(config.model.path)
  model = evaluate.load_model(config.model.path, config)
  specs = train_config.domain_specs(config)
  it = data_lib.MixtureIterator(specs, tokenizer, seq_len=config.data.seq_len,
                                batch_size=config.data.batch_size, seed=config.seed)
  train = {s.name: [ids for ids, _ in ex] for s, ex in zip(specs, it.examples)}
  held = {n: [ids for ids, _ in ex]
          for n, ex in heldout.heldout_examples_of(config, tokenizer).items()}
  pooled = [x for ex in train.values() for x in ex]
  truth = np.concatenate([[d] * len(train[n]) for d, n in enumerate(DOMAINS)])
  held_truth = np.concatenate([[d] * len(held[n]) for d, n in enumerate(DOMAINS)])
  t0 = time.perf_counter()
  sig = discover.routing_signatures(model, pooled, seq_len=config.data.seq_len,
                                    batch_size=config.data.batch_size)
  route_s = time.perf_counter() - t0
  mc = model.config
  layers, top_k = sig.shape[1] // mc.n_routed_experts, mc.num_experts_per_tok
  lengths = [len(x) for x in pooled]
  truth_a = correlation(sig, lengths, truth, len(DOMAINS), top_k, layers)
  out = {"model": config.model.path, "examples": len(pooled), "route_s": route_s,
         "signature_dims": int(sig.shape[1]), "requests": {}}
  plots = os.path.join(args.workdir, "plots")

  def draw(a, names, stem):
    mask = np.asarray(specialization.mask_from_correlation(a, config.dges.phi,
                                                           config.dges.score))
    paths = {"correlation": os.path.join(plots, f"{stem}_correlation.png"),
             "overlap": os.path.join(plots, f"{stem}_overlap.png")}
    save_heatmaps(types.SimpleNamespace(correlation=a, expert_mask=mask), names, paths,
                  config.train.heatmap_layers)
    return paths

  out["true_heatmaps"] = draw(truth_a, list(DOMAINS), "true_domains")
  for want in REQUESTS:
    config.data.discover_domains = want
    work = os.path.join(args.workdir, f"K{want}")
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    a = discover.discover(config, model, train, held, work, signatures=sig)
    cluster_s = time.perf_counter() - t0
    pred = np.concatenate([a.train_labels(n) for n in DOMAINS])
    held_pred = np.concatenate([np.asarray(a.heldout[n]["cluster"], int) for n in DOMAINS])
    names = discover.cluster_names(a.k)
    table = discover.confusion(truth, pred, len(DOMAINS), a.k)
    out["requests"][str(want)] = {
        "k": a.k, "sizes": a.sizes(), "cluster_s": cluster_s,
        "silhouette": a.info.get("silhouette"),
        "ari": discover.adjusted_rand_index(truth, pred),
        "heldout_ari": discover.adjusted_rand_index(held_truth, held_pred),
        "confusion": table.tolist(), "confusion_md": confusion_markdown(table, names),
        "heatmaps": draw(correlation(sig, lengths, pred, a.k, top_k, layers), names,
                         f"discovered_K{want}"),
        "domains_json": os.path.join(work, discover.FILE)}
  jax.clear_caches()
  return out


def run_one(args, label, lr: float, found: dict, base: dict) -> dict:
  """One DES-MoE run of the comparison: trained (trainer.train, as train.py), then evaluated
  as the frontier evaluates (general text over 24 batches)."""
  import jax
  from desmoe_jax import discover, evaluate, trainer
  from desmoe_jax.data import load_tokenizer
  config, s, run = frontier_config(args.preset, lr, 0 if label == "labels" else label)
  name = f"{label if label == 'labels' else 'K' + str(label)}-lr{lr:g}"
  run_dir = os.path.join(args.workdir, "runs", name)
  if os.path.exists(run_dir):
    shutil.rmtree(run_dir)
  os.makedirs(run_dir)
  if label != "labels":   # the assignment computed once above: read, not recomputed
    shutil.copy(found["requests"][str(label)]["domains_json"], run_dir)
  train_cfg = config.copy_and_resolve_references()
  train_cfg.eval.general_batches = 2
  t0 = time.perf_counter()
  trainer.train(train_cfg, run_dir)
  train_s = time.perf_counter() - t0
  tokenizer = load_tokenizer(config.model.path)
  model, _ = evaluate.load_run_model(config, run_dir)
  results = evaluate.evaluate_model(model, tokenizer, config, with_generation=False,
                                    assignment=evaluate.run_assignment(config, run_dir))
  in_domain = float(np.mean([results[d]["loss"] for d in DOMAINS]))
  record = {"name": name, "label": str(label), "lr": lr, "seed": run.seed, "steps": run.steps,
            "train_wall_s": train_s, "in_domain": in_domain,
            "general": results["general"]["loss"],
            "delta_general": results["general"]["loss"] - base["general"]["loss"],
            "per_domain": {d: results[d]["loss"] for d in DOMAINS},
            "per_cluster": {k: v["loss"] for k, v in results.items()
                            if k.startswith("cluster")}}
  if label != "labels":
    record["k"] = discover.Assignment.load(os.path.join(run_dir, discover.FILE)).k
  shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
  jax.clear_caches()
  return record


def base_eval(args) -> dict:
  from desmoe_jax.data import load_tokenizer
  from desmoe_jax import evaluate
  path = os.path.join(args.workdir, "base.json")
  if not os.path.exists(path):
    config, _, _ = frontier_config(args.preset, 3e-4)
    tokenizer = load_tokenizer(config.model.path)
    base = evaluate.evaluate_model(evaluate.load_model(config.model.path, config), tokenizer,
                                   config, with_generation=False)
    with open(path, "w") as f:
      json.dump(base, f, indent=2)
  with open(path) as f:
    return json.load(f)


def report(args, found: dict, runs: list[dict], base: dict | None) -> str:
  lines = [f"Base model `{os.path.relpath(found['model'], REPO)}`: {found['examples']} training "
           "examples of the six domains pooled, labels hidden; signature "
           f"{found['signature_dims']} numbers per example (MoE layers x routed experts), routed "
           f"in {found['route_s']:.0f} s.", ""]
  lines += ["| request | K | cluster sizes | ARI (training) | ARI (held-out, nearest centroid) |",
            "|---|---|---|---|---|"]
  for want, r in found["requests"].items():
    lines.append(f"| {want} | {r['k']} | {', '.join(map(str, r['sizes']))} | {r['ari']:.3f} | "
                 f"{r['heldout_ari']:.3f} |")
  auto = found["requests"].get("auto")
  if auto and auto.get("silhouette"):
    lines += ["", "Silhouette per K (auto): " + ", ".join(
        f"{k}: {v:.3f}" for k, v in auto["silhouette"].items()) + "."]
  for want, r in found["requests"].items():
    lines += ["", f"Confusion, request {want} (rows: true domain, columns: cluster):", "",
              r["confusion_md"]]
  lines += ["", "Heatmaps (the base model's token-weighted correlation f per group): " +
            ", ".join(os.path.relpath(p, args.workdir) for r in
                      [{"heatmaps": found["true_heatmaps"]}, *found["requests"].values()]
                      for p in [r["heatmaps"]["correlation"]])]
  if runs:
    lines += ["", f"DES-MoE [router+backbone], seed 0, {runs[0]['steps']} steps; base model "
              f"general loss {base['general']['loss']:.3f}, mean in-domain loss "
              f"{np.mean([base[d]['loss'] for d in DOMAINS]):.3f}.", "",
              "| domains | lr | K | mean in-domain loss | Δ general loss | " +
              " | ".join(DOMAINS) + " |", "|---|---|---|---|---|" + "---|" * len(DOMAINS)]
    for r in sorted(runs, key=lambda r: (r["lr"], r["label"] != "labels", r["label"])):
      what = "true labels" if r["label"] == "labels" else f"discovered ({r['label']})"
      lines.append(f"| {what} | {r['lr']:g} | {r.get('k', 6)} | {r['in_domain']:.3f} | "
                   f"{r['delta_general']:+.3f} | " +
                   " | ".join(f"{r['per_domain'][d]:.3f}" for d in DOMAINS) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="tiny", help="tiny or tiny_v2 (the base model)")
  p.add_argument("--workdir", default=None, help="default: workdir/discover_<preset>")
  p.add_argument("--train", action="store_true", help="also the DES-MoE comparison runs")
  p.add_argument("--lrs", default="3e-4,1e-3", help="learning rates of the comparison")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  args.workdir = args.workdir or os.path.join(REPO, "workdir", f"discover_{args.preset}")
  os.makedirs(args.workdir, exist_ok=True)
  found_path = os.path.join(args.workdir, "report.json")
  if os.path.exists(found_path):
    with open(found_path) as f:
      found = json.load(f)
  else:
    found = discover_all(args)
    with open(found_path, "w") as f:
      json.dump(found, f, indent=2)
  runs, base = [], None
  if args.train:
    base = base_eval(args)
    results = os.path.join(args.workdir, "results.jsonl")
    done = {r["name"]: r for r in read_jsonl(results)}
    for lr in (float(x) for x in args.lrs.split(",")):
      for label in ("labels", *REQUESTS):
        name = f"{label if label == 'labels' else 'K' + str(label)}-lr{lr:g}"
        if name not in done:
          record = run_one(args, label, lr, found, base)
          with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")
          done[name] = record
          log.info("%s: in-domain %.3f, general %+.3f (%.0f s)", name, record["in_domain"],
                   record["delta_general"], record["train_wall_s"])
        runs.append(done[name])
  text = report(args, found, runs, base)
  with open(os.path.join(args.workdir, "report.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
