"""The trainer on every family: `train.py --config=configs/six_domains.py:tiny,<method>
--config.model.path=<tiny random model of a family>` runs DES-MoE, FFT and ESFT-Token, and
`eval.py` reloads the DES-MoE run's checkpoint.

One process per group of three families does all of it, through the functions train.py and
eval.py call: `cli.run(trainer.train, config, workdir)` after `load_config` (train.py's config
loader: the preset and its overrides) for each method, then `cli.eval_main([...])` (all of
eval.py, its flag parsing included) on the DES-MoE run, family after family. The suite so pays
for one interpreter start and one import of JAX per three families rather than four per family
(about 6 CPU-s each), the two groups still run on both of CI's xdist workers, and each
evaluation reuses its training's compiled held-out loss. train.py and eval.py as commands are
run by tests/test_cli.py and CI.

Each method runs 1 step and saves its checkpoint; DES-MoE's step is in stabilization (t1=0,
t2=1: router and experts train, masks apply, one compile) and its run exports `workdir/hf` (the
ALR folded into the family's linear router). Crossing the three phases is tested on DeepSeek-V2
(tests/test_trainer.py, tests/test_methods.py); which phase trains what does not depend on the
family. Two of the six domains (math, code), one packed sequence of 256 tokens per step, one
held-out batch."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import E2E_MOE_IMPL, make_family_model, one_device_env

from desmoe_jax.convert import copy_tokenizer
from desmoe_jax.families import FAMILIES

pytestmark = pytest.mark.e2e   # end-to-end (pyproject.toml markers): -m "not e2e" skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "assets", "tiny_deepseek_v2")   # the tiny preset's tokenizer
COMMON = {"train.log_every": 1, "train.eval_every": 0, "data.batch_size": 1,
          "data.seq_len": 256, "data.select": "math,code", "eval.loss_batches": 1,
          "eval.general_batches": 1, "model.moe_impl": E2E_MOE_IMPL}
RUNS = {"desmoe": {"train.steps": 1, "train.checkpoint_every": 1, "export.enabled": True,
                   "schedule.t1": 0.0, "schedule.t2": 1.0},
        "fft": {"train.steps": 1, "train.checkpoint_every": 1, "export.enabled": False},
        "esft_token": {"train.steps": 1, "train.checkpoint_every": 1, "export.enabled": False,
                       "esft.sample_tokens": 256}}   # experts scored on one sequence a domain

DRIVER = textwrap.dedent("""
    import json, logging, os, sys
    logging.basicConfig(level=logging.WARNING)
    from absl import flags
    from desmoe_jax import cli, trainer
    from desmoe_jax.run_config import load_config
    paths, root, runs = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    for family, path in paths.items():
      # eval.py defines its flags in absl's global registry: a second eval_main in one
      # process starts from a registry without them, as a fresh eval.py does.
      for flag in list(flags.FLAGS.flags_by_module_dict().get("desmoe_jax.cli", ())):
        delattr(flags.FLAGS, flag.name)
      flags.FLAGS.unparse_flags()
      for method, overrides in runs.items():
        config = load_config(f"six_domains:tiny,{method}",
                             dict(overrides, **{"model.path": path}))
        cli.run(trainer.train, config, os.path.join(root, family, method))
      print(f"=== eval {family}", flush=True)
      try:
        cli.eval_main(["eval.py", f"--workdir={os.path.join(root, family, 'desmoe')}",
                       "--no_generation", "--no_base"])
      except SystemExit as e:   # absl's app.run ends with sys.exit
        if e.code not in (0, None):
          raise
      print(f"=== done {family}", flush=True)
""")


def _family_dir(family, tmp_path):
  """A tiny random model of `family` with the tiny preset's tokenizer."""
  with open(os.path.join(TOKENIZER, "config.json")) as f:
    vocab = json.load(f)["vocab_size"]
  path = str(tmp_path / family)
  make_family_model(family, path, vocab_size=vocab, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0)
  copy_tokenizer(TOKENIZER, path)
  return path


def _steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return records, [r["step"] for r in records if "loss" in r]


# Two groups of three (sorted names), about equal in time: one process each.
GROUPS = (tuple(sorted(FAMILIES))[:3], tuple(sorted(FAMILIES))[3:])


@pytest.mark.parametrize("families", GROUPS, ids="+".join)
def test_every_method_trains_and_eval_reloads(families, tmp_path):
  paths = {family: _family_dir(family, tmp_path / "models") for family in families}
  runs = {m: dict(COMMON, **o) for m, o in RUNS.items()}
  driver = tmp_path / "driver.py"
  driver.write_text(DRIVER)
  train = subprocess.run([sys.executable, str(driver), json.dumps(paths), str(tmp_path),
                          json.dumps(runs)], cwd=REPO, capture_output=True, text=True,
                         env=one_device_env(), timeout=1800)
  assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-4000:]

  for family in families:
    root = tmp_path / family
    for method, overrides in runs.items():
      records, steps = _steps(root / method)
      assert steps == list(range(1, overrides["train.steps"] + 1)), (family, method)
      assert os.listdir(root / method / "checkpoints"), (family, method)
    records, _ = _steps(root / "desmoe")
    assert {r["phase"] for r in records if "phase" in r} == {1}, family     # stabilization
    with open(root / "desmoe" / "hf" / "config.json") as f:
      assert json.load(f)["model_type"] == family
    evaluation = train.stdout[train.stdout.index(f"=== eval {family}"):
                              train.stdout.index(f"=== done {family}")]
    assert "results:" in evaluation, family
    assert any("results.json" in files for _, _, files in os.walk(root / "desmoe" / "eval")), \
        family
