"""The matched-quality report of `scripts/reproduce_paper.py --frontier`.

Every method trades in-domain learning against forgetting through its learning rate, so one
learning rate for all compares methods at different in-domain quality. Here each method's runs at
several rates form its frontier: general-loss increase (y) against mean in-domain held-out loss
(x). A method's forgetting at a target in-domain loss is read off its frontier by linear
interpolation between the two runs that bracket the target, and compared with FFT's at the same
target (a percentage of FFT's). Only the learning branch of a frontier is used: the runs up to
the rate with the lowest in-domain loss (higher rates overshoot: worse in-domain AND more
forgetting, never a better trade-off). Targets outside a frontier's range are not extrapolated.

The report goes between `<!-- BEGIN FRONTIER -->` and `<!-- END FRONTIER -->` of the target
markdown file; the PNG beside it.
"""

from __future__ import annotations

import json
import os
import statistics

import numpy as np

import paper_common
from paper_common import (ABLATIONS, DOMAINS, FREEZES, FRONTIER, FRONTIER_D, LABELS, SINGLE,
                          TESTBEDS, final_smoothed, fmt, general_delta, mean_in_domain,
                          read_jsonl, splice, steps_to, table)

BEGIN, END = "<!-- BEGIN FRONTIER -->", "<!-- END FRONTIER -->"   # the :tiny testbed's
FFT = ("fft", "")
READINGS = ("router+backbone", "router+experts")   # the DES-MoE readings ablations may use
GOAL = 0.11   # the goal: DES-MoE's increase <= 11% of FFT's at matched in-domain loss


# ------------------------------------------------------------------ frontiers


def points(records: list[dict], base: dict, method: str, variant: str, seed: int,
           rise=general_delta) -> list:
  """[(lr, mean in-domain loss, rise(run, base))] of one method and seed, by lr; the rise is
  the general-loss increase unless given (e.g. one genre's)."""
  return sorted((r["lr"], mean_in_domain(r), rise(r, base)) for r in records
                if r["method"] == method and r["variant"] == variant and r["seed"] == seed
                and r["D"] == FRONTIER_D and r.get("frontier"))


def marker(preset: str) -> tuple[str, str]:
  """The BEGIN/END markers of a testbed's frontier report."""
  name = TESTBEDS[preset]["marker"]
  return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


def preset_of(workdir: str) -> str:
  """The testbed a work directory's runs were made on (setup.json), `tiny` for older ones."""
  path = os.path.join(workdir, "setup.json")
  if not os.path.exists(path):
    return "tiny"
  with open(path) as f:
    return json.load(f).get("settings", {}).get("preset", "tiny")


def shared_targets(records: list[dict], base: dict) -> tuple[float, ...] | None:
  """TESTBEDS' "shared" targets: four in-domain losses at the middles of four equal parts of
  the range that the seed-0 learning branches of FFT and of every DES-MoE reading of FRONTIER
  all span (the readings a run has: --quick runs one). None until those frontiers are
  complete, or when they share no range."""
  grid = paper_common.FRONTIER_LRS  # read when called: a caller may run with an edited grid
  lo, hi, desmoe = -np.inf, np.inf, 0
  for key in FRONTIER:
    if key != FFT and key[0] != "desmoe":
      continue
    pts = points(records, base, *key, 0)
    if not pts and key != FFT:
      continue      # a variant this run does not have (--frontier --quick: FFT and one reading)
    if len(pts) < len(grid[key]):
      return None
    desmoe += key[0] == "desmoe"
    x, _ = branch(pts)
    lo, hi = max(lo, float(x[0])), min(hi, float(x[-1]))
  if not desmoe or not lo < hi:
    return None
  return tuple(round(lo + (hi - lo) * (k + 0.5) / 4, 3) for k in range(4))


def targets_of(records: list[dict], base: dict, preset: str = "tiny"):
  """The testbed's comparison targets (a tuple), or None while they cannot be placed yet."""
  targets = TESTBEDS[preset]["targets"]
  return shared_targets(records, base) if targets == "shared" else tuple(targets)


def branch(pts: list) -> tuple[np.ndarray, np.ndarray]:
  """The learning branch (rates up to the one with the lowest in-domain loss) as (x, y) sorted
  by in-domain loss x, ready for np.interp."""
  if not pts:
    return np.zeros(0), np.zeros(0)
  best = int(np.argmin([p[1] for p in pts]))
  kept = sorted(pts[:best + 1], key=lambda p: p[1])
  return np.array([p[1] for p in kept]), np.array([p[2] for p in kept])


def interpolate(pts: list, target: float) -> float | None:
  """General-loss increase at in-domain loss `target` along the frontier of `pts`; None when
  the target is outside the range of its learning branch (no extrapolation)."""
  x, y = branch(pts)
  if len(x) == 0 or not x[0] <= target <= x[-1]:
    return None
  return float(np.interp(target, x, y))


def ratio(rise: float | None, fft_rise: float | None) -> float | None:
  """`rise` as a fraction of FFT's; None when either is missing or FFT's is not positive."""
  if rise is None or fft_rise is None or fft_rise <= 0:
    return None
  return rise / fft_rise


def seeds_of(records: list[dict]) -> list[int]:
  return sorted({r["seed"] for r in records if r.get("frontier")})


def run_ratio(rec: dict, records: list[dict], base: dict) -> float | None:
  """One run's increase as a fraction of FFT's at the run's own in-domain loss (same seed)."""
  fft = points(records, base, *FFT, rec["seed"])
  return ratio(general_delta(rec, base), interpolate(fft, mean_in_domain(rec)))


def ablation_setting(records: list[dict], base: dict, preset: str = "tiny"):
  """(reading, (lr_a, lr_b)) for the ablations: the DES-MoE reading whose seed-0 increase is
  the smallest mean fraction of FFT's over the targets that both readings reach (all the
  targets each reaches if they share none), and its two rates on the learning branch whose
  in-domain losses are nearest the middle of those targets. None until both readings' and FFT's seed-0 frontiers
  are complete."""
  grid = paper_common.FRONTIER_LRS  # read when called: a caller may run with an edited grid
  fft = points(records, base, *FFT, 0)
  targets_all = targets_of(records, base, preset)
  if len(fft) < len(grid[FFT]) or targets_all is None:
    return None
  curves, reached = {}, {}
  for reading in READINGS:
    curves[reading] = points(records, base, "desmoe", reading, 0)
    if len(curves[reading]) < len(grid[("desmoe", reading)]):
      return None
    reached[reading] = {t: r for t in targets_all
                        if (r := ratio(interpolate(curves[reading], t), interpolate(fft, t)))
                        is not None}
  common = set.intersection(*(set(r) for r in reached.values()))
  best = None
  for reading in READINGS:
    targets = sorted(common) if common else sorted(reached[reading])
    if not targets:
      continue
    score = statistics.mean(reached[reading][t] for t in targets)
    if best is None or score < best[0]:
      middle = statistics.median(targets)
      x, _ = branch(curves[reading])   # the learning branch only: no overshooting rate
      learning = [p for p in curves[reading] if p[1] in x]
      nearest = sorted(learning, key=lambda p: abs(p[1] - middle))[:2]
      best = (score, reading, tuple(sorted(p[0] for p in nearest)))
  return None if best is None else (best[1], best[2])


# ------------------------------------------------------------------ the report


def write(workdir: str, report_file: str):
  """The report of the testbed the work directory's runs were made on, between that testbed's
  markers (TESTBEDS[...]["marker"])."""
  records = [r for r in read_jsonl(os.path.join(workdir, "results.jsonl")) if r.get("frontier")]
  with open(os.path.join(workdir, "base.json")) as f:
    base = json.load(f)["eval"]
  preset = preset_of(workdir)
  testbed = TESTBEDS[preset]
  plot_dir = os.path.dirname(os.path.abspath(report_file))
  lines = [f"Generated by `scripts/reproduce_paper.py --frontier{'' if preset == 'tiny' else ' --config=' + preset}` "
           f"from {len(records)} runs at D = {FRONTIER_D} (seeds {seeds_of(records)}). Base "
           f"model (`:{preset}`): general held-out loss {base['general']['loss']:.4f}, mean "
           f"in-domain held-out loss {base_in_domain(base):.3f}.", ""]
  premise_path = os.path.join(workdir, "premise.json")
  if os.path.exists(premise_path):
    with open(premise_path) as f:
      lines += premise_section(json.load(f))
  targets = targets_of(records, base, preset)
  if targets is None:
    lines += ["The comparison targets are placed by the seed-0 frontiers of FFT and DES-MoE, "
              "which are not complete yet.", ""]
  else:
    if testbed["targets"] == "shared":
      lines += [f"Targets (placed by the seed-0 learning branches, in-domain losses only): "
                f"{', '.join(f'{t:g}' for t in targets)}.", ""]
    lines += headline_section(records, base, plot_dir, targets, testbed["plot"])
    if testbed["extras"]:
      lines += genre_section(records, base, targets)
  lines += points_section(records, base)
  lines += ablations_section(records, base, testbed["oracle_top"])
  if testbed["extras"]:
    lines += freeze_section(records, base, preset)
    lines += singles_section(records, base)
    lines += convergence_section(records)
  splice(report_file, "\n".join(lines), *marker(preset))
  with open(os.path.join(plot_dir, f"frontier_points_{preset}.json"), "w") as f:
    json.dump({"preset": preset, "source": f"scripts/reproduce_paper.py --frontier, {len(records)} "
               "runs", "targets": list(targets or ()), "points": point_summary(records, base)},
              f, indent=1)
  plot_testbeds(plot_dir)


def base_in_domain(base: dict) -> float:
  return float(np.mean([base[d]["loss"] for d in base if d != "general" and "loss" in base[d]]))


def premise_section(p: dict) -> list[str]:
  layers = len(p["union"]["mask_fraction"])
  per = lambda v: " / ".join(f"{x:.2f}" for x in v)
  lines = ["### The premise: does general text use other experts than the domains?", "",
           f"Base model, routing of {p['tokens']['general']} tokens of general held-out text and "
           f"about {min(v for k, v in p['tokens'].items() if k != 'general')} tokens of each "
           "domain's training data. Per MoE layer (values for layers "
           f"1 / ... / {layers}): *overlap* = sum over experts of min(p_general(e), p_domain(e)), "
           "where p(e) is the share of the text's top-k slots routed to expert e (1 = identical "
           f"routing, 0 = disjoint experts); *mask* = the experts DGES selects for the domain at "
           f"phi = {p['phi']} from this routing; *general on mask* = share of general text's "
           "slots landing on those experts. If general text used other experts, general on mask "
           "would sit well below the mask's fraction of the experts.", ""]
  rows = [[name, per(v["overlap"]), per(v["mask_fraction"]), per(v["general_on_mask"]),
           per(v["domain_on_mask"])] for name, v in p["per_domain"].items()]
  rows.append(["union of the six masks", "", per(p["union"]["mask_fraction"]),
               per(p["union"]["general_on_mask"]), ""])
  rows.append(["mean over domains and layers", f"{p['overlap_mean']:.3f}",
               f"{p['mask_fraction_mean']:.3f}", f"{p['general_on_mask_mean']:.3f}",
               f"{p['domain_on_mask_mean']:.3f}"])
  lines += table(["domain", "overlap", "mask fraction of experts", "general on mask",
                  "domain on mask"], rows)
  top = p["general_top_share"]
  e = p.get("experts", 32)
  lines += ["", "General text's own concentration: share of its slots on its top N experts "
            f"(uniform routing over {e} experts would give N / {e}): "
            + "; ".join(f"top {n}: {per(v)}" for n, v in top.items()) + ".", ""]
  return lines


def premise_comparison(premises: dict) -> list[str]:
  """The premise of several base models side by side ({label: routing_premise result}), each
  measured with its own preset's general text (`data.general`): per domain the means over
  layers, then the means over domains and layers, and the target of docs/RESULTS.md
  ("Testbeds": general on mask / mask fraction <= 0.6, overlap <= 0.5)."""
  labels = list(premises)
  m = lambda v: float(np.mean(v))
  cols = [("overlap", lambda d, p: m(d["overlap"])),
          ("mask fraction", lambda d, p: m(d["mask_fraction"])),
          ("general on mask", lambda d, p: m(d["general_on_mask"])),
          ("general on mask / mask fraction",
           lambda d, p: m(d["general_on_mask"]) / max(m(d["mask_fraction"]), 1e-9)),
          ("concentration (slots on top 10% of experts)", lambda d, p: m(d["concentration"])),
          ("ESFT: gate weight on top 10%", lambda d, p: m(d["gate_top_share"])),
          ("ESFT-Token experts (p=0.2)", lambda d, p: m(d["esft_experts"]["token"])),
          ("ESFT-Gate experts (p=0.1)", lambda d, p: m(d["esft_experts"]["gate"]))]
  header = ["domain"] + [f"{name}: {' / '.join(labels)}" for name, _ in cols]
  domains = list(next(iter(premises.values()))["per_domain"])
  rows = [[name] + [" / ".join(f"{f(premises[l]['per_domain'][name], premises[l]):.2f}"
                                for l in labels) for _, f in cols] for name in domains]
  means = {"overlap": "overlap_mean", "mask fraction": "mask_fraction_mean",
           "general on mask": "general_on_mask_mean",
           "general on mask / mask fraction": "general_on_mask_over_mask",
           "concentration (slots on top 10% of experts)": "concentration_mean",
           "ESFT: gate weight on top 10%": "gate_top_share_mean"}
  mean_row = ["mean over domains and layers"]
  for name, _ in cols:
    if name in means:
      mean_row.append(" / ".join(f"{premises[l][means[name]]:.3f}" for l in labels))
    else:
      kind = "token" if "Token" in name else "gate"
      mean_row.append(" / ".join(f"{premises[l]['esft_experts_mean'][kind]:.1f}"
                                 for l in labels))
  rows.append(mean_row)
  lines = [f"Premise of each base ({' / '.join(labels)}), means over its MoE layers; each base "
           "measured with its own preset's general held-out text ("
           + "; ".join(f"{l}: {premises[l]['experts']} routed experts, "
                       f"{premises[l]['tokens']['general']} general tokens" for l in labels)
           + "). Uniform routing gives general on mask / mask fraction = 1 and concentration = "
           "0.1.", ""]
  lines += table(header, rows)
  lines += [""]
  for l in labels:
    genres = premises[l].get("general_per_genre")
    if not genres:
      continue
    dom = list(premises[l]["per_domain"])
    lines += [f"{l}, general text by genre: each genre's held-out text in place of the whole "
              "general set (same domain masks): general on mask / mask fraction per domain, "
              "then the mean over domains and layers (ratio of the means) and the overlap.", ""]
    mask = {d: float(np.mean(premises[l]["per_domain"][d]["mask_fraction"])) for d in dom}
    on = lambda v, d: float(np.mean(v["per_domain"][d]["general_on_mask"]))
    rows = [[g] + [f"{on(v, d) / max(mask[d], 1e-9):.2f}" for d in dom]
            + [f"{v['general_on_mask_over_mask']:.2f}", f"{v['overlap_mean']:.2f}"]
            for g, v in genres.items()]
    lines += table(["genre"] + dom + ["mean ratio", "mean overlap"], rows) + [""]
  for l in labels:
    p = premises[l]
    ok = p["general_on_mask_over_mask"] <= 0.6 and p["overlap_mean"] <= 0.5
    lines.append(f"{l}: general on mask / mask fraction {p['general_on_mask_over_mask']:.2f} "
                 f"(mean of the per-layer ratios {p['general_on_mask_over_mask_each']:.2f}), "
                 f"overlap {p['overlap_mean']:.2f}; target <= 0.6 and <= 0.5: "
                 f"{'met' if ok else 'not met'}.")
  return lines


def seed_ratios(records, base, key, target) -> dict:
  """{seed: the method's increase at `target` as a fraction of FFT's (same seed)}, for the
  seeds where both frontiers reach the target."""
  out = {}
  for seed in seeds_of(records):
    r = ratio(interpolate(points(records, base, *key, seed), target),
              interpolate(points(records, base, *FFT, seed), target))
    if r is not None:
      out[seed] = r
  return out


def mean_ratio_per_seed(records, base, key, targets) -> list[float]:
  """Per seed: the mean over the targets reached of the fraction of FFT's increase."""
  by_seed: dict = {}
  for t in targets:
    for seed, r in seed_ratios(records, base, key, t).items():
      by_seed.setdefault(seed, []).append(r)
  return [statistics.mean(v) for _, v in sorted(by_seed.items())]


def headline_section(records, base, plot_dir, targets, plot_name) -> list[str]:
  lines = ["### Forgetting at matched in-domain quality (the headline)", "",
           "General-loss increase of each method interpolated along its frontier at the same "
           "mean in-domain held-out losses, and in brackets as a percentage of FFT's increase "
           "at that loss (per seed, then mean ± std over seeds). `-`: the target is outside "
           "the method's frontier (never extrapolated). Last column: per seed, the mean of the "
           "percentages over the targets reached, then mean ± std over seeds.", ""]
  rows = []
  for key in FRONTIER:
    cells = []
    for t in targets:
      rises = [interpolate(points(records, base, *key, s), t) for s in seeds_of(records)]
      rs = list(seed_ratios(records, base, key, t).values())
      pct = f" ({fmt([100 * r for r in rs], digits=0)}%)" if rs and key != FFT else ""
      cells.append(fmt(rises, signed=True) + pct)
    means = mean_ratio_per_seed(records, base, key, targets)
    rows.append([LABELS[key], *cells, fmt([100 * m for m in means], digits=0) + "%"
                 if means else "-"])
  lines += table(["method", *[f"in-domain {t:g}" for t in targets],
                  "mean % of FFT"], rows)
  lines += ["", goal_line(records, base, targets), "", f"![frontier]({plot_name})", ""]
  plot(records, base, os.path.join(plot_dir, plot_name), targets)
  return lines


def goal_line(records, base, targets) -> str:
  out = []
  for key in FRONTIER:
    if key[0] != "desmoe":
      continue
    per_target = [seed_ratios(records, base, key, t) for t in targets]
    reached = [statistics.mean(r.values()) for r in per_target if r]
    if not reached:
      out.append(f"{LABELS[key]}: no target reached")
      continue
    best = min(reached)
    out.append(f"{LABELS[key]}: {100 * min(reached):.0f}%-{100 * max(reached):.0f}% of FFT "
               f"over the targets it reaches ({'met' if best <= GOAL else 'not met'})")
  return (f"Goal: DES-MoE's increase at FFT-matched in-domain loss <= {100 * GOAL:.0f}% of "
          "FFT's. " + "; ".join(out) + ".")


def points_section(records, base) -> list[str]:
  lines = ["### Every frontier point", "",
           "Mean ± std over seeds of the mean in-domain held-out loss and the general-loss "
           "increase, per method and learning rate.", ""]
  rows = []
  for key in FRONTIER:
    lrs = sorted({r["lr"] for r in records if (r["method"], r["variant"]) == key})
    for lr in lrs:
      rs = [r for r in records if (r["method"], r["variant"]) == key and r["lr"] == lr]
      rows.append([LABELS[key], f"{lr:g}", str(len(rs)), fmt([mean_in_domain(r) for r in rs]),
                   fmt([general_delta(r, base) for r in rs], signed=True)])
  return lines + table(["method", "lr", "seeds", "mean in-domain loss", "Δ general loss"],
                       rows) + [""]


def ablation_label(method: str, variant: str, oracle_top: int = 16) -> str:
  parts = variant.split(",")
  reading = parts[0] if parts[0] in READINGS else ""
  suffix = ",".join(p for p in parts if p not in READINGS)
  name = {("desmoe_no_alr", ""): "w/o ALR", ("desmoe_no_dges", ""): "w/o DGES",
          ("desmoe_no_schedule", ""): "w/o schedule",
          ("desmoe_no_alr", "router_frozen"): "router frozen (linear, no ALR)",
          ("desmoe", "oracle"): f"oracle DGES (the top {oracle_top} general experts "
                                "excluded)",
          ("desmoe", ""): "DES-MoE"}.get((method, suffix), f"{method} {suffix}")
  return f"{name} [{reading}]" if reading else name


def ablations_section(records, base, oracle_top: int = 16) -> list[str]:
  ablation_methods = {m for m, _ in ABLATIONS}
  abl = [r for r in records if r["method"] in ablation_methods and r["method"] != "desmoe"
         or (r["method"] == "desmoe" and "oracle" in r["variant"])]
  if not abl:
    return []
  readings = {r["variant"].split(",")[0] for r in abl if r["variant"].split(",")[0] in READINGS}
  lrs = sorted({r["lr"] for r in abl})
  keys = [("desmoe", reading) for reading in sorted(readings)]
  keys += sorted({(r["method"], r["variant"]) for r in abl})
  lines = ["### Ablations and controls at the matched learning rates", "",
           "Each DES-MoE ablation at the two frontier learning rates of the chosen reading whose "
           "in-domain losses are nearest the middle target. *% of FFT*: the run's general-loss "
           "increase as a percentage of FFT's at the run's own in-domain loss (FFT's frontier "
           "of the same seed), mean ± std over seeds. *Paired change*: that percentage minus "
           "DES-MoE's (same reading, learning rate and seed), in percentage points, mean ± std "
           "over the seeds both ran; it removes what the seeds share, so it is the column that "
           "says whether a mechanism helps (negative: the ablation forgets less).", ""]
  rows = []
  for method, variant in keys:
    for lr in lrs:
      rs = [r for r in records if r["method"] == method and r["variant"] == variant
            and r["lr"] == lr]
      if not rs:
        continue
      ratios = [100 * x for r in rs if (x := run_ratio(r, records, base)) is not None]
      paired = [] if method == "desmoe" and variant in READINGS else [
          100 * d for r in rs if (d := paired_change(r, records, base, readings)) is not None]
      rows.append([ablation_label(method, variant, oracle_top), f"{lr:g}", str(len(rs)),
                   fmt([mean_in_domain(r) for r in rs]),
                   fmt([general_delta(r, base) for r in rs], signed=True),
                   fmt(ratios, digits=0) + "%" if ratios else "-",
                   fmt(paired, signed=True, digits=0) if paired else "-"])
  return lines + table(["run", "lr", "seeds", "mean in-domain loss", "Δ general loss",
                        "% of FFT at the same in-domain loss", "paired change (pp)"],
                       rows) + [""]


def paired_change(rec: dict, records: list[dict], base: dict, readings) -> float | None:
  """`run_ratio` of an ablation run minus that of the DES-MoE frontier run with the same
  reading, learning rate and seed (None without one). An ablation without a reading of its own
  (w/o schedule) is paired with the one reading the ablations ran under."""
  reading = rec["variant"].split(",")[0]
  if reading not in READINGS:
    if len(readings) != 1:
      return None
    reading = next(iter(readings))
  ref = [r for r in records if (r["method"], r["variant"]) == ("desmoe", reading)
         and r["lr"] == rec["lr"] and r["seed"] == rec["seed"]]
  if not ref:
    return None
  mine, theirs = run_ratio(rec, records, base), run_ratio(ref[0], records, base)
  return None if mine is None or theirs is None else mine - theirs


def plot(records, base, path: str, targets):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.0, 4.6))
  for key in FRONTIER:
    lrs = sorted({r["lr"] for r in records if (r["method"], r["variant"]) == key})
    xs, ys, xe, ye = [], [], [], []
    for lr in lrs:
      rs = [r for r in records if (r["method"], r["variant"]) == key and r["lr"] == lr]
      x = [mean_in_domain(r) for r in rs]
      y = [general_delta(r, base) for r in rs]
      xs.append(np.mean(x)), ys.append(np.mean(y))
      xe.append(np.std(x, ddof=1) if len(x) > 1 else 0.0)
      ye.append(np.std(y, ddof=1) if len(y) > 1 else 0.0)
    if not xs:
      continue
    line = ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", capsize=2, label=LABELS[key],
                       linewidth=2.2 if key in (FFT, ("desmoe", "router+backbone")) else 1.2)
    for x, y, lr in zip(xs, ys, lrs):
      ax.annotate(f"{lr:g}", (x, y), fontsize=6, color=line[0].get_color(),
                  xytext=(3, 3), textcoords="offset points")
  # The one ablation that leaves the frontiers' band: DES-MoE without its schedule (dashed).
  no_schedule = [r for r in records if r["method"] == "desmoe_no_schedule"]
  lrs = sorted({r["lr"] for r in no_schedule})
  if lrs:
    xs = [np.mean([mean_in_domain(r) for r in no_schedule if r["lr"] == lr]) for lr in lrs]
    ys = [np.mean([general_delta(r, base) for r in no_schedule if r["lr"] == lr]) for lr in lrs]
    ax.plot(xs, ys, marker="x", linestyle="--", color="black", linewidth=1.0,
            label=ablation_label("desmoe_no_schedule", "") + " (ablation)")
    for x, y, lr in zip(xs, ys, lrs):
      ax.annotate(f"{lr:g}", (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
  for t in targets:
    ax.axvline(t, color="gray", linewidth=0.6, linestyle=":")
  ax.set_yscale("symlog", linthresh=0.01)   # linear below 0.01: an increase may be ~0 or < 0
  ax.set_ylim(bottom=min(0.0, *(general_delta(r, base) for r in records)))
  ax.set_xlabel(f"mean in-domain held-out loss, D = {FRONTIER_D} (lower is better)")
  ax.set_ylabel("general held-out loss − base (lower is better)")
  ax.set_title("Learning vs forgetting, one point per learning rate (mean over seeds)",
               fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------ the extras (TESTBEDS)


def best_in_domain_rate(records: list[dict], key) -> float | None:
  """The rate of `key`'s complete seed-0 frontier with the lowest mean in-domain loss."""
  pts = [r for r in records if (r["method"], r["variant"]) == key and r["seed"] == 0
         and r["D"] == FRONTIER_D and r.get("frontier")]
  if len(pts) < len(paper_common.FRONTIER_LRS[key]):
    return None
  return min(pts, key=mean_in_domain)["lr"]


def best_desmoe_setting(records: list[dict], base: dict, preset: str = "tiny"):
  """(reading, lr): the DES-MoE frontier point of either warm-up reading, on its learning
  branch, with the least seed-0 forgetting as a fraction of FFT's at the run's own in-domain
  loss. None until those frontiers are complete or none is inside FFT's."""
  if targets_of(records, base, preset) is None:
    return None
  best = None
  for reading in READINGS:
    pts = points(records, base, "desmoe", reading, 0)
    if len(pts) < len(paper_common.FRONTIER_LRS[("desmoe", reading)]):
      return None
    x, _ = branch(pts)
    for r in records:
      if ((r["method"], r["variant"], r["seed"], r["D"]) == ("desmoe", reading, 0, FRONTIER_D)
          and r.get("frontier") and mean_in_domain(r) in x):
        q = run_ratio(r, records, base)
        if q is not None and (best is None or q < best[0]):
          best = (q, reading, r["lr"])
  return None if best is None else (best[1], best[2])


def genre_rise(genre: str):
  def rise(rec: dict, base: dict) -> float:
    return (rec["eval"]["general"]["loss_per_genre"][genre]
            - base["general"]["loss_per_genre"][genre])
  return rise


def genre_section(records, base, targets) -> list[str]:
  """General-loss increase per genre of the held-out set, read along each frontier at the
  targets like the mean."""
  genres = sorted(base.get("general", {}).get("loss_per_genre", {}))
  if not genres:
    return []
  lines = ["### What each method forgets, per genre", "",
           "General-loss increase per genre of the held-out set (base model's loss per genre in "
           "the first row), interpolated along each method's frontier at the same targets as "
           "the mean, mean ± std over seeds; last column: the mean over genres.", ""]
  rows = [["base model", "", *[f"{base['general']['loss_per_genre'][g]:.3f}" for g in genres],
           ""]]
  for key in FRONTIER:
    for t in targets:
      cells = []
      for g in genres:
        cells.append(fmt([interpolate(points(records, base, *key, s, rise=genre_rise(g)), t)
                          for s in seeds_of(records)], signed=True))
      per_seed = []
      for s in seeds_of(records):
        v = [interpolate(points(records, base, *key, s, rise=genre_rise(g)), t) for g in genres]
        if all(x is not None for x in v):
          per_seed.append(float(np.mean(v)))
      if any(c != "-" for c in cells):   # a target outside this frontier: no row
        rows.append([LABELS[key], f"{t:g}", *cells, fmt(per_seed, signed=True)])
  return lines + table(["method", "in-domain", *genres, "mean over genres"], rows) + [""]


def freeze_section(records, base, preset) -> list[str]:
  """DES-MoE at its best setting with one part never trained: where the forgetting comes from."""
  best = best_desmoe_setting(records, base, preset)
  runs = [r for r in records if r["method"] == "desmoe" and ",freeze=" in r["variant"]]
  if best is None or not runs:
    return []
  reading, lr = best
  lines = ["### Where the forgetting comes from: one part frozen at a time", "",
           f"DES-MoE at its best setting (warm-up: {reading}, lr {lr:g}: the frontier point "
           "with the least seed-0 forgetting as a fraction of FFT's at its own in-domain loss), "
           "with one parameter group never trained. Columns as in the ablations; paired change "
           "against DES-MoE at the same setting and seed.", ""]
  rows = []
  for variant in [reading] + [f"{reading},freeze={g}" for g in FREEZES]:
    rs = [r for r in records if (r["method"], r["variant"]) == ("desmoe", variant)
          and r["lr"] == lr and r["D"] == FRONTIER_D]
    if not rs:
      continue
    ratios = [100 * x for r in rs if (x := run_ratio(r, records, base)) is not None]
    paired = [] if variant == reading else [
        100 * d for r in rs if (d := paired_change(r, records, base, {reading})) is not None]
    frozen = variant.split("freeze=")[1] if "freeze=" in variant else "nothing (DES-MoE)"
    rows.append([frozen, str(len(rs)), fmt([mean_in_domain(r) for r in rs]),
                 fmt([general_delta(r, base) for r in rs], signed=True),
                 fmt(ratios, digits=0) + "%" if ratios else "-",
                 fmt(paired, signed=True, digits=0) if paired else "-"])
  return lines + table(["frozen", "seeds", "mean in-domain loss", "Δ general loss",
                        "% of FFT at the same in-domain loss", "paired change (pp)"],
                       rows) + [""]


def singles_section(records, base) -> list[str]:
  """One multi-domain model against one ESFT model per domain, in-domain loss per domain."""
  singles = [r for r in records if r["variant"] == "single"]
  if not singles:
    return []
  multi = {}
  for key in (FFT, ("desmoe", "router+backbone")):
    lr = best_in_domain_rate(records, key)
    if lr is not None:
      multi[key] = (lr, [r for r in records if (r["method"], r["variant"]) == key
                         and r["lr"] == lr and r["D"] == FRONTIER_D])
  lines = ["### One multi-domain model against one ESFT model per domain", "",
           "Held-out loss per domain, mean ± std over seeds. Each ESFT model trains on its "
           "domain alone for the multi-domain runs' per-domain token budget, at the rate of the "
           "ESFT-Token frontier with the lowest seed-0 mean in-domain loss; the multi-domain "
           "models at their own such rate. Last column: general-loss increase (for the ESFT "
           "rows, the mean over the six models).", ""]
  domains = list(DOMAINS[:FRONTIER_D])
  rows = []
  for m in SINGLE:
    rs = [r for r in singles if r["method"] == m]
    if not rs:
      continue
    cells = [fmt([r["eval"][d]["loss"] for r in rs if r["domains"][0] == d]) for d in domains]
    per_seed = [np.mean([general_delta(r, base) for r in rs if r["seed"] == s])
                for s in sorted({r["seed"] for r in rs})]
    rows.append([LABELS[(m, "single")], f"{rs[0]['lr']:g}", *cells,
                 fmt([float(x) for x in per_seed], signed=True)])
  for key, (lr, rs) in multi.items():
    rows.append([LABELS[key] + ", one model", f"{lr:g}",
                 *[fmt([r["eval"].get(d, {}).get("loss") for r in rs]) for d in domains],
                 fmt([general_delta(r, base) for r in rs], signed=True)])
  return lines + table(["model", "lr", *domains, "Δ general loss"], rows) + [""]


def convergence_section(records) -> list[str]:
  """Steps to the same training loss, FFT against DES-MoE at each rate both ran (the paper's
  "68% faster")."""
  des = ("desmoe", "router+backbone")
  rates = sorted(set(paper_common.FRONTIER_LRS[FFT]) & set(paper_common.FRONTIER_LRS[des]))
  rows = []
  for lr in rates:
    pairs = []
    for s in seeds_of(records):
      a = [r for r in records if (r["method"], r["variant"], r["lr"], r["seed"]) ==
           (*FFT, lr, s) and r["D"] == FRONTIER_D]
      b = [r for r in records if (r["method"], r["variant"], r["lr"], r["seed"]) ==
           (*des, lr, s) and r["D"] == FRONTIER_D]
      if a and b:
        target = max(final_smoothed(a[0]), final_smoothed(b[0]))
        pairs.append((steps_to(a[0], target), steps_to(b[0], target)))
    if not pairs:
      continue
    both = [(f, d) for f, d in pairs if f and d]
    rows.append([f"{lr:g}", str(len(pairs)), fmt([float(f) for f, _ in both], 1),
                 fmt([float(d) for _, d in both], 1),
                 fmt([100 * d / f for f, d in both], digits=0) + "%" if both else "-"])
  if not rows:
    return []
  lines = ["### Steps to the same training loss (the paper's \"68% faster\")", "",
           "Per rate and seed, the target is the worse of FFT's and DES-MoE's final training "
           "loss (moving average over 10% of the run), so both reach it; steps until the "
           "smoothed training loss first reaches it. The paper's claim reads as DES-MoE needing "
           "at most 32% of FFT's steps.", ""]
  return lines + table(["lr", "seeds", "FFT steps", "DES-MoE steps", "DES-MoE / FFT"],
                       rows) + [""]


# ------------------------------------------------------------------ both testbeds in one figure


def point_summary(records, base) -> list[dict]:
  """Every frontier point as the plot and the points table use it: per FRONTIER method and
  rate, mean and std over seeds of the in-domain loss (x) and the general-loss increase (y)."""
  out = []
  for key in FRONTIER:
    for lr in sorted({r["lr"] for r in records if (r["method"], r["variant"]) == key
                      and r["D"] == FRONTIER_D}):
      rs = [r for r in records if (r["method"], r["variant"]) == key and r["lr"] == lr
            and r["D"] == FRONTIER_D]
      x, y = [mean_in_domain(r) for r in rs], [general_delta(r, base) for r in rs]
      out.append({"method": key[0], "variant": key[1], "lr": lr, "seeds": len(rs),
                  "x": float(np.mean(x)), "x_std": float(np.std(x, ddof=1)) if len(x) > 1 else 0.0,
                  "y": float(np.mean(y)), "y_std": float(np.std(y, ddof=1)) if len(y) > 1 else 0.0})
  return out


def plot_testbeds(plot_dir: str):
  """frontier_testbeds.png: one panel per testbed whose frontier_points_<preset>.json is in
  `plot_dir`, FFT's and DES-MoE's frontiers (mean over seeds) with the testbed's targets."""
  found = [p for p in TESTBEDS if os.path.exists(os.path.join(plot_dir,
                                                              f"frontier_points_{p}.json"))]
  if not found:
    return
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(found), figsize=(6.0 * len(found), 4.4), squeeze=False)
  for ax, preset in zip(axes[0], found):
    with open(os.path.join(plot_dir, f"frontier_points_{preset}.json")) as f:
      data = json.load(f)
    for key in FRONTIER:
      pts = [p for p in data["points"] if (p["method"], p["variant"]) == key]
      if not pts:
        continue
      ax.errorbar([p["x"] for p in pts], [p["y"] for p in pts],
                  xerr=[p["x_std"] for p in pts], yerr=[p["y_std"] for p in pts], marker="o",
                  capsize=2, label=LABELS[key],
                  linewidth=2.2 if key in (FFT, ("desmoe", "router+backbone")) else 1.2)
    for t in data.get("targets", []):
      ax.axvline(t, color="gray", linewidth=0.6, linestyle=":")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_ylim(bottom=min([0.0] + [p["y"] for p in data["points"]]))
    seeds = max((p["seeds"] for p in data["points"]), default=0)
    ax.set_title(f":{preset} ({seeds} seed{'s' if seeds != 1 else ''} per point)", fontsize=9)
    ax.set_xlabel(f"mean in-domain held-out loss, D = {FRONTIER_D}")
    ax.set_ylabel("general held-out loss − base")
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(plot_dir, "frontier_testbeds.png"), dpi=110)
  plt.close(fig)
