"""evaluate_model on the embedded tiny model: the general-text loss is next-token cross-entropy
computed by hand on the same rows, task metrics come with their generations, and everything is
written into `out_dir` even when that directory does not exist yet (a training run that never
evaluated has no `eval/`)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from desmoe_jax import data as data_lib
from desmoe_jax import evaluate
from desmoe_jax.errors import ConfigError
from desmoe_jax.run_config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_model_hand_loss_and_outputs_in_a_new_directory(tmp_path):
  config = load_config(os.path.join(REPO, "configs", "six_domains.py:tiny"), {
      "data.batch_size": 2, "data.general_mc": "",
      "eval.loss_batches": 1, "eval.general_batches": 2, "eval.max_examples": 2,
      "eval.max_new_tokens": 4})
  config.data.domains = [d for d in config.data.domains if d.name == "intent"]
  # Per genre: one genre whose one document is the general text itself, so its loss is the
  # general loss.
  genres = tmp_path / "genres.jsonl"
  genres.write_text(json.dumps({"genre": "plays", "text": open(config.data.general).read()}))
  config.data.general_genres, config.eval.genre_batches = str(genres), 2
  tokenizer = AutoTokenizer.from_pretrained(config.model.path)
  model = evaluate.load_model(config.model.path, config)
  out_dir = tmp_path / "run" / "eval"                    # neither directory exists

  results = evaluate.evaluate_model(model, tokenizer, config, out_dir=str(out_dir))

  batches = data_lib.text_loss_batches(config.data.general, tokenizer,
                                       seq_len=config.data.seq_len, batch_size=2, max_batches=2)
  total, count = 0.0, 0.0
  for b in batches:                                      # whole rows: no segments, no positions
    logits = model(jnp.asarray(b["tokens"])).logits      # [batch, seq, vocab]
    logp = np.asarray(jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1))
    nll = -np.take_along_axis(logp, b["tokens"][:, 1:, None], axis=-1)[..., 0]
    total += float((nll * b["loss_mask"][:, 1:]).sum())
    count += float(b["loss_mask"][:, 1:].sum())
  np.testing.assert_allclose(results["general"]["loss"], total / count, rtol=1e-5)
  assert results["general"]["loss_per_genre"] == {"plays": results["general"]["loss"]}

  intent = results["intent"]
  assert np.isfinite(intent["loss"]) and intent["generated"] == 2
  assert 0.0 <= intent["json_exact_match"] <= 1.0
  assert json.load(open(out_dir / "results.json"))["intent"]["generated"] == 2
  lines = (out_dir / "generations_intent.jsonl").read_text().splitlines()
  assert len(lines) == 2 and {"prompt", "answers", "generation"} <= set(json.loads(lines[0]))


def test_code_pass_at_1_is_opt_in_and_never_a_zero(tmp_path, monkeypatch, sandbox_isolates):
  """Without eval.allow_code_execution the code domain reports pass@1 as not run (null, with the
  flag named), not 0; with it, the programs run isolated; a machine that cannot isolate refuses
  before any model work, naming the override."""
  from desmoe_jax import metrics, sandbox
  config = load_config(os.path.join(REPO, "configs", "six_domains.py:tiny"), {
      "data.batch_size": 2, "data.general_mc": "", "data.general": "",
      "eval.loss_batches": 1, "eval.max_examples": 2, "eval.max_new_tokens": 4})
  config.data.domains = [d for d in config.data.domains if d.name == "code"]
  tokenizer = AutoTokenizer.from_pretrained(config.model.path)
  model = evaluate.load_model(config.model.path, config)

  results = evaluate.evaluate_model(model, tokenizer, config, out_dir=str(tmp_path / "off"))
  code = json.load(open(tmp_path / "off" / "results.json"))["code"]
  assert code["pass@1"] is None and "eval.allow_code_execution=False" in code["pass@1_not_run"]
  assert np.isfinite(code["loss"])
  assert "pass@1 not run (eval.allow_code_execution=False)" in metrics.format_results(results)

  config.eval.allow_code_execution = True
  if sandbox_isolates:  # False only where the machine cannot isolate (conftest.py)
    code = evaluate.evaluate_model(model, tokenizer, config)["code"]
    assert 0.0 <= code["pass@1"] <= 1.0 and code["pass@1_isolated"] and code["generated"] == 2

  monkeypatch.setattr(sandbox, "_backends", lambda: [])
  sandbox.isolation_status.cache_clear()
  monkeypatch.setattr(evaluate.heldout, "heldout_losses", None)  # must not get that far
  try:
    # A ConfigError (train.py / eval.py: one line, exit 2), since a setting overrides it.
    with pytest.raises(ConfigError, match="allow_unisolated_code_execution"):
      evaluate.evaluate_model(model, tokenizer, config)
  finally:
    sandbox.isolation_status.cache_clear()
