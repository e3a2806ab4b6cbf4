"""scripts/pretrain_tiny.py: the shipped tiny model is reproducible from its script, and the
validation windows used to pick its weights never leak into training."""

import json
import os
import sys

import numpy as np
import pytest

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


def test_fast_encoding_gives_the_tokenizers_ids():
  """pretrain_tiny.encode (no character offsets) against the tokenizer's own call, on the start
  of both presets' corpora: the first-step reproductions below then rebuild the same windows."""
  from transformers import AutoTokenizer
  for preset in ("v1", "v2"):
    p = pretrain_tiny.PRESETS[preset]
    tokenizer = AutoTokenizer.from_pretrained(p["tokenizer"])
    if preset == "v1":
      with open(p["corpus"], encoding="utf-8") as f:
        texts = [f.read(50_000)]
    else:   # two documents of every genre
      docs = pretrain_tiny.make_corpus.read_docs(p["heldout"])
      texts = [d["text"] for g in pretrain_tiny.make_corpus.GENRES
               for d in [d for d in docs if d["genre"] == g][:2]]
    want = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert pretrain_tiny.encode(tokenizer, texts) == want and sum(map(len, want)) > 5_000


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


# ------------------------------------------------------------------ the :tiny_v2 base (--preset=v2)

SHIPPED_V2 = os.path.join(REPO, "assets", "tiny_deepseek_v2_moe64")


def _v2_log():
  with open(os.path.join(SHIPPED_V2, "pretrain_log.json")) as f:
    return json.load(f)


def test_shipped_v2_model_matches_its_config_and_log():
  with open(os.path.join(SHIPPED_V2, "config.json")) as f:
    config = json.load(f)
  # transformers 5 writes RoPE as rope_parameters (rope_theta and the YaRN fields in one dict).
  rope = dict(pretrain_tiny.ARCH_V2["rope_scaling"], rope_theta=pretrain_tiny.ARCH_V2["rope_theta"])
  assert config["rope_parameters"] == rope
  for key, value in pretrain_tiny.ARCH_V2.items():
    if key not in ("rope_theta", "rope_scaling"):
      assert config[key] == value, key
  log = _v2_log()
  assert log["arch"] == json.loads(json.dumps(pretrain_tiny.ARCH_V2))
  assert log["best_validation"] == min(v for _, v in log["validation"])
  # The schedule ran to its end, or the log says where a partial run (--export) stopped.
  assert len(log["train_loss"]) == (log["args"]["steps"] if log["complete"]
                                    else log["stopped_at_step"])
  # Every genre of the held-out general set is reported.
  genres = set(pretrain_tiny.make_corpus.GENRES)
  assert set(log["heldout_general_loss_per_genre"]) == genres
  assert os.path.getsize(os.path.join(SHIPPED_V2, "model.safetensors")) <= 25 * 2**20


def _v2_argv(a: dict, **extra) -> list[str]:
  flags = dict(seed=a["seed"], steps=a["steps"], batch=a["batch"], seq_len=a["seq_len"],
               lr=a["lr"], warmup=a["warmup"], eval_every=10**9, **extra)
  return ["--preset=v2"] + [f"--{k}={v}" for k, v in flags.items()]


def test_first_steps_reproduce_the_shipped_v2_loss_curve():
  """Same seed and flags -> the same losses as the run (and its resumptions) that made the
  shipped :tiny_v2 weights."""
  a = _v2_log()["args"]
  log = pretrain_tiny.main(_v2_argv(a, stop_after=1))   # one step of 8 x 1024 tokens: ~7 CPU-s
  np.testing.assert_allclose(log["train_loss"], _v2_log()["train_loss"][:1], rtol=2e-4)


def test_v2_run_resumed_from_its_checkpoint_continues_the_same_curve(tmp_path):
  """A run stopped at step 2 (--until) and started again with the same command ends with the
  losses of an uninterrupted run: windows drawn from (seed, step), weights and Adam state
  restored exactly. Small shapes over a few held-out documents."""
  make_corpus = pretrain_tiny.make_corpus
  docs = make_corpus.read_docs(os.path.join(REPO, "data", "corpus", "heldout.jsonl.gz"))
  small = [d for g in ("literature_zh", "code", "ui_strings")
           for d in [d for d in docs if d["genre"] == g][:2]]
  corpus = str(tmp_path / "corpus.jsonl.gz")
  make_corpus.write_docs(corpus, small)
  common = ["--preset=v2", f"--corpus={corpus}", f"--heldout={corpus}", "--steps=4",
            "--batch=2", "--seq_len=32", "--warmup=1", "--eval_every=2",
            f"--checkpoint_dir={tmp_path / 'ckpt'}", f"--out={tmp_path / 'out'}"]
  first = pretrain_tiny.main(common + ["--until=2"])
  assert len(first["train_loss"]) == 2
  assert os.path.exists(tmp_path / "ckpt" / "hf" / "config.json")   # the premise can read it
  resumed = pretrain_tiny.main(common)
  straight = pretrain_tiny.main(common + ["--stop_after=4"])   # uninterrupted, saves nothing
  assert len(resumed["train_loss"]) == 4 and resumed["complete"]
  np.testing.assert_allclose(resumed["train_loss"], straight["train_loss"], rtol=1e-6)
  assert resumed["validation"] == straight["validation"]
  assert set(resumed["heldout_general_loss_per_genre"]) == {"literature_zh", "code", "ui_strings"}
  # A checkpoint of another run is refused, not silently continued.
  with pytest.raises(ValueError, match="another run"):
    pretrain_tiny.main([a for a in common if not a.startswith("--steps")] + ["--steps=5"])
