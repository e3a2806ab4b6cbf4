"""scripts/reproduce_paper.py and its report: the experiment plan is the one the issue asks for
(equal token budgets, every method at every D, one ESFT model per domain), each run's config is
a valid trainer config, and the report's measurements are right on hand-made curves."""

import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import paper_report  # noqa: E402
import reproduce_paper as rp  # noqa: E402
from desmoe_jax import trainer  # noqa: E402


@pytest.mark.parametrize("mode", ["full", "quick"])
def test_plan_has_every_method_at_every_d_with_equal_token_budgets(mode):
  s = rp.SETTINGS[mode]
  runs = rp.plan(s)
  assert len({r.name for r in runs}) == len(runs)
  for seed in s["seeds"]:
    for num in (2, 4, 6):
      at_d = [r for r in runs if r.seed == seed and len(r.domains) == num]
      assert {(r.method, r.variant) for r in at_d} == set(rp.MULTI)
      assert all(r.domains == rp.DOMAINS[:num] for r in at_d)
      assert {r.steps for r in at_d} == {s["steps_per_domain"] * num}
    single = [r for r in runs if r.seed == seed and r.variant == "single"]
    assert sorted((r.method, r.domains[0]) for r in single) == sorted(
        (m, d) for m in rp.SINGLE for d in rp.DOMAINS)
    assert {r.steps for r in single} == {s["steps_per_domain"]}


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
  paper_report._splice(str(path), "new table")
  text = path.read_text()
  assert "intro" in text and "discussion" in text and "new table" in text and "old" not in text
