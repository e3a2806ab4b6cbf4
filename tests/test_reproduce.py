"""scripts/reproduce_paper.py and its report: the experiment plan is the one the issue asks for
(equal token budgets, every method at every D, one ESFT model per domain), each run's config is
a valid trainer config, and the report's measurements are right on hand-made curves."""

import os
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.e2e   # end-to-end (pyproject.toml markers): -m "not e2e" skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import paper_common  # noqa: E402
import paper_report  # noqa: E402
import reproduce_paper as rp  # noqa: E402
from desmoe_jax import trainer  # noqa: E402


@pytest.mark.parametrize("mode", ["full", "quick"])
def test_plan_has_every_method_at_every_d_with_equal_token_budgets(mode):
  s = rp.SETTINGS[mode]
  runs = rp.plan(s)
  assert len({r.name for r in runs}) == len(runs)
  for seed in s["seeds"]:
    for num in s["num_domains"]:
      at_d = [r for r in runs if r.seed == seed and len(r.domains) == num]
      assert {(r.method, r.variant) for r in at_d} == set(rp.MULTI)
      assert all(r.domains == rp.DOMAINS[:num] for r in at_d)
      assert {r.steps for r in at_d} == {s["steps_per_domain"] * num}
    single = [r for r in runs if r.seed == seed and r.variant == "single"]
    assert sorted((r.method, r.domains[0]) for r in single) == sorted(
        (m, d) for m in rp.SINGLE for d in rp.DOMAINS)
    assert {r.steps for r in single} == {s["steps_per_domain"]}


def test_quick_is_the_full_runs_seed_0_run_for_run():
  """A full run continues from a --quick one in the same workdir: its runs must be identical."""
  full, quick = rp.SETTINGS["full"], rp.SETTINGS["quick"]
  assert set(rp.plan(quick)) <= set(rp.plan(full))
  assert {k: v for k, v in quick.items() if k not in ("seeds", "num_domains")} == \
      {k: v for k, v in full.items() if k not in ("seeds", "num_domains")}
  assert max(quick["num_domains"]) == max(full["num_domains"])  # task metrics at the same D


def test_run_configs_are_valid_trainer_configs():
  s = rp.SETTINGS["quick"]
  for run in rp.plan(s)[:14] + [r for r in rp.plan(s) if r.variant == "router+experts"][:1]:
    config = rp.run_config(run, s, None)
    trainer.check_config(config)
    assert config.method == run.method
    assert [d.name for d in config.data.domains] == list(run.domains)
    assert trainer.method_config(config).num_domains == len(run.domains)
    assert config.train.steps == run.steps and config.optim.learning_rate == run.lr
    expected = "router+experts" if run.variant == "router+experts" else "router+backbone"
    assert config.schedule.warmup_trains == expected
    with_tasks = run.variant == "single" or len(run.domains) == 6
    assert config.eval.max_examples == (s["gen_examples"] if with_tasks else 0)
    assert config.eval.general_batches == s["general_batches"]


def _record(losses, step_s, phases, seed=0):
  return {"seed": seed, "curves": {"loss": losses, "step_s": step_s, "phase": phases}}


def test_steps_to_target_and_compile_free_time():
  losses = [5.0] * 10 + [1.0] * 10            # moving average over 5 steps
  rec = _record(losses, [10.0] + [1.0] * 9 + [7.0] + [2.0] * 9, ["a"] * 10 + ["b"] * 10)
  # smoothed[i] = mean(losses[i-4:i+1]); first <= 3.0 at i = 12 (5,5,1,1,1 -> 2.6)
  assert paper_report.steps_to(rec, 3.0) == 13
  assert paper_report.steps_to(rec, 0.5) is None
  t = paper_report.clean_step_times(rec)
  assert t[0] == 1.0 and t[10] == 2.0 and t.sum() == pytest.approx(10 * 1.0 + 10 * 2.0)
  assert paper_report.final_smoothed(rec) == pytest.approx(1.0)


def test_overlap_and_formatting():
  rec = {"domains": ["math", "code", "law"],
         "curves": {"overlap": [[1, 0.2, 0.4], [0.2, 1, 0.6], [0.4, 0.6, 1]]}}
  assert paper_report.mean_overlap(rec) == pytest.approx(0.4)
  assert paper_report.pair_overlap(rec, "law", "code") == pytest.approx(0.6)
  assert paper_report.pair_overlap(rec, "law", "intent") is None
  assert paper_report.fmt([1.0, 3.0]) == f"2.000 ± {np.std([1.0, 3.0], ddof=1):.3f}"
  assert paper_report.fmt([0.5], signed=True) == "+0.500"
  assert paper_report.fmt([None]) == "-"


def test_report_keeps_the_hand_written_text(tmp_path):
  path = tmp_path / "R.md"
  path.write_text(f"# Title\n\nintro\n\n{paper_report.BEGIN}\nold\n{paper_report.END}\n\n"
                  "discussion\n")
  paper_report.splice(str(path), "new table")
  text = path.read_text()
  assert "intro" in text and "discussion" in text and "new table" in text and "old" not in text


def test_frontier_plan_and_configs():
  """Every FRONTIER method at each of its rates at D = 6, names unique (results.jsonl resumes
  by name), and each run's config is a valid trainer config with its variant's fields set."""
  s = rp.SETTINGS["frontier"]
  runs = rp.plan_frontier(s, (0, 1))
  assert len({r.name for r in runs}) == len(runs)
  assert len(runs) == 2 * sum(len(v) for v in rp.FRONTIER_LRS.values())
  assert all(len(rp.FRONTIER_LRS[k]) >= 4 for k in rp.FRONTIER)
  assert {r.steps for r in runs} == {s["steps_per_domain"] * 6}
  for run in runs[:len(runs) // 2]:
    config = rp.run_config(run, s, None)
    trainer.check_config(config)
    assert config.optim.learning_rate == run.lr and config.eval.max_examples == 0
    want = "router+experts" if run.variant == "router+experts" else "router+backbone"
    assert config.schedule.warmup_trains == want
    assert config.alr.mix == ("update" if run.variant == "mix=update" else "gradient")
  oracle = rp.Run("desmoe", "router+experts,oracle", rp.DOMAINS, 0, 60, 1e-3, frontier=True)
  config = rp.run_config(oracle, s, None)
  trainer.check_config(config)
  assert config.dges.exclude_general_top > 0
  assert config.schedule.warmup_trains == "router+experts"
  quick = rp.plan_frontier(rp.SETTINGS["frontier_quick"], (0,))
  assert set(quick) <= set(rp.plan_frontier(s, (0, 1, 2))) and len(quick) == 10
  # LoRA with every target, and without the routed experts; FFT's grid times 10
  lora_runs = [r for r in runs if r.method == "lora" and r.seed == 0]
  assert sorted(r.lr for r in lora_runs) == sorted(
      2 * [round(10 * lr, 12) for lr in rp.FRONTIER_LRS[("fft", "")]])
  for run in lora_runs:
    config = rp.run_config(run, s, None)
    mc = trainer.method_config(config)
    want = {"attention", "shared_experts", "router", "dense_mlp"} | (
        set() if run.variant == "no_routed" else {"routed_experts"})
    assert mc.lora.target_set == want and config.optim.learning_rate == run.lr
    assert mc.trainable_ever() <= {"lora_backbone", "lora_shared_experts", "lora_router",
                                   "lora_routed_experts"}
  frozen = rp.run_config(rp.Run("desmoe_no_alr", "router+backbone,router_frozen", rp.DOMAINS,
                                0, 60, 1e-3, frontier=True), s, None)
  assert frozen.ablation.linear_router_trainable is False
  assert "router" not in trainer.method_config(frozen).trainable_ever()


def _frontier_record(method, variant, lr, in_domain, rise, seed=0):
  """A results.jsonl record whose mean in-domain loss and general increase are given."""
  return {"method": method, "variant": variant, "lr": lr, "seed": seed, "D": 6,
          "frontier": True, "domains": ["math", "code"],
          "eval": {"math": {"loss": in_domain - 1}, "code": {"loss": in_domain + 1},
                   "general": {"loss": 4.0 + rise}}}


def test_frontier_interpolation_by_hand():
  import frontier_report as fr
  base = {"general": {"loss": 4.0}}
  # The learning branch stops at the lowest in-domain loss (lr 1e-2 overshoots: dropped).
  pts = [(1e-4, 7.0, 0.1), (1e-3, 6.0, 0.3), (3e-3, 5.0, 1.3), (1e-2, 5.5, 2.0)]
  x, y = fr.branch(pts)
  np.testing.assert_array_equal(x, [5.0, 6.0, 7.0])
  assert fr.interpolate(pts, 5.5) == pytest.approx(0.8)       # halfway between 1.3 and 0.3
  assert fr.interpolate(pts, 4.9) is None and fr.interpolate(pts, 7.1) is None
  records = [_frontier_record("fft", "", lr, x, y) for lr, x, y in pts]
  records += [_frontier_record("desmoe", "router+backbone", lr, x, y / 4)
              for lr, x, y in pts]
  got = fr.seed_ratios(records, base, ("desmoe", "router+backbone"), 5.5)
  assert got == {0: pytest.approx(0.25)}
  rec = _frontier_record("desmoe_no_alr", "router+backbone", 1e-3, 6.5, 0.1)
  assert fr.run_ratio(rec, records, base) == pytest.approx(0.1 / 0.2)
  assert fr.ratio(0.1, 0.0) is None and fr.ratio(None, 1.0) is None
  # Paired with DES-MoE's run at the same reading, lr and seed: 0.5 - 0.25 of FFT's.
  assert fr.paired_change(rec, records, base, {"router+backbone"}) == pytest.approx(0.25)
  assert fr.paired_change({**rec, "seed": 1}, records, base, {"router+backbone"}) is None
  no_schedule = _frontier_record("desmoe_no_schedule", "", 1e-3, 6.5, 0.1)
  assert fr.paired_change(no_schedule, records, base, {"router+backbone"}) == pytest.approx(0.25)
  assert fr.paired_change(no_schedule, records, base, set(fr.READINGS)) is None


def test_ablations_are_placed_by_the_seed_0_frontier(monkeypatch):
  """The reading with the smaller fraction of FFT's forgetting is chosen, at its two rates
  nearest the middle of the targets it reaches; nothing until the frontiers are complete."""
  import frontier_report as fr
  monkeypatch.setattr(paper_common, "FRONTIER_LRS",
                      {("fft", ""): (1e-4, 1e-3, 3e-3),
                       ("desmoe", "router+backbone"): (1e-4, 1e-3, 3e-3),
                       ("desmoe", "router+experts"): (1e-4, 1e-3, 3e-3)})
  monkeypatch.setitem(paper_common.TESTBEDS["tiny"], "targets", (5.5, 6.0, 6.5))
  base = {"general": {"loss": 4.0}}
  curve = [(1e-4, 7.0, 0.1), (1e-3, 6.0, 0.3), (3e-3, 5.0, 1.3)]
  records = [_frontier_record("fft", "", lr, x, y) for lr, x, y in curve]
  records += [_frontier_record("desmoe", "router+backbone", lr, x, y / 2) for lr, x, y in curve]
  assert fr.ablation_setting(records, base) is None            # router+experts missing
  records += [_frontier_record("desmoe", "router+experts", lr, x + 0.2, y / 5)
              for lr, x, y in curve]
  assert fr.ablation_setting(records, base) == ("router+experts", (1e-3, 3e-3))
  # A rate past the best in-domain loss lands near the middle (6.0) but is never chosen.
  monkeypatch.setitem(paper_common.FRONTIER_LRS, ("desmoe", "router+experts"),
                      (1e-4, 1e-3, 3e-3, 1e-2))
  records.append(_frontier_record("desmoe", "router+experts", 1e-2, 6.0, 3.0))
  assert fr.ablation_setting(records, base) == ("router+experts", (1e-3, 3e-3))
  monkeypatch.setattr(rp, "ABLATIONS", (("desmoe_no_alr", ""), ("desmoe_no_schedule", ""),
                                        ("desmoe", "oracle")))
  runs = rp.plan_ablations(rp.SETTINGS["frontier"], (0,), records, base)
  assert sorted({(r.method, r.variant) for r in runs}) == [
      ("desmoe", "router+experts,oracle"), ("desmoe_no_alr", "router+experts"),
      ("desmoe_no_schedule", "")]
  assert {r.lr for r in runs} == {1e-3, 3e-3} and len(runs) == 6


def test_frontier_report_is_written_between_its_markers(tmp_path):
  """The whole --frontier report from hand-made records: premise table, headline with FFT's
  percentage, every point, and the PNG beside the file; the text around the markers stays."""
  import json

  import frontier_report as fr
  from desmoe_jax import specialization as sp
  base = {"general": {"loss": 4.0}, "math": {"loss": 9.0}, "code": {"loss": 9.0}}
  (tmp_path / "base.json").write_text(json.dumps({"eval": base}))
  premise = sp.routing_premise(np.full((2, 32), 1 / 32), {"math": np.eye(32)[[0, 1]]}, phi=0.6)
  premise.update(tokens={"general": 100, "math": 90}, phi=0.6)
  (tmp_path / "premise.json").write_text(json.dumps(premise))
  curve = [(1e-4, 7.0, 0.1), (1e-3, 6.0, 0.3), (3e-3, 5.0, 1.3)]
  records = [_frontier_record("fft", "", lr, x, y) for lr, x, y in curve]
  records += [_frontier_record("desmoe", "router+backbone", lr, x, y / 2) for lr, x, y in curve]
  (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  report = tmp_path / "R.md"
  report.write_text(f"intro\n{fr.BEGIN}\nold\n{fr.END}\ndiscussion\n")
  fr.write(str(tmp_path), str(report))
  text = report.read_text()
  assert "intro" in text and "discussion" in text and "old" not in text
  assert "| math | 0.03 / 0.03 |" in text     # overlap of uniform routing with one expert: 1/32
  assert "(50%)" in text and "not met" in text        # DES-MoE's increase is half FFT's
  assert (tmp_path / "frontier_D6.png").exists()


def test_tiny_v2_protocol_places_targets_and_extra_runs_and_reports_them(monkeypatch, tmp_path):
  """The :tiny_v2 testbed's protocol: targets at the middles of four equal parts of the range
  every seed-0 learning branch of FFT and DES-MoE spans; singles at ESFT-Token's best
  in-domain rate; the freezing runs at DES-MoE's least-forgetting point; its own markers, and
  the per-genre, freezing, singles and convergence sections, all by hand."""
  import json

  import frontier_report as fr
  grid = (1e-4, 1e-3, 3e-3)
  monkeypatch.setattr(paper_common, "FRONTIER_LRS", {k: grid for k in rp.FRONTIER})
  base = {"general": {"loss": 4.0, "loss_per_genre": {"code": 4.0, "prose": 4.0}},
          "math": {"loss": 9.0}, "code": {"loss": 9.0}}
  curve = [(1e-4, 7.0, 0.1), (1e-3, 6.0, 0.3), (3e-3, 5.0, 1.3)]

  def rec(method, variant, lr, x, y, **kw):
    r = _frontier_record(method, variant, lr, x, y, **kw)
    r["eval"]["general"]["loss_per_genre"] = {"code": 4.0 + y, "prose": 4.0 + 2 * y}
    r["curves"] = {"loss": list(np.linspace(8.0, x, 20))}
    return r

  records = [rec("fft", "", lr, x, y) for lr, x, y in curve]
  records += [rec("desmoe", "router+backbone", lr, x, y / 2) for lr, x, y in curve]
  records += [rec("desmoe", "router+experts", lr, x + 0.2, y / 5) for lr, x, y in curve]
  # Only the readings a run has count (--quick: FFT and router+backbone), but a started one
  # must be complete.
  assert fr.shared_targets(records[:6], base) == (5.25, 5.75, 6.25, 6.75)   # both span 5-7
  assert fr.shared_targets(records[:3], base) is None           # no DES-MoE reading at all
  assert fr.shared_targets(records[:-1], base) is None          # router+experts incomplete
  records += [rec("desmoe", "mix=update", lr, x, y / 2) for lr, x, y in curve[:1]]
  assert fr.shared_targets(records, base) is None               # mix=update incomplete
  records = records[:-1]
  records += [rec("desmoe", "mix=update", lr, x, y / 2) for lr, x, y in curve]
  # lo = 5.2 (router+experts' lowest), hi = 7.0: the middles of four parts of [5.2, 7.0].
  assert fr.targets_of(records, base, "tiny_v2") == (5.425, 5.875, 6.325, 6.775)
  assert fr.targets_of(records, base, "tiny") == rp.FRONTIER_TARGETS
  records += [rec("esft_token", "union", lr, x + 0.5, y) for lr, x, y in
              [(1e-4, 7.0, 0.1), (1e-3, 6.0, 0.2), (3e-3, 6.2, 0.9)]]
  s = dict(rp.SETTINGS["frontier"], preset="tiny_v2")
  runs = rp.plan_extras(s, (0,), records, base)
  singles = [r for r in runs if r.variant == "single"]
  assert len(singles) == 12 and {r.lr for r in singles} == {1e-3}   # ESFT-Token's best: 6.5
  assert {r.steps for r in singles} == {s["steps_per_domain"]}
  # Least forgetting per FFT's at the run's own in-domain loss: router+experts at 1e-3
  # (0.06 / 0.26), not 3e-3 (0.26 / 1.1); its 1e-4 point (7.2) is outside FFT's frontier.
  assert fr.best_desmoe_setting(records, base, "tiny_v2") == ("router+experts", 1e-3)
  freezes = [r for r in runs if r.variant != "single"]
  assert sorted(r.variant for r in freezes) == [
      "router+experts,freeze=backbone", "router+experts,freeze=router",
      "router+experts,freeze=shared_experts"] and {r.lr for r in freezes} == {1e-3}
  config = rp.run_config(freezes[0], s, None)
  trainer.check_config(config)
  assert config.ablation.freeze in rp.FREEZES and config.model.path.endswith("moe64")
  oracle = rp.run_config(rp.Run("desmoe", "router+backbone,oracle", rp.DOMAINS, 0, 60, 1e-3,
                                frontier=True), s, None)
  assert oracle.dges.exclude_general_top == 32                   # half of 64 experts
  # The report, with the extra runs done.
  records += [rec("desmoe", v, 1e-3, 6.2, 0.03) for v in
              ("router+experts,freeze=backbone", "router+experts,freeze=router")]
  for d, loss in (("math", 5.0), ("code", 6.0)):
    r = rec("esft_token", "single", 1e-3, loss, 0.05)
    r.update(D=1, domains=[d], eval={d: {"loss": loss}, "general": r["eval"]["general"]})
    records.append(r)
  (tmp_path / "base.json").write_text(json.dumps({"eval": base}))
  (tmp_path / "setup.json").write_text(json.dumps({"settings": s}))
  (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  report = tmp_path / "R.md"
  begin, end = fr.marker("tiny_v2")
  report.write_text(f"{fr.BEGIN}\nkeep\n{fr.END}\n{begin}\nold\n{end}\n")
  fr.write(str(tmp_path), str(report))
  text = report.read_text()
  assert "keep" in text and "old" not in text and "--config=tiny_v2" in text
  assert "Targets (placed by the seed-0 learning branches" in text
  # FFT at 5.425: 1.3 - 0.425 * (1.3 - 0.3) = 0.875 on code, twice that on prose.
  assert "| FFT | 5.425 | +0.875 | +1.750 | +1.312 |" in text
  assert "| backbone | 1 | 6.200 | +0.030 |" in text and "| shared_experts |" not in text
  assert "| ESFT-Token (one model per domain) | 0.001 | 5.000 | 6.000 | - |" in text
  assert "### Steps to the same training loss" in text
  assert (tmp_path / "frontier_D6_tiny_v2.png").exists()
  # The points behind both testbeds' figure: FFT's 3e-3 point is (5.0, +1.3), one seed.
  points = json.loads((tmp_path / "frontier_points_tiny_v2.json").read_text())
  assert {"method": "fft", "variant": "", "lr": 3e-3, "seeds": 1, "x": 5.0, "x_std": 0.0,
          "y": pytest.approx(1.3), "y_std": 0.0} in points["points"]
  assert points["targets"] == [5.425, 5.875, 6.325, 6.775]
  assert (tmp_path / "frontier_testbeds.png").exists()


def test_only_the_whole_run_reports_into_docs():
  """A check of one run (--only, --seeds) must not replace docs/RESULTS.md's tables."""
  import argparse
  docs = os.path.join(rp.REPO, "docs", "RESULTS.md")

  def args(**kw):
    return argparse.Namespace(**{"only": None, "seeds": None, "steps_per_domain": None,
                                 "workdir": "/w", **kw})

  assert rp.default_report_file(args(), "frontier") == docs
  assert rp.default_report_file(args(), "full") == docs
  assert rp.default_report_file(args(only="fft-"), "frontier") == "/w/RESULTS.md"
  assert rp.default_report_file(args(seeds="0"), "full") == "/w/RESULTS.md"
  assert rp.default_report_file(args(), "frontier_quick") == "/w/RESULTS.md"
