"""evaluate_model on the embedded tiny model: the general-text loss is next-token cross-entropy
computed by hand on the same rows, task metrics come with their generations, and everything is
written into `out_dir` even when that directory does not exist yet (a training run that never
evaluated has no `eval/`)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

from desmoe_jax import data as data_lib
from desmoe_jax import evaluate
from desmoe_jax.run_config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_model_hand_loss_and_outputs_in_a_new_directory(tmp_path):
  config = load_config(os.path.join(REPO, "configs", "six_domains.py:tiny"), {
      "data.batch_size": 2, "data.general_mc": "",
      "eval.loss_batches": 1, "eval.general_batches": 2, "eval.max_examples": 2,
      "eval.max_new_tokens": 4})
  config.data.domains = [d for d in config.data.domains if d.name == "intent"]
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

  intent = results["intent"]
  assert np.isfinite(intent["loss"]) and intent["generated"] == 2
  assert 0.0 <= intent["json_exact_match"] <= 1.0
  assert json.load(open(out_dir / "results.json"))["intent"]["generated"] == 2
  lines = (out_dir / "generations_intent.jsonl").read_text().splitlines()
  assert len(lines) == 2 and {"prompt", "answers", "generation"} <= set(json.loads(lines[0]))
