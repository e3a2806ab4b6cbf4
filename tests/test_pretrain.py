"""scripts/pretrain_tiny.py: the shipped tiny model is reproducible from its script, and the
validation windows used to pick its weights never leak into training."""

import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import pretrain_tiny  # noqa: E402

SHIPPED = os.path.join(REPO, "assets", "tiny_deepseek_v2")


def test_validation_windows_never_overlap_training_windows():
  ids = np.arange(10_000, dtype=np.int32)  # token value = its position in the corpus
  seq_len = 64
  train_starts, val_rows = pretrain_tiny.corpus_windows(ids, seq_len, bos=-1)
  n = seq_len - 1
  assert (val_rows[:, 0] == -1).all() and val_rows.shape[1] == seq_len
  val_tokens = set(val_rows[:, 1:].ravel().tolist())
  train_tokens = set()
  for s in train_starts:
    train_tokens.update(range(s, s + n))
  assert not val_tokens & train_tokens
  assert max(train_tokens) < len(ids)
  # Nearly everything else is trainable: only validation windows (and the tail) are excluded.
  assert len(train_tokens) + len(val_tokens) > 0.9 * len(ids)


def test_shipped_model_matches_its_config_and_log():
  with open(os.path.join(SHIPPED, "config.json")) as f:
    config = json.load(f)
  for key, value in pretrain_tiny.ARCH.items():
    assert config[key] == value, key
  with open(os.path.join(SHIPPED, "pretrain_log.json")) as f:
    log = json.load(f)
  assert log["arch"] == json.loads(json.dumps(pretrain_tiny.ARCH))
  assert log["best_validation"] == min(v for _, v in log["validation"])
  assert os.path.getsize(os.path.join(SHIPPED, "model.safetensors")) <= 10 * 2**20


def test_first_steps_reproduce_the_shipped_loss_curve():
  """Same seed and flags -> the same losses as the run that made the shipped weights."""
  with open(os.path.join(SHIPPED, "pretrain_log.json")) as f:
    shipped = json.load(f)
  a = shipped["args"]
  argv = [f"--seed={a['seed']}", f"--steps={a['steps']}", f"--batch={a['batch']}",
          f"--seq_len={a['seq_len']}", f"--lr={a['lr']}", f"--warmup={a['warmup']}",
          f"--eval_every={10**9}", "--stop_after=2"]
  log = pretrain_tiny.main(argv)
  np.testing.assert_allclose(log["train_loss"], shipped["train_loss"][:2], rtol=2e-4)
