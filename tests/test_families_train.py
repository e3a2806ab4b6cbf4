"""`train.py --config=configs/six_domains.py:tiny --config.model.path=<tiny random model of a
family>` runs DES-MoE, FFT and ESFT-Token on every family, and `eval.py` reloads the run's
checkpoint. DES-MoE runs the fewest steps that cross its three phases (4) and exports (the ALR
folded into the family's linear router); FFT and ESFT-Token, which have no phases, run 2 steps.
One packed sequence per step, one held-out batch."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ONE_DEVICE_XLA_FLAGS, make_family_model

from desmoe_jax.convert import copy_tokenizer
from desmoe_jax.families import FAMILIES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "assets", "tiny_deepseek_v2")   # the tiny preset's tokenizer
FLAGS = ["--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.data.batch_size=1", "--config.eval.loss_batches=1",
         "--config.eval.general_batches=1"]


def _env():
  env = dict(os.environ, HF_HUB_OFFLINE="1",
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  env["XLA_FLAGS"] = ONE_DEVICE_XLA_FLAGS  # one device, fast compile
  return env


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
  """model_type -> a tiny random model of that family with the tiny preset's tokenizer."""
  with open(os.path.join(TOKENIZER, "config.json")) as f:
    vocab = json.load(f)["vocab_size"]
  out = {}
  for family in FAMILIES:
    path = str(tmp_path_factory.mktemp(f"train_{family}"))
    make_family_model(family, path, vocab_size=vocab, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    copy_tokenizer(TOKENIZER, path)
    out[family] = path
  return out


def _run(script, preset, path, workdir, *extra):
  cmd = [sys.executable, os.path.join(REPO, script), f"--config=configs/six_domains.py:{preset}",
         f"--config.model.path={path}", f"--workdir={workdir}", *FLAGS, *extra]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=1800)


def _train(method, path, workdir, steps, export):
  run = _run("train.py", f"tiny,{method}", path, workdir, f"--config.train.steps={steps}",
             f"--config.train.checkpoint_every={steps}",
             f"--config.export.enabled={'true' if export else 'false'}")
  assert run.returncode == 0, run.stderr[-4000:]
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))
  return records


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_desmoe_trains_exports_and_eval_reloads(family_dirs, family, tmp_path):
  records = _train("desmoe", family_dirs[family], tmp_path, 4, export=True)
  assert {r["phase"] for r in records if "phase" in r} == {0, 1, 2}
  with open(tmp_path / "hf" / "config.json") as f:
    assert json.load(f)["model_type"] == family
  ev = _run("eval.py", "tiny,desmoe", family_dirs[family], tmp_path, "--no_generation",
            "--no_base")
  assert ev.returncode == 0, ev.stderr[-4000:]
  assert "results:" in ev.stdout


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["fft", "esft_token"])
def test_baselines_train(family_dirs, family, method, tmp_path):
  _train(method, family_dirs[family], tmp_path, 2, export=False)
