"""`train.py --config=configs/six_domains.py:tiny --config.model.path=<tiny random model of a
family>` runs DES-MoE, FFT and ESFT-Token on every family, and `eval.py` reloads the run's
checkpoint. The fewest steps that cross every phase of DES-MoE (3) on sequences of 64 tokens; the
DES-MoE run also exports (the ALR folded into the family's linear router)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import make_family_model

from desmoe_jax.convert import copy_tokenizer
from desmoe_jax.families import FAMILIES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "assets", "tiny_deepseek_v2")   # the tiny preset's tokenizer
FLAGS = ["--config.train.steps=3", "--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.train.checkpoint_every=3", "--config.data.seq_len=64",
         "--config.data.batch_size=2", "--config.eval.loss_batches=1",
         "--config.eval.general_batches=1"]


def _env():
  env = dict(os.environ, HF_HUB_OFFLINE="1",
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  env.pop("XLA_FLAGS", None)
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
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=1200)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_three_methods_and_eval_reloads(family_dirs, family, tmp_path):
  path = family_dirs[family]
  for method in ("desmoe", "fft", "esft_token"):
    workdir = tmp_path / method
    export = "--config.export.enabled=" + ("true" if method == "desmoe" else "false")
    run = _run("train.py", f"tiny,{method}", path, workdir, export)
    assert run.returncode == 0, run.stderr[-4000:]
    losses = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2, 3]
    if method == "desmoe":
      assert {r["phase"] for r in losses if "phase" in r} == {0, 1, 2}
      with open(workdir / "hf" / "config.json") as f:
        assert json.load(f)["model_type"] == family
  ev = _run("eval.py", "tiny,desmoe", path, tmp_path / "desmoe", "--no_generation", "--no_base")
  assert ev.returncode == 0, ev.stderr[-4000:]
  assert "results:" in ev.stdout
